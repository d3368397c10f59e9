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
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.num_layers)])
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

    def moe_layers(self, *, mtp: bool = True) -> list[tuple[int, MoELayer]]:
        """(layer index, MoELayer) for every MoE layer, in depth order (the order of `ModelAux.layers`); the MTP
        modules' MoE layers last, unless `mtp=False` (a forward pass without `mtp=True` runs only the others)."""
        main = [(b.layer_index, b.ffn) for b in self.blocks if b.is_moe]
        return main if self.mtp is None or not mtp else main + self.mtp.moe_layers()

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
        moe_count = sum(b.is_moe for b in self.blocks)
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
        layers = tuple(b.attn.init_cache(batch_size, max_len) for b in self.blocks)
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
        layer_aux, new_layers = [], []
        for i, block in enumerate(self.blocks):
            layer_rng = None if rng is None else jax.random.fold_in(rng, i)
            layer_cache = None if cache is None else cache.layers[i]
            index = None if cache is None else cache.index
            layer_replay = replay[len(layer_aux)] if replay is not None and block.is_moe else None
            load = None if balance_load is None else balance_load.get(i)
            x_BLD, aux, layer_cache = block(x_BLD, positions_BL, tokens_BL, train=train, rng=layer_rng,
                                            cache=layer_cache, index=index, replay=layer_replay, balance_load=load,
                                            token_mask_BL=token_mask_BL)
            new_layers.append(layer_cache)
            if aux is not None:
                entry = {"layer": i, "losses": aux.losses, "metrics": aux.metrics, "choices": aux.choices}
                if aux.balance_load is not None:
                    entry["balance_load"] = aux.balance_load
                layer_aux.append(entry)
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
