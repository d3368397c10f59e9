"""Attention: RoPE goldens and relative-position property, GQA against MHA and a numpy loop reference,
MLA against an explicit per-head reference, cached (absorbed) MLA against the expanded form, cache sizes."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.attention import Attention, LatentAttention, apply_rope
from moe_jax.model_config import ModelConfig


def _cfg(**kw):
    base = dict(vocab_size=32, d_model=32, num_layers=1, num_heads=4, d_ff=64, max_seq_len=16)
    base.update(kw)
    return ModelConfig(**base)


def _rngs(seed):
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))  # rbg: init compiles ~4x faster on the CPU


call = nnx.jit(lambda m, x, p: m(x, p)[0])
call_cached = nnx.jit(lambda m, x, p, c, i: m(x, p, c, i))


def _positions(B, L, start=0):
    return jnp.broadcast_to(jnp.arange(start, start + L, dtype=jnp.int32), (B, L))


def test_rope_golden():
    # P = 4, theta = 10000: inverse frequencies theta^(-0/4) = 1 and theta^(-2/4) = 0.01; pairs (0, 2), (1, 3).
    # x = [1, 0, 0, 0] at position 2: the pair (x0, x2) = (1, 0) turns by 2 * 1 = 2 rad -> (cos 2, sin 2);
    # x = [0, 1, 0, 0] at position 2: the pair (x1, x3) = (1, 0) turns by 2 * 0.01 = 0.02 rad.
    x = jnp.array([[[[1.0, 0, 0, 0]], [[0, 1.0, 0, 0]]]])  # [B=1, L=2, H=1, P=4]
    out = apply_rope(x, jnp.array([[2, 2]]), 10000.0)
    np.testing.assert_allclose(out[0, 0, 0], [math.cos(2), 0, math.sin(2), 0], atol=1e-6)
    np.testing.assert_allclose(out[0, 1, 0], [0, math.cos(0.02), 0, math.sin(0.02)], atol=1e-6)
    np.testing.assert_allclose(apply_rope(x, jnp.zeros((1, 2), jnp.int32), 10000.0), x)  # position 0: identity


def test_rope_depends_on_relative_position_only():
    kq, kk = jax.random.split(jax.random.key(0))
    q = jax.random.normal(kq, (1, 1, 1, 16))
    k = jax.random.normal(kk, (1, 1, 1, 16))
    dot = lambda m, n: float(jnp.sum(apply_rope(q, jnp.array([[m]]), 500.0) * apply_rope(k, jnp.array([[n]]), 500.0)))
    for m, n, shift in [(3, 1, 5), (0, 7, 11), (9, 9, 100)]:
        assert dot(m, n) == pytest.approx(dot(m + shift, n + shift), rel=1e-4, abs=1e-4)
    assert abs(dot(3, 1) - dot(3, 2)) > 1e-3  # ...and it does depend on the offset
    norms = jnp.linalg.norm(apply_rope(q, jnp.array([[37]]), 500.0))
    assert float(norms) == pytest.approx(float(jnp.linalg.norm(q)), rel=1e-5)  # a rotation


def _reference_mha(x, positions, wq, wk, wv, wo, theta):
    """numpy loop over heads: RoPE'd q/k, causal softmax(q.k / sqrt(Q)) v, output projection."""
    x, wq, wk, wv, wo = (np.asarray(a, np.float64) for a in (x, wq, wk, wv, wo))
    B, L, _ = x.shape
    H, N, Q = wq.shape[1], wk.shape[1], wq.shape[2]
    rope = lambda a: np.asarray(apply_rope(jnp.asarray(a, jnp.float32), positions, theta), np.float64)
    q, k = rope(np.einsum("bld,dhq->blhq", x, wq)), rope(np.einsum("bld,dnq->blnq", x, wk))
    v = np.einsum("bld,dnu->blnu", x, wv)
    out = np.zeros((B, L, H, wv.shape[2]))
    for b in range(B):
        for h in range(H):
            n = h // (H // N)
            for l in range(L):
                s = np.array([q[b, l, h] @ k[b, j, n] / math.sqrt(Q) for j in range(l + 1)])
                p = np.exp(s - s.max())
                p /= p.sum()
                out[b, l, h] = p @ v[b, : l + 1, n]
    return np.einsum("blhu,hud->bld", out, wo)


def test_gqa_matches_loop_reference():
    cfg = _cfg(num_kv_heads=2)
    attn = Attention(cfg, rngs=_rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 6, 32))
    pos = _positions(2, 6)
    y = call(attn, x, pos)
    assert y.shape == (2, 6, 32)
    ref = _reference_mha(x, pos, attn.w_q_DHQ[...], attn.w_k_DNQ[...], attn.w_v_DNU[...], attn.w_o_HUD[...],
                         cfg.rope_theta)
    np.testing.assert_allclose(y, ref, atol=1e-5, rtol=1e-5)


def test_gqa_equals_mha_with_repeated_kv_heads():
    """num_kv_heads = 2 of 4 heads == MHA whose K/V weights repeat each kv head for its R = 2 query heads."""
    gqa = Attention(_cfg(num_kv_heads=2), rngs=_rngs(0))
    mha = Attention(_cfg(num_kv_heads=4), rngs=_rngs(1))
    mha.w_q_DHQ[...] = gqa.w_q_DHQ[...]
    mha.w_o_HUD[...] = gqa.w_o_HUD[...]
    mha.w_k_DNQ[...] = jnp.repeat(gqa.w_k_DNQ[...], 2, axis=1)  # query head h = n * R + r reads kv head n
    mha.w_v_DNU[...] = jnp.repeat(gqa.w_v_DNU[...], 2, axis=1)
    x = jax.random.normal(jax.random.key(2), (2, 5, 32))
    pos = _positions(2, 5)
    np.testing.assert_allclose(call(gqa, x, pos), call(mha, x, pos), atol=1e-6)
    assert _cfg(num_kv_heads=None).kv_heads == 4  # None means MHA


def _mla_cfg(**kw):
    return _cfg(attention="mla", kv_lora_rank=12, qk_rope_head_dim=4, qk_nope_head_dim=6, v_head_dim=5, **kw)


@pytest.mark.parametrize("q_lora_rank", [None, 10])
def test_mla_matches_explicit_per_head_reference(q_lora_rank):
    cfg = _mla_cfg(q_lora_rank=q_lora_rank)
    mla = LatentAttention(cfg, rngs=_rngs(0))
    B, L = 2, 5
    x = jax.random.normal(jax.random.key(3), (B, L, 32))
    pos = _positions(B, L)
    y = call(mla, x, pos)
    assert y.shape == (B, L, 32)
    rms = lambda a, g: a / np.sqrt(np.mean(a**2, -1, keepdims=True) + cfg.norm_eps) * g
    p = lambda v: np.asarray(v[...], np.float64)
    xn = np.asarray(x, np.float64)
    cq = xn if q_lora_rank is None else rms(xn @ p(mla.w_dq_DA), p(mla.q_norm.scale))
    q = np.einsum("bla,ahq->blhq", cq, p(mla.w_q_AHQ))
    q_nope, q_rope = q[..., :6], np.asarray(apply_rope(jnp.asarray(q[..., 6:], jnp.float32), pos, cfg.rope_theta))
    ckv = rms(xn @ p(mla.w_dkv_DZ), p(mla.kv_norm.scale))  # [B, L, Z=12]
    k_rope = np.asarray(apply_rope(jnp.asarray(xn @ p(mla.w_kr_DP), jnp.float32)[:, :, None], pos, cfg.rope_theta))
    k_rope = k_rope[:, :, 0]  # one RoPE key per position, shared by the heads
    k_nope = np.einsum("blz,zho->blho", ckv, p(mla.w_uk_ZHO))
    v = np.einsum("blz,zhu->blhu", ckv, p(mla.w_uv_ZHU))
    out = np.zeros((B, L, 4, 5))
    for b in range(B):
        for h in range(4):
            for l in range(L):
                k_h = np.concatenate([k_nope[b, : l + 1, h], k_rope[b, : l + 1]], -1)  # rope key shared by heads
                s = k_h @ np.concatenate([q_nope[b, l, h], q_rope[b, l, h]]) / math.sqrt(6 + 4)
                w = np.exp(s - s.max())
                out[b, l, h] = (w / w.sum()) @ v[b, : l + 1, h]
    np.testing.assert_allclose(y, np.einsum("blhu,hud->bld", out, p(mla.w_o_HUD)), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kind", ["mha", "mla"])
def test_cached_attention_matches_uncached(kind):
    """Prefill 3 positions then 2 one-token steps into an 8-slot cache == one uncached pass over 5.
    For MLA this compares the absorbed form (W_UK folded into the query) with the expanded one."""
    cfg = _mla_cfg(q_lora_rank=10) if kind == "mla" else _cfg(num_kv_heads=2)
    attn = (LatentAttention if kind == "mla" else Attention)(cfg, rngs=_rngs(0))
    x = jax.random.normal(jax.random.key(4), (2, 5, 32))
    full = call(attn, x, _positions(2, 5))
    cache = attn.init_cache(2, 8)
    outs = []
    for start, stop in [(0, 3), (3, 4), (4, 5)]:
        y, cache = call_cached(attn, x[:, start:stop], _positions(2, stop - start, start), cache, jnp.int32(start))
        outs.append(y)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), full, atol=2e-5, rtol=1e-5)


def test_mla_cache_is_smaller_by_the_expected_factor():
    """Per token per layer: MHA caches 2 * H * head_dim = 2 * 4 * 8 = 64 numbers; MLA kv_lora_rank +
    qk_rope_head_dim = 12 + 4 = 16: a factor 4. DeepSeek-V2's sizes (H = 128, head 128; C = 512, P = 64):
    2 * 128 * 128 = 32768 vs 576, a factor 56.9."""
    mha = nnx.eval_shape(lambda: Attention(_cfg(), rngs=nnx.Rngs(params=0)))
    mla = nnx.eval_shape(lambda: LatentAttention(_mla_cfg(), rngs=nnx.Rngs(params=0)))
    B, M = 3, 7
    per_token = lambda cache: sum(a.size for a in jax.tree.leaves(cache)) // (B * M)
    assert per_token(mha.init_cache(B, M)) == 64 == _cfg().cache_numbers_per_token
    assert per_token(mla.init_cache(B, M)) == 16 == _mla_cfg().cache_numbers_per_token
    v2_mha = _cfg(d_model=128 * 128, num_heads=128)
    v2_mla = _cfg(d_model=128 * 128, num_heads=128, attention="mla", kv_lora_rank=512, qk_rope_head_dim=64)
    assert v2_mha.cache_numbers_per_token == 32768 and v2_mla.cache_numbers_per_token == 576
