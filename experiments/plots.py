"""The sweep figures (PNG, matplotlib Agg), drawn from the results rows and `analysis.analyse`'s output.

    paths = plot_all(rows, result, out)   # {figure name: path}; a figure whose sweep has no rows is skipped

loss_vs_experts.png       eval loss vs number of experts (mean +- seed sd) with Clark et al.'s fitted law
loss_vs_granularity.png   eval loss vs G: per step with the fitted L(G) per size; at matched FLOPs (dedicated
                          runs and per-step curves interpolated); train loss at matched wall-clock; step time
joint_fit.png             the joint law L(N, D, G): fitted vs observed
capacity_drop.png         capacity factor vs dropped fraction (train, eval) and eval loss
expert_load.png           final share of tokens per expert and layer (heatmaps) for the expert and router runs
shared_experts.png        DeepSeekMoE's ordering: eval loss per variant
routers_aux.png           eval loss and load imbalance per router strategy and auxiliary-loss setting
"""
from __future__ import annotations

import os

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _keyed(d: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = np.array([float(k) for k in d])
    return x, np.array([v["mean"] for v in d.values()]), np.array([v["std"] for v in d.values()])


def _save(fig, out, name) -> str:
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _plt().close(fig)
    return path


def plot_experts(result, out):
    r = result["num_experts"]
    if not r["by_E"]:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    E, m, s = _keyed(r["by_E"])
    ax.errorbar(E, m, yerr=s, fmt="o", capsize=3, label="expert sweep (mean +- seed sd)")
    if "clark_fit" in r:
        p = r["clark_fit"]["params"]
        pts = r["clark_points"]
        grid = np.geomspace(1, max(max(q["E"] for q in pts), 2), 50)
        for size in dict.fromkeys(q["size"] for q in pts):
            mine = [q for q in pts if q["size"] == size]
            N = float(np.median([q["N"] for q in mine]))  # active N differs across E only by the router
            ax.plot([q["E"] for q in mine], [q["L"] for q in mine], "x", color="gray", ms=5)
            law = 10 ** (p["a"] * np.log10(N) + (p["b"] + p["c"] * np.log10(N)) * np.log10(grid) + p["d"])
            ax.plot(grid, law, "-", lw=1, label=f"Clark law, size {size} (N={N / 1e3:.0f}k active)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("experts E (top-1; E=1 dense)")
    ax.set_ylabel("eval cross-entropy (nats/token)")
    ax.set_title("Loss vs number of experts at equal active parameters")
    ax.legend(fontsize=7)
    return _save(fig, out, "loss_vs_experts.png")


def plot_granularity(result, out):
    r = result["granularity"]
    if not r["per_step"]:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    ax = axes[0]
    for size, by_G in r["per_step"].items():
        G, m, s = _keyed(by_G)
        line = ax.errorbar(G, m, yerr=s, fmt="o", capsize=3, label=f"size {size}")
        if size in r["fits"]:
            p = r["fits"][size]["params"]
            grid = np.geomspace(1, G.max(), 50)
            ax.plot(grid, p["h"] + p["g"] * grid ** -p["gamma"], "-", color=line[0].get_color(), lw=1,
                    label=f"fit {size}: gamma={p['gamma']:.2f}")
    ax.set_title("per step (equal tokens)")
    ax = axes[1]
    if r["matched_flops_runs"]:
        G, m, s = _keyed(r["matched_flops_runs"])
        ax.errorbar(G, m, yerr=s, fmt="s", capsize=3, label="steps cut to G=1's FLOPs (eval)")
    interp = r.get("matched_interpolated", {})
    if "useful_flops" in interp:
        G, m, s = _keyed(interp["useful_flops"]["by_G"])
        ax.errorbar(G, m, yerr=s, fmt="^", capsize=3, label="per-step runs' train loss at min FLOPs")
    ax.set_title("matched training FLOPs (router counted)")
    ax = axes[2]
    if "seconds" in interp:
        G, m, s = _keyed(interp["seconds"]["by_G"])
        ax.errorbar(G, m, yerr=s, fmt="v", capsize=3, label=f"train loss at {interp['seconds']['budget']:.3g} s")
    ax.set_title("matched wall-clock (steady-state step time)")
    for ax in axes[:3]:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("granularity G (expert width F/G, k = G)")
        ax.set_ylabel("cross-entropy (nats/token)")
        ax.legend(fontsize=7)
    ax = axes[3]
    for size, times in r.get("step_seconds", {}).items():
        G = np.array([float(g) for g in times])
        t = np.array(list(times.values()))
        ax.plot(G, t / t[0], "o-", label=f"size {size}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("granularity G")
    ax.set_ylabel("step time / step time at G=1")
    ax.set_title("cost of granularity on this machine")
    ax.legend(fontsize=7)
    return _save(fig, out, "loss_vs_granularity.png")


def plot_joint(result, out):
    j = result["granularity"]["joint"]
    if "points" not in j:
        return None
    plt = _plt()
    pts = np.array(j["points"])
    fig, ax = plt.subplots(figsize=(5, 4.5))
    for N in sorted(set(pts[:, 0])):
        sel = pts[:, 0] == N
        ax.scatter(pts[sel, 3], pts[sel, 4], s=12, label=f"N={N/1e3:.0f}k")
    lo, hi = pts[:, 3:].min(), pts[:, 3:].max()
    ax.plot([lo, hi], [lo, hi], "k--", lw=1)
    p = j["params"]
    ax.set_title(f"joint law: alpha={p['alpha']:.3f} beta={p['beta']:.3f} gamma={p['gamma']:.2f}", fontsize=9)
    ax.set_xlabel("observed eval cross-entropy")
    ax.set_ylabel("fitted L(N, D, G)")
    ax.legend(fontsize=7)
    return _save(fig, out, "joint_fit.png")


def plot_capacity(result, out):
    entries = result["capacity"]
    if not entries:
        return None
    plt = _plt()
    main_S = max(v.get("group_size") or 0 for v in entries)
    rows = [v for v in entries if (v.get("group_size") or 0) == main_S]
    others = [v for v in entries if (v.get("group_size") or 0) != main_S]
    cf = np.array([float(v["capacity_factor"]) for v in rows])
    fig, ax = plt.subplots(figsize=(6, 4.2))
    label = f"groups of {main_S}" if main_S else "groups of one sequence"
    ax.plot(cf, [100 * (v["dropped_fraction"] or 0) for v in rows], "o-", label=f"dropped, train, {label} (%)")
    ax.plot(cf, [100 * (v["eval_dropped_fraction"] or 0) for v in rows], "s--",
            label="dropped, eval at cf 2.0 (%)")
    for v in others:
        ax.plot([float(v["capacity_factor"])], [100 * (v["dropped_fraction"] or 0)], "x", ms=9,
                label=f"dropped, train, groups of {v.get('group_size') or 'one sequence'} (%)")
    pub = result["published"]["st_moe_drop_rate"]
    ax.plot([float(k) for k in pub], [100 * v for v in pub.values()], "k*", ms=10, label="ST-MoE (published)")
    ax.set_xlabel("train capacity factor")
    ax.set_ylabel("dropped token choices (%)")
    ax2 = ax.twinx()
    ax2.plot(cf, [v["final_eval_ce"] for v in rows], "r^:", label="eval loss")
    ax2.set_ylabel("eval cross-entropy", color="r")
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title("Capacity factor vs dropped tokens")
    return _save(fig, out, "capacity_drop.png")


def plot_expert_load(rows, out):
    chosen = [r for r in rows if r.get("status") == "ok" and r.get("expert_load") and r.get("seed") == 0
              and r["sweep"] in ("num_experts", "routers")]
    seen, runs = set(), []
    for r in chosen:
        if r["name"] not in seen:
            seen.add(r["name"])
            runs.append(r)
    if not runs:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(runs), figsize=(3.2 * len(runs), 2.8), squeeze=False, layout="constrained")
    for ax, r in zip(axes[0], runs):
        layers = sorted(r["expert_load"], key=int)
        share = np.array([r["expert_load"][layer] for layer in layers])  # [layers, E]
        im = ax.imshow(share * share.shape[1], aspect="auto", cmap="viridis", vmin=0, vmax=2,
                       origin="lower")
        ax.set_title(r["name"].replace("_seed0", ""), fontsize=7)
        ax.set_yticks(range(len(layers)), layers)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
    fig.colorbar(im, ax=axes[0].tolist(), label="tokens served / uniform share")
    path = os.path.join(out, "expert_load.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _bars(ax, labels, means, stds, title):
    ax.bar(range(len(labels)), means, yerr=stds, capsize=3, color="tab:blue", alpha=0.8)
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
    lo, hi = min(means) - max(stds + [0]) - 0.02, max(means) + max(stds + [0]) + 0.02
    ax.set_ylim(lo, hi)
    ax.set_ylabel("eval cross-entropy")
    ax.set_title(title, fontsize=9)


def plot_shared(result, out):
    by = result["shared_experts"]["by_variant"]
    if not by:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    _bars(ax, list(by), [v["mean"] for v in by.values()], [v["std"] for v in by.values()],
          "Shared and fine-grained experts (mean +- seed sd)")
    return _save(fig, out, "shared_experts.png")


def plot_routers_aux(result, out):
    parts = [(k, result[k]) for k in ("routers", "aux_losses") if result[k]]
    if not parts:
        return None
    plt = _plt()
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.2), squeeze=False)
    for ax, (name, rows) in zip(axes[0], parts):
        labels = list(rows)
        _bars(ax, labels, [v["final_eval_ce"] for v in rows.values()], [0.0] * len(labels), name)
        for i, v in enumerate(rows.values()):
            if v.get("load_cv") is not None:
                ax.annotate(f"cv {v['load_cv']:.2f}", (i, v["final_eval_ce"]), ha="center", va="bottom", fontsize=7)
    return _save(fig, out, "routers_aux.png")


def plot_all(rows, result, out) -> dict:
    os.makedirs(out, exist_ok=True)
    paths = {
        "loss_vs_experts": plot_experts(result, out),
        "loss_vs_granularity": plot_granularity(result, out),
        "joint_fit": plot_joint(result, out),
        "capacity_drop": plot_capacity(result, out),
        "expert_load": plot_expert_load(rows, out),
        "shared_experts": plot_shared(result, out),
        "routers_aux": plot_routers_aux(result, out),
    }
    return {k: v for k, v in paths.items() if v}
