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
"""
from __future__ import annotations

from experiments.scales import Scale
from experiments.spec import RunSpec, make_spec

NAME = "routers"
VARIANTS = ("token_choice", "expert_choice", "hash", "drop_cf1", "reroute_cf1")
_FIELDS = {
    "token_choice": {},
    "expert_choice": dict(router="expert_choice", grouping="position", min_capacity=1),
    "hash": dict(router="hash"),
    "drop_cf1": dict(capacity_factor=1.0),
    "reroute_cf1": dict(capacity_factor=1.0, overflow="reroute"),
}


def sweep(scale: Scale) -> list[RunSpec]:
    size = scale.headline
    return [make_spec(NAME, scale, size=size, seed=scale.seeds[0], axes={"variant": v},
                      model=scale.model(size, **_FIELDS[v]))
            for v in scale.axis(VARIANTS, smoke=("expert_choice", "reroute_cf1"))]
