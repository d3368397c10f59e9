"""The router module: gate weights in float32, training noise, and the choice of routing strategy.

All routing math lives in routing.py and capacity.py; this module only owns parameters and RNG use.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax import capacity as capacity_lib
from moe_jax import routing as routing_lib
from moe_jax.moe_config import MoEConfig
from moe_jax.types import Array


@struct.dataclass
class RouterOutput:
    """What `Router.route` gives the fixed-buffer (capacity) paths.

    routing: the slot form every dispatcher consumes (`SoftRouting` for Soft MoE).
    expert_GSK: <int32>[G, S, K] the router's own token choices before capacity (f_i in the balance
        loss); None for expert choice and Soft MoE, which make no token choices.
    weight_GSK: <float32>[G, S, K] the combine weights of those choices before capacity (None likewise).
    """

    routing: routing_lib.Routing | routing_lib.SoftRouting
    expert_GSK: Optional[Array]
    weight_GSK: Optional[Array] = None


class RouterBias(nnx.Variable):
    """DeepSeek-V3's expert correction bias: state updated by a rule, not by the optimizer."""


class Router(nnx.Module):
    """x -> float32 logits -> routing. Gate weight `w_DE` (Soft MoE: `[D, E * C]`, C slots per expert)."""

    def __init__(self, cfg: MoEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        E = cfg.num_routed_experts
        out = E * cfg.soft_slots_per_expert if cfg.router == "soft" else E
        init = nnx.initializers.variance_scaling(cfg.router_init_scale, "fan_in", "truncated_normal")
        self.w_DE = nnx.data(None if cfg.router == "hash" else nnx.Param(init(rngs.params(), (cfg.d_model, out), jnp.float32)))
        self.correction_bias_E = nnx.data(RouterBias(jnp.zeros((E,), jnp.float32)) if cfg.use_correction_bias else None)

    def logits(self, x_GSD: Array, rng: Optional[Array] = None) -> Array:
        """<float32>[G, S, E]. Noise (Switch jitter on the input, Gaussian on the logits) only with an rng.

        Hash routing has no gate: its logits are zeros (uniform probabilities in the metrics).
        """
        cfg = self.cfg
        if self.w_DE is None:
            return jnp.zeros(x_GSD.shape[:2] + (cfg.num_routed_experts,), jnp.float32)
        x_GSD = x_GSD.astype(jnp.float32)
        if rng is not None:
            jitter_rng, noise_rng = jax.random.split(rng)
            if cfg.jitter_eps > 0:
                x_GSD = x_GSD * jax.random.uniform(
                    jitter_rng, x_GSD.shape, jnp.float32, 1.0 - cfg.jitter_eps, 1.0 + cfg.jitter_eps)
        logits_GSE = jnp.einsum("gsd,de->gse", x_GSD, self.w_DE[...], precision=jax.lax.Precision.HIGHEST)
        if rng is not None and cfg.logit_noise_std > 0:
            logits_GSE = logits_GSE + cfg.logit_noise_std * jax.random.normal(noise_rng, logits_GSE.shape)
        return logits_GSE

    def choices(self, logits_GSE: Array, token_ids_GS: Optional[Array],
                replay: Optional[tuple] = None) -> tuple[Array, Array, Optional[Array]]:
        """Token choice: (expert_GSK, weight_GSK, selection scores used to rank fallback experts).

        replay: (expert_GSK <int>[G, S, K], weight_GSK <float32>[G, S, K] or None) taken instead of the
        router's picks (moe_jax.ledger): without weights, the router weighs the given experts as it weighs its
        own picks (`routing.choice_weights`), so for its own picks the result is identical.
        """
        cfg = self.cfg
        E, k = cfg.num_routed_experts, cfg.top_k
        if replay is not None:
            return self._replayed(logits_GSE, *replay)
        if cfg.router == "hash":
            if token_ids_GS is None:
                raise ValueError("MoEConfig.router='hash' routes by token id: pass token_ids to the layer.")
            expert_GSK, weight_GSK = routing_lib.hash_choices(token_ids_GS, E, k)
            return expert_GSK, weight_GSK, None
        bias_E = None if self.correction_bias_E is None else self.correction_bias_E[...]
        expert_GSK, weight_GSK = routing_lib.top_k_choices(
            logits_GSE, k, score_fn=cfg.score_fn, topk_order=cfg.topk_order, normalize=cfg.normalize_topk,
            routed_scaling_factor=cfg.routed_scaling_factor, correction_bias_E=bias_E,
            n_groups=cfg.n_expert_groups, topk_groups=cfg.topk_groups, group_score=cfg.group_score)
        return expert_GSK, weight_GSK, self._selection(logits_GSE)

    def _selection(self, logits_GSE: Array) -> Optional[Array]:
        """Selection scores that rank the fallback experts of a re-routed choice (overflow='reroute')."""
        cfg = self.cfg
        if cfg.overflow != "reroute" or cfg.router == "hash":
            return None
        bias_E = None if self.correction_bias_E is None else self.correction_bias_E[...]
        selection_GSE = routing_lib.scores_from_logits(logits_GSE, cfg.score_fn)
        if bias_E is not None:
            selection_GSE = selection_GSE + bias_E
        if cfg.n_expert_groups > 1:
            selection_GSE = routing_lib.group_limited_mask(selection_GSE, cfg.n_expert_groups, cfg.topk_groups,
                                                         cfg.group_score)
        return selection_GSE

    def _replayed(self, logits_GSE: Array, expert_GSK: Array, weight_GSK: Optional[Array]):
        cfg = self.cfg
        if cfg.router in ("soft", "expert_choice"):
            raise ValueError(f"MoEConfig.router={cfg.router!r} makes no token choices, so there is no routing to "
                             "replay; replay works with router='top_k' or 'hash'.")
        if expert_GSK.shape != logits_GSE.shape[:2] + (cfg.top_k,):
            raise ValueError(f"replayed expert ids have shape {expert_GSK.shape}; this layer routes "
                             f"{logits_GSE.shape[:2] + (cfg.top_k,)} (groups, tokens per group, top_k): record the "
                             "ledger with the same model and batch shape.")
        expert_GSK = expert_GSK.astype(jnp.int32)
        if weight_GSK is None:
            if cfg.router == "hash":
                weight_GSK = jnp.full(expert_GSK.shape, 1.0 / cfg.top_k, jnp.float32)
            else:
                weight_GSK = routing_lib.choice_weights(
                    logits_GSE, expert_GSK, score_fn=cfg.score_fn, topk_order=cfg.topk_order,
                    normalize=cfg.normalize_topk, routed_scaling_factor=cfg.routed_scaling_factor)
        return expert_GSK, weight_GSK.astype(jnp.float32), self._selection(logits_GSE)

    def route(self, logits_GSE: Array, *, train: bool, token_ids_GS: Optional[Array] = None,
              replay: Optional[tuple] = None, token_mask_GS: Optional[Array] = None) -> RouterOutput:
        """Capacity routing for the fixed-buffer paths (Soft MoE: logits_GSE are its slot logits).

        token_mask_GS: <bool>[G, S] False for tokens that claim no capacity (padding); token choice only.
        """
        cfg = self.cfg
        if token_mask_GS is not None and cfg.router in ("soft", "expert_choice"):
            raise ValueError(f"MoEConfig.router={cfg.router!r} has no per-token choices to mask: a token mask "
                             "(padding) is supported for router='top_k' and 'hash'; pass token_mask=None.")
        S = logits_GSE.shape[1]
        C = cfg.capacity(S, train)
        if replay is not None and cfg.router in ("soft", "expert_choice"):
            self._replayed(logits_GSE, *replay)  # raises: nothing to replay
        if cfg.router == "soft":
            return RouterOutput(routing_lib.soft_routing(logits_GSE, cfg.num_routed_experts), expert_GSK=None)
        if cfg.router == "expert_choice":
            return RouterOutput(routing_lib.expert_choice_routing(logits_GSE, C), expert_GSK=None)
        expert_GSK, weight_GSK, selection_GSE = self.choices(logits_GSE, token_ids_GS, replay)
        routing = capacity_lib.assign_capacity(
            expert_GSK, weight_GSK, num_experts=cfg.num_routed_experts, capacity=C, priority=cfg.priority,
            overflow=cfg.overflow, nominal_capacity=cfg.nominal_capacity(S, train),
            selection_GSE=selection_GSE, max_rounds=cfg.max_reroute_rounds,
            priority_key_GS=self.priority_key(logits_GSE, expert_GSK) if cfg.priority == "top_prob" else None,
            token_mask_GS=token_mask_GS)
        return RouterOutput(routing, expert_GSK, weight_GSK)

    def priority_key(self, logits_GSE: Array, expert_GSK: Array) -> Array:
        """<float32>[G, S]: what batch-priority routing ranks tokens by: the router's score (softmax probability,
        or sigmoid) of the token's first choice, before normalize_topk, routed_scaling_factor or a correction
        bias (Riquelme et al. 2021; NLLB-MoE ranks by the top softmax probability). Not the combine weight:
        after normalisation every top-1 weight is 1 and the ranking would collapse to position order.
        Hash routing has no scores (uniform): position order."""
        scores_GSE = routing_lib.scores_from_logits(logits_GSE, self.cfg.score_fn)
        return jnp.take_along_axis(scores_GSE, expert_GSK[..., :1], axis=-1)[..., 0]
