"""Causal self-attention with RoPE: multi-head / grouped-query (`Attention`) and DeepSeek-V2's
Multi-head Latent Attention (`LatentAttention`), each with a fixed-size decode cache.

Axis letters used here (besides B, L, D, H of types.py):
    M  key positions (the sequence itself, or the whole fixed-size cache when decoding)
    N  key/value heads (GQA; N = H for MHA)      R  query heads per key/value head (H = N * R)
    Q  query/key head width                      V  value head width
    O  MLA per-head key/query width without RoPE P  MLA decoupled RoPE width (shared key, per-head query)
    A  MLA query latent width (q_lora_rank)      C  MLA key/value latent width (kv_lora_rank)

Both modules take `(x_BLD, positions_BL)` and optionally `(cache, index)`. With a cache, the L new
tokens are written at positions [index, index + L) of the cache (index: int32 scalar, the same for
the whole batch) and attend over the whole cache, masked to key positions <= their own: one shape
per cache size, so a decode step traces once however far it has got. The caller keeps
index + L <= cache length (`jax.lax.dynamic_update_slice` would clamp, silently).

Scores and softmax are float32 whatever the compute dtype.
"""
from __future__ import annotations

import math
from typing import Optional

import jax
import jax.numpy as jnp
from flax import nnx, struct

from moe_jax.model_config import ModelConfig
from moe_jax.types import Array


def apply_rope(x_BLHP: Array, positions_BL: Array, theta: float) -> Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout (GPT-NeoX, Llama).

    Feature pairs (i, i + P/2) are rotated by the angle position * theta^(-2i/P). Computed in float32,
    returned in x's dtype. q.k of two rotated vectors depends on their positions only through their
    difference.
    """
    P = x_BLHP.shape[-1]
    inv_freq = theta ** (-jnp.arange(0, P // 2, dtype=jnp.float32) * 2.0 / P)
    angle_BLP = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    sin, cos = jnp.sin(angle_BLP)[:, :, None, None, :], jnp.cos(angle_BLP)[:, :, None, None, :]
    signed_sin_BL1TP = jnp.concatenate([-sin, sin], axis=-2)  # T = the two halves
    # Halves as an axis of 2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with a reverse of that axis,
    # no slice + concatenate of x (whose gradient is a pad, slow on XLA:CPU). Same float ops, same result.
    x_BLHTP = x_BLHP.astype(jnp.float32).reshape(*x_BLHP.shape[:-1], 2, P // 2)
    out_BLHTP = x_BLHTP * cos + x_BLHTP[..., ::-1, :] * signed_sin_BL1TP
    return out_BLHTP.reshape(x_BLHP.shape).astype(x_BLHP.dtype)


def causal_mask(q_positions_BL: Array, k_positions_BM: Array) -> Array:
    """<bool>[B, L, M]: query l may attend to key m iff key position <= query position."""
    return k_positions_BM[:, None, :] <= q_positions_BL[:, :, None]


def _masked_softmax(scores: Array, mask: Array) -> Array:
    """float32 softmax over the last axis; every query sees at least itself, so no row is all-masked."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def _init(in_axis, out_axis):
    """Fan-in scaled truncated normal (LeCun) for a weight whose inputs/outputs span several axes."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _write(cache_BM: Array, new_BL: Array, index: Array) -> Array:
    start = (0, index) + (0,) * (cache_BM.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BM, new_BL.astype(cache_BM.dtype), start)


@struct.dataclass
class KVCache:
    """One MHA/GQA layer's cache: RoPE'd keys `<dtype>[B, M, N, Q]` and values `<dtype>[B, M, N, V]`."""

    k_BMNQ: Array
    v_BMNV: Array


@struct.dataclass
class LatentCache:
    """One MLA layer's cache: the normalised latent `<dtype>[B, M, C]` and the RoPE'd shared key `[B, M, P]`.
    Per token: C + P numbers instead of MHA's 2 * H * head_dim."""

    c_kv_BMC: Array
    k_rope_BMP: Array


class Attention(nnx.Module):
    """Causal multi-head attention with RoPE; grouped-query (Ainslie et al. 2023) when num_kv_heads < num_heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, N, Q, V = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.qk_head_dim, cfg.value_head_dim
        pd = cfg.param_jnp_dtype
        self.num_heads, self.num_kv_heads = H, N
        self.rope_theta = cfg.rope_theta
        self.dtype = cfg.compute_dtype
        self.w_q_DHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, H, Q), pd))
        self.w_k_DNQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, N, Q), pd))
        self.w_v_DNV = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, N, V), pd))
        self.w_o_HVD = nnx.Param(_init((0, 1), 2)(rngs.params(), (H, V, D), pd))

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        N, Q = self.w_k_DNQ.shape[1:]
        V = self.w_v_DNV.shape[2]
        return KVCache(jnp.zeros((batch_size, max_len, N, Q), self.dtype),
                       jnp.zeros((batch_size, max_len, N, V), self.dtype))

    def __call__(self, x_BLD: Array, positions_BL: Array, cache: Optional[KVCache] = None,
                 index: Optional[Array] = None) -> tuple[Array, Optional[KVCache]]:
        """x_BLD <dtype>[B, L, D] -> (<dtype>[B, L, D], updated cache or None)."""
        dt = self.dtype
        x_BLD = x_BLD.astype(dt)
        q_BLHQ = apply_rope(jnp.einsum("bld,dhq->blhq", x_BLD, self.w_q_DHQ[...].astype(dt)), positions_BL,
                            self.rope_theta)
        k_BLNQ = apply_rope(jnp.einsum("bld,dnq->blnq", x_BLD, self.w_k_DNQ[...].astype(dt)), positions_BL,
                            self.rope_theta)
        v_BLNV = jnp.einsum("bld,dnv->blnv", x_BLD, self.w_v_DNV[...].astype(dt))
        if cache is None:
            k_BMNQ, v_BMNV, k_positions_BM = k_BLNQ, v_BLNV, positions_BL
        else:
            cache = KVCache(_write(cache.k_BMNQ, k_BLNQ, index), _write(cache.v_BMNV, v_BLNV, index))
            k_BMNQ, v_BMNV = cache.k_BMNQ, cache.v_BMNV
            M = k_BMNQ.shape[1]
            k_positions_BM = jnp.broadcast_to(jnp.arange(M, dtype=positions_BL.dtype), (x_BLD.shape[0], M))
        B, L, H, Q = q_BLHQ.shape
        N = self.num_kv_heads
        q_BLNRQ = q_BLHQ.reshape(B, L, N, H // N, Q)
        scores_BNRLM = jnp.einsum("blnrq,bmnq->bnrlm", q_BLNRQ, k_BMNQ,
                                  preferred_element_type=jnp.float32) / math.sqrt(Q)
        mask = causal_mask(positions_BL, k_positions_BM)[:, None, None]
        probs_BNRLM = _masked_softmax(scores_BNRLM, mask).astype(dt)
        out_BLNRV = jnp.einsum("bnrlm,bmnv->blnrv", probs_BNRLM, v_BMNV)
        out_BLHV = out_BLNRV.reshape(B, L, H, -1)
        return jnp.einsum("blhv,hvd->bld", out_BLHV, self.w_o_HVD[...].astype(dt)), cache


class LatentAttention(nnx.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1).

        c_KV = RMSNorm(x W_DKV)                           [B, L, C]   cached
        k_R  = RoPE(x W_KR)                               [B, L, P]   cached, shared by all heads
        k_h  = [c_KV W_UK_h ; k_R],  v_h = c_KV W_UV_h
        q_h  = [c_Q W_UQ_h ; RoPE(c_Q W_QR_h)],  c_Q = RMSNorm(x W_DQ) (or x itself without q_lora_rank)
        softmax scale 1 / sqrt(O + P)

    Without a cache the keys and values are expanded per head (cheapest for a long sequence). With a
    cache, W_UK is absorbed into the query and W_UV applied after the weighted sum of latents (Sec.
    2.1.3), so decoding never materialises per-head keys or values: the scores are
    (q_nope W_UK^T) . c_KV + q_rope . k_R.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H = cfg.d_model, cfg.num_heads
        O, P, V, C = cfg.nope_head_dim, cfg.qk_rope_head_dim, cfg.value_head_dim, cfg.kv_lora_rank
        pd, dt = cfg.param_jnp_dtype, cfg.compute_dtype
        self.nope_dim, self.rope_dim = O, P
        self.rope_theta = cfg.rope_theta
        self.dtype = dt
        if cfg.q_lora_rank is None:
            self.w_dq_DA, self.q_norm = nnx.data(None), nnx.data(None)
            self.w_q_AHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, H, O + P), pd))  # A = D here
        else:
            A = cfg.q_lora_rank
            self.w_dq_DA = nnx.data(nnx.Param(_init(0, 1)(rngs.params(), (D, A), pd)))
            self.q_norm = nnx.data(nnx.RMSNorm(A, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs))
            self.w_q_AHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (A, H, O + P), pd))
        self.w_dkv_DC = nnx.Param(_init(0, 1)(rngs.params(), (D, C), pd))
        self.w_kr_DP = nnx.Param(_init(0, 1)(rngs.params(), (D, P), pd))
        self.kv_norm = nnx.RMSNorm(C, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.w_uk_CHO = nnx.Param(_init(0, (1, 2))(rngs.params(), (C, H, O), pd))
        self.w_uv_CHV = nnx.Param(_init(0, (1, 2))(rngs.params(), (C, H, V), pd))
        self.w_o_HVD = nnx.Param(_init((0, 1), 2)(rngs.params(), (H, V, D), pd))

    def init_cache(self, batch_size: int, max_len: int) -> LatentCache:
        return LatentCache(jnp.zeros((batch_size, max_len, self.w_dkv_DC.shape[1]), self.dtype),
                           jnp.zeros((batch_size, max_len, self.rope_dim), self.dtype))

    def __call__(self, x_BLD: Array, positions_BL: Array, cache: Optional[LatentCache] = None,
                 index: Optional[Array] = None) -> tuple[Array, Optional[LatentCache]]:
        """x_BLD <dtype>[B, L, D] -> (<dtype>[B, L, D], updated cache or None)."""
        dt = self.dtype
        w = lambda p: p[...].astype(dt)
        x_BLD = x_BLD.astype(dt)
        q_in_BLA = x_BLD if self.w_dq_DA is None else self.q_norm(x_BLD @ w(self.w_dq_DA))
        q_BLHQ = jnp.einsum("bla,ahq->blhq", q_in_BLA, w(self.w_q_AHQ))
        q_nope_BLHO = q_BLHQ[..., : self.nope_dim]
        q_rope_BLHP = apply_rope(q_BLHQ[..., self.nope_dim:], positions_BL, self.rope_theta)
        c_kv_BLC = self.kv_norm(x_BLD @ w(self.w_dkv_DC)).astype(dt)
        k_rope_BLP = apply_rope((x_BLD @ w(self.w_kr_DP))[:, :, None, :], positions_BL, self.rope_theta)[:, :, 0]
        scale = 1.0 / math.sqrt(self.nope_dim + self.rope_dim)

        if cache is None:
            k_nope_BLHO = jnp.einsum("blc,cho->blho", c_kv_BLC, w(self.w_uk_CHO))
            v_BLHV = jnp.einsum("blc,chv->blhv", c_kv_BLC, w(self.w_uv_CHV))
            scores_BHLM = (jnp.einsum("blho,bmho->bhlm", q_nope_BLHO, k_nope_BLHO, preferred_element_type=jnp.float32)
                           + jnp.einsum("blhp,bmp->bhlm", q_rope_BLHP, k_rope_BLP, preferred_element_type=jnp.float32))
            mask = causal_mask(positions_BL, positions_BL)[:, None]
            probs_BHLM = _masked_softmax(scores_BHLM * scale, mask).astype(dt)
            out_BLHV = jnp.einsum("bhlm,bmhv->blhv", probs_BHLM, v_BLHV)
        else:
            cache = LatentCache(_write(cache.c_kv_BMC, c_kv_BLC, index), _write(cache.k_rope_BMP, k_rope_BLP, index))
            c_kv_BMC, k_rope_BMP = cache.c_kv_BMC, cache.k_rope_BMP
            B, M = c_kv_BMC.shape[:2]
            q_latent_BLHC = jnp.einsum("blho,cho->blhc", q_nope_BLHO, w(self.w_uk_CHO))
            scores_BHLM = (jnp.einsum("blhc,bmc->bhlm", q_latent_BLHC, c_kv_BMC, preferred_element_type=jnp.float32)
                           + jnp.einsum("blhp,bmp->bhlm", q_rope_BLHP, k_rope_BMP, preferred_element_type=jnp.float32))
            k_positions_BM = jnp.broadcast_to(jnp.arange(M, dtype=positions_BL.dtype), (B, M))
            mask = causal_mask(positions_BL, k_positions_BM)[:, None]
            probs_BHLM = _masked_softmax(scores_BHLM * scale, mask).astype(dt)
            out_latent_BLHC = jnp.einsum("bhlm,bmc->blhc", probs_BHLM, c_kv_BMC)
            out_BLHV = jnp.einsum("blhc,chv->blhv", out_latent_BLHC, w(self.w_uv_CHV))
        return jnp.einsum("blhv,hvd->bld", out_BLHV, w(self.w_o_HVD)), cache


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return LatentAttention(cfg, rngs=rngs) if cfg.attention == "mla" else Attention(cfg, rngs=rngs)
