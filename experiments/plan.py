r"""Will a preset's train step fit a device's memory on a mesh? Per-device bytes, compiled and counted.

    python -m experiments.plan --config=configs/deepseek_v3.py:full --mesh=fsdp=4,expert=16,model=4 \
        --remat=none,full,save_dots --device_memory_gib=95
    python -m experiments.plan --config=configs/mixtral.py:tiny --mesh=fsdp=2,expert=2,model=2 --batch=8

For each remat policy it prints, per device: the parameters, AdamW's state and other variables (analytic: shapes
and the sharding rules, beside the compiled step's argument bytes), the activations + gradients + scratch (the
compiled step's temporaries), the peak, and the largest all-to-all buffers; then whether the peak fits
--device_memory_gib (95: TPU v5p; 80: H100; 141: H200) and, when none of the asked policies fits on --mesh, the
first of a few other factorizations of the same device count (fsdp x expert x model, fewest state bytes first)
and policy that fits, or that none does.

The process simulates the mesh's devices on the CPU (--xla_force_host_platform_device_count, set before JAX
starts) and compiles the real train step (moe_jax/train/step.py, as experiments.train builds it on a mesh) on
abstract inputs: nothing of full size is allocated. Deep presets are compiled at the dense prefix + 2 and + 3
periods of their MoE pattern and extrapolated linearly in depth, checked at + 4 periods (moe_jax/train/plan.py);
the output says so. Compile time grows with the device count and the width: minutes for a 256-device DeepSeek-V3.
A bad flag (mesh string, a mesh over 4096 devices, a mesh the model or batch does not divide) fails before
anything is compiled, on one line naming the flag, with exit code 2.
"""
from __future__ import annotations

import argparse
import ast
import math
import os
import re
import sys

from moe_jax import cli

REMATS = ("none", "full", "save_dots", "offload")


def parse_args(argv=None):
    parser = cli.ArgumentParser(prog="experiments.plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config file, optionally :arg (configs/deepseek_v3.py:full)")
    parser.add_argument("--mesh", required=True, help="axis=size,... over data, fsdp, expert, model")
    parser.add_argument("--remat", default=None, help="comma-separated policies of none, full, save_dots, offload "
                                                      "(default: the config's)")
    parser.add_argument("--batch", type=int, default=None, help="global batch in sequences (default: the config's)")
    parser.add_argument("--seq_len", type=int, default=None, help="tokens per sequence (default: the config's)")
    parser.add_argument("--scan_layers", choices=("config", "true", "false"), default="config",
                        help="compile the layers scanned or unrolled (default: the config's)")
    parser.add_argument("--dropless_buffer_factor", type=float, default=None,
                        help="config.mesh.dropless_buffer_factor for the padded dropless exchange (XLA:CPU cannot "
                             "compile the ragged one); default: the config's (None: worst-case buffers)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.FIELD=VALUE",
                        help="override a config field, e.g. --set model.capacity_factor=1.25 (repeatable)")
    parser.add_argument("--device_memory_gib", type=float, default=None, help="memory of one device, GiB")
    parser.add_argument("--candidates", type=int, default=3,
                        help="other meshes to try when nothing fits on --mesh (0: none)")
    parser.add_argument("--no_check", action="store_true", help="skip the third depth that checks the extrapolation")
    return parser.parse_args(argv)


def load_run(args):
    """The RunConfig of --config with --batch, --seq_len, --scan_layers applied; ValueError naming the flag."""
    import dataclasses

    from moe_jax.train.run_config import build_run_config, load_config_file, to_dict

    path, _, arg = args.config.partition(":")
    if not os.path.isfile(path):
        raise ValueError(f"--config={args.config}: no such config file {os.path.abspath(path)!r}; give a path such "
                         "as configs/deepseek_v3.py:full (relative to the current directory).")
    config = to_dict(load_config_file(path, arg or None))
    for flag, field in (("batch", "batch_size"), ("seq_len", "seq_len")):
        value = getattr(args, flag)
        if value is not None:
            if value < 1:
                raise ValueError(f"--{flag}={value}: must be an int >= 1.")
            config["data"][field] = value
    for item in args.set:
        key, eq, text = item.partition("=")
        section, _, field = key.partition(".")
        if not eq or not field or section not in config or not isinstance(config[section], dict):
            raise ValueError(f"--set={item}: write SECTION.FIELD=VALUE with a section of {sorted(config)}, "
                             "e.g. --set model.capacity_factor=1.25.")
        if field not in config[section]:
            raise ValueError(f"--set={item}: {section}.{field} is not a field of the config; see "
                             f"python -m experiments.train --config={args.config} --print_config.")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text  # a bare string such as remat=full
        config[section][field] = value
    if args.dropless_buffer_factor is not None:
        config.setdefault("mesh", {})["dropless_buffer_factor"] = args.dropless_buffer_factor
    run = build_run_config(config)
    if args.scan_layers != "config":
        run = dataclasses.replace(run, model=dataclasses.replace(run.model, scan_layers=args.scan_layers == "true"))
    return run


def parse_remats(text, default: str) -> list[str]:
    remats = [r.strip() for r in (text or default).split(",") if r.strip()]
    bad = [r for r in remats if r not in REMATS]
    if bad or not remats:
        raise ValueError(f"--remat={text}: {bad or 'nothing'} is not a policy; give a comma-separated list of {REMATS}.")
    return remats


def simulate_devices(n: int) -> None:
    """XLA_FLAGS for `n` CPU devices (before JAX's backend starts); LLVM's backend optimisation off, which
    changes compile time, not the buffer assignment that memory_analysis reports."""
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
    flags += f" --xla_force_host_platform_device_count={n}"
    if "--xla_backend_optimization_level" not in flags:
        flags += " --xla_backend_optimization_level=0"
    os.environ["XLA_FLAGS"] = flags.strip()
    os.environ["JAX_PLATFORMS"] = "cpu"


def main(argv=None) -> int:
    args = parse_args(argv)
    from moe_jax.train import plan as plan_lib

    sizes = plan_lib.parse_mesh(args.mesh)
    if args.device_memory_gib is not None and not args.device_memory_gib > 0:
        raise ValueError(f"--device_memory_gib={args.device_memory_gib}: must be > 0 (e.g. 95 for TPU v5p, 80 for H100).")
    if args.candidates < 0:
        raise ValueError(f"--candidates={args.candidates}: must be >= 0.")
    n = math.prod(sizes.values())
    simulate_devices(n)
    run = load_run(args)
    remats = parse_remats(args.remat, run.model.remat)
    plan_lib.check_mesh(run, sizes)

    import jax

    if jax.device_count() < n:
        raise ValueError(f"--mesh={args.mesh}: {n} devices, but JAX started with {jax.device_count()} before the "
                         "planner could set XLA_FLAGS; run it as its own process (python -m experiments.plan).")
    budget = None if args.device_memory_gib is None else args.device_memory_gib * plan_lib.GIB
    cfg = run.model
    print(f"{run.name}: {cfg.num_layers} layers, batch {run.data.batch_size} x {run.data.seq_len} tokens, "
          f"{n} simulated devices, scan_layers={cfg.scan_layers}")

    def log(msg):
        print(msg, flush=True)

    results = []
    for remat in remats:
        p = plan_lib.extrapolated_memory(plan_lib.with_model(run, remat=remat), sizes, check=not args.no_check,
                                         log=log)
        results.append(p)
        print(plan_lib.format_plan(p, budget), flush=True)
    if budget is None:
        return 0
    fitting = [p for p in results if plan_lib.fits(p, budget)]
    if fitting:
        best = fitting[0]
        print(f"fits: mesh {plan_lib.mesh_name(sizes)} with remat={best.remat} "
              f"({best.predicted.peak / plan_lib.GIB:.3g} of {args.device_memory_gib:g} GiB per device)")
        return 0
    print(f"no asked policy fits {args.device_memory_gib:g} GiB per device on {plan_lib.mesh_name(sizes)}; "
          f"trying up to {args.candidates} other meshes of {n} devices")
    others = [s for s in plan_lib.candidate_meshes(run, n, limit=args.candidates + 1) if s != sizes]
    for other in others[:args.candidates]:
        for remat in [r for r in ("none", "save_dots", "full") if r in remats] or remats:
            p = plan_lib.extrapolated_memory(plan_lib.with_model(run, remat=remat), other, check=False, log=log)
            verdict = "fits" if plan_lib.fits(p, budget) else "does not fit"
            print(f"  {plan_lib.mesh_name(other)} remat={remat}: peak {p.predicted.peak / plan_lib.GIB:.1f} GiB, {verdict}")
            if plan_lib.fits(p, budget):
                print(f"suggested: --mesh={plan_lib.mesh_name(other)} --remat={remat}")
                return 0
    print(f"none fits: no tried mesh of {n} devices and remat policy fits {args.device_memory_gib:g} GiB per device; "
          "use more devices, a smaller batch (--batch) or microbatches (config.train.microbatches).")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
