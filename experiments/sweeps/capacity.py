"""Capacity factor and the dropped-token rate: 8 experts, top-1, train capacity factor 0.75 / 1.0 / 1.25 / 2.0.

Capacity per expert and group of S tokens: C = ceil(cf * S * k / E). Evaluation runs at capacity
factor 2.0 throughout, as in Switch. Published: Switch Transformer Table 1, quality changes little from
1.0 to 2.0 and dropped tokens are typically under 1 %; ST-MoE (Zoph et al. 2022): cf 0.75 drops 10.6 %
of tokens, cf 1.25 drops 0.3 %.

Where the scale routes in groups larger than one sequence (cpu: the whole batch of 2,048 tokens), one more
run routes cf 1.25 in groups of one sequence (`group_size` = seq_len, the earlier protocol's groups): with
fewer tokens per group, chance fluctuations of the load overflow the capacity more often.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "capacity"
CAPACITY_FACTORS = (0.75, 1.0, 1.25, 2.0)


def sweep(scale: Scale) -> list[RunSpec]:
    size, seed = scale.headline, scale.seeds[0]
    specs = [make_spec(NAME, scale, size=size, seed=seed, axes={"capacity_factor": cf, "group_size": scale.group_size},
                       model=scale.model(size, capacity_factor=cf))
             for cf in scale.axis(CAPACITY_FACTORS, smoke=(0.75, 1.25))]
    seq_len = scale.data["seq_len"]
    if scale.group_size is not None and scale.group_size != seq_len:
        specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"capacity_factor": 1.25, "group_size": seq_len},
                               model=scale.model(size, group_size=seq_len)))
    return specs
