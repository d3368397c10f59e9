"""How long a checkpoint save stalls training: synchronous vs asynchronous saves, side by side in one run.

    python -m benchmarks.checkpoint_stall [--config configs/default.py] [--steps 40] [--every 5] [--json PATH]

Trains the config's model (random tokens, so no data is read) and saves the state every `--every` steps,
alternating a synchronous save and an asynchronous one (moe_jax.train.checkpoint.Checkpoints: a copy of the
state on its devices, written by orbax in a background thread). Every step is timed to completion. The
blocking time of a save is how long the save call holds the training loop; its stall is the time of the
`--every` steps after it (the blocking part plus any slowdown from the background write sharing the CPU)
minus as many median steps. Both are printed in steps and as the ratio async / sync; the stall is noisy on
a shared machine (a window of steps varies by more than a save costs), the blocking time is not. The first
save of each kind (orbax's set-up) is reported but not averaged.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax import cli
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.run_config import build_run_config, load_config_file, model_record
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--config", default=os.path.join(root, "configs", "default.py"))
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--every", type=int, default=5, help="steps between saves")
    parser.add_argument("--quick", action="store_true", help="a small model (smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if args.every < 1 or args.steps < 2 * args.every:
        parser.error(f"--steps={args.steps} must hold at least two saves every --every={args.every} steps")

    config = load_config_file(args.config)
    if args.quick:
        config.model.num_layers, config.data.seq_len, config.data.batch_size = 1, 32, 2
    run = build_run_config(config)
    B, L = run.data.batch_size, run.data.seq_len
    tx = make_optimizer(run.train)
    graphdef, state = init_state(Transformer(run.model, rngs=nnx.Rngs(params=0)), tx)
    step_fn = make_train_step(graphdef, tx, learning_rate_schedule(run.train))
    key = jax.random.PRNGKey(0)
    batch = jax.random.randint(jax.random.PRNGKey(3), (B, L + 1), 0, run.model.vocab_size, jnp.int32)
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(state))
    meta = {"model": model_record(run.model)}

    with tempfile.TemporaryDirectory() as tmp:
        ckpts = {"sync": Checkpoints(os.path.join(tmp, "sync"), keep=2, async_save=False, log=lambda *_: None),
                 "async": Checkpoints(os.path.join(tmp, "async"), keep=2, async_save=True, log=lambda *_: None)}
        for _ in range(2):  # compile and warm up
            state, metrics = step_fn(state, batch, key)
        jax.block_until_ready(state)
        step_s, saved_after, save_call_s = [], {}, {}
        t_prev = time.perf_counter()
        for i in range(1, args.steps + 1):
            state, metrics = step_fn(state, batch, key)
            jax.block_until_ready(metrics["loss"])
            if i % args.every == 0:
                mode = ("sync", "async")[(i // args.every - 1) % 2]
                t0 = time.perf_counter()
                ckpts[mode].save(i, state, meta)
                save_call_s[i] = time.perf_counter() - t0
                saved_after[i] = mode
            now = time.perf_counter()
            step_s.append(now - t_prev)  # step i, and the save after it
            t_prev = now
        for c in ckpts.values():
            c.close()

    median = statistics.median(step_s)
    stalls = {"sync": [], "async": []}
    blocking = {"sync": [], "async": []}
    rows = []
    for i, mode in saved_after.items():
        window = step_s[i - 1:i - 1 + args.every]  # the step that saved, and the every-1 after it
        stall = sum(window) - len(window) * median
        first = not any(m == mode for j, m in saved_after.items() if j < i)
        rows.append({"step": i, "mode": mode, "stall_s": stall, "save_call_s": save_call_s[i], "first": first,
                     "steps_after": len(window)})
        if not first:
            blocking[mode].append(save_call_s[i])
            if len(window) == args.every:
                stalls[mode].append(stall)
    mean = {m: statistics.mean(v) if v else None for m, v in stalls.items()}
    block = {m: statistics.mean(v) if v else None for m, v in blocking.items()}
    out = {"config": args.config, "steps": args.steps, "every": args.every, "state_mb": state_bytes / 2**20,
           "median_step_s": median, "saves": rows,
           "sync_stall_steps": None if mean["sync"] is None else mean["sync"] / median,
           "async_stall_steps": None if mean["async"] is None else mean["async"] / median}
    for m in ("sync", "async"):
        out[f"{m}_blocking_steps"] = None if block[m] is None else block[m] / median
    if block["sync"] and block["async"] is not None:
        out["blocking_async_over_sync"] = block["async"] / block["sync"]
    if mean["sync"] and mean["async"] is not None:
        out["stall_async_over_sync"] = mean["async"] / mean["sync"]
    print(f"checkpoint stall, {run.name}: batch {B} x {L}, state {out['state_mb']:.0f} MB, "
          f"{args.steps} steps, a save every {args.every} (alternating sync / async)")
    for r in rows:
        print(f"  step {r['step']:4d} {r['mode']:5s}: save call {r['save_call_s'] / median:6.2f} steps, "
              f"stall over {r['steps_after']} steps {r['stall_s'] / median:6.2f} steps"
              + ("   (first of its kind: not averaged)" if r["first"] else ""))
    for m in ("sync", "async"):
        if out[f"{m}_blocking_steps"] is not None:
            print(f"  mean {m:5s} save call (blocking)  {out[f'{m}_blocking_steps']:6.2f} steps")
        if out[f"{m}_stall_steps"] is not None:
            print(f"  mean {m:5s} stall                 {out[f'{m}_stall_steps']:6.2f} steps")
    if "blocking_async_over_sync" in out:
        print(f"  async / sync save call            {out['blocking_async_over_sync']:6.2f}")
    if "stall_async_over_sync" in out:
        print(f"  async / sync stall                {out['stall_async_over_sync']:6.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
