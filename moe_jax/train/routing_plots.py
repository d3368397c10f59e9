"""Routing pictures: load of every (layer, expert) over training, router saturation over evaluations, and
the expert co-activation matrix of a ledger. `routing.png` in the workdir (rewritten at each evaluation)
and a TensorBoard image.

The figure is drawn once per evaluation on matplotlib's Agg canvas, without pyplot and with a fixed layout:
the PNG file and the TensorBoard image share the same pixels (`render`)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from moe_jax import ledger_analysis
from moe_jax.ledger import Ledger


def load_matrix(records: list[dict]) -> tuple[list[int], list[int], np.ndarray]:
    """From the train rows of metrics.jsonl: (MoE layers, steps, share <float>[layers * E, steps]), each
    layer's served load normalised to sum to 1 per step (rows: layer-major, expert-minor)."""
    train = [r for r in records if r["split"] == "train"]
    layers = sorted({int(k.split("/")[1]) for r in train for k in r
                     if k.startswith("moe/") and k.endswith("/tokens_per_expert")})
    rows = [r for r in train if layers and f"moe/{layers[0]}/tokens_per_expert" in r]
    if not rows:
        return layers, [], np.zeros((0, 0))
    blocks = []
    for layer in layers:
        load_SE = np.asarray([r[f"moe/{layer}/tokens_per_expert"] for r in rows], float)
        blocks.append((load_SE / np.maximum(load_SE.sum(axis=1, keepdims=True), 1e-9)).T)
    return layers, [r["step"] for r in rows], np.concatenate(blocks)


def routing_figure(records: list[dict], ledger: Optional[Ledger] = None, title: str = ""):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(16, 4.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.12, top=0.84 if title else 0.9, wspace=0.35)
    ax = axes[0]
    layers, steps, share = load_matrix(records)
    if share.size:
        E = share.shape[0] // len(layers)
        im = ax.imshow(share, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                       extent=[steps[0], max(steps[-1], steps[0] + 1), -0.5, share.shape[0] - 0.5])
        for i in range(1, len(layers)):
            ax.axhline(i * E - 0.5, color="white", lw=1)
        ax.set_yticks([i * E + (E - 1) / 2 for i in range(len(layers))], [f"layer {l}" for l in layers])
        fig.colorbar(im, ax=ax, label="share of the layer's served choices")
    ax.set_xlabel("step")
    ax.set_title("expert load over training (layers x experts)")

    ax = axes[1]
    evals = [r for r in records if r["split"] == "eval"]
    for layer in layers:
        pts = [(r["step"], r[f"moe/{layer}/saturation"]) for r in evals if f"moe/{layer}/saturation" in r]
        if pts:
            ax.plot(*zip(*pts), "o-", label=f"layer {layer}")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("step")
    ax.set_ylabel("tokens with an unchanged top-k set")
    ax.set_title("router saturation vs the previous evaluation")
    if ax.lines:
        ax.legend()

    ax = axes[2]
    if ledger is not None:
        m = ledger.num_layers - 1
        co = ledger_analysis.coactivation(ledger, m) / max(ledger.num_tokens, 1)
        im = ax.imshow(co, cmap="magma", origin="upper")
        fig.colorbar(im, ax=ax, label="fraction of tokens")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.set_title(f"co-activation, layer {int(ledger.layers[m])} (step {ledger.step})")
    else:
        ax.set_axis_off()
    if title:
        fig.suptitle(title)
    return fig


def render(fig, dpi: int = 90) -> np.ndarray:
    """The figure's pixels, <uint8>[H, W, 3], drawn once."""
    fig.set_dpi(dpi)
    fig.canvas.draw()
    return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def write_png(pixels: np.ndarray, path: str) -> str:
    from matplotlib.image import imsave

    imsave(path, pixels, format="png")
    return path


def plot_routing(records: list[dict], path: str, ledger: Optional[Ledger] = None, title: str = "") -> str:
    return write_png(render(routing_figure(records, ledger, title)), path)
