"""End-of-run PNG: loss curves (train and eval) and per-layer expert load over training."""
from __future__ import annotations

import numpy as np


def plot_run(records: list[dict], path: str, title: str = "") -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    layers = sorted({k.split("/")[1] for r in train for k in r if k.startswith("moe/") and k.endswith("/tokens_per_expert")},
                    key=int)
    ncols = 1 + len(layers)
    fig = Figure(figsize=(5 * ncols, 4))  # no pyplot: nothing global to close, no GUI backend to pick
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, ncols, squeeze=False)
    fig.subplots_adjust(left=0.25 / ncols, right=0.98, bottom=0.13, top=0.9, wspace=0.35)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["ce"] for r in train], label="train")
    if evals:
        ax.plot([r["step"] for r in evals], [r["ce"] for r in evals], "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title or "loss")
    ax.legend()
    for ax, layer in zip(axes[0, 1:], layers):
        key = f"moe/{layer}/tokens_per_expert"
        rows = [r for r in train if key in r]
        load_TE = np.array([r[key] for r in rows], dtype=float)
        load_TE = load_TE / np.maximum(load_TE.sum(axis=1, keepdims=True), 1e-9)
        im = ax.imshow(load_TE.T, aspect="auto", origin="lower", cmap="viridis",
                       extent=[rows[0]["step"], rows[-1]["step"], -0.5, load_TE.shape[1] - 0.5])
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"layer {layer}: share of tokens served")
        fig.colorbar(im, ax=ax)
    fig.savefig(path, dpi=100)
    return path
