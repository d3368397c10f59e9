"""Shared and fine-grained experts in DeepSeekMoE's order (Dai et al. 2024, Fig. 3 and Table 1).

At equal total and active parameters (width F = the dense FFN's):
  gshard          16 experts of width F, top-2
  gshard+shared   1 shared expert + top-1 of 15 routed (shared expert isolation)
  fine_x2         1 shared + top-3 of 31 routed, all of width F/2 (fine-grained segmentation)
  fine_x4         1 shared + top-7 of 63 routed, all of width F/4
and, as in their Table 1, the references at the active compute of one expert:
  dense           a dense FFN of width F
  hash            16 experts, top-1, hash routing on the token id (Roller et al. 2021)
  switch          16 experts, top-1 (learned)
Published (Pile loss, Table 1): dense 2.060 > hash 1.932 > Switch 1.881 > GShard 1.867 > DeepSeekMoE 1.808.
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "shared_experts"
VARIANTS = ("dense", "hash", "switch", "gshard", "gshard+shared", "fine_x2", "fine_x4")


def variant_model(scale: Scale, size: str, variant: str) -> dict:
    F = scale.sizes[size].ffn
    if variant == "dense":
        return scale.model(size, dense=True)
    if variant in ("hash", "switch"):
        return scale.model(size, num_experts=16, num_experts_per_token=1,
                           router="hash" if variant == "hash" else "top_k")
    if variant == "gshard":
        return scale.model(size, num_experts=16, num_experts_per_token=2)
    if variant == "gshard+shared":
        return scale.model(size, num_experts=15, num_experts_per_token=1, num_shared_experts=1)
    if variant.startswith("fine_x"):
        m = int(variant[len("fine_x"):])
        if F % m:
            raise ValueError(f"{variant}: the scale's ffn={F} is not divisible by {m}.")
        return scale.model(size, moe_d_ff=F // m, num_experts=16 * m - 1, num_experts_per_token=2 * m - 1,
                           num_shared_experts=1)
    raise ValueError(f"unknown variant {variant!r}; one of {VARIANTS}.")


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    return [make_spec(NAME, scale, size=size, seed=seed, axes={"variant": v}, model=variant_model(scale, size, v))
            for v in scale.axis(VARIANTS, smoke=("hash", "fine_x4")) for seed in scale.seeds]
