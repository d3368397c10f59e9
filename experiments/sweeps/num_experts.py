"""Number of experts at fixed active compute: E in {1 (dense), 2, 4, 8, 16, 32}, top-1.

Every MoE has experts of the dense FFN's width and routes each token to one of them, so active
parameters and useful FLOPs per token are those of the dense model (plus the router); total
parameters grow with E. Published: loss falls steadily with E at equal compute (Switch Transformer,
Fedus et al. 2022, Fig. 4: 2 -> 256 experts); Clark et al. 2022 fit
log L = a log N + b log E + c log N log E + d with b < 0 (more experts help) and c > 0 (less so as N grows).
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "num_experts"
EXPERTS = (1, 2, 4, 8, 16, 32)


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    specs = []
    for E in scale.axis(EXPERTS):
        model = scale.model(size, dense=True) if E == 1 else scale.model(size, num_experts=E)
        for seed in scale.seeds:
            specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"E": E}, model=model))
    return specs
