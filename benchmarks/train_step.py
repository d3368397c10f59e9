"""Train-step throughput of the default MoE preset (configs/default.py), as ratios measured side by side in one run.

    python -m benchmarks.train_step [--config configs/default.py] [--json PATH] [--quick]

Prints, all timed interleaved in the same process (median over rounds after a warm-up):
  tokens/s of the MoE model's full train step (forward, backward, AdamW update, bias rules);
  MFU-like ratio: the model's training FLOP/s (6 x active matmul parameters + attention, the same
      accounting as the training loop's `model_flops_per_s`) divided by the FLOP/s of a large dense
      float32 matmul measured in the same run (target >= 0.40 on the CPU);
  the step time divided by that of the same model with a dense SwiGLU FFN of equal active parameters
      (hidden k * expert width + shared width) in place of each MoE layer (target <= 1.15).

    python -m benchmarks.train_step --microbatches 4 [--json PATH] [--quick]

Gradient accumulation instead, with the balance loss over the whole batch (balance_loss_scope='batch'), the
case that needs a forward pass counting the batch's expert load before the accumulation pass: the step time
with M microbatches, with and without that pass (without: each microbatch's own load, the approximation
other codebases make), over the step time of the whole batch at once, timed interleaved.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import jax
import jax.numpy as jnp
from flax import nnx

from benchmarks.timing import time_interleaved
from moe_jax.flops import train_flops_per_token
from moe_jax import cli
from moe_jax.params import count_params
from moe_jax.train.run_config import build_run_config, load_config_file
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer


def dense_equivalent(model_cfg):
    moe = model_cfg.moe
    width = moe.top_k * moe.expert_d_ff + moe.shared_width
    return dataclasses.replace(model_cfg, moe=None, d_ff=width, activation=moe.activation)


def make_candidate(model_cfg, run, batch, microbatches=1, batch_load=None):
    tx = make_optimizer(run.train)
    graphdef, state = init_state(Transformer(model_cfg, rngs=nnx.Rngs(params=0)), tx)
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train), microbatches=microbatches,
                           batch_load=batch_load)
    key = jax.random.PRNGKey(0)
    holder = {"state": state}

    def run_once():
        holder["state"], metrics = step(holder["state"], batch, key)
        jax.block_until_ready(metrics["loss"])

    return run_once


def make_matmul(n: int):
    a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
    f = jax.jit(lambda a, b: a @ b)

    def run_once():
        jax.block_until_ready(f(a, b))

    return run_once, 2.0 * n**3


def main(argv=None):
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--config", default=os.path.join(root, "configs", "default.py"))
    parser.add_argument("--json", default=None)
    parser.add_argument("--quick", action="store_true", help="a smaller model and few rounds (smoke test)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--microbatches", type=int, default=1,
                        help="M > 1: time gradient accumulation over M microbatches instead (see above)")
    args = parser.parse_args(argv)

    config = load_config_file(args.config)
    if args.quick:
        config.model.num_layers, config.data.seq_len, config.data.batch_size = 2, 32, 2
    if args.microbatches > 1:
        return accumulation(args, config, root)
    run = build_run_config(config)
    B, L = run.data.batch_size, run.data.seq_len
    batch = jax.random.randint(jax.random.PRNGKey(3), (B, L + 1), 0, run.model.vocab_size, jnp.int32)
    dense_cfg = dense_equivalent(run.model)
    matmul, matmul_flops = make_matmul(512 if args.quick else 2048)
    candidates = {"moe": make_candidate(run.model, run, batch), "dense_equivalent": make_candidate(dense_cfg, run, batch),
                  "matmul": matmul}
    rounds = args.rounds or (3 if args.quick else 15)
    timings = time_interleaved(candidates, rounds, warmup=2)
    t = {name: timings.median(name) for name in candidates}

    counts = count_params(run.model)
    flops_per_step = train_flops_per_token(run.model, counts, L) * B * L
    tokens_per_s = B * L / t["moe"]
    matmul_flops_per_s = matmul_flops / t["matmul"]
    out = {
        "config": os.path.relpath(os.path.abspath(args.config), root),  # repository-relative: no machine path
        "batch": B, "seq_len": L, "rounds": rounds, "device": str(jax.devices()[0]),
        "d_model": run.model.d_model, "num_layers": run.model.num_layers, "num_experts": run.model.moe.num_experts,
        "params_total": counts["total"], "params_active_per_token": counts["active_per_token"],
        "dense_equivalent_params": count_params(dense_cfg)["total"],
        "moe_step_s": t["moe"], "dense_equivalent_step_s": t["dense_equivalent"], "matmul_s": t["matmul"],
        "tokens_per_s": tokens_per_s,
        "model_flops_per_s": flops_per_step / t["moe"],
        "matmul_flops_per_s": matmul_flops_per_s,
        "mfu_vs_matmul": flops_per_step / t["moe"] / matmul_flops_per_s,
        "moe_over_dense_equivalent": t["moe"] / t["dense_equivalent"],
    }
    print(f"train step, {run.name}: batch {B} x {L} tokens, {counts['total']/1e6:.2f}M params "
          f"({counts['active_per_token']/1e6:.2f}M active), {rounds} interleaved rounds")
    print(f"  tokens/s                                {tokens_per_s:12,.0f}")
    print(f"  model FLOP/s / dense matmul FLOP/s      {out['mfu_vs_matmul']:12.3f}   (target >= 0.40; "
          f"matmul {matmul_flops_per_s/1e9:.0f} GFLOP/s)")
    print(f"  step time / dense-equivalent model      {out['moe_over_dense_equivalent']:12.3f}   (target <= 1.15)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


def accumulation(args, config, root):
    M = args.microbatches
    config.model.balance_loss_scope = "batch"
    if args.quick:
        config.data.batch_size = 2 * M
    config.train.microbatches = M  # validated against the batch and the routing groups like a run's config
    run = build_run_config(config)
    B, L = run.data.batch_size, run.data.seq_len
    batch = jax.random.randint(jax.random.PRNGKey(3), (B, L + 1), 0, run.model.vocab_size, jnp.int32)
    candidates = {"whole_batch": make_candidate(run.model, run, batch),
                  "microbatches": make_candidate(run.model, run, batch, M),
                  "microbatches_without_load_pass": make_candidate(run.model, run, batch, M, batch_load=False)}
    rounds = args.rounds or (3 if args.quick else 7)
    timings = time_interleaved(candidates, rounds, warmup=2)
    t = {name: timings.median(name) for name in candidates}
    out = {
        "config": os.path.relpath(os.path.abspath(args.config), root),
        "batch": B, "seq_len": L, "microbatches": M, "balance_loss_scope": "batch", "rounds": rounds,
        "device": str(jax.devices()[0]), **{f"{name}_step_s": v for name, v in t.items()},
        "load_pass_overhead": t["microbatches"] / t["microbatches_without_load_pass"],
        "microbatches_over_whole_batch": t["microbatches"] / t["whole_batch"],
        "without_load_pass_over_whole_batch": t["microbatches_without_load_pass"] / t["whole_batch"],
    }
    print(f"gradient accumulation, {run.name}: batch {B} x {L} tokens in {M} microbatches, balance loss over the "
          f"whole batch, {rounds} interleaved rounds")
    print(f"  step time, load pass / without it (per-microbatch balance loss)  {out['load_pass_overhead']:8.3f}")
    print(f"  step time, {M} microbatches / whole batch at once                  "
          f"{out['microbatches_over_whole_batch']:8.3f}")
    print(f"  step time, {M} microbatches without the load pass / whole batch    "
          f"{out['without_load_pass_over_whole_batch']:8.3f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
