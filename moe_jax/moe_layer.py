"""`MoELayer`: router -> dispatch -> experts -> combine, plus shared experts. Replaces a transformer FFN.

    y, aux = layer(x_BLD, train=True, rng=key)       # aux.losses, aux.metrics
    loss = task_loss + aux.losses["aux_loss"]       # the weighted sum; the layer never adds it itself

A call is `forward` (the output and the routing results, `RoutingStats`) then `aux` (losses and metrics
from them). Code that runs the layer another way calls the two itself: the expert-parallel wrapper
(moe_jax.sharding) runs `forward` per device under shard_map, with the expert buffers sent through
all_to_all (`run_experts`), and `aux` on the gathered results. The layer knows nothing of meshes.

Tokens are routed within groups (`MoEConfig.grouping`, `group_size`):
  tokens    groups of consecutive tokens of the flattened [B * L] batch (default: one sequence).
            Token choice is causal per token, but capacity is not: whether a choice is dropped
            depends on the choices of tokens earlier in the group and, with k-major priority or
            top_prob priority, later ones too.
  position  groups of the tokens at one position across sequences (Krajewski et al. 2024): nothing a
            token's routing depends on comes from a later position of any sequence, so expert
            choice and capacity drops are causal.

A token mask (`token_mask_BL`, False = padding) leaves tokens out of the layer: they claim no capacity
(no other token's routing changes), their output is exactly 0 (routed and shared experts alike; the
residual carries them), and they count in no statistic: neither f_i nor P_i of the balance loss (as
Hugging Face's `load_balancing_loss_func` with an attention mask), nor the z-loss, nor any metric (load
per expert, dropped fractions, entropy). Token choice only (router 'top_k' or 'hash'); on the capacity
paths (gather, einsum) and the dropless path of one device. The expert-parallel wrapper refuses it.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax import dispatch as dispatch_lib
from moe_jax import losses as losses_lib
from moe_jax.moe_config import MoEConfig
from moe_jax.experts import Experts, FeedForward
from moe_jax.flops import layer_flops
from moe_jax.routers import Router
from moe_jax import routing as routing_lib
from moe_jax.routing import balance_probs
from moe_jax.types import Array


@struct.dataclass
class MoEAux:
    """What the layer reports besides its output: losses (raw and weighted) and routing metrics.

    balance_load: <float32>[n, E] router choices per expert in each of the n statistics slices of a
    balance_loss_scope='batch' loss (n = 1: the whole batch; see `MoELayer.aux`), what a microbatched step
    sums over the microbatches of a batch to pass back as `balance_load`; None for the other scopes.
    """

    losses: dict
    metrics: dict
    choices: Optional[dict] = None  # see `MoELayer.aux`; None where the forward pass gave no token choices
    balance_load: Optional[Array] = None


@struct.dataclass
class RoutingStats:
    """What `MoELayer.aux` needs from a forward pass (G groups of S tokens, K choices, E experts).

    logits_GSE: <float32>[G, S, E] router logits.  expert_GSK: <int32>[G, S, K] the router's token
    choices before capacity (None for expert choice and Soft MoE).  served_E: <float32>[E] choices each
    expert served.  dropped_GSK: <bool>[G, S, K].  unserved_GS: <bool>[G, S].  weight_GSK: <float32>[G, S, K]
    the combine weights of the token choices before capacity (None where expert_GSK is None, or not kept).
    token_mask_GS: <bool>[G, S] the layer's token mask, grouped (None: every token counts).
    """

    logits_GSE: Array
    expert_GSK: Optional[Array]
    served_E: Array
    dropped_GSK: Array
    unserved_GS: Array
    weight_GSK: Optional[Array] = None
    token_mask_GS: Optional[Array] = None


def group_tokens(x: Array, cfg: MoEConfig) -> Array:
    """[B, L, ...] -> [G, S, ...] per `cfg.grouping` / `cfg.group_size` (error names the field)."""
    B, L = x.shape[:2]
    rest = x.shape[2:]
    S = cfg.tokens_per_group(B, L)
    if cfg.grouping == "tokens":
        if (B * L) % S:
            raise ValueError(
                f"MoEConfig.group_size={S} does not divide the {B * L} tokens of a [{B}, {L}] batch; "
                "choose a group size that divides batch * length.")
        return x.reshape((B * L // S, S) + rest)
    if B % S:
        raise ValueError(
            f"MoEConfig.group_size={S} does not divide the batch of {B} sequences (grouping='position' "
            "groups the same position across sequences); choose a group size that divides the batch.")
    x = jnp.swapaxes(x, 0, 1)  # [L, B, ...]
    return x.reshape((L * B // S, S) + rest)


def ungroup_tokens(x: Array, cfg: MoEConfig, B: int, L: int) -> Array:
    """[G, S, ...] -> [B, L, ...], the inverse of `group_tokens`."""
    rest = x.shape[2:]
    if cfg.grouping == "tokens":
        return x.reshape((B, L) + rest)
    return jnp.swapaxes(x.reshape((L, B) + rest), 0, 1)


class MoELayer(nnx.Module):
    """Mixture-of-Experts FFN (Shazeer et al. 2017; GShard; Switch; DeepSeekMoE; Qwen-MoE)."""

    def __init__(self, cfg: MoEConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.cfg = cfg
        self.dtype = dtype
        self.router = Router(cfg, rngs=rngs)
        self.experts = Experts(
            cfg.num_routed_experts, cfg.d_model, cfg.expert_d_ff, activation=cfg.activation,
            use_bias=cfg.expert_bias, init_scale=cfg.expert_init_scale, dtype=dtype, param_dtype=param_dtype,
            capacity_backend="blocked" if cfg.expert_backend == "blocked" else "einsum", rngs=rngs)
        shared, shared_gate = None, None
        if cfg.num_shared_experts:
            shared = FeedForward(cfg.d_model, cfg.shared_width, activation=cfg.activation,
                                 init_scale=cfg.expert_init_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if cfg.shared_expert_gate:
                init = nnx.initializers.lecun_normal()
                shared_gate = nnx.Param(init(rngs.params(), (cfg.d_model, 1), param_dtype))
        self.shared = nnx.data(shared)
        self.shared_gate_D1 = nnx.data(shared_gate)

    def __call__(self, x_BLD: Array, *, train: bool = False, rng: Optional[Array] = None,
                 token_ids_BL: Optional[Array] = None, replay: Optional[tuple] = None,
                 balance_load: Optional[Array] = None,
                 token_mask_BL: Optional[Array] = None) -> tuple[Array, MoEAux]:
        """x_BLD <dtype>[B, L, D] -> (y_BLD, MoEAux). `rng` turns on router noise (training only);
        `replay`, `token_mask_BL`: see `forward`; `balance_load`: see `aux`."""
        B, L, _ = x_BLD.shape
        y_BLD, stats = self.forward(x_BLD, train=train, rng=rng, token_ids_BL=token_ids_BL, replay=replay,
                                    token_mask_BL=token_mask_BL)
        return y_BLD, self.aux(stats, B, L, train, balance_load=balance_load)

    def forward(self, x_BLD: Array, *, train: bool, rng: Optional[Array] = None,
                token_ids_BL: Optional[Array] = None, run_experts=None,
                replay: Optional[tuple] = None, run_dropless=None,
                token_mask_BL: Optional[Array] = None) -> tuple[Array, RoutingStats]:
        """The layer without its losses and metrics: x_BLD <dtype>[B, L, D] -> (y_BLD, RoutingStats).

        run_experts: capacity buffers `[E, X, D] -> [E, X, D]` through the experts; default `self.experts`
        (the expert-parallel path sends the buffers to the devices holding the experts and back).
        replay: (expert_BLK <int>[B, L, K], weight_BLK <float32>[B, L, K] or None): token choices used instead
        of the router's (a ledger's, moe_jax.ledger); capacity, losses and metrics follow from them as from the
        router's own. Without weights the router weighs the given experts itself (differentiably).
        run_dropless: dropless routing's token choices through the experts and back,
        `(x_TD, expert_TK, weight_TK) -> y_TD` (the weighted sum over the K choices); default: sorted by
        expert on this device (the expert-parallel path exchanges the sorted rows with the devices holding
        the experts, moe_jax.sharding.dropless).
        token_mask_BL: <bool>[B, L] False for tokens left out of the layer (padding): no capacity, output 0, no
        statistics (see the module docstring). Token choice only.
        """
        cfg = self.cfg
        B, L, D = x_BLD.shape
        if D != cfg.d_model:
            raise ValueError(f"MoELayer: input width {D} != MoEConfig.d_model={cfg.d_model}.")
        x_GSD = group_tokens(x_BLD, cfg).astype(self.dtype)
        G, S, _ = x_GSD.shape
        token_ids_GS = None if token_ids_BL is None else group_tokens(token_ids_BL, cfg)
        mask_GS = None
        if token_mask_BL is not None:
            if token_mask_BL.shape != (B, L):
                raise ValueError(f"MoELayer: token_mask of shape {token_mask_BL.shape} does not match the "
                                 f"[{B}, {L}] batch; give one bool per token (False = padding).")
            if cfg.router in ("soft", "expert_choice"):
                raise ValueError(f"MoEConfig.router={cfg.router!r} has no per-token choices to mask: a token mask "
                                 "(padding) is supported for router='top_k' and 'hash'; pass token_mask=None.")
            mask_GS = group_tokens(token_mask_BL.astype(jnp.bool_), cfg)
        logits_GSE = self.router.logits(x_GSD, rng if train else None)
        replay_GSK = None
        if replay is not None:
            expert_BLK, weight_BLK = replay
            if expert_BLK.shape[:2] != (B, L):
                raise ValueError(f"MoELayer: replayed expert ids of shape {expert_BLK.shape} do not match the "
                                 f"[{B}, {L}] batch; replay a ledger recorded on this batch shape.")
            replay_GSK = (group_tokens(expert_BLK, cfg),
                          None if weight_BLK is None else group_tokens(weight_BLK, cfg))

        weight_GSK = None
        if cfg.capacity_factor_for(train) is None:
            y_GSD, expert_GSK, weight_GSK = self._dropless(x_GSD, logits_GSE, token_ids_GS, replay_GSK,
                                                            run_dropless, mask_GS)
            served_E = losses_lib.expert_load(expert_GSK, cfg.num_routed_experts, mask_GS).sum(axis=0)
            dropped_GSK = jnp.zeros(expert_GSK.shape, jnp.bool_)
            unserved_GS = jnp.zeros((G, S), jnp.bool_)
        else:
            routed = self.router.route(logits_GSE, train=train, token_ids_GS=token_ids_GS, replay=replay_GSK,
                                       token_mask_GS=mask_GS)
            routing, expert_GSK, weight_GSK = routed.routing, routed.expert_GSK, routed.weight_GSK
            dispatcher = dispatch_lib.make_dispatcher(cfg.dispatch)
            buffer_EXD = dispatcher.dispatch(x_GSD, routing)
            y_GSD = dispatcher.combine((run_experts or self.experts)(buffer_EXD), routing)
            served_E, dropped_GSK, unserved_GS = (
                routing.tokens_per_expert_E(), routing.dropped_GSK, routing.unserved_GS())

        if self.shared is not None:
            shared_TD = self.shared(x_GSD.reshape(G * S, D))
            if self.shared_gate_D1 is not None:
                gate_T1 = jax.nn.sigmoid(x_GSD.reshape(G * S, D) @ self.shared_gate_D1[...].astype(self.dtype))
                shared_TD = gate_T1 * shared_TD
            y_GSD = y_GSD + shared_TD.reshape(G, S, D)
        if mask_GS is not None:
            y_GSD = jnp.where(mask_GS[..., None], y_GSD, jnp.zeros((), y_GSD.dtype))
            unserved_GS = unserved_GS & mask_GS

        stats = RoutingStats(logits_GSE=logits_GSE, expert_GSK=expert_GSK, served_E=served_E,
                             dropped_GSK=dropped_GSK, unserved_GS=unserved_GS, weight_GSK=weight_GSK,
                             token_mask_GS=mask_GS)
        return ungroup_tokens(y_GSD, cfg, B, L).astype(x_BLD.dtype), stats

    def _dropless(self, x_GSD, logits_GSE, token_ids_GS, replay_GSK=None, run_dropless=None, mask_GS=None):
        cfg = self.cfg
        G, S, D = x_GSD.shape
        if replay_GSK is not None and cfg.router in ("soft", "expert_choice"):
            self.router._replayed(logits_GSE, *replay_GSK)  # raises: nothing to replay
        expert_GSK, weight_GSK, _ = self.router.choices(logits_GSE, token_ids_GS, replay_GSK)
        K = expert_GSK.shape[-1]
        # Masked tokens still occupy rows of the sorted buffer (its size is static) but weigh 0.
        run_weight_GSK = weight_GSK if mask_GS is None else jnp.where(mask_GS[..., None], weight_GSK, 0.0)
        if run_dropless is not None:
            y_TD = run_dropless(x_GSD.reshape(G * S, D), expert_GSK.reshape(G * S, K),
                                run_weight_GSK.reshape(G * S, K))
            return y_TD.reshape(G, S, D), expert_GSK, weight_GSK
        block = cfg.dropless_block_size if cfg.expert_backend == "blocked" else 1
        sorted_routing = dispatch_lib.sort_choices(
            expert_GSK.reshape(G * S, K), run_weight_GSK.reshape(G * S, K), cfg.num_routed_experts, block)
        dispatcher = dispatch_lib.SortedDispatcher()
        rows_MD = dispatcher.dispatch(x_GSD.reshape(G * S, D), sorted_routing)
        out_MD = self.experts.grouped(rows_MD, sorted_routing.group_sizes_E, backend=cfg.expert_backend,
                                      block_size=block, counts_E=sorted_routing.counts_E)
        return dispatcher.combine(out_MD, sorted_routing).reshape(G, S, D), expert_GSK, weight_GSK

    def aux(self, stats: RoutingStats, B: int, L: int, train: bool, balance_shards: int = 1,
            balance_load: Optional[Array] = None) -> MoEAux:
        """Losses and metrics of a forward pass over a `[B, L]` batch, from its `RoutingStats` (grouped as
        `group_tokens` groups that batch). stats.expert_GSK: the router's token choices before capacity
        (None for expert choice and Soft MoE, which have none: they are balanced by construction, so
        their balance loss is reported as 0).

        balance_shards: with balance_loss_scope='batch', the balance loss is the mean of its value over
        this many equal contiguous slices of the batch (the per-shard statistics of a data-parallel run
        whose shards each balance their own tokens); 1 = the global batch.

        balance_load: <float32>[balance_shards, E], with balance_loss_scope='batch': the router choices per
        expert (f_i) to use in the balance loss instead of this batch's own, i.e. those of the whole batch
        when this call sees one microbatch of it (its `MoEAux.balance_load`, summed over the microbatches).
        P_i stays this call's. Ignored by the other scopes, whose statistics never span microbatches.
        """
        cfg = self.cfg
        logits_GSE, expert_GSK, served_E = stats.logits_GSE, stats.expert_GSK, stats.served_E
        dropped_GSK, unserved_GS, mask_GS = stats.dropped_GSK, stats.unserved_GS, stats.token_mask_GS
        G, S, _ = logits_GSE.shape
        E, T = cfg.num_routed_experts, G * S
        zero = jnp.zeros((), jnp.float32)
        if cfg.router == "soft":  # router distribution over experts: softmax of each expert's best slot logit
            expert_logits_GSE = logits_GSE.reshape(G, S, E, cfg.soft_slots_per_expert).max(-1)
        else:
            expert_logits_GSE = logits_GSE
        probs_GSE = balance_probs(expert_logits_GSE, cfg.score_fn)
        has_router = cfg.router != "hash"
        mask_T = None if mask_GS is None else mask_GS.reshape(T)
        z_loss = losses_lib.router_z_loss(logits_GSE.reshape(T, -1), mask_T) if has_router else zero
        balance, own_load = zero, None
        if expert_GSK is not None and has_router:

            def scoped(a_GS):
                """[G, S, ...] -> [scopes, tokens per scope, ...] for the balance loss's scope."""
                if a_GS is None or cfg.balance_loss_scope == "group":
                    return a_GS
                if cfg.balance_loss_scope == "sequence":
                    return ungroup_tokens(a_GS, cfg, B, L)
                if balance_shards == 1:
                    return a_GS.reshape((1, T) + a_GS.shape[2:])
                n = balance_shards  # shard-major token order: ungrouped [B, L], sharded over B
                return ungroup_tokens(a_GS, cfg, B, L).reshape((n, T // n) + a_GS.shape[2:])

            p, e, m = scoped(probs_GSE), scoped(expert_GSK), scoped(mask_GS)
            load = None
            if cfg.balance_loss_scope == "batch":
                own_load = losses_lib.expert_load(e, E, m)
                load = balance_load
            balance = losses_lib.load_balancing_loss(p, e, E, load_GE=load, token_mask_GS=m)
        losses = {
            "balance_loss": balance,
            "z_loss": z_loss,
            "aux_loss": cfg.balance_loss_coef * balance + cfg.z_loss_coef * z_loss,
        }
        routed_E = served_E if expert_GSK is None else losses_lib.expert_load(expert_GSK, E, mask_GS).sum(axis=0)
        metrics = losses_lib.routing_metrics(
            probs_TE=probs_GSE.reshape(T, E), routed_E=routed_E, served_E=served_E,
            dropped_TK=dropped_GSK.reshape(T, -1), unserved_T=unserved_GS.reshape(T), token_mask_T=mask_T)
        for name, value in layer_flops(cfg, num_tokens=T, group_size=S, train=train).items():
            metrics[name] = jnp.asarray(value, jnp.float32)
        return MoEAux(losses=losses, metrics=metrics, choices=self._choices(stats, B, L),
                      balance_load=own_load)

    def _choices(self, stats: RoutingStats, B: int, L: int) -> Optional[dict]:
        """The token choices of a forward pass, per token of the [B, L] batch (what a ledger records):
        expert <int32>[B, L, K], weight <float32>[B, L, K] (before capacity), dropped <bool>[B, L, K], and
        score <float32>[B, L, K], the router's raw score of each chosen expert (softmax probability or
        sigmoid, before normalisation, scaling or bias). None for expert choice and Soft MoE. Only reshapes
        and one gather of arrays the pass computed: a jitted step that does not return them does not compute
        them (XLA removes unused outputs)."""
        if stats.expert_GSK is None or stats.weight_GSK is None:
            return None
        scores_GSE = routing_lib.scores_from_logits(stats.logits_GSE, self.cfg.score_fn)
        score_GSK = jnp.take_along_axis(scores_GSE, stats.expert_GSK, axis=-1)
        out = {"expert": stats.expert_GSK, "weight": stats.weight_GSK, "dropped": stats.dropped_GSK,
               "score": score_GSK}
        return {k: ungroup_tokens(v, self.cfg, B, L) for k, v in out.items()}
