"""Capacity assignment: token choices `(expert_GSK, weight_GSK)` -> slot-form `Routing`.

Each expert has C slots per group. Choices claim slots in priority order, k-major: every token's
first choice before any token's second choice (GShard, Switch), and within one k either position
order or batch-priority order: tokens sorted by the router's top probability, i.e. the score of the
token's first choice BEFORE any renormalisation of the k weights (Riquelme et al. 2021; NLLB-MoE's
`batch_prioritized_routing`). Ranking by the combine weight after `normalize_topk` would make every
top-1 key 1.0 and batch priority silently position order.

Overflow policies, for a choice that finds its expert full:
  drop            the choice is dropped: weight 0; a token with every choice dropped gets 0 from the
                  MoE branch and is carried by the residual connection (Switch).
  reduced_weight  a bounded buffer of ceil(overflow_buffer_factor * C) slots takes the first choices
                  in priority order (the rest drop), and every kept choice of an expert whose load L
                  (choices routed to it in the group, before dropping) exceeds C has its combine
                  weight scaled by C / L. An over-subscribed expert thus serves more tokens than C,
                  at less weight each, and its total combine mass is at most C times its largest weight.
  reroute         the choice moves to the token's best-scoring expert (by router selection score) that
                  it does not already use and that still has room; this repeats in rounds (in priority
                  order within a round) until no choice can move or `max_rounds` is reached. A rerouted
                  choice keeps its combine weight, so a token's weights still sum as the router set them.
  renormalize     as drop, then the kept choices of a token share its whole weight: each is scaled by
                  (sum of the token's k weights) / (sum of its kept weights), so a token that loses its
                  second expert of two normalised ones weighs 1 on its first (NLLB-MoE with
                  normalize_router_prob_before_dropping=False). A token with every choice dropped stays
                  at 0. With k = 1 it is drop.

Masked tokens (`token_mask_GS` False: padding) claim no slot: they are neither kept nor dropped, weigh
0, and do not move any other token's position.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.routing import Routing
from moe_jax.types import Array


def priority_order_GS(key_GS: Array, priority: str) -> Array:
    """<int32>[G, S]: token indices in the order they claim slots (within one k); key_GS <float32>[G, S]
    is what priority='top_prob' sorts by, descending."""
    G, S = key_GS.shape
    if priority == "position":
        return jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (G, S))
    if priority == "top_prob":
        # Stable sort on -key: equal keys keep position order.
        return jnp.argsort(-jax.lax.stop_gradient(key_GS), axis=1, stable=True).astype(jnp.int32)
    raise ValueError(f"priority={priority!r} is not 'position' or 'top_prob'.")


def _positions(expert_GSK: Array, active_GSK: Array, order_GS: Array, start_GE: Array, num_experts: int) -> Array:
    """Slot position each active choice would take in its expert, counting from `start_GE`.

    Choices claim positions k-major, then in `order_GS`. Returns <int32>[G, S, K] (meaningless
    where not active).
    """
    G, S, K = expert_GSK.shape
    # Reorder to claim order [G, K, S].
    expert_GKS = jnp.swapaxes(jnp.take_along_axis(expert_GSK, order_GS[..., None], axis=1), 1, 2)
    active_GKS = jnp.swapaxes(jnp.take_along_axis(active_GSK, order_GS[..., None], axis=1), 1, 2)
    onehot_GKSE = jax.nn.one_hot(expert_GKS, num_experts, dtype=jnp.int32) * active_GKS[..., None]
    # Earlier claims on each expert: a cumulative sum over the K * S claims in claim order.
    claims = onehot_GKSE.reshape(G, K * S, num_experts)
    before_GKSE = (jnp.cumsum(claims, axis=1) - claims).reshape(G, K, S, num_experts)
    pos_GKS = jnp.sum((before_GKSE + start_GE[:, None, None, :]) * onehot_GKSE, axis=-1)
    # Undo the reorder.
    inverse_GS = jnp.argsort(order_GS, axis=1)
    return jnp.take_along_axis(jnp.swapaxes(pos_GKS, 1, 2), inverse_GS[..., None], axis=1)


def _counts_GE(expert_GSK: Array, mask_GSK: Array, num_experts: int) -> Array:
    onehot = jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.int32) * mask_GSK[..., None]
    return onehot.sum(axis=(1, 2))


def assign_capacity(
    expert_GSK: Array,
    weight_GSK: Array,
    *,
    num_experts: int,
    capacity: int,
    priority: str = "position",
    overflow: str = "drop",
    nominal_capacity: Optional[int] = None,
    selection_GSE: Optional[Array] = None,
    max_rounds: Optional[int] = None,
    priority_key_GS: Optional[Array] = None,
    token_mask_GS: Optional[Array] = None,
) -> Routing:
    """Places token choices into E experts x `capacity` slots per group; see the module docstring.

    expert_GSK: <int32>[G, S, K] the router's choices, best first; weight_GSK their combine weights.
    nominal_capacity: the C that `reduced_weight` scales by (its buffer is `capacity`).
    selection_GSE: <float32>[G, S, E] scores that rank fallback experts for `reroute` (-inf = never).
    priority_key_GS: <float32>[G, S] what priority='top_prob' ranks tokens by: the router's top probability
        before renormalisation (`Router.route` passes it). Default weight_GSK[..., 0], the combine weight,
        which is the same key only when the weights are unnormalised probabilities.
    token_mask_GS: <bool>[G, S] False for tokens that take no part (padding); default all True.
    """
    G, S, K = expert_GSK.shape
    E, C = num_experts, capacity
    if C < 1:
        raise ValueError(f"assign_capacity: capacity={C} must be >= 1.")
    expert_GSK = expert_GSK.astype(jnp.int32)
    order_GS = priority_order_GS(weight_GSK[..., 0] if priority_key_GS is None else priority_key_GS, priority)
    routed_GSK = jnp.ones((G, S, K), jnp.bool_)
    if token_mask_GS is not None:
        routed_GSK = routed_GSK & token_mask_GS.astype(jnp.bool_)[..., None]
    pos_GSK = _positions(expert_GSK, routed_GSK, order_GS, jnp.zeros((G, E), jnp.int32), E)
    kept_GSK = routed_GSK & (pos_GSK < C)

    if overflow == "drop":
        pass
    elif overflow == "renormalize":
        total_GS1 = jnp.where(routed_GSK, weight_GSK, 0.0).sum(-1, keepdims=True)
        kept_GS1 = jnp.where(kept_GSK, weight_GSK, 0.0).sum(-1, keepdims=True)
        # Where nothing is kept the weights become 0 below; the guarded denominator only avoids 0 / 0.
        weight_GSK = weight_GSK * (total_GS1 / jnp.where(kept_GS1 > 0, kept_GS1, 1.0))
    elif overflow == "reduced_weight":
        if nominal_capacity is None:
            raise ValueError("assign_capacity: overflow='reduced_weight' needs nominal_capacity.")
        load_GE = _counts_GE(expert_GSK, routed_GSK, E).astype(jnp.float32)
        scale_GE = jnp.minimum(1.0, nominal_capacity / jnp.maximum(load_GE, 1.0))
        weight_GSK = weight_GSK * jnp.take_along_axis(scale_GE[:, None, :], expert_GSK, axis=-1)
    elif overflow == "reroute":
        if selection_GSE is None:
            raise ValueError("assign_capacity: overflow='reroute' needs selection_GSE to rank fallback experts.")
        expert_GSK, pos_GSK, kept_GSK = _reroute(
            expert_GSK, pos_GSK, kept_GSK, routed_GSK, order_GS, jax.lax.stop_gradient(selection_GSE), C,
            max_rounds if max_rounds is not None else max(E - K, 0))
    else:
        raise ValueError(f"overflow={overflow!r} is not one of drop, reduced_weight, reroute, renormalize.")

    slot_GSK = jnp.where(kept_GSK, expert_GSK * C + pos_GSK, E * C).astype(jnp.int32)
    weight_GSK = jnp.where(kept_GSK, weight_GSK, 0.0)
    sk_GSK = jnp.arange(S * K, dtype=jnp.int32).reshape(1, S, K)
    # Invert slot_GSK over the E * C flat slots plus the "dropped" slot E * C, which is then cut off.
    src = jnp.full((G, E * C + 1), S * K, jnp.int32).at[
        jnp.arange(G)[:, None, None], slot_GSK].set(jnp.broadcast_to(sk_GSK, (G, S, K)))  # [G, E * C + 1]
    return Routing(
        slot_GSK=slot_GSK, weight_GSK=weight_GSK, expert_GSK=expert_GSK,
        src_GEC=src[:, : E * C].reshape(G, E, C), dropped_GSK=routed_GSK & ~kept_GSK,
        num_experts=E, capacity=C)


def _reroute(expert_GSK, pos_GSK, kept_GSK, routed_GSK, order_GS, selection_GSE, C, max_rounds):
    """Rounds of moving overflowed choices to the next-best expert with room (see module docstring)."""
    G, S, K = expert_GSK.shape
    E = selection_GSE.shape[-1]
    fill_GE = _counts_GE(expert_GSK, kept_GSK, E)
    tried_GSE = jax.nn.one_hot(expert_GSK, E, dtype=jnp.bool_).any(axis=2) | jnp.isneginf(selection_GSE)

    def round_(_, carry):
        expert_GSK, pos_GSK, kept_GSK, fill_GE, tried_GSE = carry
        waiting_GSK = routed_GSK & ~kept_GSK
        room_GE = fill_GE < C
        candidate_GSE = jnp.where(tried_GSE | ~room_GE[:, None, :], -jnp.inf, selection_GSE)
        # A token with several waiting choices sends them to its best, second best, ... candidates.
        rank_GSK = jnp.cumsum(waiting_GSK, axis=-1) - 1
        best_score_GSK, best_GSK = jax.lax.top_k(candidate_GSE, K)
        pick_GSK = jnp.take_along_axis(best_GSK, jnp.clip(rank_GSK, 0, K - 1), axis=-1)
        pick_ok_GSK = waiting_GSK & jnp.isfinite(jnp.take_along_axis(best_score_GSK, jnp.clip(rank_GSK, 0, K - 1), axis=-1))
        new_expert_GSK = jnp.where(pick_ok_GSK, pick_GSK, expert_GSK)
        new_pos_GSK = _positions(new_expert_GSK, pick_ok_GSK, order_GS, fill_GE, E)
        placed_GSK = pick_ok_GSK & (new_pos_GSK < C)
        tried_GSE = tried_GSE | (jax.nn.one_hot(new_expert_GSK, E, dtype=jnp.bool_) & pick_ok_GSK[..., None]).any(2)
        expert_GSK = jnp.where(placed_GSK, new_expert_GSK, expert_GSK)
        pos_GSK = jnp.where(placed_GSK, new_pos_GSK, pos_GSK)
        fill_GE = fill_GE + _counts_GE(new_expert_GSK, placed_GSK, E)
        return expert_GSK, pos_GSK, kept_GSK | placed_GSK, fill_GE, tried_GSE

    carry = (expert_GSK, pos_GSK, kept_GSK, fill_GE, tried_GSE)
    expert_GSK, pos_GSK, kept_GSK, _, _ = jax.lax.fori_loop(0, max_rounds, round_, carry)
    return expert_GSK, pos_GSK, kept_GSK
