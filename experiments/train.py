r"""Train an MoE language model from an ml_collections config.

    python -m experiments.train --config=configs/default.py --workdir=/tmp/moe_default
    python -m experiments.train --config=configs/mixtral.py:tiny --config.model.num_experts=16 --workdir=...
    python -m experiments.train --config=configs/default.py --print_config   # the fields, then exit
    python -m experiments.train --config=configs/default.py --config.mesh.expert=8 --workdir=...  # 8 devices
    MOE_JAX_PROCESS_ID=<i> python -m experiments.train ... --config.mesh.num_processes=2 \
        --config.mesh.coordinator_address=<host0>:<port>           # the same command on every host

Any field can be overridden with --config.<section>.<field>=value (sections: model, data, train, mesh, health;
run with --print_config to list them). The config is validated into typed dataclasses before anything is
built: a bad field fails with its name and the fix, on one line (exit code 2; --debug or MOE_JAX_DEBUG=1
shows the traceback). Re-running on the same workdir resumes from the latest checkpoint. On SIGTERM the run
finishes its step, writes a checkpoint and exits with code 75 (moe_jax.cli.PREEMPTED): run it again to resume.
"""
from __future__ import annotations

import os
import sys

from absl import flags
from ml_collections import config_flags

from moe_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "Path to a config file, optionally :arg.",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and plots (resumed if it exists).")
_PRINT = flags.DEFINE_bool("print_config", False, "Print the resolved config and the derived values, then exit.")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax and TFDS log every save/read at INFO
    from moe_jax.train.run_config import build_run_config

    run = build_run_config(_CONFIG.value, on_this_machine=not _PRINT.value)
    if _PRINT.value:
        from moe_jax.params import count_params

        print(_CONFIG.value)
        counts = count_params(run.model)
        print("derived:", {k: f"{v:,}" for k, v in counts.items()})
        if run.model.moe is not None:
            print("derived: " + ", ".join(f"{name} {value}" for name, value in run.moe_derived().items()))
        return
    if not _WORKDIR.value:
        cli.fail("--workdir is required (an empty or existing directory; an existing run there is resumed).")
    from moe_jax.train.loop import train

    summary = train(run, _WORKDIR.value)
    if summary.get("preempted"):
        sys.exit(cli.PREEMPTED)
    if summary.get("stopped"):
        sys.exit(cli.STOPPED)


def parse_flags(argv):
    """One-line errors, and a config file that does not exist named before ml_collections tries to load it."""
    for i, arg in enumerate(argv[1:], 1):
        value = arg[len("--config="):] if arg.startswith("--config=") else (
            argv[i + 1] if arg == "--config" and i + 1 < len(argv) else None)
        if value is not None:
            path = value.split(":", 1)[0]
            if not os.path.isfile(path):
                cli.fail(f"--config={value}: no such config file {os.path.abspath(path)!r}; give a path to a config "
                         "file such as configs/default.py (relative to the current directory).")
    return cli.parse_absl_flags(argv)


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run_absl(main, flags_parser=parse_flags)
