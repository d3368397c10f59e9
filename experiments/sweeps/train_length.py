"""Training length: the scale's `long_sizes` at LONG_FACTOR x their steps, dense and MoE (8 experts, top-1),
every seed of the scale, the same batches and evaluation windows as the model-size sweep's runs.

The MoE-beats-dense claim is judged at equal steps at every size; at one budget the larger sizes see fewer
tokens per active parameter (cpu: 21 at s, 7.5 at m, 3.4 at l), and at s the MoE's lead grew from behind
dense at ~4 tokens per parameter to -0.058 nats at 21. These runs measure whether the gap at a larger size
grows the same way with more tokens (a cosine schedule to the longer end, not a longer run's midpoint).
The pod scale has no `long_sizes`: its sizes already train ~20 tokens per active parameter each.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "train_length"
LONG_FACTOR = 2


def sweep(scale: Scale) -> list[RunSpec]:
    specs = []
    for size in scale.long_sizes:
        steps = LONG_FACTOR * scale.steps(size)
        for variant in ("dense", "moe"):
            model = scale.model(size, dense=variant == "dense")
            for seed in scale.seeds:
                specs.append(make_spec(NAME, scale, size=size, seed=seed, axes={"variant": variant, "steps": steps},
                                       model=model, steps=steps))
    return specs
