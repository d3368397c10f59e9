"""Gradient accumulation (config.train.microbatches): one step over M microbatches equals one step over the
whole batch, auxiliary losses, metrics and the DeepSeek-V3 bias update included, on one device and on a mesh."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from moe_jax import sharding as sh
from moe_jax.losses import update_correction_bias
from moe_jax.train.distributed import init_sharded_state
from moe_jax.train.microbatch import split_microbatches
from moe_jax.train.run_config import build_run_config
from moe_jax.train.state import init_state
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

RTOL = 2e-5  # float32 round-off of sums taken in another order
KEY = jax.random.PRNGKey(0)

# One MoE layer, 4 experts top-2, capacity factor 1 with groups of one 8-token sequence: C = 4 slots per expert,
# so drops happen and slot order matters. balance_loss_coef 1 makes the balance loss's gradient a large part.
# Two cases (each step compiles for a few seconds): a 'batch'-scope loss, which needs the whole batch's load;
# and DeepSeek-V3's sigmoid router with its correction bias and a 'group'-scope loss over groups of 4 tokens,
# which lie inside any microbatch (per-microbatch averaging is exact; 'sequence' scope is the same case).
CASES = {
    "batch": dict(balance_loss_scope="batch"),
    "group_sigmoid_bias": dict(balance_loss_scope="group", group_size=4, score_fn="sigmoid",
                               use_correction_bias=True, bias_update_rate=0.1),
}


def run_config(case: str, batch: int, microbatches: int = 1, **mesh):
    model = base.tiny_model(**{**dict(d_model=16, num_layers=1, num_heads=2, d_ff=32, moe_d_ff=16, num_experts=4,
                                      max_seq_len=8, capacity_factor=1.0, min_capacity=1, router_init_scale=3.0,
                                      balance_loss_coef=1.0, z_loss_coef=1e-2), **CASES[case]})
    config = base.make("mb", model, data=dict(corpus="synthetic", seq_len=8, batch_size=batch),
                       train=dict(microbatches=microbatches))
    config.mesh.update(mesh)
    return build_run_config(config)


def recording_sgd(lr: float) -> optax.GradientTransformation:
    """SGD whose optimizer state is the last step's gradient (so the test reads the gradient exactly)."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(lambda g: -lr * g, grads), grads))


def batch_of(B: int) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, size=(B, 9)).astype(np.int32)


@functools.lru_cache(maxsize=None)
def step_result(case: str, M: int, batch_load=None, mesh: tuple = ()):
    """One step of `case` with M microbatches (on a mesh of `mesh` sizes, else one device):
    (gradients, params after, router biases before and after, metrics), all on the host."""
    B = 8
    run = run_config(case, B, M, **dict(mesh))
    tx = recording_sgd(1e-2)
    make_model = lambda: Transformer(run.model, rngs=nnx.Rngs(params=0))
    if mesh:
        m = sh.make_mesh(run.mesh)
        graphdef, state, placement = init_sharded_state(make_model, tx, m, sh.ExpertParallel(m))
        batch = placement.put_batch(batch_of(B))
    else:
        (graphdef, state), placement, batch = init_state(make_model(), tx), None, jnp.asarray(batch_of(B))
    rest_before = jax.device_get(state.rest)
    step = make_train_step(graphdef, tx, lambda s: 1e-2, placement=placement, microbatches=M, batch_load=batch_load)
    state, metrics = step(state, batch, KEY)
    return jax.device_get((state.opt_state, state.params, rest_before, state.rest, metrics))


def assert_trees_close(a, b, rtol=RTOL):
    """Leaf by leaf, atol scaled by the leaf's largest entry."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        x, y = np.asarray(x), np.asarray(y)
        scale = float(np.max(np.abs(y))) if y.size else 0.0
        np.testing.assert_allclose(x, y, rtol=rtol, atol=1e-7 + rtol * scale, err_msg=jax.tree_util.keystr(path))


def assert_same_step(got, ref):
    grads, params, _, rest, metrics = got
    ref_grads, ref_params, _, ref_rest, ref_metrics = ref
    assert set(metrics) == set(ref_metrics)
    for name in ref_metrics:  # loss, ce, aux_loss, grad_norm, per-layer losses, load, drops, entropy, load_cv
        np.testing.assert_allclose(metrics[name], ref_metrics[name], rtol=RTOL, atol=1e-6, err_msg=name)
    assert_trees_close(grads, ref_grads)
    assert_trees_close(params, ref_params)
    assert_trees_close(rest, ref_rest, rtol=0)  # biases move by +-rate from the same loads


@pytest.mark.parametrize("case,M", [("batch", 4), ("group_sigmoid_bias", 4)])  # M = 2: the mesh test
def test_microbatched_step_equals_the_whole_batch_step(case, M):
    ref = step_result(case, 1)
    assert float(ref[4]["moe/0/dropped_fraction"]) > 0  # capacity binds: routing order matters
    assert_same_step(step_result(case, M), ref)


def test_bias_update_sees_the_whole_batchs_load():
    """The bias moves by rate * sign(mean - load) of the whole batch's routed load (here counted by a forward
    pass of the initial model), which one microbatch's load would not give."""
    run = run_config("group_sigmoid_bias", 8)
    model = Transformer(run.model, rngs=nnx.Rngs(params=0))
    tokens = jnp.asarray(batch_of(8))[:, :-1]
    routed = lambda t: model(t, train=True)[1].layers[0]["metrics"]["routed_per_expert"]
    whole_E, first_quarter_E = jax.jit(lambda t: (routed(t), routed(t[:2])))(tokens)
    before = model.blocks[0].ffn.router.correction_bias_E[...]
    _, _, _, rest, _ = step_result("group_sigmoid_bias", 4)
    after = rest["blocks"][0]["ffn"]["router"]["correction_bias_E"][...]
    np.testing.assert_array_equal(after, update_correction_bias(before, whole_E, 0.1))
    assert np.any(update_correction_bias(before, first_quarter_E, 0.1) != after)


def test_per_microbatch_batch_scope_loss_would_differ():
    """The naive accumulation (each microbatch's own f_i) changes the batch-scope loss and its gradient."""
    ref = step_result("batch", 1)
    naive = step_result("batch", 4, batch_load=False)
    assert abs(float(naive[4]["moe/0/balance_loss"]) - float(ref[4]["moe/0/balance_loss"])) > 1e-3
    with pytest.raises(AssertionError):
        assert_trees_close(naive[0], ref[0])


def test_on_a_mesh_the_statistics_stay_the_whole_batchs(eight_devices):
    """8 devices (expert 4 x model 2: 4 batch shards), 2 microbatches of 4 sequences, one per shard: the
    batch-scope balance loss, the metrics and the gradients are the whole batch's, as on one device."""
    assert_same_step(step_result("batch", 2, mesh=(("expert", 4), ("model", 2))), step_result("batch", 1))


def test_microbatches_take_every_shards_rows_in_turn():
    batch = np.arange(8)[:, None] * np.ones((1, 3), int)
    # 2 shards of rows 0-3 and 4-7, 2 microbatches: rows 0,1 | 4,5 and then 2,3 | 6,7.
    np.testing.assert_array_equal(split_microbatches(jnp.asarray(batch), 2, shards=2)[:, :, 0], [[0, 1, 4, 5],
                                                                                                 [2, 3, 6, 7]])
    np.testing.assert_array_equal(split_microbatches(jnp.asarray(batch), 4)[:, :, 0], [[0, 1], [2, 3], [4, 5], [6, 7]])


@pytest.mark.parametrize("train,model,mesh,fix", [
    (dict(microbatches=0), {}, {}, "must be an int >= 1"),
    (dict(microbatches=3), {}, {}, "does not divide config.data.batch_size=8"),
    (dict(microbatches=4), dict(group_size=32), {}, "group_size=32"),
    (dict(microbatches=2), dict(grouping="position"), {}, "set group_size to a divisor"),
    (dict(microbatches=2), dict(grouping="position", group_size=8), {}, "group_size=8 (grouping='position')"),
    (dict(microbatches=2), {}, dict(data=8), "multiple of 8"),
])
def test_bad_microbatches_fail_before_compiling(train, model, mesh, fix):
    m = base.tiny_model(d_model=16, num_layers=1, num_heads=2, d_ff=32, moe_d_ff=16, num_experts=4, max_seq_len=8,
                        **model)
    config = base.make("bad", m, data=dict(corpus="synthetic", seq_len=8, batch_size=8), train=train)
    config.mesh.update(mesh)
    with pytest.raises(ValueError, match="config.train.microbatches") as err:
        build_run_config(config)
    assert fix in str(err.value), str(err.value)
