"""Auxiliary losses, routing metrics and the aux-loss-free bias update: free functions.

Losses are returned by the layer, never added silently; the training loop multiplies by the
coefficients (the layer reports both the raw values and the weighted ones).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from moe_jax.types import Array


def load_balancing_loss(probs_GSE: Array, expert_GSK: Array, num_experts: int) -> Array:
    """E * sum_i f_i P_i, averaged over G scopes of S tokens (routing groups, sequences, or one scope:
    the global batch).

    f_i: fraction of the scope's S * K router choices that picked expert i (before capacity drops),
         so sum_i f_i = 1. P_i: mean router probability of expert i over the scope's S tokens.
    Equals 1 for perfectly uniform routing, E (k = 1) when all tokens and all probability go to one
    expert. Switch Transformer (Fedus et al. 2022, Eq. 4) for k = 1; for k > 1 Hugging Face's Mixtral
    and Qwen-MoE loss counts f summed over k (sums to K), i.e. K times this value.
    """
    K = expert_GSK.shape[-1]
    f_GE = jax.nn.one_hot(expert_GSK, num_experts, dtype=jnp.float32).sum(axis=2).mean(axis=1) / K
    p_GE = probs_GSE.astype(jnp.float32).mean(axis=1)
    return num_experts * jnp.mean(jnp.sum(jax.lax.stop_gradient(f_GE) * p_GE, axis=-1))


def router_z_loss(logits_TE: Array) -> Array:
    """ST-MoE (Zoph et al. 2022, Eq. 5): mean over tokens of logsumexp(logits)^2."""
    lse = jax.nn.logsumexp(logits_TE.astype(jnp.float32), axis=-1)
    return jnp.mean(lse**2)


def router_entropy(probs_TE: Array) -> Array:
    """Mean over tokens of the entropy (nats) of the router's distribution over experts."""
    p = probs_TE.astype(jnp.float32)
    return -jnp.mean(jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1))


def update_correction_bias(bias_E: Array, tokens_per_expert_E: Array, rate: float) -> Array:
    """DeepSeek-V3 auxiliary-loss-free balancing (Wang et al. 2024): b_i += rate * sign(mean load - load_i).

    Applied after the optimizer step, outside the gradient. Overloaded experts go down, underloaded up.
    """
    load_E = jax.lax.stop_gradient(tokens_per_expert_E).astype(jnp.float32)
    return bias_E + rate * jnp.sign(load_E.mean() - load_E)


def routing_metrics(*, probs_TE: Array, routed_E: Array, served_E: Array, dropped_TK: Array,
                    unserved_T: Array) -> dict[str, Array]:
    """Named metrics researchers watch.

    probs_TE: router probabilities; routed_E: choices the router made per expert (before capacity);
    served_E: choices each expert actually served; dropped_TK: <bool> choices that found no room;
    unserved_T: <bool> tokens that no expert serves (the residual alone carries them).
    """
    dropped_TK = dropped_TK.astype(jnp.float32)
    return {
        "tokens_per_expert": served_E,
        "routed_per_expert": routed_E,
        "dropped_fraction": dropped_TK.mean(),
        "dropped_fraction_per_k": dropped_TK.mean(axis=0),
        "unserved_token_fraction": unserved_T.astype(jnp.float32).mean(),
        "router_entropy": router_entropy(probs_TE),
        "load_cv": jnp.std(routed_E) / jnp.maximum(jnp.mean(routed_E), 1e-9),
        "dead_experts": jnp.sum(served_E == 0).astype(jnp.float32),
    }
