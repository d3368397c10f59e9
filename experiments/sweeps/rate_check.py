"""The headline comparisons again at a higher learning rate: do the verdicts depend on the protocol's rate?

The protocol trains every run at the scale's rate (cpu: 3e-3). The `learning_rate` sweep (one seed) found both
kinds better at higher rates (cpu: dense 6e-3 and 1.2e-2 tie at its best, the MoE's best is 1.2e-2, both
~0.04 nats below the protocol's), but it varies the rate for the dense model and the base MoE only. This
sweep trains, at the scale's rate x `Scale.rate_check_factor` (cpu: x 4 = 1.2e-2) and every seed of the scale,
the models of the comparisons the protocol judges:
  dense, G1       claim 1 at the headline size (8 experts of the dense FFN's width, top-1)
  G4, G16         claim 3 (granularity at equal total and active parameters; G = 4 was the per-step best), per
                  step, and G4@flops, G16@flops at the FLOPs of G = 1 (the steps of the granularity sweep's
                  FLOP-matched runs): claim 3 is judged at equal FLOPs
  gshard, fine_x4 claim 4 (fine-grained + shared against top-2 of 16), and with hash and switch (16 experts,
  hash, switch    top-1) and dense, the five models of its ordering against DeepSeekMoE's Table 1
The seed-0 dense and G1 runs are the learning_rate sweep's x 4 points (same configuration, same name). The
verdicts stay on the protocol's rate; this measures whether each comparison changes at the better rate.
The pod scale has no factor until its own learning_rate sweep has picked one: no runs there.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec
from experiments.sweeps import granularity, shared_experts

NAME = "rate_check"
VARIANTS = ("dense", "G1", "G4", "G16", "G4@flops", "G16@flops", "gshard", "fine_x4", "hash", "switch")


def variant_model(scale: Scale, size: str, variant: str) -> dict:
    if variant == "dense":
        return scale.model(size, dense=True)
    if variant.startswith("G"):
        return scale.model(size, granularity=int(variant[1:].split("@")[0]))
    return shared_experts.variant_model(scale, size, variant)


def variant_steps(scale: Scale, size: str, variant: str) -> int:
    """The scale's steps, or for `G<n>@flops` the steps that spend G = 1's training FLOPs."""
    if variant.endswith("@flops"):
        return granularity.flops_matched_steps(scale, size, variant_model(scale, size, variant))
    return scale.steps(size)


def sweep(scale: Scale) -> list[RunSpec]:
    if scale.rate_check_factor is None:
        return []
    size = scale.headline
    lr = float(f"{scale.train['learning_rate'] * scale.rate_check_factor:.3g}")
    return [make_spec(NAME, scale, size=size, seed=seed, axes={"variant": v, "learning_rate": lr},
                      model=variant_model(scale, size, v), steps=variant_steps(scale, size, v),
                      train=dict(learning_rate=lr))
            for v in scale.axis(VARIANTS, smoke=("dense", "G1")) for seed in scale.seeds]
