"""Granularity at fixed total and active parameters (Krajewski et al. 2024): G in {1, 2, 4, 8, 16}.

Each of the 8 experts of width F is split into G experts of width F / G and every token picks
k = G * k0 of the 8 G experts (k0 = 1), so total and active expert parameters stay fixed; only the
router grows (8 G outputs), and with it the FLOPs (Krajewski et al.'s Eq. 10).

Two budgets, axis `budget`:
  steps  every G trains the scale's number of steps (compared per step), at the scale's
         `granularity_sizes`, so the law L(G) = h + g G^-gamma can be fitted per size and the joint law
         L(N, D, G) across sizes; headline size with all seeds, the others with one.
  flops  headline size: G trains round(steps * F(G=1) / F(G)) steps, F = useful training FLOPs per
         step with the router counted, so every G spends the FLOPs of G = 1 (and is annealed fully);
         seeds `flops_matched_seeds`.
Wall-clock comparisons use the per-step runs' curves at matched measured time (see experiments/collect.py).
Published (Table 1): g 2.1 > 0 and gamma 0.58: loss falls with G, with diminishing returns.
"""
from __future__ import annotations

from experiments.flops import run_flops
from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec
from moe_jax.train.run_config import build_run_config

NAME = "granularity"
GRANULARITY = (1, 2, 4, 8, 16)


def _useful_per_step(spec: RunSpec) -> float:
    return run_flops(build_run_config(spec.config))["per_step"]["useful_flops"]


def flops_matched_steps(scale: Scale, size: str, model: dict) -> int:
    """Steps at which `model` spends the useful training FLOPs (router counted) of the scale's base MoE at `size`
    over the scale's steps."""
    reference = _useful_per_step(make_spec(NAME, scale, size=size, seed=0, axes={}, model=scale.model(size)))
    per_step = _useful_per_step(make_spec(NAME, scale, size=size, seed=0, axes={}, model=model))
    return round(scale.steps(size) * reference / per_step)


def sweep(scale: Scale) -> list[RunSpec]:
    specs = []
    for size in scale.axis(scale.granularity_sizes):
        seeds = scale.seeds if size == scale.headline else scale.seeds[:1]
        for G in scale.axis(GRANULARITY):
            for seed in seeds:
                specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"G": G, "budget": "steps"},
                                       model=scale.model(size, granularity=G)))
    size = scale.headline
    for G in scale.axis(GRANULARITY):
        model = scale.model(size, granularity=G)
        steps = flops_matched_steps(scale, size, model)
        for seed in scale.flops_matched_seeds:
            specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"G": G, "budget": "flops"},
                                   model=model, steps=steps))
    return specs
