"""`Transformer`: a decoder-only language model of pre-norm blocks, dense `FeedForward` or `MoELayer` FFNs.

    model = Transformer(cfg, rngs=nnx.Rngs(params=0))
    logits_BLV, aux = model(tokens_BL, train=True, rng=key)   # <float32>[B, L, V], ModelAux
    loss = cross_entropy(logits_BLV, targets_BL) + aux.aux_loss

    logits_BLV, aux = model(tokens_BL, train=True, rng=key, mtp=True)  # + aux.mtp_logits (cfg.mtp_depth > 0)

    cache = model.init_cache(batch_size, max_len)             # fixed size: one trace per shape
    logits_BLV, cache = model.decode(tokens_BL, cache)         # prefill (L tokens) or one step (L = 1)

Block i: x += Attn(Norm(x)); x += FFN_i(Norm(x)) with FFN_i an `MoELayer` for i in
`cfg.moe_layer_indices` (optionally followed by a norm, `moe_output_norm`), else a dense FFN.
Parameters are `cfg.param_dtype`; activations `cfg.dtype`; router logits and output logits float32.

With `cfg.scan_layers` the blocks after the dense prefix run as `jax.lax.scan` over periods of `moe_every` layers
whose variables are stacked (`prefix`, `scan`, `suffix` instead of `blocks`; moe_jax/layer_stack.py), with
the unrolled model's parameters, outputs and aux; `cfg.remat` puts each unrolled block and each scanned period
under `jax.checkpoint` (not the MTP modules' blocks).

With `cfg.mtp_depth` > 0 the model also holds DeepSeek-V3's multi-token-prediction modules
(moe_jax/mtp.py), built after everything else (the main parameters are initialised as without them);
they run only when a call asks for them (`mtp=True`, the train step), never in `decode`.

Decoding runs the MoE layers with train=False on the tokens of that call. Routing is per token, but
capacity is per group: with `grouping='tokens'`, a decode step's group is the one new token of each
sequence, whereas the full forward pass routes the whole sequence as one group, where a token can lose
its slot to earlier tokens. The two agree token by token when nothing is dropped (dropless, or an
eval capacity of at least the group size: eval_capacity_factor >= E / k), or with `grouping='position'`,
whose groups (one position across the batch) are the same in both.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.attention import make_attention
from moe_jax.experts import FeedForward
from moe_jax.layer_stack import checkpointed, layer_places, slice_module
from moe_jax.model_config import ModelConfig
from moe_jax.moe_layer import MoELayer
from moe_jax.types import Array


@struct.dataclass
class ModelAux:
    """aux_loss: <float32>[] sum over MoE layers of their weighted aux loss (`losses['aux_loss']`).
    layers: one dict per MoE layer in depth order: {"layer": index, "losses": {...}, "metrics": {...},
        "choices": {...} or None} (choices: `MoELayer.aux`'s per-token routing decisions, for the ledger), and
        "balance_load" (`MoEAux.balance_load`) for a layer with balance_loss_scope='batch'.
    layer_indices: the same indices, static (python ints even under jit).
    mtp_logits: with `mtp=True`, <float32>[B, L - k, V] of MTP depth k = 1..D, predicting `targets_BL[:, k:]`
    (its MoE layers are in `layers` and `aux_loss` too, indices num_layers + k - 1); else ()."""

    aux_loss: Array
    layers: tuple
    layer_indices: tuple = struct.field(pytree_node=False, default=())
    mtp_logits: tuple = ()


@struct.dataclass
class DecodeCache:
    """Per-layer attention caches (`KVCache` or `LatentCache`) and `index`, <int32>[]: positions filled."""

    layers: tuple
    index: Array

    @property
    def max_len(self) -> int:
        return jax.tree.leaves(self.layers[0])[0].shape[1]

    def numbers_per_token(self) -> int:
        """Cached numbers per token per layer (summed over the layer's arrays)."""
        leaves = jax.tree.leaves(self.layers[0])
        B, M = leaves[0].shape[:2]
        return sum(x.size for x in leaves) // (B * M)


def make_norm(cfg: ModelConfig, dim: int, *, rngs: nnx.Rngs) -> nnx.Module:
    kind = nnx.RMSNorm if cfg.norm == "rmsnorm" else nnx.LayerNorm
    return kind(dim, epsilon=cfg.norm_eps, dtype=cfg.compute_dtype, param_dtype=cfg.param_jnp_dtype, rngs=rngs)


class Block(nnx.Module):
    """Pre-norm transformer block: attention, then a dense FFN or an MoE layer."""

    def __init__(self, cfg: ModelConfig, layer_index: int, *, rngs: nnx.Rngs):
        self.layer_index = layer_index
        self.is_moe = cfg.is_moe_layer(layer_index)
        self.attn_norm = make_norm(cfg, cfg.d_model, rngs=rngs)
        self.attn = make_attention(cfg, rngs=rngs)
        self.ffn_norm = make_norm(cfg, cfg.d_model, rngs=rngs)
        dt, pd = cfg.compute_dtype, cfg.param_jnp_dtype
        moe_norm = None
        if self.is_moe:
            self.ffn = MoELayer(cfg.moe, dtype=dt, param_dtype=pd, rngs=rngs)
            if cfg.moe_output_norm:
                moe_norm = make_norm(cfg, cfg.d_model, rngs=rngs)
        else:
            self.ffn = FeedForward(cfg.d_model, cfg.d_ff, activation=cfg.activation, dtype=dt, param_dtype=pd,
                                   rngs=rngs)
        self.moe_norm = nnx.data(moe_norm)

    def __call__(self, x_BLD: Array, positions_BL: Array, tokens_BL: Array, *, train: bool,
                 rng: Optional[Array], cache=None, index=None, replay=None, balance_load: Optional[Array] = None,
                 token_mask_BL: Optional[Array] = None):
        h_BLD, cache = self.attn(self.attn_norm(x_BLD), positions_BL, cache, index)
        x_BLD = x_BLD + h_BLD.astype(x_BLD.dtype)
        y_BLD = self.ffn_norm(x_BLD)
        aux = None
        if self.is_moe:
            y_BLD, aux = self.ffn(y_BLD, train=train, rng=rng, token_ids_BL=tokens_BL, replay=replay,
                                  balance_load=balance_load, token_mask_BL=token_mask_BL)
            if self.moe_norm is not None:
                y_BLD = self.moe_norm(y_BLD)
        else:
            B, L, D = y_BLD.shape
            y_BLD = self.ffn(y_BLD.reshape(B * L, D)).reshape(B, L, D)
        return x_BLD + y_BLD.astype(x_BLD.dtype), aux, cache


class Transformer(nnx.Module):
    """Decoder-only MoE transformer (GShard / Switch / Mixtral / DeepSeek-V2,V3 layouts, per `ModelConfig`)."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        V, D, pd = cfg.vocab_size, cfg.d_model, cfg.param_jnp_dtype
        # std 1/sqrt(D): tied logits x_final . e_v then start with unit variance, like the untied head's.
        embed_init = nnx.initializers.normal(stddev=D ** -0.5)
        self.embed_VD = nnx.Param(embed_init(rngs.params(), (V, D), pd))
        blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)]
        if cfg.scan_layers:  # built as unrolled (the same rng draws), then stacked: moe_jax/layer_stack.py
            N, P, n = cfg.first_dense_layers, cfg.layer_period, cfg.scan_periods
            self.prefix = nnx.List(blocks[:N])
            periods = [nnx.split(nnx.List(blocks[N + j * P:N + (j + 1) * P])) for j in range(n)]
            stack = []
            if n:  # the blocks' static attributes (layer_index) are period 0's
                stack = nnx.merge(periods[0][0], jax.tree.map(lambda *xs: jnp.stack(xs), *[s for _, s in periods]))
            self.scan = nnx.List(stack)
            self.suffix = nnx.List(blocks[N + n * P:])
        else:
            self.blocks = nnx.List(blocks)
        self.final_norm = make_norm(cfg, D, rngs=rngs)
        unembed = None
        if not cfg.tie_embeddings:
            unembed = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (D, V), pd))
        self.unembed_DV = nnx.data(unembed)
        mtp = None
        if cfg.mtp_depth:  # last: the main parameters' initialisation does not depend on mtp_depth
            from moe_jax.mtp import MultiTokenPrediction

            mtp = MultiTokenPrediction(cfg, block_cls=Block, make_norm=make_norm, rngs=rngs)
        self.mtp = nnx.data(mtp)

    def moe_layer_slots(self, *, mtp: bool = True) -> list[tuple[int, MoELayer, Optional[int]]]:
        """(layer index, MoELayer, period) for every MoE layer in depth order (the order of `ModelAux.layers`;
        the MTP modules' last unless `mtp=False`). period is None where the module is the layer's own; for a
        scanned layer (`cfg.scan_layers`) the module is the stack's, its variables stacked over the periods, and
        the layer's are at [period] (what the correction-bias update writes)."""
        out = []
        for i, (where, k, j) in enumerate(self._places()):
            block = getattr(self, where)[k]
            if block.is_moe:
                out.append((i, block.ffn, j))
        if self.mtp is not None and mtp:
            out += [(i, layer, None) for i, layer in self.mtp.moe_layers()]
        return out

    def moe_layers(self, *, mtp: bool = True) -> list[tuple[int, MoELayer]]:
        """(layer index, MoELayer) for every MoE layer, in depth order (the order of `ModelAux.layers`); the MTP
        modules' MoE layers last, unless `mtp=False` (a forward pass without `mtp=True` runs only the others).
        A scanned layer's module is a copy holding its slice of the stack (reading only: writes to it do not
        reach the model; `moe_layer_slots` gives the stack itself)."""
        return [(i, layer if j is None else slice_module(layer, j)) for i, layer, j in self.moe_layer_slots(mtp=mtp)]

    def _places(self) -> list[tuple[str, int, Optional[int]]]:
        """Per main layer: (attribute, index in it, period or None), `layer_stack.layer_places`."""
        if self.cfg.scan_layers:
            return layer_places(self.cfg)
        return [("blocks", i, None) for i in range(self.cfg.num_layers)]

    def _check_tokens(self, tokens_BL: Array, max_len: int, what: str) -> None:
        if tokens_BL.ndim != 2:
            raise ValueError(f"Transformer: tokens must be [batch, length] integers, got shape {tokens_BL.shape}.")
        if not jnp.issubdtype(tokens_BL.dtype, jnp.integer):
            raise ValueError(f"Transformer: tokens must be integer ids, got dtype {tokens_BL.dtype}.")
        if tokens_BL.shape[1] > max_len:
            raise ValueError(f"Transformer: {tokens_BL.shape[1]} tokens exceed {what}={max_len}; "
                             f"shorten the input or raise {what}.")

    def __call__(self, tokens_BL: Array, *, train: bool = False, rng: Optional[Array] = None,
                 replay: Optional[tuple] = None, balance_load: Optional[dict] = None,
                 mtp: bool = False, token_mask: Optional[Array] = None) -> tuple[Array, ModelAux]:
        """tokens_BL <int>[B, L] -> (logits <float32>[B, L, V], ModelAux). `rng` drives router noise (train).

        replay: one (expert_BLK, weight_BLK or None) per MoE layer in depth order, routing used instead of the
        routers' (moe_jax.ledger.replay_choices); each layer's choices come back in `aux.layers[i]["choices"]`.
        balance_load: {MoE layer index: <float32>[n, E]} the router choices per expert that the layer's
        balance_loss_scope='batch' loss uses for f_i (`MoELayer.aux`): a microbatched train step passes the
        whole batch's (the sum over its microbatches of `ModelAux.layers[i]["balance_load"]`).
        mtp: also run the multi-token-prediction modules (if any): `ModelAux.mtp_logits`.
        token_mask: <bool>[B, L] False for padding: every MoE layer leaves those tokens out (no capacity, output
        0, no balance statistics or metrics; `MoELayer.forward`). Attention is not masked: pad at the end of a
        sequence (right padding), which causal attention keeps out of every real token.
        """
        self._check_tokens(tokens_BL, self.cfg.max_seq_len, "ModelConfig.max_seq_len")
        B, L = tokens_BL.shape
        if mtp and L <= self.cfg.mtp_depth:
            raise ValueError(f"Transformer: {L} input tokens leave no position for MTP depth {self.cfg.mtp_depth} "
                             "(depth k predicts token i + k + 1 at positions i < L - k); use sequences longer than "
                             "ModelConfig.mtp_depth + 1 tokens (inputs plus targets).")
        positions_BL = jnp.broadcast_to(jnp.arange(L, dtype=jnp.int32), (B, L))
        if token_mask is not None:
            if token_mask.shape != (B, L):
                raise ValueError(f"Transformer: token_mask of shape {token_mask.shape} does not match the tokens' "
                                 f"[{B}, {L}]; give one bool per token (False = padding).")
            if mtp and self.mtp is not None:
                raise ValueError("Transformer: token_mask is not supported with mtp=True (the MTP modules see "
                                 "shifted windows of the sequence); call with mtp=False or token_mask=None.")
        moe_count = len(self.cfg.moe_layer_indices)
        if replay is not None and len(replay) != moe_count:
            raise ValueError(f"Transformer: replay has {len(replay)} entries for {moe_count} MoE layers; give one "
                             "(expert ids, weights or None) per MoE layer in depth order.")
        logits_BLV, aux, _ = self._forward(tokens_BL, positions_BL, train=train, rng=rng, replay=replay,
                                           balance_load=balance_load, mtp=mtp, token_mask_BL=token_mask)
        return logits_BLV, aux

    def init_cache(self, batch_size: int, max_len: Optional[int] = None) -> DecodeCache:
        """An empty fixed-size cache of `max_len` positions (default `cfg.max_seq_len`), in the compute dtype."""
        max_len = self.cfg.max_seq_len if max_len is None else max_len
        if not 0 < max_len <= self.cfg.max_seq_len:
            raise ValueError(f"Transformer.init_cache: max_len={max_len} must be in [1, ModelConfig.max_seq_len="
                             f"{self.cfg.max_seq_len}].")
        layers = []
        for where, k, j in self._places():
            attn = getattr(self, where)[k].attn
            layers.append((attn if j is None else slice_module(attn, j)).init_cache(batch_size, max_len))
        layers = tuple(layers)
        return DecodeCache(layers=layers, index=jnp.zeros((), jnp.int32))

    def decode(self, tokens_BL: Array, cache: DecodeCache) -> tuple[Array, DecodeCache]:
        """Feed L tokens at positions [cache.index, cache.index + L) (eval mode): (logits <float32>[B, L, V],
        cache advanced by L). The caller keeps cache.index + L <= cache.max_len."""
        self._check_tokens(tokens_BL, cache.max_len, "the cache length")
        B, L = tokens_BL.shape
        positions_BL = jnp.broadcast_to(cache.index + jnp.arange(L, dtype=jnp.int32), (B, L))
        logits_BLV, _, layers = self._forward(tokens_BL, positions_BL, train=False, rng=None, cache=cache)
        return logits_BLV, DecodeCache(layers=layers, index=cache.index + L)

    def _embed(self, tokens_BL: Array) -> Array:
        return jnp.take(self.embed_VD[...], tokens_BL, axis=0).astype(self.cfg.compute_dtype)

    def _head(self, x_BLD: Array) -> Array:
        """Normalised states -> <float32>[B, L, V] logits (the output head; the embedding when tied)."""
        dt = self.cfg.compute_dtype
        if self.unembed_DV is None:
            logits_BLV = jnp.einsum("bld,vd->blv", x_BLD, self.embed_VD[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        else:
            logits_BLV = jnp.einsum("bld,dv->blv", x_BLD, self.unembed_DV[...].astype(dt),
                                    preferred_element_type=jnp.float32)
        return logits_BLV.astype(jnp.float32)

    def _forward(self, tokens_BL, positions_BL, *, train, rng, cache: Optional[DecodeCache] = None, replay=None,
                 balance_load: Optional[dict] = None, mtp: bool = False, token_mask_BL: Optional[Array] = None):
        x_BLD = self._embed(tokens_BL)
        cfg = self.cfg
        replay = {} if replay is None else dict(zip(cfg.moe_layer_indices, replay))
        balance_load = {} if balance_load is None else balance_load
        index = None if cache is None else cache.index

        def run_block(block, x_BLD, layer_rng, layer_cache, layer_replay, load):
            x_BLD, aux, layer_cache = block(x_BLD, positions_BL, tokens_BL, train=train, rng=layer_rng,
                                            cache=layer_cache, index=index, replay=layer_replay, balance_load=load,
                                            token_mask_BL=token_mask_BL)
            return x_BLD, None if aux is None else _aux_entry(aux), layer_cache

        def layer_inputs(i):
            return (None if rng is None else jax.random.fold_in(rng, i), None if cache is None else cache.layers[i],
                    replay.get(i), balance_load.get(i))

        def unrolled(block, x_BLD, i):
            if cfg.remat == "none":
                return run_block(block, x_BLD, *layer_inputs(i))
            graphdef, state = nnx.split(block)
            remat = checkpointed(lambda state, x_BLD, *inputs: run_block(nnx.merge(graphdef, state), x_BLD, *inputs),
                                 cfg.remat)
            return remat(state, x_BLD, *layer_inputs(i))

        places = self._places()
        layer_aux, new_layers = [], [None] * cfg.num_layers
        i = 0
        while i < cfg.num_layers:
            where, k, j = places[i]
            if j is None:
                x_BLD, entry, new_layers[i] = unrolled(getattr(self, where)[k], x_BLD, i)
                if entry is not None:
                    layer_aux.append({"layer": i, **entry})
                i += 1
                continue
            x_BLD, entries = self._scan(x_BLD, i, run_block, layer_inputs, new_layers)
            layer_aux += entries
            i += cfg.layer_period * cfg.scan_periods
        mtp_logits = ()
        if mtp and self.mtp is not None and cache is None:
            mtp_logits, mtp_aux = self.mtp(x_BLD, tokens_BL, embed=self._embed, head=self._head, train=train,
                                           rng=rng, balance_load=balance_load)
            layer_aux += mtp_aux
        logits_BLV = self._head(self.final_norm(x_BLD))
        aux_loss = sum((a["losses"]["aux_loss"].astype(jnp.float32) for a in layer_aux), jnp.zeros((), jnp.float32))
        aux = ModelAux(aux_loss=aux_loss, layers=tuple(layer_aux),
                       layer_indices=tuple(a["layer"] for a in layer_aux), mtp_logits=mtp_logits)
        return logits_BLV, aux, tuple(new_layers)

    def _scan(self, x_BLD, first: int, run_block, layer_inputs, new_layers: list):
        """Layers [first, first + n P) as `jax.lax.scan` over the n periods of `self.scan` (its P blocks, variables
        stacked), each period under the remat policy. Per-layer inputs (rng, cache, replay, balance load) are
        stacked over the periods and the outputs unstacked, so both read as the unrolled layers'. Fills
        new_layers[i] with layer i's cache; returns (x_BLD, aux entries in depth order)."""
        P, n = self.cfg.layer_period, self.cfg.scan_periods
        layer = lambda j, p: first + j * P + p
        inputs = [[layer_inputs(layer(j, p)) for j in range(n)] for p in range(P)]
        for p, per_period in enumerate(inputs):
            for field, name in ((2, "replay"), (3, "balance_load")):
                given = [x[field] is not None for x in per_period]
                if any(given) and not all(given):
                    raise ValueError(f"Transformer: {name} is given for some of the scanned layers "
                                     f"{[layer(j, p) for j in range(n)]} and not others; give it for all of them "
                                     "(or set ModelConfig.scan_layers=False).")
        stacked = [jax.tree.map(lambda *xs: jnp.stack(xs), *per_period) for per_period in inputs]
        graphdef, state = nnx.split(self.scan)

        def period(x_BLD, xs):
            state_j, stacked_j = xs
            blocks = nnx.merge(graphdef, state_j)
            out = []
            for p, block in enumerate(blocks):
                x_BLD, entry, layer_cache = run_block(block, x_BLD, *stacked_j[p])
                out.append((entry, layer_cache))
            return x_BLD, tuple(out)

        body = checkpointed(period, self.cfg.remat, prevent_cse=False)
        x_BLD, out = jax.lax.scan(body, x_BLD, (state, tuple(stacked)))
        entries = []
        for j in range(n):
            for p, (entry, layer_cache) in enumerate(out):
                new_layers[layer(j, p)] = jax.tree.map(lambda x: x[j], layer_cache)
                if entry is not None:
                    entries.append({"layer": layer(j, p), **jax.tree.map(lambda x: x[j], entry)})
        return x_BLD, entries


def _aux_entry(aux) -> dict:
    """An MoE layer's `ModelAux.layers` entry, less its "layer" index."""
    entry = {"losses": aux.losses, "metrics": aux.metrics, "choices": aux.choices}
    if aux.balance_load is not None:
        entry["balance_load"] = aux.balance_load
    return entry
