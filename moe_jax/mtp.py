"""Multi-token prediction (MTP): DeepSeek-V3's D sequential training-only modules (arXiv 2412.19437, section 2.2).

With inputs t_0 .. t_{L-1} (the main model predicts t_{i+1} at position i), module k = 1..D at position
i < L - k computes

    h'^k_i = M_k [Norm(h^{k-1}_i); Norm(Emb(t_{i+k}))]          M_k <float>[2D, D] (`w_proj_2DD`), Eq. 21
    h^k_{0:L-k} = TRM_k(h'^k_{0:L-k})                            one transformer block, causal, Eq. 22
    P^k_i = softmax(OutHead(FinalNorm_k(h^k_i)))                  predicts t_{i+k+1}, Eq. 23

so depth k runs on L - k positions, and its targets are the main targets shifted by k
(`targets_BL[:, k:]`, i.e. the inputs shifted by k + 1). Emb and OutHead are the main model's (shared:
no parameters here); h^0 is the main model's last residual stream, before its final norm (each depth
normalises its input itself, `hidden_norm`). L_MTP = lambda / D * sum_k CE(P^k, t_{i+k+1}) over the
L - k positions that have a target (train/step.py adds it).

Choices the paper leaves open, and ours:
- TRM_k is a `Block` of the main model's kind: an MoE block whenever the model has MoE layers
  (DeepSeek-V3's released MTP layer 61 is a full MoE decoder layer), with layer index
  num_layers + k - 1. Its MoE auxiliary losses are added to the training loss at their full
  coefficients, not scaled by lambda: the balance losses keep the MTP router balanced like any other,
  and its correction bias (DeepSeek-V3) gets the same sign update. Their metrics are reported under
  `moe/<num_layers + k - 1>/...`.
- Each module has its own final norm before the shared head (DeepSeek's release: `shared_head.norm`).
- Concatenation order [hidden; embedding] follows Eq. 21. DeepSeek's released inference code
  concatenates [enorm(embedding); hnorm(hidden)], so a converter of their `eh_proj` swaps the halves.
- RoPE positions of depth k are 0 .. L - k - 1 (attention only sees relative positions).

Parameters per module: 2 D^2 (M_k) + 3 norms + one block. Inference (decode, sampling, the main head's
eval CE) never runs these modules.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.model_config import ModelConfig
from moe_jax.types import Array


class MTPModule(nnx.Module):
    """MTP module `depth` (1-based): norms, the projection M_k, one block, a final norm."""

    def __init__(self, cfg: ModelConfig, depth: int, *, block_cls, make_norm: Callable, rngs: nnx.Rngs):
        D, pd = cfg.d_model, cfg.param_jnp_dtype
        self.depth = depth
        self.hidden_norm = make_norm(cfg, D, rngs=rngs)
        self.embed_norm = make_norm(cfg, D, rngs=rngs)
        self.w_proj_2DD = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (2 * D, D), pd))
        self.block = block_cls(cfg, cfg.num_layers + depth - 1, rngs=rngs)
        self.final_norm = make_norm(cfg, D, rngs=rngs)

    def __call__(self, h_BLD: Array, emb_BLD: Array, positions_BL: Array, tokens_BL: Array, *, train: bool,
                 rng: Optional[Array], balance_load: Optional[Array] = None):
        """h_BLD: h^{k-1} at the L positions this depth sees; emb_BLD: Emb(t_{i+k}) there; tokens_BL: t_{i+k}.
        -> (h^k <dtype>[B, L, D] (residual stream), FinalNorm_k(h^k), the block's MoEAux or None)."""
        dt = h_BLD.dtype
        x_BLC = jnp.concatenate([self.hidden_norm(h_BLD), self.embed_norm(emb_BLD)], axis=-1)
        x_BLD = jnp.einsum("blc,cd->bld", x_BLC, self.w_proj_2DD[...].astype(dt))
        x_BLD, aux, _ = self.block(x_BLD, positions_BL, tokens_BL, train=train, rng=rng, balance_load=balance_load)
        return x_BLD, self.final_norm(x_BLD), aux


class MultiTokenPrediction(nnx.Module):
    """The D sequential MTP modules of a `Transformer` (built by it when `cfg.mtp_depth > 0`)."""

    def __init__(self, cfg: ModelConfig, *, block_cls, make_norm: Callable, rngs: nnx.Rngs):
        self.num_layers = cfg.num_layers
        self.modules = nnx.List([MTPModule(cfg, k, block_cls=block_cls, make_norm=make_norm, rngs=rngs)
                                 for k in range(1, cfg.mtp_depth + 1)])

    def moe_layers(self) -> list:
        """(layer index, MoELayer) of the MoE blocks, depth order."""
        return [(m.block.layer_index, m.block.ffn) for m in self.modules if m.block.is_moe]

    def __call__(self, h_BLD: Array, tokens_BL: Array, *, embed: Callable[[Array], Array],
                 head: Callable[[Array], Array], train: bool, rng: Optional[Array],
                 balance_load: Optional[dict] = None):
        """h_BLD: the main model's last residual stream h^0 <dtype>[B, L, D]; tokens_BL: its inputs.
        embed: token ids -> embeddings; head: normalised states -> <float32> logits (both the main model's).
        balance_load: as `Transformer.__call__`'s, keyed by these layers' indices (num_layers + k - 1).

        -> (logits: tuple over k = 1..D of <float32>[B, L - k, V], predicting `targets_BL[:, k:]`;
            layer aux: [{"layer", "losses", "metrics"}] of the MoE blocks, depth order)."""
        B, L = tokens_BL.shape  # L > D: checked by Transformer.__call__
        logits, layer_aux = [], []
        for module in self.modules:
            k = module.depth
            index = self.num_layers + k - 1
            h_BLD = h_BLD[:, :L - k]  # h^{k-1}_i for the positions i < L - k whose t_{i+k+1} exists
            tokens_k_BL = tokens_BL[:, k:]  # t_{i+k}
            positions_BL = jnp.broadcast_to(jnp.arange(L - k, dtype=jnp.int32), (B, L - k))
            layer_rng = None if rng is None else jax.random.fold_in(rng, index)
            h_BLD, normed_BLD, aux = module(h_BLD, embed(tokens_k_BL).astype(h_BLD.dtype), positions_BL,
                                            tokens_k_BL, train=train, rng=layer_rng,
                                            balance_load=None if balance_load is None else balance_load.get(index))
            logits.append(head(normed_BLD))
            if aux is not None:
                entry = {"layer": index, "losses": aux.losses, "metrics": aux.metrics, "choices": aux.choices}
                if aux.balance_load is not None:
                    entry["balance_load"] = aux.balance_load
                layer_aux.append(entry)
        return tuple(logits), layer_aux
