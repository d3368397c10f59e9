"""Router strategies on the 8-expert top-1 model: token choice, expert choice, hash; reroute vs drop.

  token_choice   learned top-1, overflow dropped, capacity factor 1.25 (the base model)
  expert_choice  each expert takes its top-C tokens (Zhou et al. 2022), C for capacity factor 1.25.
                 Groups are the tokens at one position across the batch (grouping='position'):
                 with groups of one sequence an expert's choice of token t would depend on later
                 tokens of the same sequence, which leaks the future into a language model's loss.
                 min_capacity=1, so C = ceil(1.25 * batch / 8) (see the table's effective_cf).
  hash           fixed expert per token id (Roller et al. 2021), no learned gate
  drop_cf1       token choice at capacity factor 1.0, overflowing choices dropped
  reroute_cf1    the same, overflowing choices moved to the next-best expert with room
  dropless       token choice without capacity (every choice computed; tokens sorted by expert)
  topk_softmax   top-1 then softmax over the one chosen logit: the combine weight is always 1, so the
                 router learns only from the balance and z losses (a diagnosis run: moe_jax warns about
                 this configuration)
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "routers"
VARIANTS = ("token_choice", "expert_choice", "hash", "drop_cf1", "reroute_cf1", "dropless", "topk_softmax")


def variant_fields(scale: Scale, variant: str) -> dict:
    if variant == "expert_choice":  # a group is one position across the batch (the whole batch when S is set)
        group = None if scale.group_size is None else scale.data["batch_size"]
        return dict(router="expert_choice", grouping="position", min_capacity=1, group_size=group)
    return {
        "token_choice": {},
        "hash": dict(router="hash"),
        "drop_cf1": dict(capacity_factor=1.0),
        "reroute_cf1": dict(capacity_factor=1.0, overflow="reroute"),
        "dropless": dict(capacity_factor=None, eval_capacity_factor=None, expert_backend="blocked"),
        "topk_softmax": dict(topk_order="topk_softmax"),
    }[variant]


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    return [make_spec(NAME, scale, size=size, seed=scale.seeds[0], axes={"variant": v},
                      model=scale.model(size, **variant_fields(scale, v)))
            for v in scale.axis(VARIANTS, smoke=("expert_choice", "reroute_cf1"))]
