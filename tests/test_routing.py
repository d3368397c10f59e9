"""Routing functions (routing.py) and the Router module's noise (routers.py): goldens and properties."""
from __future__ import annotations

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from moe_jax import MoEConfig
from moe_jax import routing as R
from moe_jax.routers import Router

LN = np.log


def _g(x):
    """One group, as float32 [1, S, E]."""
    return jnp.asarray(np.asarray(x, np.float32))[None]


# ---- token-choice top-k ----

def test_softmax_topk_golden():
    # logits log([1, 2, 3, 4]) -> softmax [0.1, 0.2, 0.3, 0.4]; top-2 = e3 (0.4), e2 (0.3).
    logits = _g([LN([1.0, 2.0, 3.0, 4.0])])
    e, w = R.top_k_choices(logits, 2)
    np.testing.assert_array_equal(e[0, 0], [3, 2])
    np.testing.assert_allclose(w[0, 0], [0.4, 0.3], rtol=1e-6)
    # Renormalised: 0.4 / 0.7 = 4/7, 0.3 / 0.7 = 3/7; routed scaling 2.5 multiplies both.
    _, wn = R.top_k_choices(logits, 2, normalize=True, routed_scaling_factor=2.5)
    np.testing.assert_allclose(wn[0, 0], [2.5 * 4 / 7, 2.5 * 3 / 7], rtol=1e-6)
    # topk_softmax = softmax over the two picked logits [log 4, log 3] = [4/7, 3/7].
    et, wt = R.top_k_choices(logits, 2, topk_order="topk_softmax")
    np.testing.assert_array_equal(et[0, 0], [3, 2])
    np.testing.assert_allclose(wt[0, 0], [4 / 7, 3 / 7], rtol=1e-6)


def test_sigmoid_with_correction_bias_selects_by_biased_weights_by_unbiased():
    # sigmoid([0, log 3, -log 3, log 9]) = [0.5, 0.75, 0.25, 0.9].
    # bias [0, -0.5, 0.5, 0] -> biased [0.5, 0.25, 0.75, 0.9]: top-2 = e3, e2 (no bias: e3, e1).
    # Weights are the unbiased scores 0.9, 0.25; normalised: 0.9 / 1.15, 0.25 / 1.15.
    logits = _g([[0.0, LN(3.0), -LN(3.0), LN(9.0)]])
    bias = jnp.asarray([0.0, -0.5, 0.5, 0.0])
    e, w = R.top_k_choices(logits, 2, score_fn="sigmoid", correction_bias_E=bias)
    np.testing.assert_array_equal(e[0, 0], [3, 2])
    np.testing.assert_allclose(w[0, 0], [0.9, 0.25], rtol=1e-6)
    _, wn = R.top_k_choices(logits, 2, score_fn="sigmoid", correction_bias_E=bias, normalize=True)
    np.testing.assert_allclose(wn[0, 0], [0.9 / 1.15, 0.25 / 1.15], rtol=1e-6)
    e0, _ = R.top_k_choices(logits, 2, score_fn="sigmoid")
    np.testing.assert_array_equal(e0[0, 0], [3, 1])


def test_correction_bias_gets_no_gradient_weights_do():
    logits = _g([[0.0, LN(3.0), -LN(3.0), LN(9.0)]])
    bias = jnp.asarray([0.0, -0.5, 0.5, 0.0])

    def f(logits, bias):
        _, w = R.top_k_choices(logits, 2, score_fn="sigmoid", correction_bias_E=bias, normalize=True)
        return (w * jnp.asarray([1.0, 3.0])).sum()

    g_logits, g_bias = jax.grad(f, argnums=(0, 1))(logits, bias)
    np.testing.assert_array_equal(g_bias, 0.0)
    assert np.abs(np.asarray(g_logits)[0, 0, [2, 3]]).min() > 0  # picked experts get gradient
    np.testing.assert_array_equal(np.asarray(g_logits)[0, 0, [0, 1]], 0.0)


def test_k_out_of_range():
    with pytest.raises(ValueError, match="k=5"):
        R.top_k_choices(jnp.zeros((1, 2, 4)), 5)


def test_ties_give_distinct_experts_lowest_index_first():
    e, w = R.top_k_choices(jnp.zeros((1, 3, 4)), 3)
    np.testing.assert_array_equal(e[0], [[0, 1, 2]] * 3)
    np.testing.assert_allclose(w, 0.25)


# ---- DeepSeek-V3 group-limited routing ----

def test_group_mask_uses_minus_inf_for_negative_biased_scores():
    # E = 4 in 2 groups {e0, e1}, {e2, e3}; logits 0 -> sigmoid 0.5; bias [-1.1, -1.2, -0.7, -1.4]
    # -> biased [-0.6, -0.7, -0.2, -0.9]. Group scores (top-2 sums): -1.3 vs -1.1: keep group 1.
    # Top-2 of the masked scores = e2 (-0.2), e3 (-0.9). Had the excluded group been masked with 0,
    # e0 and e1 (0 > -0.2) would win: the data tell the two apart.
    bias = jnp.asarray([-1.1, -1.2, -0.7, -1.4])
    biased = _g([[-0.6, -0.7, -0.2, -0.9]])
    masked = R.group_limited_mask(biased, 2, 1)
    np.testing.assert_allclose(masked[0, 0], [-np.inf, -np.inf, -0.2, -0.9], rtol=1e-6)
    zero_masked = jnp.where(jnp.isneginf(masked), 0.0, masked)
    assert set(np.asarray(jax.lax.top_k(zero_masked, 2)[1])[0, 0].tolist()) == {0, 1}
    e, w = R.top_k_choices(jnp.zeros((1, 1, 4)), 2, score_fn="sigmoid", correction_bias_E=bias,
                           n_groups=2, topk_groups=1, normalize=True)
    np.testing.assert_array_equal(e[0, 0], [2, 3])
    np.testing.assert_allclose(w[0, 0], [0.5, 0.5], rtol=1e-6)  # unbiased 0.5 each, normalised


def test_group_score_is_sum_of_top_two():
    # Groups {e0, e1} = [0.9, 0.0] and {e2, e3} = [0.6, 0.5]: top-2 sums 0.9 vs 1.1 -> group 1 wins
    # (a max-per-group rule would keep group 0). With one group kept and k = 1: e2.
    masked = R.group_limited_mask(_g([[0.9, 0.0, 0.6, 0.5]]), 2, 1)
    np.testing.assert_allclose(masked[0, 0], [-np.inf, -np.inf, 0.6, 0.5], rtol=1e-6)
    e, _ = R.top_k_choices(_g([[0.9, 0.0, 0.6, 0.5]]), 1, topk_order="topk_softmax", n_groups=2, topk_groups=1)
    np.testing.assert_array_equal(e[0, 0], [2])


def test_group_score_max_is_deepseek_v2s_rule():
    # Same scores, DeepSeek-V2's group_limited_greedy: a group's score is its best expert, 0.9 vs 0.6 ->
    # group 0 is kept and k = 2 picks e0 then e1 (0.0 still beats the excluded -inf).
    masked = R.group_limited_mask(_g([[0.9, 0.0, 0.6, 0.5]]), 2, 1, "max")
    np.testing.assert_allclose(masked[0, 0], [0.9, 0.0, -np.inf, -np.inf], rtol=1e-6)
    e, _ = R.top_k_choices(_g([[0.9, 0.0, 0.6, 0.5]]), 2, topk_order="topk_softmax", n_groups=2, topk_groups=1,
                           group_score="max")
    np.testing.assert_array_equal(e[0, 0], [0, 1])
    with pytest.raises(ValueError, match="group_score='mean'"):
        R.group_limited_mask(_g([[0.9, 0.0, 0.6, 0.5]]), 2, 1, "mean")


@settings(max_examples=20, deadline=None)
@given(st.lists(st.floats(-3, 3, width=32), min_size=3 * 8, max_size=3 * 8),
       st.lists(st.floats(-2, 0, width=32), min_size=8, max_size=8))
def test_group_limited_choices_stay_in_kept_groups(logits, bias):
    logits = jnp.asarray(np.float32(logits).reshape(1, 3, 8))
    bias = jnp.asarray(np.float32(bias))
    e, w = R.top_k_choices(logits, 3, score_fn="sigmoid", correction_bias_E=bias, n_groups=4,
                           topk_groups=2, normalize=True, routed_scaling_factor=2.5)
    biased = np.asarray(jax.nn.sigmoid(logits) + bias)[0]  # [S, E]
    for s in range(3):
        groups = set((np.asarray(e)[0, s] // 2).tolist())
        assert len(groups) <= 2 and len(set(np.asarray(e)[0, s].tolist())) == 3
        gscore = np.sort(biased[s].reshape(4, 2), -1).sum(-1)
        best2 = np.sort(gscore)[-2]
        assert all(gscore[g] >= best2 - 1e-6 for g in groups)
    np.testing.assert_allclose(np.asarray(w).sum(-1), 2.5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(-2, 2), min_size=4 * 6, max_size=4 * 6), st.sampled_from((1, 2, 3)),
       st.booleans())
def test_top_k_properties_with_ties(ints, k, normalize):
    logits = jnp.asarray(np.float32(ints).reshape(1, 4, 6))  # integer logits: many ties
    e, w = R.top_k_choices(logits, k, normalize=normalize)
    e, w = np.asarray(e)[0], np.asarray(w)[0]
    probs = np.asarray(jax.nn.softmax(logits, -1))[0]
    for s in range(4):
        assert len(set(e[s].tolist())) == k
        unpicked = np.setdiff1d(np.arange(6), e[s])
        assert probs[s, e[s]].min() >= probs[s, unpicked].max()
        assert np.all(np.diff(w[s]) <= 1e-7)  # best first
    if normalize:
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
    else:
        assert np.all(w.sum(-1) <= 1.0 + 1e-6)


# ---- hash routing ----

def test_hash_routing_deterministic_distinct_and_spread():
    ids = jnp.arange(2000, dtype=jnp.int32).reshape(4, 500)
    e, w = R.hash_choices(ids, 8, 2)
    e2, _ = R.hash_choices(ids[::-1], 8, 2)  # the same ids at other positions
    np.testing.assert_array_equal(np.asarray(e2)[::-1], e)
    assert np.all(np.asarray(e)[..., 0] != np.asarray(e)[..., 1])
    np.testing.assert_array_equal(w, 0.5)
    counts = np.bincount(np.asarray(e).ravel(), minlength=8)  # 4000 choices, 500 per expert on average
    assert counts.min() > 400 and counts.max() < 600, counts
    # Different ids do not all share one expert pair.
    assert len({tuple(r) for r in np.asarray(e).reshape(-1, 2).tolist()}) > 20
    e1, w1 = R.hash_choices(ids, 8, 1)
    np.testing.assert_array_equal(w1, 1.0)


# ---- expert choice ----

_expert_choice = jax.jit(R.expert_choice_routing, static_argnums=1)

def test_expert_choice_golden():
    # S = 4, E = 3, C = 1. probs t0 [0.45, 0.45, 0.1], t1 [0.1, 0.1, 0.8], t2 [0.3, 0.3, 0.4],
    # t3 [0.2, 0.2, 0.6]. e0's best token t0 (0.45), e1's t0 (0.45), e2's t1 (0.8): t0 is served
    # twice, t2 and t3 by nobody.
    probs = np.float32([[0.45, 0.45, 0.1], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.2, 0.2, 0.6]])
    r = R.expert_choice_routing(_g(LN(probs)), 1)
    none = 3  # E * C
    np.testing.assert_array_equal(r.slot_GSK[0], [[0, 1, none], [none, none, 2], [none] * 3, [none] * 3])
    np.testing.assert_array_equal(r.src_GEC[0, :, 0], [0 * 3 + 0, 0 * 3 + 1, 1 * 3 + 2])  # s * E + e
    np.testing.assert_allclose(r.weight_GSK[0], [[0.45, 0.45, 0], [0, 0, 0.8], [0] * 3, [0] * 3], rtol=1e-6)
    np.testing.assert_array_equal(r.unserved_GS()[0], [0, 0, 1, 1])
    np.testing.assert_array_equal(r.tokens_per_expert_E(), [1, 1, 1])
    with pytest.raises(ValueError, match="capacity"):
        R.expert_choice_routing(_g(LN(probs)), 5)


@settings(max_examples=15, deadline=None)
@given(st.lists(st.floats(-4, 4, width=32), min_size=2 * 8 * 4, max_size=2 * 8 * 4), st.sampled_from((1, 2, 5)))
def test_expert_choice_each_expert_takes_exactly_c(logits, C):
    r = _expert_choice(jnp.asarray(np.float32(logits).reshape(2, 8, 4)), C)
    slot, src = np.asarray(r.slot_GSK), np.asarray(r.src_GEC)
    for g in range(2):
        for e in range(4):
            tokens = np.nonzero(slot[g, :, e] < 4 * C)[0]
            assert len(tokens) == C  # exactly C distinct tokens per expert
            np.testing.assert_array_equal(np.sort(src[g, e] // 4), tokens)
    np.testing.assert_array_equal(r.tokens_per_expert_E(), 2 * C)


# ---- Soft MoE ----

def test_soft_routing_normalisation():
    logits = jax.random.normal(jax.random.key(0), (2, 5, 3 * 2))  # E = 3 experts x P = 2 slots
    r = R.soft_routing(logits, 3)
    np.testing.assert_allclose(r.dispatch_GSEC.sum(axis=1), 1.0, rtol=1e-6)  # over tokens, per slot
    np.testing.assert_allclose(r.combine_GSEC.sum(axis=(2, 3)), 1.0, rtol=1e-6)  # over slots, per token
    assert r.dispatch_GSEC.shape == (2, 5, 3, 2) and r.capacity == 2
    # Zero logits: dispatch 1/S = 1/5, combine 1/(E * P) = 1/6.
    z = R.soft_routing(jnp.zeros((1, 5, 6)), 3)
    np.testing.assert_allclose(z.dispatch_GSEC, 1 / 5, rtol=1e-6)
    np.testing.assert_allclose(z.combine_GSEC, 1 / 6, rtol=1e-6)


# ---- the Router module: noise only with an rng (the layer passes it only when train=True) ----

def _router(**kw):
    base = dict(d_model=8, d_ff=16, num_experts=4, num_experts_per_token=1)
    base.update(kw)
    return Router(MoEConfig(**base), rngs=nnx.Rngs(0))


@nnx.jit
def _logits(router, x, rng=None):
    return router.logits(x, rng)


@pytest.mark.parametrize("kw", [dict(jitter_eps=0.1), dict(logit_noise_std=1.0)])
def test_router_noise_only_with_rng(kw):
    router = _router(**kw)
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    clean = _logits(router, x)
    np.testing.assert_array_equal(_logits(router, x), clean)  # no rng: deterministic
    np.testing.assert_allclose(clean, jnp.einsum("gsd,de->gse", x, router.w_DE[...]), rtol=1e-6)
    a = _logits(router, x, jax.random.key(2))
    b = _logits(router, x, jax.random.key(3))
    assert not np.allclose(a, clean) and not np.allclose(a, b)
    np.testing.assert_array_equal(_logits(router, x, jax.random.key(2)), a)  # same key, same noise
    if "jitter_eps" in kw:
        # Input multiplied by U(0.9, 1.1): each logit moves by at most 0.1 * sum_d |x_d w_de|.
        bound = 0.1 * jnp.einsum("gsd,de->gse", jnp.abs(x), jnp.abs(router.w_DE[...]))
        assert np.all(np.abs(a - clean) <= bound + 1e-5)


def test_router_without_noise_ignores_rng():
    router = _router()
    x = jax.random.normal(jax.random.key(1), (2, 4, 8))
    np.testing.assert_array_equal(_logits(router, x, jax.random.key(2)), _logits(router, x))


def test_hash_router_has_no_gate():
    router = _router(router="hash")
    assert router.w_DE is None
    np.testing.assert_array_equal(router.logits(jnp.ones((1, 3, 8))), 0.0)
