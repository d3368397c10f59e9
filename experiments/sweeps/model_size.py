"""Model size: every size of the scale, dense and MoE (8 experts, top-1), with every seed of the scale (the
MoE-beats-dense claim is judged at each size over the seeds), so that laws in N can be fitted.

Together with the granularity sweep (every size x G) these are the points of the joint law
L(N, D, G) (Krajewski et al. 2024) and, with the expert sweep, of Clark et al.'s law in N and E.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "model_size"


def sweep(scale: Scale) -> list[RunSpec]:
    specs = []
    for size in scale.axis(scale.sizes):
        for variant in ("dense", "moe"):
            model = scale.model(size, dense=variant == "dense")
            for seed in scale.seeds:
                specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"variant": variant}, model=model))
    return specs
