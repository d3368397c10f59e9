"""Learning rate and warm-up at the headline size, for the dense model and the base MoE (8 experts, top-1).

The protocol trains every run at the scale's learning rate and warm-up; this sweep checks that choice
for both model kinds, so that a dense-vs-MoE gap is not an artefact of a rate that suits one of them:
  lr      the scale's rate / 3, x 1, x 2, x 4, x 8 (cpu: 1e-3, 3e-3, 6e-3, 1.2e-2, 2.4e-2), warm-up of the
          scale; x 4 and x 8 bracket the best rate when x 2 beats x 1 (cpu: the MoE's best was x 4)
  warmup  the scale's rate with 30 % and 300 % of its warm-up steps (cpu: 30, 300)
One seed each; the scale's own point is the expert and size sweeps' seed-0 run.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "learning_rate"
LR_FACTORS = (1 / 3, 1.0, 2.0, 4.0, 8.0)
WARMUP_FACTORS = (0.3, 3.0)


def sweep(scale: Scale) -> list[RunSpec]:
    size, seed = scale.headline, scale.seeds[0]
    lr0, warmup0 = scale.train["learning_rate"], scale.train["warmup_steps"]
    points = [(float(f"{lr0 * f:.3g}"), warmup0) for f in LR_FACTORS]
    points += [(lr0, max(1, round(warmup0 * f))) for f in WARMUP_FACTORS]
    specs = []
    for variant in ("dense", "moe"):
        model = scale.model(size, dense=variant == "dense")
        for lr, warmup in scale.axis(points, smoke=(points[0], points[-1])):
            specs.append(make_spec(NAME, scale, size=size, seed=seed,
                                   axes={"variant": variant, "learning_rate": lr, "warmup_steps": warmup},
                                   model=model, train=dict(learning_rate=lr, warmup_steps=warmup)))
    return specs
