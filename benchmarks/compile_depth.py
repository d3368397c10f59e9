"""Compile time of the train step against depth, scanned layers (`scan_layers=True`) and unrolled, side by side.

    python -m benchmarks.compile_depth [--config configs/mixtral.py:tiny] [--depths 4,16,64] [--json PATH]

For each depth (`num_layers`) and layout: the seconds to lower (trace) and to compile the jitted train step
(forward, backward, AdamW, bias rules) of the config's model and batch, from abstract shapes (no parameter
is allocated; building the abstract state is not timed). Prints, per layout, the ratio of the deepest
model's lower+compile time to the shallowest's: an unrolled step traces and compiles every layer (growing
about linearly with depth, or worse), a scanned one compiles one period (`moe_every` layers) whatever the
depth. Each (depth, layout) is compiled once, in turn, in one process: the ratios carry over between
machines better than the seconds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import cli
from moe_jax.train.run_config import build_run_config, load_config_file
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_run(spec: str):
    """The run config of `path[:arg]` (e.g. configs/mixtral.py:tiny)."""
    path, _, arg = spec.partition(":")
    return build_run_config(load_config_file(path, arg or None))


def lowered_train_step(run, model_cfg):
    """(the lowered train step of `model_cfg` on `run`'s batch, lower seconds); nothing allocated."""
    tx = make_optimizer(run.train)
    graphdef, state = nnx.eval_shape(lambda: init_state(Transformer(model_cfg, rngs=nnx.Rngs(params=0)), tx))
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train), microbatches=run.train.microbatches)
    batch = jax.ShapeDtypeStruct((run.data.batch_size, run.data.seq_len + 1), jnp.int32)
    key = jax.eval_shape(lambda: jax.random.PRNGKey(0))
    t0 = time.perf_counter()
    lowered = step.lower(state, batch, key)
    return lowered, time.perf_counter() - t0


def compile_times(run, model_cfg) -> dict:
    lowered, lower_s = lowered_train_step(run, model_cfg)
    t0 = time.perf_counter()
    lowered.compile()
    compile_s = time.perf_counter() - t0
    return {"lower_s": lower_s, "compile_s": compile_s, "total_s": lower_s + compile_s}


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "mixtral.py") + ":tiny")
    parser.add_argument("--depths", default="4,16,64", help="comma-separated num_layers values")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    depths = [int(d) for d in args.depths.split(",")]
    run = load_run(args.config)

    rows = {}
    for depth in depths:
        for scanned in (False, True):
            cfg = dataclasses.replace(run.model, num_layers=depth, scan_layers=scanned)
            name = f"{'scanned' if scanned else 'unrolled'}_L{depth}"
            rows[name] = compile_times(run, cfg)
            print(f"  {name:14s} lower {rows[name]['lower_s']:7.2f} s  compile {rows[name]['compile_s']:7.2f} s",
                  flush=True)
    lo, hi = min(depths), max(depths)
    ratios = {layout: rows[f"{layout}_L{hi}"]["total_s"] / rows[f"{layout}_L{lo}"]["total_s"]
              for layout in ("unrolled", "scanned")}
    scanned_over_unrolled = {str(d): rows[f"scanned_L{d}"]["total_s"] / rows[f"unrolled_L{d}"]["total_s"]
                             for d in depths}
    out = {"config": os.path.relpath(args.config, ROOT) if os.path.isabs(args.config) else args.config,
           "depths": depths, "batch": run.data.batch_size, "seq_len": run.data.seq_len,
           "layer_period": run.model.layer_period, "device": str(jax.devices()[0]), "rows": rows,
           f"L{hi}_over_L{lo}": ratios, "scanned_over_unrolled": scanned_over_unrolled}
    print(f"train step lower+compile time, {run.name}, depth {hi} / depth {lo}:")
    for layout, ratio in ratios.items():
        print(f"  {layout:10s} {ratio:8.2f}")
    print("  scanned / unrolled per depth: " + ", ".join(f"L{d} {r:.2f}" for d, r in scanned_over_unrolled.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
