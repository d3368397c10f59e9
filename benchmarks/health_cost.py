"""What the routing ledger, the health alarms and the routing pictures cost a training run, as a fraction of its
train-step time, measured side by side in one run (configs/default.py unless --config).

    python -m benchmarks.health_cost [--config configs/default.py] [--json PATH] [--quick]

The train step is the same with health on or off (the alarms read the metrics the step already returns), so the
cost is the loop's extra work, timed interleaved with the train step (median over rounds):
  at_train   the training-window alarms at one log step (train.log_every steps of metrics joined and checked);
  at_eval    at one evaluation: the ledger's forward pass on `health.ledger_batches` batches, writing its .npz,
             the saturation against the previous ledger and the evaluation alarms;
  picture    redrawing routing.png and its TensorBoard image at one evaluation.
The run's overhead = (log steps x at_train + evaluations x (at_eval + picture)) / (steps x train step), with the
config's steps, log_every and eval_every (target <= 2 %). Printed beside it: the ledger's bytes per evaluation
and the one-off cost of compiling the ledger's forward pass (the first call), in train steps.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time

import jax
import numpy as np
from flax import nnx

from benchmarks.timing import time_interleaved
from moe_jax import cli
from moe_jax.data import make_lm_data
from moe_jax.train.health import RoutingWatch
from moe_jax.train.loop import _mean_metrics, evaluate
from moe_jax.train.metrics import MetricWriter
from moe_jax.train.run_config import build_run_config, load_config_file
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_eval_step, make_train_step
from moe_jax.transformer import Transformer


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--config", default=os.path.join(root, "configs", "default.py"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="a smaller model and few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)

    config = load_config_file(args.config)
    if args.quick:
        config.model.num_layers, config.data.seq_len, config.data.batch_size = 2, 32, 2
        config.train.eval_batches = 1
    run = build_run_config(config)
    tcfg, hcfg = run.train, run.health
    if not hcfg.ledger_batches or not hcfg.alarms:
        parser.error(f"{args.config}: the health section turns the ledger or the alarms off; nothing to measure.")
    data = make_lm_data(run.data)
    tx = make_optimizer(tcfg)
    graphdef, state = init_state(Transformer(run.model, rngs=nnx.Rngs(params=tcfg.seed)), tx)
    train_step = make_train_step(graphdef, tx, learning_rate_schedule(tcfg))
    eval_step = make_eval_step(graphdef)
    key = jax.random.PRNGKey(0)
    holder = {"state": state, "step": 0, "rows": []}

    def one_step():
        holder["state"], metrics = train_step(holder["state"], data.train_batch(holder["step"]), key)
        holder["step"] += 1
        holder["rows"] = (holder["rows"] + [metrics])[-tcfg.log_every:]
        jax.block_until_ready(metrics["loss"])

    with tempfile.TemporaryDirectory() as workdir:
        writer = MetricWriter(workdir)
        # alarms checked from the first log step on, so that every at_train call does the full check
        watch = RoutingWatch(dataclasses.replace(hcfg, train_start_step=0, train_window=tcfg.log_every),
                             run.model, graphdef, workdir, log=lambda *_: None)
        for _ in range(tcfg.log_every):
            one_step()
        eval_metrics = evaluate(eval_step, holder["state"], data, tcfg.eval_batches)
        writer.write(holder["step"], "train", _mean_metrics(holder["rows"]))  # the loop's log-step row
        writer.write(holder["step"], "eval", eval_metrics)

        t0 = time.perf_counter()
        watch.at_eval(holder["step"], holder["state"], data, dict(eval_metrics))  # compiles the ledger's pass
        first_eval = time.perf_counter() - t0

        def at_train():
            rows = jax.device_get(holder["rows"])
            watch.at_train(holder["step"], rows)

        def at_eval():
            watch.at_eval(holder["step"], holder["state"], data, dict(eval_metrics))

        def picture():
            watch.picture(writer, holder["step"], title=run.name)

        candidates = {"step": one_step, "at_train": at_train, "at_eval": at_eval, "picture": picture}
        rounds = args.rounds or (3 if args.quick else 11)
        timings = time_interleaved(candidates, rounds, warmup=1)
        t = {name: timings.median(name) for name in candidates}
        ledger_bytes = watch.ledger_bytes[-1]
        writer.close()

    log_steps = math.ceil(tcfg.steps / tcfg.log_every)
    evals = math.ceil(tcfg.steps / tcfg.eval_every) if tcfg.eval_batches else 0
    steps_s = tcfg.steps * t["step"]
    parts = {"at_train": log_steps * t["at_train"], "at_eval": evals * t["at_eval"], "picture": evals * t["picture"]}
    out = {
        "config": os.path.relpath(os.path.abspath(args.config), root),  # repository-relative: no machine path
        "rounds": rounds, "device": str(jax.devices()[0]),
        "batch": run.data.batch_size, "seq_len": run.data.seq_len, "steps": tcfg.steps,
        "log_every": tcfg.log_every, "eval_every": tcfg.eval_every, "ledger_batches": hcfg.ledger_batches,
        "seconds": t, "cpu_seconds": {name: float(np.median(v)) for name, v in timings.cpu.items()},
        "overhead_fraction": {name: v / steps_s for name, v in parts.items()},
        "overhead_total_fraction": sum(parts.values()) / steps_s,
        "ledger_first_call_in_steps": first_eval / t["step"],
        "ledger_bytes_per_eval": ledger_bytes,
    }
    print(f"routing health cost, {run.name}: {tcfg.steps} steps of {run.data.batch_size} x {run.data.seq_len}, "
          f"log every {tcfg.log_every}, evaluate every {tcfg.eval_every}; {rounds} interleaved rounds")
    for name, v in out["overhead_fraction"].items():
        print(f"  {name:<10} {t[name] / t['step']:8.3f} train steps per call   {100 * v:6.2f} % of the run's steps")
    print(f"  total overhead                                {100 * out['overhead_total_fraction']:6.2f} %   "
          "(target <= 2 %)")
    print(f"  ledger: {ledger_bytes:,} bytes per evaluation; first call (compiles its pass) "
          f"{out['ledger_first_call_in_steps']:.1f} train steps, once per run")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
