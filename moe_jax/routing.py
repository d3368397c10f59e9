"""Routing decisions as pure `jnp` functions: router logits -> which experts, with which weights.

Every function takes float32 logits `<float32>[G, S, E]` (G groups of S tokens, E experts) and
needs no Flax. Token-choice selection returns per-token choices `(expert_GSK, weight_GSK)`;
capacity.py turns those into a `Routing` (the slot form every dispatch path consumes). Expert
choice and Soft MoE produce their routing directly.

The slot form (see `Routing`): for each group, `src_GEC` maps each of the E * C expert buffer slots
to the (token, choice) pair that fills it, and `slot_GSK` maps each (token, choice) pair to its slot;
both are kept so that dispatch and combine, and their gradients, are gathers, never scatters.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.types import Array


@struct.dataclass
class Routing:
    """Capacity-bounded routing of G groups of S tokens, K choices each, into E experts x C slots.

    slot_GSK:   <int32>[G, S, K] flat buffer slot e * C + c of choice k of token s; E * C if dropped.
    weight_GSK: <float32>[G, S, K] combine weight of that choice; exactly 0 where dropped.
    expert_GSK: <int32>[G, S, K] expert that serves the choice (after re-routing; the router's pick
                if dropped).
    src_GEC:    <int32>[G, E, C] s * K + k of the choice filling slot (e, c); S * K if the slot is empty.
    dropped_GSK: <bool>[G, S, K] the choice was routed but found no room.
    """

    slot_GSK: Array
    weight_GSK: Array
    expert_GSK: Array
    src_GEC: Array
    dropped_GSK: Array
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)

    @property
    def num_groups(self) -> int:
        return self.slot_GSK.shape[0]

    @property
    def group_size(self) -> int:
        return self.slot_GSK.shape[1]

    @property
    def k(self) -> int:
        return self.slot_GSK.shape[2]

    def dispatch_tensor(self, dtype=jnp.float32) -> Array:
        """One-hot `<dtype>[G, S, E, C]`: 1 where token s sits in slot (e, c) (Switch/GShard's dispatch)."""
        return self._onehot_GSKEC(dtype).sum(axis=2)

    def combine_tensor(self, dtype=jnp.float32) -> Array:
        """`<dtype>[G, S, E, C]`: the combine weight of token s from slot (e, c); differentiable in weights."""
        return jnp.einsum("gskec,gsk->gsec", self._onehot_GSKEC(dtype), self.weight_GSK.astype(dtype))

    def _onehot_GSKEC(self, dtype) -> Array:
        """1 where choice k of token s sits in slot (e, c); all 0 for a dropped choice."""
        E, C = self.num_experts, self.capacity
        # One-hot over the E * C flat slots plus the "dropped" index E * C, which is then cut off.
        onehot = jax.nn.one_hot(self.slot_GSK, E * C + 1, dtype=dtype)[..., : E * C]  # [G, S, K, E * C]
        return onehot.reshape(*self.slot_GSK.shape, E, C)

    def tokens_per_expert_E(self) -> Array:
        """<float32>[E]: assignments each expert actually serves (after capacity), summed over groups."""
        filled_GEC = self.src_GEC < self.group_size * self.k
        return filled_GEC.sum(axis=(0, 2)).astype(jnp.float32)

    def unserved_GS(self) -> Array:
        """<bool>[G, S]: tokens no expert serves (all choices dropped / picked by no expert)."""
        return jnp.all(self.slot_GSK >= self.num_experts * self.capacity, axis=-1)


@struct.dataclass
class SoftRouting:
    """Dense Soft MoE routing (Puigcerver et al. 2023): every slot is a mixture of every token.

    dispatch_GSEC: <float32>[G, S, E, C] softmax over S for each slot (slot input = sum_s w * x_s).
    combine_GSEC:  <float32>[G, S, E, C] softmax over all E * C slots for each token.
    capacity: C, the slots per expert (`MoEConfig.soft_slots_per_expert`).
    """

    dispatch_GSEC: Array
    combine_GSEC: Array
    num_experts: int = struct.field(pytree_node=False)
    capacity: int = struct.field(pytree_node=False)

    @property
    def dropped_GSK(self) -> Array:
        return jnp.zeros(self.dispatch_GSEC.shape[:2] + (1,), jnp.bool_)

    def tokens_per_expert_E(self) -> Array:
        """<float32>[E]: token mass each expert receives (each slot's dispatch weights sum to 1)."""
        return self.dispatch_GSEC.sum(axis=(0, 1, 3))

    def unserved_GS(self) -> Array:
        return jnp.zeros(self.dispatch_GSEC.shape[:2], jnp.bool_)

    def dispatch_tensor(self, dtype=jnp.float32) -> Array:
        return self.dispatch_GSEC.astype(dtype)

    def combine_tensor(self, dtype=jnp.float32) -> Array:
        return self.combine_GSEC.astype(dtype)


def scores_from_logits(logits_GSE: Array, score_fn: str) -> Array:
    """Router scores in float32: softmax over experts, or elementwise sigmoid (DeepSeek-V3)."""
    logits_GSE = logits_GSE.astype(jnp.float32)
    if score_fn == "softmax":
        return jax.nn.softmax(logits_GSE, axis=-1)
    if score_fn == "sigmoid":
        return jax.nn.sigmoid(logits_GSE)
    raise ValueError(f"score_fn={score_fn!r} is not 'softmax' or 'sigmoid'.")


def balance_probs(logits_GSE: Array, score_fn: str) -> Array:
    """P in the balance loss: router probabilities summing to 1 per token (sigmoid scores normalised)."""
    scores_GSE = scores_from_logits(logits_GSE, score_fn)
    if score_fn == "sigmoid":
        scores_GSE = scores_GSE / scores_GSE.sum(-1, keepdims=True)
    return scores_GSE


def group_limited_mask(selection_GSE: Array, n_groups: int, topk_groups: int, group_score: str = "top2_sum") -> Array:
    """Group-limited routing (DeepSeek-V2 device-limited, V3 node-limited): keep the experts of the
    `topk_groups` best expert groups.

    Experts form `n_groups` contiguous groups. A group's score is, with group_score='top2_sum'
    (DeepSeek-V3), the sum of its two highest selection scores (one if a group holds a single
    expert), or with 'max' (DeepSeek-V2's group_limited_greedy) its highest score. Returns the
    selection scores with every expert of an excluded group set to -inf -- not 0: biased sigmoid
    scores can be negative, and a 0 would then outrank them (transformers 4.57 had that bug).
    """
    G, S, E = selection_GSE.shape
    per_group = E // n_groups
    by_group = selection_GSE.reshape(G, S, n_groups, per_group)
    if group_score == "max":
        score = by_group.max(-1)  # [G, S, n_groups]
    elif group_score == "top2_sum":
        score = jax.lax.top_k(by_group, min(2, per_group))[0].sum(-1)
    else:
        raise ValueError(f"group_limited_mask: group_score={group_score!r} is not 'top2_sum' or 'max'.")
    _, kept_groups = jax.lax.top_k(score, topk_groups)  # [G, S, topk_groups]
    keep = jax.nn.one_hot(kept_groups, n_groups, dtype=jnp.bool_).any(axis=-2)  # [G, S, n_groups]
    keep_GSE = jnp.repeat(keep, per_group, axis=-1)
    return jnp.where(keep_GSE, selection_GSE, -jnp.inf)


def top_k_choices(
    logits_GSE: Array,
    k: int,
    *,
    score_fn: str = "softmax",
    topk_order: str = "softmax_topk",
    normalize: bool = False,
    routed_scaling_factor: float = 1.0,
    correction_bias_E: Optional[Array] = None,
    n_groups: int = 1,
    topk_groups: int = 1,
    group_score: str = "top2_sum",
) -> tuple[Array, Array]:
    """Token-choice top-k (Shazeer et al. 2017; Switch = k 1; Mixtral; DeepSeek-V3).

    softmax_topk: weights are the softmax probabilities of the k picked experts (optionally
        renormalised to sum to 1, as Mixtral and Qwen-MoE with norm_topk_prob do).
    topk_softmax: weights are softmax(TopK(logits)) over the k picked logits.
    sigmoid (DeepSeek-V3): selection uses scores + correction bias, weights the unbiased scores.
    All are multiplied by `routed_scaling_factor`.

    Returns expert_GSK <int32>[G, S, K] (best first) and weight_GSK <float32>[G, S, K].
    """
    E = logits_GSE.shape[-1]
    if not 1 <= k <= E:
        raise ValueError(f"top_k_choices: k={k} must be in [1, E={E}].")
    logits_GSE = logits_GSE.astype(jnp.float32)
    if topk_order == "topk_softmax":
        selection_GSE = logits_GSE
        scores_GSE = None
    else:
        scores_GSE = scores_from_logits(logits_GSE, score_fn)
        selection_GSE = scores_GSE
    if correction_bias_E is not None:
        selection_GSE = selection_GSE + jax.lax.stop_gradient(correction_bias_E.astype(jnp.float32))
    if n_groups > 1:
        selection_GSE = group_limited_mask(selection_GSE, n_groups, topk_groups, group_score)
    _, expert_GSK = jax.lax.top_k(jax.lax.stop_gradient(selection_GSE), k)
    weight_GSK = _weights_of(logits_GSE, scores_GSE, expert_GSK, score_fn=score_fn, topk_order=topk_order,
                             normalize=normalize, routed_scaling_factor=routed_scaling_factor)
    return expert_GSK.astype(jnp.int32), weight_GSK


def _weights_of(logits_GSE, scores_GSE, expert_GSK, *, score_fn, topk_order, normalize, routed_scaling_factor):
    if topk_order == "topk_softmax":
        weight_GSK = jax.nn.softmax(jnp.take_along_axis(logits_GSE, expert_GSK, axis=-1), axis=-1)
    else:
        weight_GSK = jnp.take_along_axis(scores_GSE, expert_GSK, axis=-1)
        if normalize:
            denom = weight_GSK.sum(-1, keepdims=True)
            weight_GSK = weight_GSK / (denom + 1e-20 if score_fn == "sigmoid" else denom)
    return weight_GSK * routed_scaling_factor


def choice_weights(
    logits_GSE: Array,
    expert_GSK: Array,
    *,
    score_fn: str = "softmax",
    topk_order: str = "softmax_topk",
    normalize: bool = False,
    routed_scaling_factor: float = 1.0,
) -> Array:
    """<float32>[G, S, K]: the combine weights `top_k_choices` would give the experts `expert_GSK` (any
    experts, e.g. a replayed routing): the same arithmetic, differentiable in the logits, so a replayed
    routing still trains the router through its combine weights. For the experts `top_k_choices` picked
    it returns exactly its weights."""
    logits_GSE = logits_GSE.astype(jnp.float32)
    scores_GSE = None if topk_order == "topk_softmax" else scores_from_logits(logits_GSE, score_fn)
    return _weights_of(logits_GSE, scores_GSE, expert_GSK.astype(jnp.int32), score_fn=score_fn,
                       topk_order=topk_order, normalize=normalize, routed_scaling_factor=routed_scaling_factor)


def hash_choices(token_ids_GS: Array, num_experts: int, k: int = 1) -> tuple[Array, Array]:
    """Hash layers (Roller et al. 2021): a fixed function of the token id picks the experts.

    Every (token id, expert) pair gets a pseudo-random integer from a 32-bit integer hash; a token
    takes the k experts with the largest values, so its k experts are distinct and depend on the id
    alone. Weights are 1/k (1 for k = 1). No parameters, no gradient to a router.
    """
    ids_GS1 = token_ids_GS.astype(jnp.uint32)[..., None]
    h = ids_GS1 * jnp.uint32(num_experts) + jnp.arange(num_experts, dtype=jnp.uint32)
    h = (h ^ (h >> 16)) * jnp.uint32(0x45D9F3B)
    h = (h ^ (h >> 16)) * jnp.uint32(0x45D9F3B)
    h = h ^ (h >> 16)
    _, expert_GSK = jax.lax.top_k((h >> 1).astype(jnp.int32), k)
    return expert_GSK.astype(jnp.int32), jnp.full(expert_GSK.shape, 1.0 / k, jnp.float32)


def expert_choice_routing(logits_GSE: Array, capacity: int) -> Routing:
    """Expert choice (Zhou et al. 2022): each expert takes its `capacity` highest-scoring tokens.

    Scores are softmax over experts per token; an expert's combine weight for a token is that score.
    A token picked by no expert gets 0 from the layer (the residual carries it). K = E in the
    result: choice e of a token is "expert e picked me". Not causal over the group: a token's
    routing depends on the scores of every other token in it -- use grouping='position' (groups of
    the same position across sequences) for autoregressive models.
    """
    G, S, E = logits_GSE.shape
    if not 1 <= capacity <= S:
        raise ValueError(f"expert_choice_routing: capacity={capacity} must be in [1, group size {S}].")
    scores_GSE = scores_from_logits(logits_GSE, "softmax")
    scores_GES = jnp.swapaxes(scores_GSE, 1, 2)
    _, token_GEC = jax.lax.top_k(jax.lax.stop_gradient(scores_GES), capacity)
    token_GEC = token_GEC.astype(jnp.int32)
    e_E = jnp.arange(E, dtype=jnp.int32)
    src_GEC = token_GEC * E + e_E[None, :, None]
    # Invert: slot of (token s, expert e) is e * C + c if expert e picked s.
    picked_GES = jnp.zeros((G, E, S), jnp.int32).at[
        jnp.arange(G)[:, None, None], e_E[None, :, None], token_GEC
    ].set(jnp.arange(capacity, dtype=jnp.int32)[None, None, :] + 1)
    picked_GSE = jnp.swapaxes(picked_GES, 1, 2)  # c + 1, or 0 when not picked
    slot_GSE = jnp.where(picked_GSE > 0, e_E * capacity + picked_GSE - 1, E * capacity)
    weight_GSE = jnp.where(picked_GSE > 0, scores_GSE, 0.0)
    expert_GSE = jnp.broadcast_to(e_E, (G, S, E))
    return Routing(
        slot_GSK=slot_GSE, weight_GSK=weight_GSE, expert_GSK=expert_GSE, src_GEC=src_GEC,
        dropped_GSK=jnp.zeros((G, S, E), jnp.bool_), num_experts=E, capacity=capacity)


def soft_routing(slot_logits: Array, num_experts: int) -> SoftRouting:
    """Soft MoE (Puigcerver et al. 2023) from slot logits `<float32>[G, S, E * C]` (C slots per expert).

    dispatch: softmax over the S tokens of each slot; combine: softmax over the E * C slots of each
    token. Not causal: every slot mixes every token of the group, future tokens included.
    """
    G, S, num_slots = slot_logits.shape
    E, C = num_experts, num_slots // num_experts
    slot_logits = slot_logits.astype(jnp.float32)
    return SoftRouting(
        dispatch_GSEC=jax.nn.softmax(slot_logits, axis=1).reshape(G, S, E, C),
        combine_GSEC=jax.nn.softmax(slot_logits, axis=2).reshape(G, S, E, C),
        num_experts=E, capacity=C)
