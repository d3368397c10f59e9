r"""Sparse upcycling vs. from-scratch MoE vs. continued dense training at equal extra compute.

    python -m experiments.upcycling --scale=cpu --out=experiments/results/cpu/upcycling    # 3 seeds, ~20 min each, 2 cores
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

Every seed (--seeds, default the scale's: 0, 1, 2 at cpu) has its own dense base and arms; the report gives each
arm's final eval loss over the seeds and its difference from dense_continued paired by seed, judged against the
CPU protocol's noise floor when its analysis.json sits beside --out (experiments/results/cpu).
Writes to --out: runs/<name> (workdirs: config.json, metrics.jsonl, summary.json), results.json (every number,
paths relative to --out), upcycling.png, report.md. Finished runs are skipped when the command is run again.
"""
from __future__ import annotations

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


def summarise(by_seed: dict) -> dict:
    """Per arm over the seeds: final eval CE (mean, sd, n) and its difference from dense_continued of the same
    seed (paired: a seed fixes the base run, the data order and the initialisation)."""
    out = {}
    for arm in ("base",) + ARMS:
        finals = {seed: rows[arm]["eval_curve"][-1][1] for seed, rows in by_seed.items() if arm in rows}
        if not finals:
            continue
        diffs = [finals[seed] - by_seed[seed]["dense_continued"]["eval_curve"][-1][1] for seed in finals]
        sd = lambda v: float(np.std(v, ddof=1)) if len(v) > 1 else 0.0
        out[arm] = {"final_mean": float(np.mean(list(finals.values()))), "final_sd": sd(list(finals.values())),
                    "n": len(finals), "minus_dense_continued_mean": float(np.mean(diffs)),
                    "minus_dense_continued_sd": sd(diffs)}
        starts = [rows[arm].get("start_eval_ce") for rows in by_seed.values() if arm in rows]
        if starts and all(v is not None for v in starts):
            out[arm]["start_mean"] = float(np.mean(starts))
    return out


def plot(by_seed: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    base_ce = float(np.mean([rows["base"]["eval_curve"][-1][1] for rows in by_seed.values()]))
    ax.axhline(base_ce, color="gray", ls=":", label=f"dense base ({base_ce:.3f}, mean over seeds)")
    lo = base_ce
    for i, arm in enumerate(ARMS):
        for j, rows in enumerate(by_seed.values()):  # one line per seed, one colour per arm
            if arm not in rows:
                continue
            r = rows[arm]
            xs = [x for x, _ in r["extra_flops_curve"]]
            ys = [y for _, y in r["extra_flops_curve"]]
            if r["start_eval_ce"] is not None:
                xs, ys = [0.0] + xs, [r["start_eval_ce"]] + ys
            ax.plot(np.asarray(xs) / 1e12, ys, marker="o", ms=3, lw=1, color=f"C{i}", alpha=0.8,
                    label=arm if j == 0 else None)
            lo = min(lo, min(ys))
    ax.set_xlabel("extra training compute (useful TFLOPs)")
    ax.set_ylabel("eval cross-entropy (nats/token)")
    ax.set_ylim(lo - 0.05, base_ce + 0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"Sparse upcycling at equal extra compute ({len(by_seed)} seed(s))")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def protocol_noise(out: str) -> float | None:
    """The CPU protocol's noise floor (seed sd of its base configuration) from the analysis.json beside --out,
    if the protocol's report was written there."""
    path = os.path.join(os.path.dirname(os.path.abspath(out)), "analysis.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        floor = json.load(f).get("noise_floor")
    return floor["std"] if floor else None


def report(by_seed: dict, summary: dict, scale_name: str, command: str, noise: float | None = None) -> str:
    seeds = list(by_seed)
    first = by_seed[seeds[0]]
    base = summary["base"]
    lines = ["# Sparse upcycling at equal extra compute", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}.", "",
             f"Dense base `{first['base']['name']}` (one per seed; seeds {', '.join(map(str, seeds))}): "
             f"{first['base']['steps']} steps, eval ce {base['final_mean']:.4f} +- {base['final_sd']:.4f} nats/token "
             "(byte-level: nats/byte).", "",
             "| arm | steps | useful FLOPs/step | extra FLOPs | eval ce at start | final eval ce (mean +- sd) "
             "| vs dense_continued (paired) |",
             "|---|---|---|---|---|---|---|"]
    for arm in [a for a in ARMS if a in summary]:
        r, v = first[arm], summary[arm]
        start = f"{v['start_mean']:.4f}" if "start_mean" in v else "-"
        lines.append(f"| {arm} | {r['steps']} | {r['flops_per_step']:.3g} | {r['steps'] * r['flops_per_step']:.3g} "
                     f"| {start} | {v['final_mean']:.4f} +- {v['final_sd']:.4f} (n={v['n']}) "
                     f"| {v['minus_dense_continued_mean']:+.4f} +- {v['minus_dense_continued_sd']:.4f} |")
    lines += ["", "Start: the upcycled model before its first step (the dense base's function when the combine weights "
              "sum to 1 and nothing is dropped; granular slices and noise break that).", ""]
    if noise is not None:
        verdicts = []
        for arm in [a for a in ARMS if a in summary and a != "dense_continued"]:
            d = summary[arm]["minus_dense_continued_mean"]
            word = "ahead of" if d < -2 * noise else "behind" if d > 2 * noise else "within noise of"
            verdicts.append(f"{arm} {word} dense_continued ({d:+.4f})")
        lines += [f"A difference counts beyond twice the CPU protocol's noise floor (seed sd {noise:.4f} of its "
                  f"base configuration, experiments/results/cpu/report.md): " + "; ".join(verdicts) + ".", ""]
    else:
        lines += [f"{len(seeds)} seed(s) at scale '{scale_name}'; compare the paired differences with their sd.", ""]
    lines += ["![curves](upcycling.png)", "", "## Published", "", PUBLISHED]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = cli.ArgumentParser(prog="experiments.upcycling", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", default="cpu", choices=("smoke", "cpu"))
    p.add_argument("--out", required=True, help="results folder (workdirs under <out>/runs)")
    p.add_argument("--size", default=None, help="model size of the scale (default: its headline size)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the scale's, cpu 0,1,2)")
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
    try:
        seeds = [int(v) for v in args.seeds.split(",") if v.strip()] if args.seeds else list(scale.seeds)
    except ValueError:
        p.error(f"--seeds={args.seeds}: give comma-separated integers, e.g. --seeds=0,1,2")
    if not seeds or len(set(seeds)) != len(seeds):
        p.error(f"--seeds={args.seeds}: give at least one seed, each once")
    out = os.path.normpath(os.path.expanduser(args.out))  # as given: the runs' configs record the dense base's
    os.makedirs(out, exist_ok=True)                         # workdir under it (relative stays relative)
    by_seed = {str(seed): train_all(scale, size, seed, args.extra_fraction, out, arms) for seed in seeds}
    summary = summarise(by_seed)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"seeds": by_seed, "summary": summary}, f, indent=2)
    plot(by_seed, os.path.join(out, "upcycling.png"))
    command = "python -m experiments.upcycling " + " ".join(sys.argv[1:] if argv is None else argv)
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write(report(by_seed, summary, args.scale, command, noise=protocol_noise(out)))
    print(f"report: {os.path.join(out, 'report.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(cli.run(main))
