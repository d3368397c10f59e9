"""Auxiliary losses, routing metrics and the aux-loss-free bias update, on hand-made inputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import losses as L


def _onehot_probs(expert_T, E):
    return jax.nn.one_hot(jnp.asarray(expert_T), E)


def test_balance_loss_uniform_is_one():
    # E = 4, T = 8, K = 1, every expert chosen twice: f_i = 2/8 = 1/4, P_i = 1/4
    # -> E * sum_i f_i P_i = 4 * 4 * (1/4 * 1/4) = 1.
    probs = jnp.full((1, 8, 4), 0.25)
    expert = jnp.asarray([0, 1, 2, 3, 0, 1, 2, 3]).reshape(1, 8, 1)
    np.testing.assert_allclose(L.load_balancing_loss(probs, expert, 4), 1.0, rtol=1e-6)


def test_balance_loss_all_to_one_expert_is_E():
    # Everything on e0 (k = 1): f = [1, 0, 0, 0], P = [1, 0, 0, 0] -> 4 * 1 * 1 = E = 4.
    probs = _onehot_probs(np.zeros((1, 8), int), 4)
    expert = jnp.zeros((1, 8, 1), jnp.int32)
    np.testing.assert_allclose(L.load_balancing_loss(probs, expert, 4), 4.0, rtol=1e-6)


def test_balance_loss_k2_is_hf_over_k():
    # K = 2, T = 2, E = 4: choices (0, 1) and (0, 2). Ours: f = counts / (T K) = [2, 1, 1, 0] / 4.
    # P = mean of [0.5, 0.3, 0.2, 0] and [0.4, 0.1, 0.5, 0] = [0.45, 0.2, 0.35, 0].
    # Ours: 4 * (0.5*0.45 + 0.25*0.2 + 0.25*0.35) = 4 * 0.3625 = 1.45.
    # HF (Mixtral/Qwen): f counted over T only (sums to K): 4 * (1*0.45 + 0.5*0.2 + 0.5*0.35) = 2.9 = K * 1.45.
    probs = jnp.asarray([[[0.5, 0.3, 0.2, 0.0], [0.4, 0.1, 0.5, 0.0]]])
    expert = jnp.asarray([[[0, 1], [0, 2]]])
    ours = L.load_balancing_loss(probs, expert, 4)
    np.testing.assert_allclose(ours, 1.45, rtol=1e-6)
    np.testing.assert_allclose(2 * ours, 2.9, rtol=1e-6)


def test_balance_loss_averages_over_scopes_and_grads_only_through_probs():
    # Scope 0 uniform (1.0), scope 1 all on e0 (4.0): mean 2.5.
    probs = jnp.stack([jnp.full((8, 4), 0.25), _onehot_probs(np.zeros(8, int), 4)])
    expert = jnp.stack([jnp.asarray([0, 1, 2, 3] * 2).reshape(8, 1), jnp.zeros((8, 1), jnp.int32)])
    np.testing.assert_allclose(L.load_balancing_loss(probs, expert, 4), 2.5, rtol=1e-6)
    # d loss / d probs[n, t, i] = E * f[n, i] / (N * T): f is a constant (non-differentiable counts).
    g = jax.grad(lambda p: L.load_balancing_loss(p, expert, 4))(probs)
    np.testing.assert_allclose(g[0], 4 * 0.25 / (2 * 8), rtol=1e-6)
    np.testing.assert_allclose(g[1], np.tile([4 * 1.0 / 16, 0, 0, 0], (8, 1)), rtol=1e-6)


def test_z_loss():
    # logits 0 (E = 4): logsumexp = log 4; logits log [1, 2, 3, 4]: logsumexp = log 10.
    logits = jnp.asarray([[0.0] * 4, list(np.log([1.0, 2.0, 3.0, 4.0]))])
    expected = (np.log(4.0) ** 2 + np.log(10.0) ** 2) / 2
    np.testing.assert_allclose(L.router_z_loss(logits), expected, rtol=1e-6)


def test_router_entropy():
    # uniform over 4: log 4; one-hot: 0 (no NaN from 0 log 0); [0.5, 0.5, 0, 0]: log 2.
    probs = jnp.asarray([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    np.testing.assert_allclose(L.router_entropy(probs), (np.log(4) + 0 + np.log(2)) / 3, rtol=1e-6)
    g = jax.grad(lambda p: L.router_entropy(p))(probs)
    assert np.all(np.isfinite(g))


def test_update_correction_bias_sign_rule():
    # loads [4, 2, 2, 0], mean 2: overloaded e0 goes down by rate, e3 up by rate, e1/e2 stay.
    bias = jnp.asarray([0.1, -0.2, 0.0, 0.3])
    new = L.update_correction_bias(bias, jnp.asarray([4.0, 2.0, 2.0, 0.0]), 1e-3)
    np.testing.assert_allclose(new, [0.1 - 1e-3, -0.2, 0.0, 0.3 + 1e-3], rtol=1e-6)
    # The step is rate * sign, whatever the size of the imbalance: loads [400, 2, 2, 0], mean 101:
    # e0 is over (-0.5), the others under (+0.5).
    new2 = L.update_correction_bias(bias, jnp.asarray([400.0, 2.0, 2.0, 0.0]), 0.5)
    np.testing.assert_allclose(new2 - bias, [-0.5, 0.5, 0.5, 0.5], rtol=1e-6)
    # Balanced loads leave the bias unchanged.
    np.testing.assert_array_equal(L.update_correction_bias(bias, jnp.full((4,), 3.0), 1e-3), bias)


def test_routing_metrics_hand_case():
    # T = 4 tokens, K = 2, E = 4. Router choices per expert (before capacity) [4, 2, 2, 0];
    # served [3, 2, 2, 0]; one of 8 choices dropped (token 3's first choice).
    probs = jnp.asarray([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4])
    dropped = jnp.asarray([[0, 0], [0, 0], [0, 0], [1, 0]], bool)
    m = L.routing_metrics(probs_TE=probs, routed_E=jnp.asarray([4.0, 2, 2, 0]),
                          served_E=jnp.asarray([3.0, 2, 2, 0]), dropped_TK=dropped,
                          unserved_T=jnp.asarray([0, 0, 0, 0], bool))
    np.testing.assert_allclose(m["dropped_fraction"], 1 / 8)
    np.testing.assert_allclose(m["dropped_fraction_per_k"], [1 / 4, 0])
    np.testing.assert_allclose(m["unserved_token_fraction"], 0.0)
    np.testing.assert_allclose(m["router_entropy"], (2 * np.log(4) + np.log(2)) / 4, rtol=1e-6)
    # routed [4, 2, 2, 0]: mean 2, population std sqrt((4 + 0 + 0 + 4) / 4) = sqrt 2 -> cv = 0.7071.
    np.testing.assert_allclose(m["load_cv"], np.sqrt(2) / 2, rtol=1e-6)
    assert m["dead_experts"] == 1.0
    np.testing.assert_array_equal(m["tokens_per_expert"], [3, 2, 2, 0])
    np.testing.assert_array_equal(m["routed_per_expert"], [4, 2, 2, 0])


@pytest.mark.parametrize("E", [2, 8])
def test_balance_loss_bounds_random(E):
    # For any routing, 0 <= loss <= E (k = 1); the minimum 1 is reached by a balanced router only.
    key = jax.random.key(E)
    probs = jax.nn.softmax(jax.random.normal(key, (3, 16, E)) * 3, -1)
    expert = jnp.argmax(probs, -1)[..., None]
    loss = float(L.load_balancing_loss(probs, expert, E))
    assert 0.0 <= loss <= E


def test_balance_loss_with_token_mask():
    # G = 2 scopes, S = 2, E = 2, K = 1. Scope 0: t0 p = [.8, .2] -> e0 (real), t1 p = [.1, .9] -> e1 (masked):
    # f = [1, 0], P = [.8, .2] over the one real token: loss 2 * (1 * .8) = 1.6. Scope 1 is all padding and
    # drops out of the mean (not a 0 that halves it).
    probs = jnp.asarray([[[.8, .2], [.1, .9]], [[.5, .5], [.5, .5]]])
    expert = jnp.asarray([[[0], [1]], [[0], [1]]])
    mask = jnp.asarray([[True, False], [False, False]])
    np.testing.assert_allclose(L.load_balancing_loss(probs, expert, 2, token_mask_GS=mask), 1.6, rtol=1e-6)
    np.testing.assert_array_equal(L.expert_load(expert, 2, mask), [[1, 0], [0, 0]])
    # z-loss and entropy: means over the real tokens.
    logits = jnp.asarray([[0.0, 0.0], [5.0, -5.0]])
    np.testing.assert_allclose(L.router_z_loss(logits, jnp.asarray([True, False])), np.log(2) ** 2, rtol=1e-6)
    np.testing.assert_allclose(L.router_entropy(jnp.asarray([[.5, .5], [1.0, 0.0]]), jnp.asarray([True, False])),
                               np.log(2), rtol=1e-6)
