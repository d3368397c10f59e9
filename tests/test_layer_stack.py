"""Scanned layers (ModelConfig.scan_layers) and rematerialisation (ModelConfig.remat): the scanned model is the
unrolled one laid out otherwise, so one seed gives the same parameters, and the same logits, aux outputs,
gradients, bias updates and decode logits to float32 round-off; every remat policy gives the same gradients.

One pair of small models is built once for the module: 6 layers, a dense first layer, then MoE every 2nd layer
(period P = 2: layers [1, 2] and [3, 4] scanned, layer 5 the unrolled remainder, an MoE layer), one MTP module,
DeepSeek-V3's sigmoid router with its correction bias, and a batch-scope balance loss (so a microbatched step
passes `balance_load` through the scan). Capacity factor 1 so that tokens drop and slot order matters. The train
step runs the scanned model on a mesh of the 8 simulated devices, against the unrolled one on one device."""
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from configs import base
from moe_jax import sharding as sh
from moe_jax.layer_stack import convert_train_state, layer_places, stack_layers, unstack_layers
from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig
from moe_jax.sharding.config import ShardingConfig
from moe_jax.train.checkpoint import model_differences
from moe_jax.train.distributed import init_sharded_state
from moe_jax.train.run_config import build_run_config
from moe_jax.train.state import init_state, split_model
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

TOL = dict(rtol=2e-5, atol=2e-6)  # float32 round-off: a scan body is fused differently from unrolled layers
MOE = MoEConfig(d_model=16, d_ff=16, num_experts=4, num_experts_per_token=2, capacity_factor=1.0, min_capacity=1,
                score_fn="sigmoid", use_correction_bias=True, bias_update_rate=0.1, balance_loss_scope="batch",
                balance_loss_coef=1.0, z_loss_coef=1e-2, router_init_scale=3.0)
CFG = ModelConfig(vocab_size=64, d_model=16, num_layers=6, num_heads=2, d_ff=32, max_seq_len=16, moe=MOE,
                  moe_every=2, first_dense_layers=1, mtp_depth=1)
B, L = 8, 8
TOKENS_BL1 = np.random.default_rng(0).integers(0, 64, size=(B, L + 1)).astype(np.int32)


@pytest.fixture(scope="module")
def models():
    """(unrolled, scanned), the same seed."""
    return (Transformer(CFG, rngs=nnx.Rngs(params=0)),
            Transformer(dataclasses.replace(CFG, scan_layers=True), rngs=nnx.Rngs(params=0)))


def with_remat(model: Transformer, remat: str) -> Transformer:
    """The same parameters under another remat policy (the policy changes no variable)."""
    copy = nnx.merge(*nnx.split(model))
    copy.cfg = dataclasses.replace(model.cfg, remat=remat)
    return copy


def assert_trees_close(a, b, **tol):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x, np.float64), np.asarray(y, np.float64), **(tol or TOL))


def test_places_of_the_pattern():
    # N = 1 dense prefix layer, P = 2, n = (6 - 1) // 2 = 2 periods, R = 6 - 1 - 4 = 1 remainder layer
    assert (CFG.layer_period, CFG.scan_periods) == (2, 2)
    assert layer_places(CFG) == [("prefix", 0, None), ("scan", 0, 0), ("scan", 1, 0), ("scan", 0, 1),
                                 ("scan", 1, 1), ("suffix", 0, None)]
    assert CFG.moe_layer_indices == (1, 3, 5)  # scan[0] is the MoE block of each period, suffix[0] MoE too


@pytest.mark.parametrize("fields,periods,suffix", [
    (dict(num_layers=2, first_dense_layers=1), 0, 1),  # (2 - 1) // 2 = 0 periods: nothing to scan, all unrolled
    (dict(moe=None, moe_every=1, first_dense_layers=0, mtp_depth=0), 6, 0),  # dense: a period of 1 layer
])
def test_edge_layouts_build(fields, periods, suffix):
    cfg = dataclasses.replace(CFG, scan_layers=True, **fields)
    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))
    assert cfg.scan_periods == periods and len(model.suffix) == suffix
    state = nnx.state(model)
    assert jax.tree.structure(jax.eval_shape(lambda s: stack_layers(unstack_layers(s, cfg), cfg), state)) == \
        jax.tree.structure(state)


def test_same_init_and_layout_round_trip(models):
    unrolled, scanned = models
    su, ss = nnx.state(unrolled), nnx.state(scanned)
    stacked = stack_layers(su, CFG)
    assert jax.tree.structure(stacked) == jax.tree.structure(ss)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(stacked), jax.tree.leaves(ss)))
    back = unstack_layers(ss, CFG)
    assert jax.tree.structure(back) == jax.tree.structure(su)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(su)))
    assert ss["scan"][0]["ffn"]["experts"]["w_in_EDF"].shape == (2, 4, 16, 16)  # [n, E, D, F]
    # a train state's params, rest and optimizer moments convert the same way
    _, state = init_state(unrolled, optax.adam(1e-3))
    converted = convert_train_state(state, CFG, scanned=True)
    assert jax.tree.structure(converted.params) == jax.tree.structure(nnx.split(scanned, nnx.Param, ...)[1])
    assert jax.tree.structure(converted.opt_state[0].mu) == jax.tree.structure(converted.params)
    with pytest.raises(ValueError, match="unstack_layers"):
        stack_layers(ss, CFG)
    with pytest.raises(ValueError, match="stack_layers"):
        unstack_layers(su, CFG)


def test_moe_layers_of_a_stack(models):
    unrolled, scanned = models
    slots = scanned.moe_layer_slots()
    assert [(i, j) for i, _, j in slots] == [(1, 0), (3, 1), (5, None), (6, None)]  # 6: the MTP block's
    for (i, a), (k, b) in zip(unrolled.moe_layers(), scanned.moe_layers()):
        assert i == k
        np.testing.assert_array_equal(a.router.w_DE[...], b.router.w_DE[...])


def recording_sgd() -> optax.GradientTransformation:
    """An optimizer whose state is the last step's gradient (so the test reads the gradient exactly)."""
    return optax.GradientTransformation(lambda params: jax.tree.map(jnp.zeros_like, params),
                                        lambda grads, state, params=None: (jax.tree.map(lambda g: -g, grads), grads))


@functools.lru_cache(maxsize=None)
def train_step_result(model: Transformer, mesh: tuple = ()):
    """(new state with the step's gradient as its opt_state, metrics) of one train step, on one device or (the
    model's MoE layers expert-parallel) on a mesh of the 8 devices."""
    tx = recording_sgd()
    if mesh:
        m = sh.make_mesh(ShardingConfig(**dict(mesh)))
        graphdef, state, placement = init_sharded_state(lambda: Transformer(model.cfg, rngs=nnx.Rngs(params=0)), tx,
                                                        m, sh.ExpertParallel(m))
        batch = placement.put_batch(TOKENS_BL1)
    else:
        graphdef, state = init_state(model, tx)
        state = jax.tree.map(jnp.copy, state)  # the step donates it: keep the module's own arrays
        placement, batch = None, jnp.asarray(TOKENS_BL1)
    step = make_train_step(graphdef, tx, lambda s: 0.0, placement=placement)
    return jax.device_get(step(state, batch, jax.random.PRNGKey(1)))


def test_train_step_on_a_mesh_equals_unrolled(models, eight_devices):
    """The scanned model on a mesh (expert 2 x fsdp 2 x model 2: stacked parameters sharded like their layers'
    slices, the MoE layers expert-parallel inside the scan) against the unrolled one on one device: loss,
    per-layer metrics (MTP's included), gradients and the correction-bias update of one step."""
    su, mu = train_step_result(models[0])
    ss, ms = train_step_result(models[1], (("expert", 2), ("fsdp", 2), ("model", 2)))
    assert mu.keys() == ms.keys() and "moe/5/balance_loss" in ms and "mtp_loss" in ms
    assert_trees_close(mu, ms)
    assert_trees_close(su.opt_state, unstack_layers(ss.opt_state, CFG))  # the gradients
    assert_trees_close(su.rest, unstack_layers(ss.rest, CFG))  # the updated correction biases
    assert not np.array_equal(ss.rest["scan"][0]["ffn"]["router"]["correction_bias_E"],
                              nnx.state(models[1], nnx.Not(nnx.Param))["scan"][0]["ffn"]["router"]["correction_bias_E"])


def test_forward_with_token_mask_replay_and_balance_load(models):
    """Each per-layer input the unrolled forward takes, through the scan: a token mask, replayed experts, and the
    balance load a microbatched step passes (train/microbatch.py)."""
    mask_BL = np.arange(L)[None, :] < np.array([8, 5, 8, 3, 8, 6, 2, 8])[:, None]
    experts = np.random.default_rng(1).integers(0, 4, size=(len(CFG.moe_layer_indices), B, L, 2)).astype(np.int32)
    replay = tuple((jnp.asarray(e), None) for e in experts)
    load = {i: jnp.arange(4.0)[None, :] + i for i in CFG.moe_layer_indices}  # <float32>[1, E] per MoE layer

    def run(model):
        graphdef, params, rest = split_model(model)

        @jax.jit
        def forward(params, rest, tokens_BL):
            model = nnx.merge(graphdef, params, rest)
            masked = model(tokens_BL, train=True, rng=jax.random.PRNGKey(2), token_mask=mask_BL)
            replayed = model(tokens_BL, train=True, replay=replay)
            loaded = model(tokens_BL, train=True, balance_load=load)
            return masked, replayed, loaded

        return jax.device_get(forward(params, rest, jnp.asarray(TOKENS_BL1[:, :-1])))

    out = [run(m) for m in models]
    (logits_u, aux_u), (logits_s, aux_s) = out[0][0], out[1][0]
    assert aux_u.layer_indices == aux_s.layer_indices == (1, 3, 5)
    assert_trees_close((logits_u, aux_u), (logits_s, aux_s))
    assert_trees_close(out[0][1:], out[1][1:])
    assert not np.allclose(out[1][2][1].aux_loss, aux_s.aux_loss)  # the given load made the balance losses
    for entry in out[1][1][1].layers:  # the replayed experts were used in every layer, the scanned ones included
        m = CFG.moe_layer_indices.index(entry["layer"])
        np.testing.assert_array_equal(entry["choices"]["expert"].reshape(B, L, 2), experts[m])


def test_decode_equals_unrolled(models):
    """A prefill of 4 tokens, then one step: logits and caches (the scanned layers' stacked per call)."""
    def run(model):
        graphdef, state = nnx.split(model)

        @jax.jit
        def decode(state, tokens_BL):
            model = nnx.merge(graphdef, state)
            prefill, cache = model.decode(tokens_BL[:, :4], model.init_cache(B, 8))
            step, cache = model.decode(tokens_BL[:, 4:], cache)
            return prefill, step, cache

        return jax.device_get(decode(state, jnp.asarray(TOKENS_BL1[:, :5])))

    assert_trees_close(run(models[0]), run(models[1]))


def test_remat_gives_the_same_gradients(models):
    """The scanned model under remat='offload' (layer_stack's own policy: matmul outputs saved, to host memory,
    everything else recomputed) against the unrolled one without remat, a train step on one device. Its prefix
    and remainder layers (0 and 5) take the unrolled path, each block under a `jax.checkpoint` of its own.
    'full' and 'save_dots' are jax's `nothing_saveable` and `dots_saveable` through the same wrapper (compiled by
    benchmarks/remat_memory.py, not run here: each case compiles a train step)."""
    su, mu = train_step_result(models[0])
    ss, ms = train_step_result(with_remat(models[1], "offload"))
    assert_trees_close(mu, ms)
    assert_trees_close(su.opt_state, unstack_layers(ss.opt_state, CFG))
    assert_trees_close(su.rest, unstack_layers(ss.rest, CFG))  # the bias update on one device too


def test_bad_fields_fail_naming_them():
    with pytest.raises(ValueError, match=r"ModelConfig.scan_layers='yes'.*True or False"):
        dataclasses.replace(CFG, scan_layers="yes")
    with pytest.raises(ValueError, match=r"ModelConfig.remat='dots'.*one of \('none', 'full', 'save_dots'"):
        dataclasses.replace(CFG, remat="dots")
    config = base.make("s", base.tiny_model(d_model=16, num_heads=2, scan_layers=True, remat="offload"),
                       data=dict(corpus="synthetic", seq_len=8, batch_size=8))
    assert build_run_config(config).model.scan_layers  # a run config takes the field
    # remat changes no parameter: a checkpoint restores across it; scan_layers changes the layout
    saved = {"num_layers": 2, "remat": "full", "scan_layers": False}
    assert model_differences(saved, dict(saved, remat="none")) == []
    assert model_differences({"num_layers": 2}, {"num_layers": 2, "scan_layers": True}) == ["scan_layers"]


def test_checkpoint_of_the_other_layout_names_the_conversion(tmp_path):
    from moe_jax.train.checkpoint import Checkpoints

    state = {"w": jnp.ones(3)}
    ckpt = Checkpoints(str(tmp_path), keep=2)
    try:
        ckpt.save(1, state, {"step": 1, "model": {"num_layers": 2, "scan_layers": True, "remat": "full"}})
        with pytest.raises(ValueError, match=r"scan_layers=True, this run has False.*layer_stack.convert_train_state"):
            ckpt.restore(1, state, expect_model={"num_layers": 2, "scan_layers": False, "remat": "full"})
        restored = ckpt.restore(1, state, expect_model={"num_layers": 2, "scan_layers": True, "remat": "none"})
        np.testing.assert_array_equal(restored["w"], np.ones(3))  # remat changes no parameter
    finally:
        ckpt.close()
