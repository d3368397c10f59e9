"""Test-wide setup: 8 simulated CPU devices (set before JAX starts) and shared helpers."""
import os

os.environ.setdefault("XLA_FLAGS", "")
if "--xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
# Tests are dominated by XLA compile time of small programs: skipping LLVM's backend optimisation cuts
# the suite's CPU time by about 40% and changes no test outcome (numerics are the same HLO). Benchmarks
# never run with it. MOE_JAX_TEST_XLA_OPT=1 keeps the default optimisation.
if os.environ.get("MOE_JAX_TEST_XLA_OPT") != "1" and "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402  (after XLA_FLAGS on purpose)
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


@pytest.fixture(scope="session")
def eight_devices():
    """The 8 simulated CPU devices; fails (never skips) if they are missing."""
    devices = jax.devices()
    assert len(devices) == 8, f"expected 8 CPU devices from XLA_FLAGS, got {len(devices)}"
    return devices
