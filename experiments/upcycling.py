r"""Sparse upcycling vs. from-scratch MoE vs. continued dense training at equal extra compute.

    python -m experiments.upcycling --scale=cpu --out=experiments/results/cpu/upcycling          # ~1 h, 2 cores
    python -m experiments.upcycling --scale=smoke --out=/tmp/upcycling                            # seconds

Protocol (Komatsuzaki et al. 2022, Figure 1's comparison, at this repository's scales):
  base              a dense model of the scale's headline size trained for the scale's step count (the "sunk"
                    dense checkpoint).
  dense_continued   the base, trained further as a dense model.
  upcycled          an MoE of 8 experts, top-2 with renormalised weights (combine weights sum to 1, so it starts
                    as the base model: moe_jax/upcycle.py), every expert a copy of the base's FFN, router fresh;
                    training capacity factor 1.25 (the scale's), evaluation capacity E / k (no drops).
  upcycled_granular 4 copies x 2 slices (granularity 2, k = 1: 2 of 8 half-width experts), as many active FFN
                    FLOPs as the dense model; it does not start as the base (the slices chosen are of
                    different copies and weighted < 1).
  scratch           the `upcycled` architecture from a random initialisation.
Every continuation starts with a fresh optimizer and the scale's schedule (warm-up, cosine decay) over its own
steps, and reads other batches than the base did (data seed + 1000). The extra budget is `extra_fraction`
of the base run's step count for the k = 2 MoE; every other arm gets the same useful training FLOPs
(experiments/flops.py: the router and k expert FFNs per token counted), hence more steps when cheaper per step.
Each arm is evaluated `evals` times along its run (the scale's 16 fixed validation batches at cpu scale) and
once at its start; curves are eval loss against extra FLOPs.

Writes to --out: runs/<name> (workdirs: config.json, metrics.jsonl, summary.json), results.json (every number,
paths relative to --out), upcycling.png, report.md. Finished runs are skipped when the command is run again.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import numpy as np

from experiments import scales
from experiments.flops import run_flops
from experiments.runner import is_finished
from moe_jax import cli

DATA_SEED_OFFSET = 1000
ARMS = ("dense_continued", "upcycled", "upcycled_granular", "scratch")
# Evaluation capacity E / k = the group size: nothing is dropped at evaluation (a start equal to the base's).
MOE = dict(num_experts=8, num_experts_per_token=2, normalize_topk=True, eval_capacity_factor=4.0)
GRANULAR = dict(num_experts=4, num_experts_per_token=1, granularity=2, normalize_topk=True, eval_capacity_factor=4.0)
PUBLISHED = (
    "Komatsuzaki et al. 2022 (Sparse Upcycling, arXiv 2212.05055; T5 language models and ViT vision models, "
    "experts initialised as copies of the dense MLP, router fresh): upcycled models beat continued dense training "
    "and MoEs trained from scratch at equal extra compute up to large budgets; an MoE from scratch catches up "
    "only with much more compute (their Figure 1 and from-scratch "
    "comparison). Their numbers are not restated here; the optimizer state is fresh in every arm of ours.")


def arm_model(scale, size: str, arm: str) -> dict:
    if arm == "dense_continued":
        return scale.model(size, dense=True)
    return scale.model(size, **(GRANULAR if arm == "upcycled_granular" else MOE))


def specs(scale, size: str, seed: int, extra_fraction: float, arms=ARMS) -> tuple[dict, list[dict]]:
    """(the base run, the arms): each {"name", "arm", "config", "steps", "flops_per_step"}."""
    from moe_jax.train.run_config import build_run_config

    base_steps = scale.steps(size)
    base_name = f"{size}_dense_base_seed{seed}"
    base = {"name": base_name, "arm": "base",
            "config": scale.config(base_name, scale.model(size, dense=True), size=size, seed=seed)}
    per_step = {}
    for arm in ARMS:
        cfg = scale.config(arm, arm_model(scale, size, arm), size=size, seed=seed, steps=1)
        per_step[arm] = run_flops(build_run_config(cfg))["per_step"]["useful_flops"]
    moe_steps = max(2, round(extra_fraction * base_steps))
    budget = moe_steps * per_step["upcycled"]
    chosen, arms = arms, []
    for arm in chosen:
        steps = max(2, round(budget / per_step[arm]))
        name = f"{size}_{arm}_extra{extra_fraction:g}_seed{seed}"
        config = scale.config(name, arm_model(scale, size, arm), size=size, seed=seed, steps=steps)
        config.data.seed = seed + DATA_SEED_OFFSET
        arms.append({"name": name, "arm": arm, "config": config, "steps": steps, "flops_per_step": per_step[arm]})
    base["steps"] = base_steps
    base["flops_per_step"] = run_flops(build_run_config(base["config"]))["per_step"]["useful_flops"]
    return base, arms


def eval_ce(workdir: str, data_cfg, num_batches: int) -> float:
    """Eval cross-entropy (nats/token) of `workdir`'s latest checkpoint on the fixed validation batches."""
    import jax
    import jax.numpy as jnp
    import optax

    from moe_jax.data import make_lm_data
    from moe_jax.train.restore import load_run

    model = load_run(workdir).model
    data = make_lm_data(data_cfg)

    @jax.jit
    def ce(batch):
        logits, _ = model(batch[:, :-1], train=False)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()

    return float(np.mean([float(ce(jnp.asarray(b))) for b in data.eval_batches(num_batches)]))


def _eval_curve(workdir: str) -> list[tuple[int, float]]:
    from moe_jax.train.metrics import read_jsonl

    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    return sorted({r["step"]: float(r["ce"]) for r in rows if r["split"] == "eval"}.items())


def train_all(scale, size: str, seed: int, extra_fraction: float, out: str, arms=ARMS, log=print) -> dict:
    from moe_jax.train.loop import train
    from moe_jax.train.run_config import build_run_config
    from moe_jax.train.upcycle import has_checkpoint, write_upcycled_workdir

    quiet = lambda *_: None
    base, arms = specs(scale, size, seed, extra_fraction, arms)
    runs = os.path.join(out, "runs")
    base_dir = os.path.join(runs, base["name"])
    t0 = time.perf_counter()
    if not is_finished(base_dir, base["steps"]):
        train(build_run_config(base["config"]), base_dir, log=quiet)
    log(f"[upcycling] base {base['name']}: done ({time.perf_counter() - t0:.0f}s)")
    base_run = build_run_config(base["config"])
    rows = {"base": {**{k: base[k] for k in ("name", "steps", "flops_per_step")},
                     "workdir": os.path.relpath(base_dir, out), "eval_curve": _eval_curve(base_dir)}}
    for spec in arms:
        workdir = os.path.join(runs, spec["name"])
        config = spec["config"].to_dict()
        if spec["arm"] != "scratch":
            config["upcycle"] = {"from_workdir": base_dir, "granular": spec["arm"] == "upcycled_granular"}
        run = build_run_config(config)
        start_ce = None
        start_path = os.path.join(workdir, "start_eval.json")
        if spec["arm"] != "scratch" and not has_checkpoint(workdir):
            write_upcycled_workdir(run, workdir, log=log)
            start_ce = eval_ce(workdir, run.data, run.train.eval_batches)
            with open(start_path, "w") as f:
                json.dump({"eval_ce": start_ce}, f)
        elif os.path.exists(start_path):
            with open(start_path) as f:
                start_ce = json.load(f)["eval_ce"]
        t0 = time.perf_counter()
        if not is_finished(workdir, spec["steps"]):
            train(run, workdir, log=quiet)
        curve = _eval_curve(workdir)
        log(f"[upcycling] {spec['name']}: {spec['steps']} steps, eval ce {curve[-1][1]:.4f} "
            f"({time.perf_counter() - t0:.0f}s)")
        rows[spec["arm"]] = {"name": spec["name"], "steps": spec["steps"], "flops_per_step": spec["flops_per_step"],
                             "workdir": os.path.relpath(workdir, out), "start_eval_ce": start_ce,
                             "eval_curve": curve,
                             "extra_flops_curve": [(s * spec["flops_per_step"], c) for s, c in curve]}
    return rows


def plot(rows: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base_ce = rows["base"]["eval_curve"][-1][1]
    ax.axhline(base_ce, color="gray", ls=":", label=f"dense base ({base_ce:.3f})")
    for arm in [a for a in ARMS if a in rows]:
        r = rows[arm]
        xs = [x for x, _ in r["extra_flops_curve"]]
        ys = [y for _, y in r["extra_flops_curve"]]
        if r["start_eval_ce"] is not None:
            xs, ys = [0.0] + xs, [r["start_eval_ce"]] + ys
        ax.plot(np.asarray(xs) / 1e12, ys, marker="o", ms=3, label=arm)
    ax.set_xlabel("extra training compute (useful TFLOPs)")
    ax.set_ylabel("eval cross-entropy (nats/token)")
    lo = min(min(y for _, y in rows[a]["eval_curve"]) for a in ARMS if a in rows)
    ax.set_ylim(lo - 0.05, base_ce + 0.3)
    ax.legend(fontsize=8)
    ax.set_title("Sparse upcycling at equal extra compute")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(rows: dict, scale_name: str, command: str) -> str:
    base = rows["base"]
    lines = ["# Sparse upcycling at equal extra compute", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Dense base `{base['name']}`: {base['steps']} steps, eval ce {base['eval_curve'][-1][1]:.4f} nats/token "
             f"(byte-level: nats/byte).", "",
             "| arm | steps | useful FLOPs/step | extra FLOPs | eval ce at start | final eval ce | vs dense_continued |",
             "|---|---|---|---|---|---|---|"]
    ref = rows["dense_continued"]["eval_curve"][-1][1]
    for arm in [a for a in ARMS if a in rows]:
        r = rows[arm]
        final = r["eval_curve"][-1][1]
        start = "-" if r["start_eval_ce"] is None else f"{r['start_eval_ce']:.4f}"
        lines.append(f"| {arm} | {r['steps']} | {r['flops_per_step']:.3g} | {r['steps'] * r['flops_per_step']:.3g} "
                     f"| {start} | {final:.4f} | {final - ref:+.4f} |")
    lines += ["", "Start: the upcycled model before its first step (the dense base's function when the combine weights "
              "sum to 1 and nothing is dropped; granular slices and noise break that).", "",
              "![curves](upcycling.png)", "", "## Published", "", PUBLISHED, "",
              f"One seed at scale '{scale_name}': differences below ~0.01 nats are within seed noise at this size "
              "(experiments/results/cpu/report.md measures the seed spread)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="experiments.upcycling", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", choices=("smoke", "cpu"))
    p.add_argument("--out", required=True, help="results folder (workdirs under <out>/runs)")
    p.add_argument("--size", default=None, help="model size of the scale (default: its headline size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--extra_fraction", type=float, default=0.5,
                   help="extra steps of the k=2 MoE, as a fraction of the base run's steps")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated among {', '.join(ARMS)}")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    arms = tuple(a for a in args.arms.split(",") if a)
    if "dense_continued" not in arms or set(arms) - set(ARMS):
        p.error(f"--arms={args.arms}: choose among {', '.join(ARMS)}; dense_continued (the reference) is required")
    scale = scales.get(args.scale)
    size = args.size or scale.headline
    if size not in scale.sizes:
        p.error(f"--size={size}: not a size of scale {args.scale} ({', '.join(scale.sizes)})")
    if not (args.extra_fraction > 0 and math.isfinite(args.extra_fraction)):
        p.error(f"--extra_fraction={args.extra_fraction}: must be > 0")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    rows = train_all(scale, size, args.seed, args.extra_fraction, out, arms)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    plot(rows, os.path.join(out, "upcycling.png"))
    command = "python -m experiments.upcycling " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(rows, args.scale, command))
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
