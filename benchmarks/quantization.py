"""Weight-only int8 / int4 routed experts on a trained tiny MoE LM: bytes saved and evaluation loss lost.

    python -m benchmarks.quantization [--workdir DIR] [--steps 300] [--eval_batches 16] [--json PATH]

Without --workdir it first trains the README's default tiny preset (`configs/default.py`, 8 experts
top-2 in every layer, Shakespeare bytes) for --steps steps into --train_dir (a few minutes on 2 CPU
cores); with --workdir it restores the latest checkpoint of a run written by `experiments.train`.
Then it evaluates the float32 model and its copies with int8 and int4 routed experts
(`moe_jax.quantization.quantize_experts`: per-(expert, output channel) scales; router, shared experts,
attention and embeddings stay float32) on the same --eval_batches held-out batches and prints, per
format: routed-expert weight bytes (int4 counted packed, two per byte; scales included) and their
ratio to float32, whole-model bytes, eval cross-entropy and its change, the share of positions
whose most likely next token is the float model's, the mean KL(float || quantized) of the next-token
distributions, and the eval forward time over float32's (timed interleaved in this process; on the
CPU dequantization is extra work, not a saving).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.timing import time_interleaved
from moe_jax import cli
from moe_jax import quantization as Q
from moe_jax.data import make_lm_data
from moe_jax.train.restore import load_run
from moe_jax.train.run_config import build_run_config, load_config_file


def load_config(path: str, overrides: dict):
    config = load_config_file(path)
    for dotted, value in overrides.items():
        section, field = dotted.split(".")
        config[section][field] = value
    return build_run_config(config)


def trained_workdir(args) -> str:
    if args.workdir:
        return args.workdir
    from moe_jax.train.loop import train

    overrides = {"train.steps": args.steps, "train.sample_tokens": 0, "train.progress": False,
                 "train.checkpoint_every": args.steps, "train.eval_every": args.steps,
                 "train.warmup_steps": min(50, args.steps // 10)}
    if args.quick:
        overrides.update({"model.d_model": 64, "model.num_layers": 2, "model.moe_d_ff": 128, "model.d_ff": 256,
                          "data.seq_len": 64})
    run = load_config(args.config, overrides)
    workdir = os.path.abspath(args.train_dir)
    print(f"training {run.name} for {args.steps} steps into {workdir} (an existing finished run there is reused)")
    t0 = time.perf_counter()
    train(run, workdir, log=lambda *_: None)
    print(f"trained in {time.perf_counter() - t0:.0f} s")
    return workdir


def make_forward(graphdef):
    @jax.jit
    def forward(state, batch_BL1):
        logits_BLV, _ = nnx.merge(graphdef, state)(batch_BL1[:, :-1], train=False)
        return jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)

    return forward


def evaluate(model, batches, reference_logp=None):
    """Mean CE over the batches; top-1 agreement and KL(reference || model) if reference log-probs are given."""
    graphdef, state = nnx.split(model)
    forward = make_forward(graphdef)
    ces, agree, kls, logps = [], [], [], []
    for i, batch in enumerate(batches):
        logp = forward(state, batch)
        ces.append(float(optax.softmax_cross_entropy_with_integer_labels(logp, batch[:, 1:]).mean()))
        logps.append(logp)
        if reference_logp is not None:
            ref = reference_logp[i]
            agree.append(float(jnp.mean(jnp.argmax(logp, -1) == jnp.argmax(ref, -1))))
            kls.append(float(jnp.mean(jnp.sum(jnp.exp(ref) * (ref - logp), axis=-1))))
    out = {"eval_ce": float(np.mean(ces))}
    if reference_logp is not None:
        out["top1_agreement"] = float(np.mean(agree))
        out["kl_from_float"] = float(np.mean(kls))
    return out, logps, lambda: jax.block_until_ready(forward(state, batches[0]))


def main():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", default=None, help="a trained run (experiments.train); default: train one")
    parser.add_argument("--config", default=os.path.join(root, "configs", "default.py"))
    parser.add_argument("--steps", type=int, default=300, help="training steps when no --workdir is given")
    parser.add_argument("--train_dir", default="/tmp/moe_jax_quantization_bench")
    parser.add_argument("--eval_batches", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds of the eval forward")
    parser.add_argument("--quick", action="store_true", help="a smaller model (smoke test)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # TFDS and orbax log every read and restore
    if args.steps < 1 or args.eval_batches < 1:
        parser.error("--steps and --eval_batches must be >= 1")

    loaded = load_run(trained_workdir(args))
    data = make_lm_data(loaded.run.data)
    batches = [jnp.asarray(b) for b in data.eval_batches(args.eval_batches)]
    print(f"{loaded.run.name}: checkpoint step {loaded.step}, {args.eval_batches} eval batches of "
          f"{batches[0].shape[0]} x {batches[0].shape[1] - 1} tokens, backend {jax.default_backend()}")

    models = {"float32": loaded.model, "int8": Q.quantize_experts(loaded.model, 8),
              "int4": Q.quantize_experts(loaded.model, 4)}
    results, timers, reference = {}, {}, None
    for name, model in models.items():
        metrics, logps, timers[name] = evaluate(model, batches, reference)
        reference = logps if reference is None else reference
        results[name] = dict(metrics, expert_bytes=Q.expert_weight_bytes(model), model_bytes=Q.model_bytes(model))
    timings = time_interleaved(timers, args.rounds)  # compiled already; the warm-up call settles
    base = results["float32"]
    for name, r in results.items():
        r["expert_bytes_ratio"] = r["expert_bytes"]["total"] / base["expert_bytes"]["total"]
        r["model_bytes_ratio"] = r["model_bytes"] / base["model_bytes"]
        r["delta_eval_ce"] = r["eval_ce"] - base["eval_ce"]
        r["forward_time_ratio"] = timings.median(name) / timings.median("float32")

    print(f"{'format':8} {'expert bytes':>13} {'ratio':>6} {'model bytes':>12} {'ratio':>6} {'eval CE':>8} "
          f"{'dCE':>8} {'top1 agree':>10} {'KL':>9} {'fwd time':>8}")
    for name, r in results.items():
        print(f"{name:8} {r['expert_bytes']['total']:13,} {r['expert_bytes_ratio']:6.3f} {r['model_bytes']:12,} "
              f"{r['model_bytes_ratio']:6.3f} {r['eval_ce']:8.4f} {r['delta_eval_ce']:+8.4f} "
              f"{r.get('top1_agreement', 1.0):10.4f} {r.get('kl_from_float', 0.0):9.2e} {r['forward_time_ratio']:8.2f}")
    out = {"run": loaded.run.name, "checkpoint_step": loaded.step, "workdir": loaded.workdir,
           "eval_batches": args.eval_batches, "eval_tokens": int(sum(b[:, 1:].size for b in batches)),
           "backend": jax.default_backend(), "results": results}
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)
        print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main() and 0))
