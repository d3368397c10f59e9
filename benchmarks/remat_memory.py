"""Per-device memory of one compiled train step for each rematerialisation policy, scanned and unrolled.

    python -m benchmarks.remat_memory [--config configs/mixtral.py:tiny] [--num_layers N] [--json PATH]

For `ModelConfig.remat` in none, full, save_dots, offload and `scan_layers` False / True: XLA's
`compiled.memory_analysis()` of the jitted train step (compiled from abstract shapes, never run): its
temporary buffers (`temp_size_in_bytes`: the activations kept for the backward pass and the scratch of
every op; parameters, optimizer state and batch are arguments, not temporaries) and the host memory it
uses (`host_temp_size_in_bytes`, where offloaded activations go). Printed as ratios to the unrolled
step without remat. Compilation is deterministic, so a loaded machine changes the time this takes, not
the figures. On a CPU 'offload' moves the saved activations to the `pinned_host` memory space, which is
the same RAM: whether XLA:CPU counts them as host temporaries is what this reports.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax

from benchmarks.compile_depth import ROOT, load_run, lowered_train_step
from moe_jax import cli
from moe_jax.model_config import REMATS

FIELDS = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
          "host_temp_size_in_bytes")


def memory(run, model_cfg) -> dict:
    lowered, _ = lowered_train_step(run, model_cfg)
    analysis = lowered.compile().memory_analysis()
    return {name: int(getattr(analysis, name, 0) or 0) for name in FIELDS}


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "mixtral.py") + ":tiny")
    parser.add_argument("--num_layers", type=int, default=None, help="override the config's depth")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    run = load_run(args.config)
    base_cfg = run.model if args.num_layers is None else dataclasses.replace(run.model, num_layers=args.num_layers)

    rows = {}
    for scanned in (False, True):
        for remat in REMATS:
            name = f"{'scanned' if scanned else 'unrolled'}_{remat}"
            rows[name] = memory(run, dataclasses.replace(base_cfg, scan_layers=scanned, remat=remat))
            print(f"  {name:18s} temp {rows[name]['temp_size_in_bytes'] / 2**20:9.2f} MiB   host temp "
                  f"{rows[name]['host_temp_size_in_bytes'] / 2**20:9.2f} MiB", flush=True)
    ref = rows["unrolled_none"]["temp_size_in_bytes"]
    temp_ratio = {name: row["temp_size_in_bytes"] / ref for name, row in rows.items()}
    out = {"config": os.path.relpath(args.config, ROOT) if os.path.isabs(args.config) else args.config,
           "num_layers": base_cfg.num_layers, "batch": run.data.batch_size, "seq_len": run.data.seq_len,
           "device": str(jax.devices()[0]), "rows": rows, "temp_over_unrolled_none": temp_ratio}
    print(f"train step temporaries / unrolled without remat, {run.name}, {base_cfg.num_layers} layers, batch "
          f"{run.data.batch_size} x {run.data.seq_len}:")
    for name, ratio in temp_ratio.items():
        print(f"  {name:18s} {ratio:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
