"""The first layer dense (DeepSeekMoE, DeepSeek-V2/V3): does it bring the drops at capacity factor 1.25 down?

The protocol's MoE models route in every layer. At the cpu scale the first MoE layer drops the most and its
load balance settles last (second half of training, size s: 4.7 % there, 1.1 % in the second layer), which keeps
claim 5 (<= 2 % dropped) from holding. DeepSeekMoE 16B keeps its first layer dense for this reason (the load
balance of the first layer converges slowly). This sweep trains the base MoE (8 experts, top-1) with
`first_dense_layers=1` at the headline size and at the scale's `long_sizes` (cpu: s, with one MoE layer, and m,
with two), every seed: active parameters are the base MoE's less one router (one expert = the dense FFN), total
parameters those of one MoE layer fewer. The drops, per layer, and the loss are compared with the base
MoE and the dense model of the same size and seed; the verdict of claim 5 stays on the base configuration.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "first_dense"


def sizes(scale: Scale) -> list[str]:
    """The headline size and the long sizes that have a layer left to route in after the first (smoke, whose
    sizes of those are one layer deep: its smallest deeper size)."""
    deep = [s for s in scale.sizes if scale.sizes[s].num_layers >= 2]
    return [s for s in dict.fromkeys((scale.headline, *scale.long_sizes)) if s in deep] or deep[:1]


def sweep(scale: Scale) -> list[RunSpec]:
    return [make_spec(NAME, scale, size=size, seed=seed, axes={"first_dense_layers": 1},
                      model=scale.model(size, first_dense_layers=1))
            for size in sizes(scale) for seed in scale.seeds]
