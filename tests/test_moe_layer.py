"""MoELayer end to end: a numpy loop reference, routing invariants through the layer (hypothesis),
expert choice and causality, hash routing, router noise, and the metrics on a hand-made case."""
from __future__ import annotations

import math

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings
from scipy.special import erf

from moe_jax import MoEConfig, MoELayer
from moe_jax import losses as losses_lib
from moe_jax import routing as routing_lib

D, F = 8, 16


@nnx.jit(static_argnames="train")
def apply(layer: MoELayer, x, train=False, rng=None, token_ids=None):
    """layer(...) compiled once per config: layers with equal configs share the compiled code."""
    return layer(x, train=train, rng=rng, token_ids_BL=token_ids)


def cfg(**kw) -> MoEConfig:
    c = dict(d_model=D, d_ff=F, num_experts=4, num_experts_per_token=2, min_capacity=1,
             capacity_factor=8.0, eval_capacity_factor=8.0)  # cf >= E / k: C = S, nothing drops
    c.update(kw)
    return MoEConfig(**c)


def randomize_biases(layer: MoELayer, seed=5):
    """Expert biases start at 0; give them values so that the test sees them."""
    ex = layer.experts
    if ex.b_in_EF is not None:
        k1, k2 = jax.random.split(jax.random.key(seed))
        ex.b_in_EF[...] = jax.random.normal(k1, ex.b_in_EF[...].shape)
        ex.b_out_ED[...] = jax.random.normal(k2, ex.b_out_ED[...].shape)


# ---- a float64 loop reference for token choice without drops ----

ACT = {
    "relu": lambda z: np.maximum(z, 0.0),
    "gelu": lambda z: 0.5 * z * (1.0 + erf(z / math.sqrt(2.0))),
    "silu": lambda z: z / (1.0 + np.exp(-z)),
}
ACT["swiglu"], ACT["geglu"] = ACT["silu"], ACT["gelu"]


def _ffn(x, w_in, w_gate, w_out, b_in, b_out, activation):
    h = x @ w_in + (0 if b_in is None else b_in)
    h = ACT[activation](x @ w_gate) * h if w_gate is not None else ACT[activation](h)
    return h @ w_out + (0 if b_out is None else b_out)


def reference(layer: MoELayer, c: MoEConfig, x_BLD) -> np.ndarray:
    p = lambda v: None if v is None else np.asarray(v[...], np.float64)
    ex = layer.experts
    w_in, w_gate, w_out, b_in, b_out = (p(ex.w_in_EDF), p(ex.w_gate_EDF), p(ex.w_out_EFD), p(ex.b_in_EF),
                                        p(ex.b_out_ED))
    x = np.asarray(x_BLD, np.float64).reshape(-1, c.d_model)
    logits = x @ p(layer.router.w_DE)
    if c.score_fn == "softmax":
        z = np.exp(logits - logits.max(-1, keepdims=True))
        scores = z / z.sum(-1, keepdims=True)
    else:
        scores = 1.0 / (1.0 + np.exp(-logits))
    y = np.zeros_like(x)
    for t in range(x.shape[0]):
        idx = np.argsort(-scores[t], kind="stable")[: c.top_k]
        w = scores[t, idx]
        if c.normalize_topk:
            w = w / w.sum()
        w = w * c.routed_scaling_factor
        for e, we in zip(idx, w):
            y[t] += we * _ffn(x[t], w_in[e], None if w_gate is None else w_gate[e], w_out[e],
                              None if b_in is None else b_in[e], None if b_out is None else b_out[e], c.activation)
    if layer.shared is not None:
        sh = layer.shared.experts
        s = _ffn(x, p(sh.w_in_EDF)[0], None if sh.w_gate_EDF is None else p(sh.w_gate_EDF)[0], p(sh.w_out_EFD)[0],
                 None, None, c.activation)
        if layer.shared_gate_D1 is not None:
            s = s / (1.0 + np.exp(-(x @ p(layer.shared_gate_D1))))
        y += s
    return y.reshape(x_BLD.shape)


@pytest.mark.parametrize("kw", [
    dict(activation="relu", expert_bias=True, num_experts_per_token=1),
    dict(activation="geglu", num_shared_experts=2, shared_d_ff=12),  # exact (erf) GELU
    dict(activation="swiglu", granularity=2, num_shared_experts=1, shared_expert_gate=True, normalize_topk=True),
    dict(activation="silu", score_fn="sigmoid", normalize_topk=True, routed_scaling_factor=2.5, expert_bias=True),
])
def test_layer_matches_loop_reference(kw):
    c = cfg(**kw)
    layer = MoELayer(c, rngs=nnx.Rngs(0))
    randomize_biases(layer)
    if c.granularity > 1:  # fine-grained: E * G experts of width F / G, k * G choices each
        assert layer.experts.w_in_EDF[...].shape == (4 * c.granularity, D, F // c.granularity)
        assert c.top_k == 2 * c.granularity
    x = jax.random.normal(jax.random.key(1), (2, 8, D))
    y, aux = apply(layer, x, train=True)
    np.testing.assert_allclose(np.asarray(y), reference(layer, c, x), rtol=1e-5, atol=1e-5)
    assert float(aux.metrics["dropped_fraction"]) == 0.0


# ---- routing invariants through the layer (fixed shapes, drawn inputs) ----

B, L = 2, 8
DROP_CFGS = {
    # C = ceil(0.5 * 8 * 2 / 4) = 2 slots per expert per sequence: plenty of drops.
    "softmax": cfg(capacity_factor=0.5),
    # DeepSeek-style weights (normalised, x 2.5) and reroute; C = 2.
    "sigmoid_reroute": cfg(capacity_factor=0.5, score_fn="sigmoid", normalize_topk=True,
                           routed_scaling_factor=2.5, overflow="reroute"),
    "reduced_weight": cfg(capacity_factor=0.5, overflow="reduced_weight", priority="top_prob"),
}
_LAYERS = {}


def _layer_and_fn(name):
    if name not in _LAYERS:
        layer = MoELayer(DROP_CFGS[name], rngs=nnx.Rngs(0))

        @nnx.jit
        def run(layer, x):
            y, aux = layer(x, train=True)
            routing = layer.router.route(layer.router.logits(x), train=True).routing  # groups = sequences
            return y, aux, routing

        _LAYERS[name] = (layer, run)
    return _LAYERS[name]


@settings(max_examples=12, deadline=None)
@given(st.integers(0, 2**16), st.sampled_from(tuple(DROP_CFGS)), st.sampled_from((0.0, 3.0, 30.0)))
def test_layer_routing_invariants(seed, name, skew):
    layer, run = _layer_and_fn(name)
    c = DROP_CFGS[name]
    x = jax.random.normal(jax.random.key(seed), (B, L, D))
    # skew > 0 pushes every token towards expert 0 (30: all tokens pick it first; others stay empty).
    w0 = layer.router.w_DE[...][:, 0]
    x = x + skew * w0 / jnp.linalg.norm(w0)
    y, aux, r = run(layer, x)
    C = c.capacity(L, True)
    assert C == (4 if name == "reduced_weight" else 2)  # reduced_weight: buffer ceil(2.0 * 2) = 4
    # Every expert holds <= C choices per group.
    filled_GE = np.asarray((r.src_GEC < L * c.top_k).sum(-1))
    assert filled_GE.max() <= C
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], filled_GE.sum(0))
    # Combine weights of a token sum to at most 1 (the routed scaling factor for DeepSeek-style).
    assert np.all(np.asarray(r.weight_GSK).sum(-1) <= c.routed_scaling_factor * (1 + 1e-6))
    # A token whose every choice dropped gets exactly 0 from the layer (no shared experts here).
    unserved = np.asarray(r.unserved_GS()).reshape(B, L)
    assert np.all(np.asarray(y)[unserved] == 0.0)
    assert np.all(np.abs(np.asarray(y)[~unserved]).sum(-1) > 0)
    np.testing.assert_allclose(aux.metrics["unserved_token_fraction"], unserved.mean())
    if skew == 30.0 and name == "softmax":
        # Everything prefers e0: e0 is full in each group, and its C slots are the first tokens.
        assert np.all(filled_GE[:, 0] == C)
        np.testing.assert_array_equal(np.asarray(r.src_GEC)[:, 0, :] // c.top_k, [[0, 1]] * B)


_PERM_LAYER = {}


@settings(max_examples=10, deadline=None)
@given(st.permutations(range(L)), st.permutations(range(B)), st.integers(0, 2**16))
def test_permuting_tokens_permutes_outputs_when_nothing_drops(perm_l, perm_b, seed):
    if not _PERM_LAYER:
        _PERM_LAYER["layer"] = MoELayer(cfg(), rngs=nnx.Rngs(0))
        _PERM_LAYER["run"] = lambda layer, x: apply(layer, x, train=True)[0]
    layer, run = _PERM_LAYER["layer"], _PERM_LAYER["run"]
    x = jax.random.normal(jax.random.key(seed), (B, L, D))
    pl, pb = np.asarray(perm_l), np.asarray(perm_b)
    y = np.asarray(run(layer, x))
    y_perm = np.asarray(run(layer, x[pb][:, pl]))
    np.testing.assert_allclose(y_perm, y[pb][:, pl], rtol=1e-6, atol=1e-6)


def test_capacity_drops_break_permutation_equivariance():
    """The counterpart: with drops, who is dropped depends on position (so the test above has teeth)."""
    layer = MoELayer(cfg(capacity_factor=0.5), rngs=nnx.Rngs(0))  # C = 2
    layer.router.w_DE[...] = 10.0 * jnp.eye(D, 4)
    # Three tokens pick e0 first: position order keeps t0, t1; reversed order keeps t2, t1.
    x = jnp.asarray(np.eye(D, dtype=np.float32)[[0, 0, 0, 1, 2, 3, 1, 2]])[None]
    x = x + 0.1 * jax.random.normal(jax.random.key(3), x.shape)
    y = np.asarray(apply(layer, x, train=True)[0])
    rev = np.arange(L)[::-1]
    y_rev = np.asarray(apply(layer, x[:, rev], train=True)[0])
    assert not np.allclose(y_rev, y[:, rev], atol=1e-6)


# ---- expert choice ----

def test_expert_choice_each_expert_takes_c_and_unpicked_tokens_get_zero():
    c = cfg(router="expert_choice", capacity_factor=0.5, eval_capacity_factor=0.5)  # C = ceil(0.5*8*2/4) = 2
    layer = MoELayer(c, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(2), (B, L, D))
    y, aux = apply(layer, x, train=False)
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], [B * 2] * 4)  # 2 per expert per group
    r = routing_lib.expert_choice_routing(layer.router.logits(x), 2)
    unpicked = np.asarray(r.unserved_GS())
    assert unpicked.any() and (~unpicked).any()
    assert np.all(np.asarray(y)[unpicked] == 0.0)
    np.testing.assert_allclose(aux.metrics["unserved_token_fraction"], unpicked.mean())
    assert float(aux.losses["balance_loss"]) == 0.0  # balanced by construction: reported as 0


@pytest.mark.parametrize("kw", [
    dict(router="expert_choice", capacity_factor=0.5, eval_capacity_factor=0.5),
    dict(capacity_factor=0.5, eval_capacity_factor=0.5, priority="top_prob"),  # token choice, with drops
])
def test_position_grouping_is_causal(kw):
    """Groups of one position across the batch: nothing at position <= t depends on positions > t."""
    Bc, Lc = 4, 6
    layer = MoELayer(cfg(grouping="position", **kw), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((Bc, Lc, D)).astype(np.float32)
    y = np.asarray(apply(layer, x)[0])
    for t in range(Lc - 1):
        x2 = x.copy()
        x2[:, t + 1:] += 5.0 * rng.standard_normal((Bc, Lc - t - 1, D)).astype(np.float32)
        y2 = np.asarray(apply(layer, x2)[0])
        np.testing.assert_array_equal(y2[:, : t + 1], y[:, : t + 1])
        assert not np.array_equal(y2[:, t + 1:], y[:, t + 1:])


def test_token_grouping_expert_choice_is_not_causal():
    """The counterpart: grouping tokens of a sequence lets a future token change an earlier output."""
    layer = MoELayer(cfg(router="expert_choice", capacity_factor=0.5, eval_capacity_factor=0.5), rngs=nnx.Rngs(0))
    rng = np.random.default_rng(4)
    x = rng.standard_normal((4, 6, D)).astype(np.float32)
    y = np.asarray(apply(layer, x)[0])
    x2 = x.copy()
    x2[:, 3:] += 5.0 * rng.standard_normal((4, 3, D)).astype(np.float32)
    assert not np.array_equal(np.asarray(apply(layer, x2)[0])[:, :3], y[:, :3])


# ---- hash routing through the layer ----

def test_hash_layer_routes_by_token_id():
    c = cfg(router="hash")
    layer = MoELayer(c, rngs=nnx.Rngs(0))
    ids = jnp.asarray([[3, 7, 3, 11, 5, 7, 3, 2], [7, 7, 1, 0, 9, 3, 4, 4]])
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    y, aux = apply(layer, x, token_ids=ids)
    e, w = routing_lib.hash_choices(ids, 4, 2)
    # Reference: y = sum_k 1/2 * FFN_{e_k}(x) (C = S: nothing drops).
    ex = layer.experts
    ref = np.zeros((B, L, D))
    for b in range(B):
        for t in range(L):
            for k in range(2):
                ee = int(e[b, t, k])
                ref[b, t] += 0.5 * _ffn(np.float64(x[b, t]), np.float64(ex.w_in_EDF[...][ee]),
                                        np.float64(ex.w_gate_EDF[...][ee]), np.float64(ex.w_out_EFD[...][ee]),
                                        None, None, "swiglu")
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)
    # The routing ignores x; equal ids get equal experts.
    _, aux2 = apply(layer, 3.0 * x + 1.0, token_ids=ids)
    np.testing.assert_array_equal(aux.metrics["tokens_per_expert"], aux2.metrics["tokens_per_expert"])
    np.testing.assert_array_equal(e[0, 0], e[0, 2])
    np.testing.assert_array_equal(e[0, 1], e[1, 0])
    assert float(aux.losses["balance_loss"]) == 0.0 and float(aux.losses["z_loss"]) == 0.0


# ---- router noise: only train=True with an rng ----

@nnx.jit
def _noise_variants(layer, x, k0, k1):
    y = lambda train, rng: layer(x, train=train, rng=rng)[0]
    return (y(False, None), y(False, k0), y(True, None), y(True, k0), y(True, k1))


def test_router_noise_only_in_training_with_rng():
    layer = MoELayer(cfg(jitter_eps=0.5, logit_noise_std=2.0, num_experts_per_token=1), rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (B, L, D))
    eval_y, eval_rng, train_no_rng, noisy, other = map(
        np.asarray, _noise_variants(layer, x, jax.random.key(0), jax.random.key(1)))
    np.testing.assert_array_equal(eval_rng, eval_y)  # eval: an rng changes nothing
    np.testing.assert_array_equal(train_no_rng, eval_y)  # train without an rng: no noise
    assert not np.allclose(noisy, eval_y)
    assert not np.allclose(other, noisy)


# ---- metrics on a hand-made case ----

def _hand_case():
    """The layer and tokens of the hand case: router w_DE = 10 I, x_t = one-hot(e_t), e = [0, 0, 0, 1, 1, 2, 0, 0]."""
    c = MoEConfig(d_model=4, d_ff=8, num_experts=4, num_experts_per_token=1, capacity_factor=1.0,
                  eval_capacity_factor=1.0, min_capacity=1)
    layer = MoELayer(c, rngs=nnx.Rngs(0))
    layer.router.w_DE[...] = 10.0 * jnp.eye(4)
    e = np.array([0, 0, 0, 1, 1, 2, 0, 0])
    return layer, jnp.asarray(np.eye(4, dtype=np.float32)[e])[None]


def test_metrics_hand_case():
    # D = 4, E = 4, k = 1, d_ff = 8 (SwiGLU), one group of S = 8 tokens (B = 1, L = 8).
    # Router w_DE = 10 I and x_t = one-hot(e_t): logits 10 on e_t, 0 elsewhere, so token t picks
    # e_t with e = [0, 0, 0, 1, 1, 2, 0, 0]. C = ceil(1.0 * 8 * 1 / 4) = 2.
    # Position order: e0 keeps t0, t1 and drops t2, t6, t7; e1 keeps t3, t4; e2 keeps t5; e3 is empty.
    layer, x = _hand_case()
    y, aux = apply(layer, x, train=True)
    m = aux.metrics
    np.testing.assert_array_equal(m["tokens_per_expert"], [2, 2, 1, 0])
    np.testing.assert_array_equal(m["routed_per_expert"], [5, 2, 1, 0])
    np.testing.assert_allclose(m["dropped_fraction"], 3 / 8)
    np.testing.assert_allclose(m["dropped_fraction_per_k"], [3 / 8])
    np.testing.assert_allclose(m["unserved_token_fraction"], 3 / 8)
    assert float(m["dead_experts"]) == 1.0
    # routed [5, 2, 1, 0]: mean 2, deviations [3, 0, -1, -2], variance 14/4 = 3.5 -> cv sqrt(3.5)/2.
    np.testing.assert_allclose(m["load_cv"], math.sqrt(3.5) / 2, rtol=1e-6)
    # Every token's probabilities are softmax([10, 0, 0, 0]) up to order: p = e^10 / (e^10 + 3), q = 1 / (e^10 + 3).
    p, q = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    np.testing.assert_allclose(m["router_entropy"], -(p * math.log(p) + 3 * q * math.log(q)), rtol=1e-4)  # float32: p = 1 - 1.4e-4
    # Balance loss (scope group): f = [5, 2, 1, 0] / 8, P = (5 [p,q,q,q] + 2 [q,p,q,q] + [q,q,p,q]) / 8.
    P = (np.array([5, 2, 1, 0]) * p + (8 - np.array([5, 2, 1, 0])) * q) / 8
    np.testing.assert_allclose(aux.losses["balance_loss"], 4 * np.sum(np.array([5, 2, 1, 0]) / 8 * P), rtol=1e-5)
    # z-loss: logsumexp([10, 0, 0, 0]) = log(e^10 + 3) for every token.
    np.testing.assert_allclose(aux.losses["z_loss"], math.log(math.exp(10) + 3) ** 2, rtol=1e-6)
    np.testing.assert_allclose(aux.losses["aux_loss"],
                               1e-2 * aux.losses["balance_loss"] + 1e-3 * aux.losses["z_loss"], rtol=1e-6)
    # FLOPs: router 2 T D E = 2*8*4*4 = 256; one SwiGLU row 2 D F 3 = 2*4*8*3 = 192.
    # useful = 256 + T k 192 = 256 + 1536 = 1792; executed (gather) = 256 + E G C 192 + 2 T k D
    # = 256 + 4*1*2*192 + 2*8*1*4 = 256 + 1536 + 64 = 1856.
    assert float(m["router_flops"]) == 256
    assert float(m["useful_flops"]) == 1792
    assert float(m["executed_flops"]) == 1856
    # Dropped tokens (t2, t6, t7) give exactly 0.
    assert np.all(np.asarray(y)[0, [2, 6, 7]] == 0.0)


# ---- token mask (padding) ----

masked_apply = nnx.jit(lambda layer, x, mask: layer(x, train=True, token_mask_BL=mask))


def test_token_mask_hand_case_equals_routing_the_real_tokens_alone():
    # The hand case above (E = 4, k = 1, picks e = [0, 0, 0, 1, 1, 2, 0, 0], C = 2) with t0, t1 masked.
    # Masked tokens claim nothing: e0 keeps t2, t6 and drops t7 (unmasked, t0 and t1 kept e0 and t2, t6, t7
    # dropped). Everything equals routing the six real tokens alone (L = 6: C = ceil(6 / 4) = 2 again).
    layer, x = _hand_case()
    mask = jnp.asarray([[False, False, True, True, True, True, True, True]])
    y, aux = masked_apply(layer, x, mask)
    y_alone, aux_alone = masked_apply(layer, x[:, 2:], None)
    m = aux.metrics
    np.testing.assert_array_equal(m["tokens_per_expert"], [2, 2, 1, 0])
    np.testing.assert_array_equal(m["routed_per_expert"], [3, 2, 1, 0])
    np.testing.assert_allclose(m["dropped_fraction"], 1 / 6)  # t7 of the six real tokens
    np.testing.assert_allclose(m["unserved_token_fraction"], 1 / 6)
    assert np.all(np.asarray(y)[0, :2] == 0.0)  # masked: exactly 0
    assert np.all(np.asarray(y)[0, 7] == 0.0)  # dropped
    assert np.any(np.asarray(y)[0, 2] != 0.0)  # t2 now holds e0's first slot
    np.testing.assert_allclose(np.asarray(y)[0, 2:], y_alone[0], atol=1e-6)
    for name in ("balance_loss", "z_loss", "aux_loss"):
        np.testing.assert_allclose(aux.losses[name], aux_alone.losses[name], rtol=1e-6)
    for name, value in aux_alone.metrics.items():
        if not name.endswith("flops"):  # FLOPs count the buffers, which padding still occupies
            np.testing.assert_allclose(m[name], value, rtol=1e-6, err_msg=name)
    # And the balance loss by hand: f = [3, 2, 1, 0] / 6, P over the six real tokens.
    p, q = math.exp(10) / (math.exp(10) + 3), 1 / (math.exp(10) + 3)
    f = np.array([3, 2, 1, 0]) / 6
    P = (np.array([3, 2, 1, 0]) * p + (6 - np.array([3, 2, 1, 0])) * q) / 6
    np.testing.assert_allclose(aux.losses["balance_loss"], 4 * np.sum(f * P), rtol=1e-5)


@pytest.mark.parametrize("kw", [
    dict(dispatch="einsum", capacity_factor=0.5, priority="top_prob"),
    dict(dispatch="gather", capacity_factor=0.5, overflow="renormalize"),
    dict(capacity_factor=None, eval_capacity_factor=None, expert_backend="blocked", dropless_block_size=4),
])
def test_token_mask_padding_changes_nothing_for_real_tokens(kw):
    # B = 2, L = 8; the last 3 tokens of sequence 1 are padding. Two paddings: random, and copies of the real
    # tokens of that sequence (they compete for the same experts). Unmasked, the copies change real tokens'
    # drops (capacity paths); masked, real tokens get the same output, routing and statistics either way, and
    # the batch balance loss is the one of the 13 real tokens alone (HF's load_balancing_loss_func with an
    # attention mask, divided by its factor K).
    c = cfg(balance_loss_scope="batch", group_size=8, **kw)
    layer = MoELayer(c, rngs=nnx.Rngs(3))
    x = jax.random.normal(jax.random.key(0), (2, 8, D))
    mask = jnp.ones((2, 8), bool).at[1, 5:].set(False)
    x_copy = x.at[1, 5:].set(x[1, :3])
    y_a, aux_a = masked_apply(layer, x, mask)
    y_b, aux_b = masked_apply(layer, x_copy, mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(y_a)[real], np.asarray(y_b)[real], atol=1e-6)
    assert np.all(np.asarray(y_a)[~real] == 0.0) and np.all(np.asarray(y_b)[~real] == 0.0)
    for name in ("balance_loss", "z_loss"):
        np.testing.assert_allclose(aux_a.losses[name], aux_b.losses[name], rtol=1e-6)
    for name in ("tokens_per_expert", "routed_per_expert", "dropped_fraction", "router_entropy"):
        np.testing.assert_allclose(aux_a.metrics[name], aux_b.metrics[name], rtol=1e-6)
    assert float(aux_a.metrics["routed_per_expert"].sum()) == 13 * c.top_k
    # The balance loss of the real tokens alone.
    logits_TE = layer.router.logits(x.reshape(1, 16, D))[0][real.reshape(16)]
    expert_TK, _ = routing_lib.top_k_choices(logits_TE[None], c.top_k)
    want = losses_lib.load_balancing_loss(jax.nn.softmax(logits_TE)[None], expert_TK, c.num_routed_experts)
    np.testing.assert_allclose(aux_a.losses["balance_loss"], want, rtol=1e-6)
    # Without the mask the loss (and, with capacity, some real token's routing) differs.
    y_c, aux_c = masked_apply(layer, x_copy, None)
    assert not np.isclose(aux_c.losses["balance_loss"], want, rtol=1e-4)
    if kw.get("capacity_factor") is not None:
        assert np.abs(np.asarray(y_c)[real] - np.asarray(y_b)[real]).max() > 1e-4


def test_token_mask_refused_where_unsupported():
    x = jnp.zeros((1, 4, D))
    mask = jnp.ones((1, 4), bool)
    layer = MoELayer(cfg(router="expert_choice"), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="token_mask"):
        layer(x, token_mask_BL=mask)
    layer = MoELayer(cfg(), rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="token_mask"):
        layer(x, token_mask_BL=mask[:, :3])
