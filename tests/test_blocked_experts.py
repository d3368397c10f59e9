"""The blocked expert backend (loops over experts and a ladder of row blocks, custom_vjp) against the
batched einsum and ragged_dot backends: forward and every gradient."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.experts import Experts, _steps, block_ladder


def test_block_ladder_goldens():
    assert block_ladder(64, 100_000) == (512, 256, 128, 64)  # 64 * 2^3 = 512, the largest step
    assert block_ladder(8, 40) == (32, 16, 8)  # capped by the 40 rows there are: 8 * 2^2 = 32 <= 40 < 64
    assert block_ladder(512, 4096) == (512,)
    assert block_ladder(1000, 4000) == (1000,)  # a block above 512 runs as it is


@pytest.mark.parametrize("block,rows_max", [(64, 2048), (8, 200), (3, 96)])
def test_steps_tile_each_expert_exactly_once(block, rows_max):
    ladder = block_ladder(block, 100_000)
    for rows in range(0, rows_max + 1, block):
        covered = []
        for size, first, n in _steps(rows, 1000, ladder):
            covered += [r for j in range(int(n)) for r in range(int(first) + j * size, int(first) + (j + 1) * size)]
        assert covered == list(range(1000, 1000 + rows)), (block, rows)


def _experts(activation, use_bias, capacity_backend="einsum", E=3, D=16, F=24):
    experts = Experts(E, D, F, activation=activation, use_bias=use_bias, capacity_backend=capacity_backend,
                      rngs=nnx.Rngs(0))
    if use_bias:  # non-zero biases, so that a missing or misplaced bias shows
        experts.b_in_EF[...] = jax.random.normal(jax.random.PRNGKey(5), experts.b_in_EF.shape)
        experts.b_out_ED[...] = jax.random.normal(jax.random.PRNGKey(6), experts.b_out_ED.shape)
    return experts


def _value_and_grads(experts, fn, x, cotangent):
    graphdef, params = nnx.split(experts)
    loss = lambda p, x: jnp.sum(fn(nnx.merge(graphdef, p), x) * cotangent)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, x)


def _assert_close(a, b, rtol=2e-5, atol=2e-5):
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("swiglu", True), ("gelu", True)])
@pytest.mark.parametrize("X", [48, 24, 7])  # 48 = 16 * 3, 24 = 8 * 3: ladder steps; 7: one-row steps
def test_capacity_buffers_blocked_equals_einsum(activation, use_bias, X):
    E, D = 3, 16
    x = jax.random.normal(jax.random.PRNGKey(1), (E, X, D))
    cot = jax.random.normal(jax.random.PRNGKey(2), (E, X, D))
    ref = _value_and_grads(_experts(activation, use_bias), lambda m, x: m(x), x, cot)
    got = _value_and_grads(_experts(activation, use_bias, "blocked"), lambda m, x: m(x), x, cot)
    _assert_close(got, ref)


@pytest.mark.parametrize("activation,use_bias", [("swiglu", False), ("geglu", True), ("relu", False)])
def test_grouped_blocked_equals_ragged_dot_and_skips_padding(activation, use_bias):
    """Sorted rows, expert segments padded to multiples of 8; counts_E below the segment sizes (and one
    expert empty): the blocked backend runs only ceil(count / 8) blocks of each expert, whose rows
    agree with ragged_dot; the skipped rows come back 0 and get no gradient."""
    E, D, block = 3, 16, 8
    counts_E = jnp.array([13, 0, 21], jnp.int32)
    group_sizes_E = jnp.array([24, 8, 32], jnp.int32)  # padded past ceil(count / 8) * 8 = 16, 0, 24
    M = int(group_sizes_E.sum())
    held = np.zeros(M, bool)
    for start, rows in ((0, 16), (24, 0), (32, 24)):
        held[start:start + rows] = True
    x = jax.random.normal(jax.random.PRNGKey(3), (M, D))
    cot = jax.random.normal(jax.random.PRNGKey(4), (M, D)) * held[:, None]
    experts = _experts(activation, use_bias)
    ref = _value_and_grads(experts, lambda m, x: m.grouped(x, group_sizes_E, backend="ragged_dot", block_size=1),
                           x, cot)
    got = _value_and_grads(experts, lambda m, x: m.grouped(x, group_sizes_E, backend="blocked", block_size=block,
                                                           counts_E=counts_E), x, cot)
    _assert_close(got, ref)
    y = experts.grouped(x, group_sizes_E, backend="blocked", block_size=block, counts_E=counts_E)
    np.testing.assert_array_equal(np.asarray(y)[~held], 0.0)


def test_bad_capacity_backend_is_named():
    with pytest.raises(ValueError, match="capacity_backend"):
        Experts(2, 8, 8, capacity_backend="ragged_dot", rngs=nnx.Rngs(0))
