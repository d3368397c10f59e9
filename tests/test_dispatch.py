"""Dispatch paths agree: gather vs einsum (with and without drops), dropless sorted vs capacity.

Forward outputs and gradients with respect to the input and every parameter are compared between
two layers holding the same parameters. The loss needs the output, 0.5 * sum(y**2) (with sum(y) the
cotangent is all ones whatever y is, and XLA deletes an FFN's output matmul from the gradient), and
adds the auxiliary loss so that the router's gradient through both paths is compared too.
"""
from __future__ import annotations

import dataclasses

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import given, settings

from moe_jax import MoEConfig, MoELayer
from moe_jax import dispatch as dispatch_lib
from moe_jax import routing as routing_lib

B, L, D, F = 2, 8, 8, 16
TOL = dict(rtol=1e-5, atol=1e-6)


def base(**kw) -> MoEConfig:
    c = dict(d_model=D, d_ff=F, num_experts=4, num_experts_per_token=2, min_capacity=1,
             capacity_factor=8.0, eval_capacity_factor=8.0)  # cf >= E / k: C = min(S, ceil(cf S k / E)) = S
    c.update(kw)
    return MoEConfig(**c)


def x_BLD(seed=0):
    return jax.random.normal(jax.random.key(seed), (B, L, D))


def with_params_of(src: MoELayer, cfg: MoEConfig) -> MoELayer:
    layer = MoELayer(cfg, rngs=nnx.Rngs(1))
    nnx.update(layer, nnx.state(src))
    return layer


def value_and_grads(layer: MoELayer, x, train=True):
    def loss(layer, x):
        y, aux = layer(x, train=train)
        return 0.5 * jnp.sum(y**2) + aux.losses["aux_loss"], (y, aux)

    (value, (y, aux)), (g_layer, g_x) = nnx.value_and_grad(loss, argnums=(0, 1), has_aux=True)(layer, x)
    return y, aux, g_x, nnx.state(g_layer, nnx.Param)


@nnx.jit
def both(a: MoELayer, b: MoELayer, x):
    """Output, aux and gradients of two layers on the same input, in one compiled call."""
    return value_and_grads(a, x), value_and_grads(b, x)


def _close(a, b, rtol, atol):
    """allclose with atol relative to the array's scale: float32 sums in another order differ by
    a few ulps of the largest terms, not of each (possibly tiny) element."""
    a, b = np.asarray(a), np.asarray(b)
    np.testing.assert_allclose(a, b, rtol=rtol, atol=atol * max(1.0, float(np.abs(b).max())))


def assert_same(a, b, **tol):
    ya, auxa, gxa, gpa = a
    yb, auxb, gxb, gpb = b
    _close(ya, yb, **tol)
    _close(gxa, gxb, **tol)
    leaves_a, leaves_b = jax.tree.leaves(gpa), jax.tree.leaves(gpb)
    assert len(leaves_a) == len(leaves_b) > 0
    for la, lb in zip(leaves_a, leaves_b):
        _close(la, lb, **tol)
    for k in ("balance_loss", "z_loss"):
        _close(auxa.losses[k], auxb.losses[k], **tol)
    np.testing.assert_array_equal(auxa.metrics["tokens_per_expert"], auxb.metrics["tokens_per_expert"])


def _nonzero_param_grads(g):
    """Every parameter gets some gradient (the router included): a test of the test."""
    for path, leaf in jax.tree_util.tree_leaves_with_path(g):
        assert np.abs(np.asarray(leaf)).max() > 0, path


@pytest.mark.parametrize("kw,expect_drops", [
    (dict(), False),                                             # C = S: no drops
    # C = ceil(0.5 * 8 * 2 / 4) = 2, batch-priority order, buffer ceil(1.5 * 2) = 3 with C / load weights.
    (dict(capacity_factor=0.5, priority="top_prob", overflow="reduced_weight", overflow_buffer_factor=1.5), True),
    (dict(router="expert_choice", capacity_factor=0.5), False),   # C = 2 tokens per expert of 8
    # Reroute, with drops left over: E = 8 experts of width 8, k = 2, C = ceil(0.5 * 8 * 2 / 8) = 1
    # (16 choices, 8 slots); ReLU with expert biases; a shared expert with its gate.
    (dict(num_experts_per_token=1, activation="relu", expert_bias=True, capacity_factor=0.5, granularity=2,
          overflow="reroute", num_shared_experts=1, shared_expert_gate=True), True),
])
def test_gather_and_einsum_agree(kw, expect_drops):
    cfg = base(dispatch="gather", **kw)
    a = MoELayer(cfg, rngs=nnx.Rngs(0))
    b = with_params_of(a, dataclasses.replace(cfg, dispatch="einsum"))
    ra, rb = both(a, b, x_BLD())
    assert_same(ra, rb, **TOL)
    _nonzero_param_grads(ra[3])
    assert (float(ra[1].metrics["dropped_fraction"]) > 0) == expect_drops


@pytest.mark.parametrize("backend,kw", [
    ("blocked", dict(expert_bias=True, num_shared_experts=1, shared_expert_gate=True)),  # SwiGLU, k = 2
    # ReLU, k = 2 of E = 8 experts of width 8 (granularity 2), DeepSeek-style weights.
    ("ragged_dot", dict(activation="relu", expert_bias=True, num_experts_per_token=1, granularity=2,
                        score_fn="sigmoid", normalize_topk=True, routed_scaling_factor=2.5)),
])
def test_dropless_agrees_with_capacity_that_drops_nothing(backend, kw):
    cap = base(dispatch="gather", **kw)
    assert cap.capacity(L, True) == L  # C = S: the capacity path cannot drop
    a = MoELayer(cap, rngs=nnx.Rngs(0))
    drop_less = dataclasses.replace(cap, capacity_factor=None, eval_capacity_factor=None, expert_backend=backend,
                                    dropless_block_size=4)
    b = with_params_of(a, drop_less)
    assert_same(*both(a, b, x_BLD(1)), **TOL)


def test_einsum_dispatch_of_soft_moe_is_dense_mixture():
    """Soft MoE through the layer: slot inputs are dispatch-weighted token averages."""
    layer = MoELayer(base(router="soft", dispatch="einsum", soft_slots_per_expert=2), rngs=nnx.Rngs(0))
    x = x_BLD()

    @nnx.jit
    def both(layer, x):
        y, _ = layer(x)
        r = routing_lib.soft_routing(layer.router.logits(x), 4)  # groups = sequences
        slots_GECD = jnp.einsum("gsec,gsd->gecd", r.dispatch_GSEC, x)
        out_EXD = layer.experts(jnp.swapaxes(slots_GECD, 0, 1).reshape(4, B * 2, D))
        y_ref = jnp.einsum("gsec,gecd->gsd", r.combine_GSEC, jnp.swapaxes(out_EXD.reshape(4, B, 2, D), 0, 1))
        return y, y_ref

    y, y_ref = both(layer, x)
    np.testing.assert_allclose(y, y_ref, **TOL)


# ---- the sorted (dropless) form ----

@settings(max_examples=20, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=10 * 2, max_size=10 * 2), st.sampled_from((1, 3, 4)))
def test_sort_choices_invariants(experts, block):
    T, K, E = 10, 2, 4
    expert_TK = np.int32(experts).reshape(T, K)
    r = _sort(jnp.asarray(expert_TK), jnp.ones((T, K)), E, block)
    sizes = np.asarray(r.group_sizes_E)
    M = r.row_token_M.shape[0]
    counts = np.bincount(expert_TK.ravel(), minlength=E)
    assert sizes.sum() == M and M % block == 0
    assert np.all(sizes[:-1] % block == 0) and np.all(sizes >= counts)
    starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    slot = np.asarray(r.token_slot_TK)
    row_choice = np.asarray(r.row_choice_M)
    for t in range(T):
        for k in range(K):
            e, m = expert_TK[t, k], slot[t, k]
            assert starts[e] <= m < starts[e] + sizes[e]  # the row lies in its expert's segment
            assert row_choice[m] == t * K + k and r.row_token_M[m] == t
    assert (row_choice < T * K).sum() == T * K  # every choice has exactly one row
    np.testing.assert_array_equal(np.asarray(r.row_token_M)[row_choice == T * K], T)  # padding reads nothing
    # Stable: within an expert, rows follow token order.
    for e in range(E):
        rows = np.sort(slot[expert_TK == e])
        toks = row_choice[rows] // K
        assert np.all(np.diff(toks) >= 0)


_sort = jax.jit(dispatch_lib.sort_choices, static_argnums=(2, 3))


def test_empty_experts_and_all_to_one_in_sorted_path():
    # T = 3 tokens, K = 1, all on e2 of E = 4, block 2. Static rows M = round_up(3 + 4 * (2 - 1), 2) = 8.
    # Counts [0, 0, 3, 0] padded to [0, 0, 4, 0]; the 4 spare rows go to the last expert: [0, 0, 4, 4].
    r = dispatch_lib.sort_choices(jnp.full((3, 1), 2, jnp.int32), jnp.ones((3, 1)), 4, 2)
    np.testing.assert_array_equal(r.group_sizes_E, [0, 0, 4, 4])
    np.testing.assert_array_equal(np.asarray(r.token_slot_TK)[:, 0], [0, 1, 2])
    np.testing.assert_array_equal(r.row_token_M, [0, 1, 2, 3, 3, 3, 3, 3])  # 3 = T: padding
