"""Capacity factor and the dropped-token rate: 8 experts, top-1, train capacity factor 0.75 / 1.0 / 1.25 / 2.0.

Capacity per expert and group of S tokens: C = ceil(cf * S * k / E). Evaluation runs at capacity
factor 2.0 throughout, as in Switch. Published: Switch Transformer Table 1, quality changes little from
1.0 to 2.0 and dropped tokens are typically under 1 %; ST-MoE (Zoph et al. 2022): cf 0.75 drops 10.6 %
of tokens, cf 1.25 drops 0.3 %.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "capacity"
CAPACITY_FACTORS = (0.75, 1.0, 1.25, 2.0)


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    return [make_spec(NAME, scale, size=size, seed=scale.seeds[0], axes={"capacity_factor": cf},
                      model=scale.model(size, capacity_factor=cf))
            for cf in scale.axis(CAPACITY_FACTORS, smoke=(0.75, 1.25))]
