"""The cells of notebooks/scaling_laws.ipynb."""
from __future__ import annotations

from .common import badge, code, install_cell, md

SCALING = [
    md(f"""
# Scaling laws for MoE: refit and compare with the papers

{badge("scaling_laws")}

Loads the sweeps of `experiments/` (results in `experiments/results/<scale>/results.json`, written by
`python -m experiments.runner --scale=cpu --sweeps=all --out=experiments/results/cpu`), refits

* granularity (Krajewski et al. 2024): `L(G) = h + g * G^-gamma` per model size, and
* expert count (Clark et al. 2022): `log10 L = a log10 N + b log10 E + c log10 N log10 E + d`,

and plots them beside the published coefficients (Krajewski Table 1: g 2.1, gamma 0.58; Clark
Table 3, S-BASE: b -0.108, c +0.009). The analysis code is the repository's `experiments/fit.py`.
"""),
    code(install_cell(clone=True)),
    code("""
import json
import tempfile
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

# The repository root (the clone in Colab; the checkout when run locally or by the tests).
ROOT = next(p for p in [Path.cwd(), *Path.cwd().parents] if (p / "experiments" / "fit.py").is_file())
sys.path.insert(0, str(ROOT))
from experiments import collect, fit, runner, scales, sweeps  # noqa: E402

RESULTS = ROOT / "experiments" / "results" / "cpu" / "results.json"
print("root", ROOT, "| committed results:", RESULTS.exists())
"""),
    md("""
## The results

If the CPU-scale results are committed (`experiments/results/cpu/results.json`), they are loaded.
Otherwise the notebook trains the **smoke** scale of the granularity and expert-count sweeps right
here: tiny models, 8 steps on a synthetic corpus, each axis cut to its first and last value (under CI
or the tests, only the smallest size). Those numbers only show that the pipeline runs end to end:
their fitted coefficients mean nothing. The printout below says which of the two this run used.
"""),
    code("""
SWEEPS = ["granularity", "num_experts"]
if RESULTS.exists():
    scale_name = "cpu"
    rows = json.loads(RESULTS.read_text())
else:
    scale_name = "smoke"
    out = tempfile.mkdtemp(prefix="moe_jax_smoke_")
    specs = sweeps.specs(SWEEPS, scales.get("smoke"))
    if SMALL:  # CI / tests: the headline size at a fixed step count only (3 runs instead of 7)
        specs = [s for s in specs if s.axes.get("size") == "xs" and s.axes.get("budget", "steps") == "steps"]
    status = runner.run_all(specs, out, log=lambda *_: None)
    print(f"smoke sweep: {sum(v == 'done' for v in status.values())} runs trained in {out}")
    rows = collect.collect(specs, out)
rows = [r for r in rows if r.get("status") == "ok"]
print(f"scale {scale_name}: {len(rows)} finished runs;",
      {s: sum(r['sweep'] == s for r in rows) for s in SWEEPS})
"""),
    md("""
## Granularity

Per model size, the eval loss at each granularity G (fixed total and active parameters, the same
number of steps), with the fitted `h + g G^-gamma`. Krajewski et al.'s Table 1 law at our N and D is
drawn as a shape (shifted to our G = 1 loss): their losses are on C4 with a BPE vocabulary, ours are
bytes, so only the trend compares.
"""),
    code("""
gran = [r for r in rows if r["sweep"] == "granularity" and r.get("budget") == "steps"]
fits = {}
plt.figure(figsize=(5, 3.5))
for size in sorted({r["size"] for r in gran}):
    pts = sorted(collect.aggregate([r for r in gran if r["size"] == size], by=("G",)), key=lambda p: p["G"])
    G = np.array([p["G"] for p in pts], float)
    L = np.array([p["mean"] for p in pts])
    line = plt.errorbar(G, L, yerr=[p["std"] for p in pts], fmt="o", label=f"size {size}")
    if len(G) >= 2:
        f = fit.fit_granularity(G, L)
        fits[size] = f
        grid = np.geomspace(G.min(), G.max(), 50)
        plt.plot(grid, f.predict(G=grid), "-", color=line[0].get_color())
        N = next(r["params_total_nonemb"] for r in gran if r["size"] == size)
        D = next(r["tokens"] for r in gran if r["size"] == size)
        paper = fit.predict_joint(fit.KRAJEWSKI, N=N, D=D, G=grid)
        plt.plot(grid, paper - paper[0] + f.predict(G=grid)[0], ":", color=line[0].get_color())
plt.xscale("log", base=2)
plt.xlabel("granularity G")
plt.ylabel("eval loss (nats/token)")
plt.title("solid: our fit, dotted: Krajewski et al. shape", fontsize=9)
plt.legend(fontsize=8)
for size, f in fits.items():
    print(f"size {size}: h {f.params['h']:.3f}, g {f.params['g']:.3f}, gamma {f.params['gamma']:.3f} "
          f"from {f.n_points} points (paper: g {fit.KRAJEWSKI['g']}, gamma {fit.KRAJEWSKI['gamma']})")
"""),
    md("""
## Number of experts

Clark et al. fit `log10 L` as a bilinear function of `log10 N` (dense-equivalent, i.e. active
parameters) and `log10 E`; `b < 0` means more experts help, `c > 0` that the help shrinks with size.
"""),
    code("""
ne = [r for r in rows if r["sweep"] == "num_experts" and r.get("E") is not None]
if ne:
    plt.figure(figsize=(5, 3.5))
    for size in sorted({r["size"] for r in ne}):
        pts = sorted(collect.aggregate([r for r in ne if r["size"] == size], by=("E",)), key=lambda p: p["E"])
        plt.errorbar([p["E"] for p in pts], [p["mean"] for p in pts], yerr=[p["std"] for p in pts],
                     fmt="o-", label=f"size {size} (ours)")
        # Clark et al.'s law at our N: the slope of log10 L in log10 E is b + c log10 N.
        N = next(r["params_active_nonemb"] for r in ne if r["size"] == size)
        slope = fit.CLARK_S_BASE["b"] + fit.CLARK_S_BASE["c"] * np.log10(N)
        E_grid = np.array([p["E"] for p in pts], float)
        plt.plot(E_grid, pts[0]["mean"] * (E_grid / E_grid[0]) ** slope, ":", color="gray")
    plt.xscale("log", base=2)
    plt.xlabel("experts E")
    plt.ylabel("eval loss (nats/token)")
    plt.title("dotted: Clark et al. S-BASE slope at our N", fontsize=9)
    plt.legend(fontsize=8)
    N = np.array([r["params_active_nonemb"] for r in ne], float)
    E = np.array([r["E"] for r in ne], float)
    L = np.array([r["final_eval_ce"] for r in ne])
    if len(set(N)) >= 2 and len(set(E)) >= 2 and len(L) >= 4:
        f = fit.fit_clark(N, E, L)
        print(f"Clark fit: b {f.params['b']:+.3f}, c {f.params['c']:+.4f} "
              f"(paper S-BASE: b {fit.CLARK_S_BASE['b']:+.3f}, c {fit.CLARK_S_BASE['c']:+.3f})")
    else:  # one size: only the slope at that N is identified
        ours = np.polyfit(np.log10(E), np.log10(L), 1)[0]
        paper = fit.CLARK_S_BASE["b"] + fit.CLARK_S_BASE["c"] * np.log10(N[0])
        print(f"one model size (N = {N[0]:,.0f} active non-embedding parameters): d log10 L / d log10 E = "
              f"{ours:+.4f} (Clark et al. S-BASE at this N: {paper:+.4f})")
else:
    print("no num_experts runs in these results")
"""),
    md("""
## The token budget, and what the protocol checks

The gap between the 8-expert MoE and the dense model of equal active parameters, at every evaluation of
the same runs: early in training (a few tokens per parameter) the MoE is not ahead; the CPU protocol
trains 21 tokens per active parameter. Then the gap per model size, the same at twice the steps (the
train_length sweep), the judged comparisons at a better learning rate (rate_check sweep), where the drops
happen (per MoE layer) and what a dense first layer does to them (first_dense sweep), and the protocol's claims, each judged from the table by `experiments/analysis.py`
(a difference counts beyond twice the seed standard deviation).
"""),
    code("""
from experiments import analysis

result = analysis.analyse(rows, bootstrap_n=10, self_test=False)
gap = result["budget"]["headline"]
if gap:
    steps = [int(s) for s in gap]
    plt.figure(figsize=(5, 3.2))
    plt.errorbar([gap[s]["tokens_per_active_param"] for s in gap], [gap[s]["mean"] for s in gap],
                 yerr=[gap[s]["std"] for s in gap], fmt="o-")
    plt.axhline(0, color="gray", lw=0.8)
    plt.xlabel("tokens per active parameter")
    plt.ylabel("MoE - dense eval CE (nats)")
    plt.title(f"seeds {result['budget']['seeds']}", fontsize=9)
else:
    print("no paired dense / 8-expert runs in these results")
for size, v in result["model_size"].items():  # the same gap at the end of training, per model size
    if "moe_minus_dense" in v:
        print(f"size {size}: MoE - dense {v['moe_minus_dense']:+.4f} +- {v['moe_minus_dense_std']:.4f} "
              f"over {v['n_paired']} seed(s)")
for size, v in result["train_length"].items():  # the same models trained longer (train_length sweep)
    if v["final"] and v["at_scale_steps"]:
        print(f"size {size}, {v['steps']} steps: MoE - dense {v['final']['mean']:+.4f} +- {v['final']['std']:.4f} "
              f"(after the protocol's steps: {v['at_scale_steps']['mean']:+.4f})")
for label, c in result["rate_check"].get("comparisons", {}).items():  # claims 1, 3, 4 at a better learning rate
    if c["high"] and c["protocol"]:
        print(f"{label}: {c['high']['mean']:+.4f} at lr {result['rate_check']['learning_rate']:g}, "
              f"{c['protocol']['mean']:+.4f} at the protocol's rate")
for E, v in result["drops"]["by_experts"].items():  # dropped in the second half, per MoE layer
    if v["by_layer"] and v["mean"] > 0:
        print(f"E = {E}: dropped per layer " + " / ".join(f"{d:.2%}" for d in v["by_layer"]))
for size, v in result["first_dense"].items():  # the first layer dense (first_dense sweep): its drops, its loss
    if v["dropped"] and v["base_dropped"] and v["minus_base"]:
        print(f"size {size}, first layer dense: dropped {v['dropped']['mean']:.2%} (base MoE "
              f"{v['base_dropped']['mean']:.2%}), eval CE minus the base MoE {v['minus_base']['mean']:+.4f}")
verdict = {True: "holds", False: "not met", None: "not measured here"}
for c in result["checks"]:
    print(f"- {c['claim']}: {verdict[c['pass']]} ({c['detail']})")
"""),
]
