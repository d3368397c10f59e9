"""Auxiliary losses, routing metrics and the aux-loss-free bias update: free functions.

Losses are returned by the layer, never added silently; the training loop multiplies by the
coefficients (the layer reports both the raw values and the weighted ones).
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.types import Array


def load_balancing_loss(probs_GSE: Array, expert_GSK: Array, num_experts: int,
                        load_GE: Optional[Array] = None, token_mask_GS: Optional[Array] = None) -> Array:
    """E * sum_i f_i P_i, averaged over G scopes of S tokens (routing groups, sequences, or one scope:
    the global batch).

    f_i: fraction of the scope's S * K router choices that picked expert i (before capacity drops),
         so sum_i f_i = 1. P_i: mean router probability of expert i over the scope's S tokens.
    Equals 1 for perfectly uniform routing, E (k = 1) when all tokens and all probability go to one
    expert. Switch Transformer (Fedus et al. 2022, Eq. 4) for k = 1; for k > 1 Hugging Face's Mixtral
    and Qwen-MoE loss counts f summed over k (sums to K), i.e. K times this value.

    load_GE: <float32>[G, E] router choices per expert of each scope counted elsewhere (`expert_load`), to
    use for f_i instead of those of `expert_GSK`: the whole batch's counts when the scope spans several
    microbatches (moe_jax.train.step), so that the mean over microbatches of this loss is the loss, and its
    gradient the gradient, of the whole batch (f_i is a constant; P_i a token mean).

    token_mask_GS: <bool>[G, S] False for tokens left out (padding): f_i and P_i are then means over each
    scope's real tokens only, and the loss the mean over the scopes that have any (Hugging Face's
    `load_balancing_loss_func` with an attention mask, which has one scope: the batch).
    """
    G, S, K = expert_GSK.shape
    m_GS = jnp.ones((G, S), jnp.float32) if token_mask_GS is None else token_mask_GS.astype(jnp.float32)
    n_G1 = m_GS.sum(axis=1, keepdims=True)
    if load_GE is None:
        f_GE = expert_load(expert_GSK, num_experts, token_mask_GS) / jnp.maximum(K * n_G1, 1.0)
    else:
        f_GE = load_GE / jnp.maximum(load_GE.sum(axis=-1, keepdims=True), 1.0)
    p_GE = jnp.einsum("gse,gs->ge", probs_GSE.astype(jnp.float32), m_GS) / jnp.maximum(n_G1, 1.0)
    loss_G = num_experts * jnp.sum(jax.lax.stop_gradient(f_GE) * p_GE, axis=-1)
    if token_mask_GS is None:
        return jnp.mean(loss_G)
    has_G = (n_G1[:, 0] > 0).astype(jnp.float32)
    return jnp.sum(loss_G * has_G) / jnp.maximum(has_G.sum(), 1.0)


def expert_load(expert_GSK: Array, num_experts: int, token_mask_GS: Optional[Array] = None) -> Array:
    """<float32>[G, E]: router choices per expert in each of G scopes (sums to S * K per scope, or K times its
    real tokens where `token_mask_GS` leaves some out)."""
    onehot_GSKE = jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.float32)
    if token_mask_GS is not None:
        onehot_GSKE = onehot_GSKE * token_mask_GS.astype(jnp.float32)[..., None, None]
    return onehot_GSKE.sum(axis=(1, 2))


def _token_mean(value_T: Array, mask_T: Optional[Array]) -> Array:
    if mask_T is None:
        return jnp.mean(value_T)
    m = mask_T.astype(jnp.float32)
    return jnp.sum(value_T * m) / jnp.maximum(m.sum(), 1.0)


def router_z_loss(logits_TE: Array, token_mask_T: Optional[Array] = None) -> Array:
    """ST-MoE (Zoph et al. 2022, Eq. 5): mean over tokens (the real ones, given a mask) of logsumexp(logits)^2."""
    lse = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
    return _token_mean(lse**2, token_mask_T)


def router_entropy(probs_TE: Array, token_mask_T: Optional[Array] = None) -> Array:
    """Mean over tokens (the real ones, given a mask) of the entropy (nats) of the router's distribution."""
    p = probs_TE.astype(jnp.float32)
    return _token_mean(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1), token_mask_T)


def update_correction_bias(bias_E: Array, tokens_per_expert_E: Array, rate: float) -> Array:
    """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024): b_i += rate * sign(mean load - load_i).

    Applied after the optimizer step, outside the gradient. Overloaded experts go down, underloaded up.
    """
    load_E = jax.lax.stop_gradient(tokens_per_expert_E).astype(jnp.float32)
    return bias_E + rate * jnp.sign(load_E.mean() - load_E)


def routing_metrics(*, probs_TE: Array, routed_E: Array, served_E: Array, dropped_TK: Array,
                    unserved_T: Array, token_mask_T: Optional[Array] = None) -> dict[str, Array]:
    """Named metrics researchers watch.

    probs_TE: router probabilities; routed_E: choices the router made per expert (before capacity);
    served_E: choices each expert actually served; dropped_TK: <bool> choices that found no room;
    unserved_T: <bool> tokens that no expert serves (the residual alone carries them).
    token_mask_T: <bool> False for tokens left out (padding): fractions and means are over the real tokens
    (the caller leaves masked tokens out of routed_E and served_E).
    """
    dropped_TK = dropped_TK.astype(jnp.float32)
    if token_mask_T is None:
        dropped_K = dropped_TK.mean(axis=0)
    else:
        m_T = token_mask_T.astype(jnp.float32)
        dropped_K = jnp.einsum("tk,t->k", dropped_TK, m_T) / jnp.maximum(m_T.sum(), 1.0)
    return {
        "tokens_per_expert": served_E,
        "routed_per_expert": routed_E,
        "dropped_fraction": dropped_K.mean(),
        "dropped_fraction_per_k": dropped_K,
        "unserved_token_fraction": _token_mean(unserved_T.astype(jnp.float32), token_mask_T),
        "router_entropy": router_entropy(probs_TE, token_mask_T),
        "load_cv": jnp.std(routed_E) / jnp.maximum(jnp.mean(routed_E), 1e-9),
        "dead_experts": jnp.sum(served_E == 0).astype(jnp.float32),
    }


# Extensive metrics: a batch's value is the sum over its microbatches. load_cv and dead_experts are recomputed
# from the summed loads; every other metric is a token or choice mean (equal microbatches: the mean).
SUMMED_METRICS = ("tokens_per_expert", "routed_per_expert", "router_flops", "useful_flops", "executed_flops")


def combine_routing_metrics(metrics_M: dict[str, Array]) -> dict[str, Array]:
    """The metrics of a batch from those of its M equal microbatches (each value stacked on a leading M axis)."""
    out = {name: (v.sum(axis=0) if name in SUMMED_METRICS else v.mean(axis=0)) for name, v in metrics_M.items()}
    if "routed_per_expert" in out and "load_cv" in out:
        routed_E = out["routed_per_expert"]
        out["load_cv"] = jnp.std(routed_E) / jnp.maximum(jnp.mean(routed_E), 1e-9)
    if "tokens_per_expert" in out and "dead_experts" in out:
        out["dead_experts"] = jnp.sum(out["tokens_per_expert"] == 0).astype(jnp.float32)
    return out
