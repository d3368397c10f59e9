"""Causal self-attention with RoPE: multi-head / grouped-query (`Attention`) and DeepSeek-V2's
Multi-head Latent Attention (`LatentAttention`), each with a fixed-size decode cache.

Axis letters (types.py): B, L, D as everywhere, and for attention
    H  query heads                               J  key positions (the sequence, or the whole cache)
    N  key/value heads (GQA; N = H for MHA)      R  query heads per key/value head (H = N * R)
    Q  query/key head width                      U  value head width
    O  MLA per-head key/query width without RoPE P  RoPE width (MLA: shared key, per-head query)
    A  MLA query latent width (q_lora_rank)      Z  MLA key/value latent width (kv_lora_rank)

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


def apply_rope(x_BLHP: Array, positions_BL: Array, theta: float, inv_freq: Optional[tuple] = None,
               factor: float = 1.0) -> Array:
    """Rotary position embedding (Su et al. 2021), rotate-half layout (GPT-NeoX, Llama).

    Feature pairs (i, i + P/2) are rotated by the angle position * theta^(-2i/P). Computed in float32,
    returned in x's dtype. q.k of two rotated vectors depends on their positions only through their
    difference. inv_freq: P/2 frequencies used instead of theta^(-2i/P) (YaRN, moe_jax/rope.py); factor
    multiplies cos and sin (YaRN's attention factor).
    """
    P = x_BLHP.shape[-1]
    if inv_freq is None:
        inv_freq = theta ** (-jnp.arange(0, P // 2, dtype=jnp.float32) * 2.0 / P)
    else:
        inv_freq = jnp.asarray(inv_freq, jnp.float32)
    angle_BLp = positions_BL.astype(jnp.float32)[..., None] * inv_freq
    sin, cos = jnp.sin(angle_BLp)[:, :, None, None, :], jnp.cos(angle_BLp)[:, :, None, None, :]
    if factor != 1.0:
        sin, cos = sin * factor, cos * factor
    signed_sin = jnp.concatenate([-sin, sin], axis=-2)  # [B, L, 1, 2, P/2]: the two halves
    # Halves as an axis of 2: (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin) with a reverse of that axis,
    # no slice + concatenate of x (whose gradient is a pad, slow on XLA:CPU). Same float ops, same result.
    x_BLH2p = x_BLHP.astype(jnp.float32).reshape(*x_BLHP.shape[:-1], 2, P // 2)
    out_BLH2p = x_BLH2p * cos + x_BLH2p[..., ::-1, :] * signed_sin
    return out_BLH2p.reshape(x_BLHP.shape).astype(x_BLHP.dtype)


def causal_mask(q_positions_BL: Array, k_positions_BJ: Array) -> Array:
    """<bool>[B, L, J]: query l may attend to key j iff key position <= query position."""
    return k_positions_BJ[:, None, :] <= q_positions_BL[:, :, None]


def _masked_softmax(scores: Array, mask: Array) -> Array:
    """float32 softmax over the last axis; every query sees at least itself, so no row is all-masked."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    return jax.nn.softmax(scores, axis=-1)


def _init(in_axis, out_axis):
    """Fan-in scaled truncated normal (LeCun) for a weight whose inputs/outputs span several axes."""
    return nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=in_axis, out_axis=out_axis)


def _write(cache_BJ: Array, new_BL: Array, index: Array) -> Array:
    start = (0, index) + (0,) * (cache_BJ.ndim - 2)
    return jax.lax.dynamic_update_slice(cache_BJ, new_BL.astype(cache_BJ.dtype), start)


@struct.dataclass
class KVCache:
    """One MHA/GQA layer's cache: RoPE'd keys `<dtype>[B, J, N, Q]` and values `<dtype>[B, J, N, U]`."""

    k_BJNQ: Array
    v_BJNU: Array


@struct.dataclass
class LatentCache:
    """One MLA layer's cache: the normalised latent `<dtype>[B, J, Z]` and the RoPE'd shared key `[B, J, P]`.
    Per token: Z + P numbers instead of MHA's 2 * H * head_dim."""

    c_kv_BJZ: Array
    k_rope_BJP: Array


class Attention(nnx.Module):
    """Causal multi-head attention with RoPE; grouped-query (Ainslie et al. 2023) when num_kv_heads < num_heads."""

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H, N, Q, U = cfg.d_model, cfg.num_heads, cfg.kv_heads, cfg.qk_head_dim, cfg.value_head_dim
        pd = cfg.param_jnp_dtype
        self.num_heads, self.num_kv_heads = H, N
        self.rope_theta = cfg.rope_theta
        self.rope_inv_freq, self.rope_factor = cfg.rope_frequencies()
        self.softmax_factor = cfg.softmax_factor
        self.dtype = cfg.compute_dtype
        self.w_q_DHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, H, Q), pd))
        self.w_k_DNQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, N, Q), pd))
        self.w_v_DNU = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, N, U), pd))
        self.w_o_HUD = nnx.Param(_init((0, 1), 2)(rngs.params(), (H, U, D), pd))
        zeros = lambda *shape: nnx.Param(jnp.zeros(shape, pd))
        bias = cfg.attention_bias
        self.b_q_HQ = nnx.data(zeros(H, Q) if bias else None)
        self.b_k_NQ = nnx.data(zeros(N, Q) if bias else None)
        self.b_v_NU = nnx.data(zeros(N, U) if bias else None)
        q_norm = k_norm = None
        if cfg.qk_norm is not None:  # 'head': over Q; 'full': over the flattened H * Q (N * Q) projection
            q_dim, k_dim = (Q, Q) if cfg.qk_norm == "head" else (H * Q, N * Q)
            q_norm = nnx.RMSNorm(q_dim, epsilon=cfg.norm_eps, dtype=self.dtype, param_dtype=pd, rngs=rngs)
            k_norm = nnx.RMSNorm(k_dim, epsilon=cfg.norm_eps, dtype=self.dtype, param_dtype=pd, rngs=rngs)
        self.qk_norm = cfg.qk_norm
        self.q_norm, self.k_norm = nnx.data(q_norm), nnx.data(k_norm)

    def _project(self, x_BLD: Array, w, b, norm) -> Array:
        """x_BLD @ w (+ b), then the optional q/k RMSNorm (Qwen3-MoE per head, OLMoE over the projection)."""
        dt = self.dtype
        y_BLHX = jnp.einsum("bld,dhx->blhx", x_BLD, w[...].astype(dt))
        if b is not None:
            y_BLHX = y_BLHX + b[...].astype(dt)
        if norm is not None:
            if self.qk_norm == "full":
                y_BLHX = norm(y_BLHX.reshape(*y_BLHX.shape[:2], -1)).reshape(y_BLHX.shape)
            else:
                y_BLHX = norm(y_BLHX)
        return y_BLHX

    def init_cache(self, batch_size: int, max_len: int) -> KVCache:
        N, Q = self.w_k_DNQ.shape[1:]
        U = self.w_v_DNU.shape[2]
        return KVCache(jnp.zeros((batch_size, max_len, N, Q), self.dtype),
                       jnp.zeros((batch_size, max_len, N, U), self.dtype))

    def __call__(self, x_BLD: Array, positions_BL: Array, cache: Optional[KVCache] = None,
                 index: Optional[Array] = None) -> tuple[Array, Optional[KVCache]]:
        """x_BLD <dtype>[B, L, D] -> (<dtype>[B, L, D], updated cache or None)."""
        dt = self.dtype
        x_BLD = x_BLD.astype(dt)
        if self.b_q_HQ is None and self.q_norm is None:  # the original path, op for op
            q_BLHQ = jnp.einsum("bld,dhq->blhq", x_BLD, self.w_q_DHQ[...].astype(dt))
            k_BLNQ = jnp.einsum("bld,dnq->blnq", x_BLD, self.w_k_DNQ[...].astype(dt))
            v_BLNU = jnp.einsum("bld,dnu->blnu", x_BLD, self.w_v_DNU[...].astype(dt))
        else:
            q_BLHQ = self._project(x_BLD, self.w_q_DHQ, self.b_q_HQ, self.q_norm)
            k_BLNQ = self._project(x_BLD, self.w_k_DNQ, self.b_k_NQ, self.k_norm)
            v_BLNU = self._project(x_BLD, self.w_v_DNU, self.b_v_NU, None)
        q_BLHQ = apply_rope(q_BLHQ, positions_BL, self.rope_theta, self.rope_inv_freq, self.rope_factor)
        k_BLNQ = apply_rope(k_BLNQ, positions_BL, self.rope_theta, self.rope_inv_freq, self.rope_factor)
        if cache is None:
            k_BJNQ, v_BJNU, k_positions_BJ = k_BLNQ, v_BLNU, positions_BL
        else:
            cache = KVCache(_write(cache.k_BJNQ, k_BLNQ, index), _write(cache.v_BJNU, v_BLNU, index))
            k_BJNQ, v_BJNU = cache.k_BJNQ, cache.v_BJNU
            J = k_BJNQ.shape[1]
            k_positions_BJ = jnp.broadcast_to(jnp.arange(J, dtype=positions_BL.dtype), (x_BLD.shape[0], J))
        B, L, H, Q = q_BLHQ.shape
        N = self.num_kv_heads
        q_BLNRQ = q_BLHQ.reshape(B, L, N, H // N, Q)
        scores_BNRLJ = jnp.einsum("blnrq,bjnq->bnrlj", q_BLNRQ, k_BJNQ,
                                  preferred_element_type=jnp.float32) / math.sqrt(Q)
        if self.softmax_factor != 1.0:  # YaRN's m(s, mscale_all_dim)^2
            scores_BNRLJ = scores_BNRLJ * self.softmax_factor
        mask = causal_mask(positions_BL, k_positions_BJ)[:, None, None]
        probs_BNRLJ = _masked_softmax(scores_BNRLJ, mask).astype(dt)
        out_BLNRU = jnp.einsum("bnrlj,bjnu->blnru", probs_BNRLJ, v_BJNU)
        out_BLHU = out_BLNRU.reshape(B, L, H, -1)
        return jnp.einsum("blhu,hud->bld", out_BLHU, self.w_o_HUD[...].astype(dt)), cache


class LatentAttention(nnx.Module):
    """Multi-head Latent Attention (DeepSeek-V2, arXiv 2405.04434, Sec. 2.1).

        c_KV = RMSNorm(x W_DKV)                           [B, L, Z]   cached
        k_R  = RoPE(x W_KR)                               [B, L, P]   cached, shared by all heads
        k_h  = [c_KV W_UK_h ; k_R],  v_h = c_KV W_UV_h
        q_h  = [c_Q W_UQ_h ; RoPE(c_Q W_QR_h)],  c_Q = RMSNorm(x W_DQ) (or x itself without q_lora_rank)
        softmax scale 1 / sqrt(O + P) (times YaRN's m^2 with rope_scaling='yarn': `ModelConfig.softmax_scale`)

    Without a cache the keys and values are expanded per head (cheapest for a long sequence). With a
    cache, W_UK is absorbed into the query and W_UV applied after the weighted sum of latents (Sec.
    2.1.3), so decoding never materialises per-head keys or values: the scores are
    (q_nope W_UK^T) . c_KV + q_rope . k_R.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
        D, H = cfg.d_model, cfg.num_heads
        O, P, U, Z = cfg.nope_head_dim, cfg.qk_rope_head_dim, cfg.value_head_dim, cfg.kv_lora_rank
        pd, dt = cfg.param_jnp_dtype, cfg.compute_dtype
        self.nope_dim, self.rope_dim = O, P
        self.rope_theta = cfg.rope_theta
        self.rope_inv_freq, self.rope_factor = cfg.rope_frequencies()
        self.scale = cfg.softmax_scale
        self.dtype = dt
        if cfg.q_lora_rank is None:
            self.w_dq_DA, self.q_norm = nnx.data(None), nnx.data(None)
            self.w_q_AHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (D, H, O + P), pd))  # A = D here
        else:
            A = cfg.q_lora_rank
            self.w_dq_DA = nnx.data(nnx.Param(_init(0, 1)(rngs.params(), (D, A), pd)))
            self.q_norm = nnx.data(nnx.RMSNorm(A, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs))
            self.w_q_AHQ = nnx.Param(_init(0, (1, 2))(rngs.params(), (A, H, O + P), pd))
        self.w_dkv_DZ = nnx.Param(_init(0, 1)(rngs.params(), (D, Z), pd))
        self.w_kr_DP = nnx.Param(_init(0, 1)(rngs.params(), (D, P), pd))
        self.kv_norm = nnx.RMSNorm(Z, epsilon=cfg.norm_eps, dtype=dt, param_dtype=pd, rngs=rngs)
        self.w_uk_ZHO = nnx.Param(_init(0, (1, 2))(rngs.params(), (Z, H, O), pd))
        self.w_uv_ZHU = nnx.Param(_init(0, (1, 2))(rngs.params(), (Z, H, U), pd))
        self.w_o_HUD = nnx.Param(_init((0, 1), 2)(rngs.params(), (H, U, D), pd))

    def init_cache(self, batch_size: int, max_len: int) -> LatentCache:
        return LatentCache(jnp.zeros((batch_size, max_len, self.w_dkv_DZ.shape[1]), self.dtype),
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
        rope = lambda x: apply_rope(x, positions_BL, self.rope_theta, self.rope_inv_freq, self.rope_factor)
        q_rope_BLHP = rope(q_BLHQ[..., self.nope_dim:])
        c_kv_BLZ = self.kv_norm(x_BLD @ w(self.w_dkv_DZ)).astype(dt)
        k_rope_BLP = rope((x_BLD @ w(self.w_kr_DP))[:, :, None, :])[:, :, 0]
        scale = self.scale

        if cache is None:
            k_nope_BLHO = jnp.einsum("blz,zho->blho", c_kv_BLZ, w(self.w_uk_ZHO))
            v_BLHU = jnp.einsum("blz,zhu->blhu", c_kv_BLZ, w(self.w_uv_ZHU))
            scores_BHLJ = (jnp.einsum("blho,bjho->bhlj", q_nope_BLHO, k_nope_BLHO, preferred_element_type=jnp.float32)
                           + jnp.einsum("blhp,bjp->bhlj", q_rope_BLHP, k_rope_BLP, preferred_element_type=jnp.float32))
            mask = causal_mask(positions_BL, positions_BL)[:, None]
            probs_BHLJ = _masked_softmax(scores_BHLJ * scale, mask).astype(dt)
            out_BLHU = jnp.einsum("bhlj,bjhu->blhu", probs_BHLJ, v_BLHU)
        else:
            cache = LatentCache(_write(cache.c_kv_BJZ, c_kv_BLZ, index), _write(cache.k_rope_BJP, k_rope_BLP, index))
            c_kv_BJZ, k_rope_BJP = cache.c_kv_BJZ, cache.k_rope_BJP
            B, J = c_kv_BJZ.shape[:2]
            q_latent_BLHZ = jnp.einsum("blho,zho->blhz", q_nope_BLHO, w(self.w_uk_ZHO))
            scores_BHLJ = (jnp.einsum("blhz,bjz->bhlj", q_latent_BLHZ, c_kv_BJZ, preferred_element_type=jnp.float32)
                           + jnp.einsum("blhp,bjp->bhlj", q_rope_BLHP, k_rope_BJP, preferred_element_type=jnp.float32))
            k_positions_BJ = jnp.broadcast_to(jnp.arange(J, dtype=positions_BL.dtype), (B, J))
            mask = causal_mask(positions_BL, k_positions_BJ)[:, None]
            probs_BHLJ = _masked_softmax(scores_BHLJ * scale, mask).astype(dt)
            out_latent_BLHZ = jnp.einsum("bhlj,bjz->blhz", probs_BHLJ, c_kv_BJZ)
            out_BLHU = jnp.einsum("blhz,zhu->blhu", out_latent_BLHZ, w(self.w_uv_ZHU))
        return jnp.einsum("blhu,hud->bld", out_BLHU, w(self.w_o_HUD)), cache


def make_attention(cfg: ModelConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    return LatentAttention(cfg, rngs=rngs) if cfg.attention == "mla" else Attention(cfg, rngs=rngs)
