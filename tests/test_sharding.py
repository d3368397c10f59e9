"""Expert parallelism on 8 simulated CPU devices: the sharded layer, train step and checkpoints equal the
single-device ones; the rule table places every array; bad meshes fail before compile, naming the field."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from configs import base
from moe_jax import sharding as sh
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer
from moe_jax.train.distributed import init_sharded_state
from moe_jax.train.run_config import build_run_config
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

RTOL, ATOL = 1e-5, 1e-6


def mesh_of(**sizes) -> jax.sharding.Mesh:
    return sh.make_mesh(sh.ShardingConfig(**sizes))


def assert_trees_close(a, b, rtol=RTOL, atol=ATOL):
    """Leaf by leaf; atol scales with the leaf's largest entry (sums in another order differ by ~1e-7 of it)."""
    leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b)
    for (path, x), y in zip(leaves_a, leaves_b):
        y = np.asarray(y)
        scale = float(np.max(np.abs(y))) if y.size and y.dtype.kind == "f" else 0.0
        np.testing.assert_allclose(np.asarray(x), y, rtol=rtol, atol=max(atol, rtol * scale),
                                   err_msg=jax.tree_util.keystr(path))


@functools.lru_cache(maxsize=None)
def layer_fn(cfg: MoEConfig, plan):
    """jit((params, x, ids) -> ((loss, (y, aux)), grads wrt (params, x))) of an MoE layer with `plan`
    (None: one device), and its initial params; cached, so each (cfg, plan) compiles once per shape."""
    graphdef, params, rest = nnx.split(MoELayer(cfg, rngs=nnx.Rngs(params=0)), nnx.Param, ...)

    def loss_fn(params, x_BLD, ids_BL):
        model = sh.apply_expert_parallel(nnx.merge(graphdef, params, rest), plan)
        y_BLD, aux = model(x_BLD, train=True, token_ids_BL=ids_BL)
        return 0.5 * jnp.sum(y_BLD ** 2) + aux.losses["aux_loss"], (y_BLD, aux)

    return jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)), params


def layer_results(cfg: MoEConfig, plan, x_BLD, ids_BL=None):
    """(loss, y, aux, grads wrt (params, x))."""
    fn, params = layer_fn(cfg, plan)
    (loss, (y, aux)), grads = fn(params, x_BLD, ids_BL)
    return loss, y, aux, grads


def check_layer(cfg: MoEConfig, mesh, B=8, L=16, expect_drops=True, **plan_kw):
    """Loss, output, every loss and metric, and the gradients of the params and the input agree."""
    x_BLD = jax.random.normal(jax.random.PRNGKey(1), (B, L, cfg.d_model))
    ids_BL = jax.random.randint(jax.random.PRNGKey(2), (B, L), 0, 256) if cfg.router == "hash" else None
    ref = layer_results(cfg, None, x_BLD, ids_BL)
    got = layer_results(cfg, sh.ExpertParallel(mesh, **plan_kw), x_BLD, ids_BL)
    np.testing.assert_allclose(got[0], ref[0], rtol=RTOL)
    np.testing.assert_allclose(got[1], ref[1], rtol=RTOL, atol=ATOL)
    assert_trees_close(got[2], ref[2])  # every loss and metric, aux_loss included
    assert_trees_close(got[3], ref[3])  # gradients of every parameter and of the input
    if expect_drops:  # the capacity is binding, so slot assignment order matters
        assert float(ref[2].metrics["dropped_fraction"]) > 0
    return ref, got


def moe(**kw) -> MoEConfig:
    base_kw = dict(d_model=16, d_ff=32, num_experts=8, num_experts_per_token=2, capacity_factor=1.0,
                   eval_capacity_factor=1.0, min_capacity=1, router_init_scale=3.0)
    return MoEConfig(**{**base_kw, **kw})


@pytest.mark.parametrize("dispatch,sizes", [
    ("gather", dict(expert=8)),  # expert axis = number of experts: one expert per device
    ("einsum", dict(expert=8)),
    ("einsum", dict(data=2, expert=4)),  # expert axis < experts: two per device
    ("gather", dict(data=2, expert=2, model=2)),  # four per device; tensor-parallel width, psum over 'model'
    ("gather", dict(fsdp=2, expert=4)),  # expert weights stored split over fsdp, gathered on entry
])
def test_layer_matches_single_device(eight_devices, dispatch, sizes):
    check_layer(moe(dispatch=dispatch), mesh_of(**sizes))


@pytest.mark.parametrize("kw", [
    dict(router="expert_choice", dispatch="einsum"),
    dict(router="soft", dispatch="einsum", soft_slots_per_expert=2),
    dict(router="hash", grouping="position", group_size=2, balance_loss_scope="sequence"),
    dict(num_shared_experts=1, shared_expert_gate=True, overflow="reroute", priority="top_prob", score_fn="sigmoid",
         use_correction_bias=True, n_expert_groups=4, topk_groups=2, normalize_topk=True, group_size=8,
         balance_loss_scope="batch"),
    dict(overflow="reduced_weight", dispatch="einsum"),
], ids=["expert_choice", "soft", "hash_position", "shared_reroute_sigmoid_groups", "reduced_weight"])
def test_layer_variants_match_single_device(eight_devices, kw):
    drops = kw.get("router") not in ("expert_choice", "soft") and kw.get("overflow") != "reduced_weight"
    B = 16 if kw.get("grouping") == "position" else 8  # position groups of 2 sequences need 2 per shard
    check_layer(moe(**kw), mesh_of(data=2, expert=4), B=B, expect_drops=drops)


def test_dropless_layer_on_a_data_parallel_mesh(eight_devices):
    cfg = moe(capacity_factor=None, eval_capacity_factor=None, expert_backend="ragged_dot")
    check_layer(cfg, mesh_of(data=8), expect_drops=False)


def test_balance_stats_global_and_per_shard(eight_devices):
    """'shard': the mean of the batch-scope balance loss of each shard's tokens (8 shards of one sequence),
    computed here by running the single-device layer on each sequence alone. ('global' equals the
    single-device loss over the whole batch: the batch-scope variant of test_layer_variants.)"""
    cfg = moe(balance_loss_scope="batch")
    B, L = 8, 16
    x_BLD = jax.random.normal(jax.random.PRNGKey(1), (B, L, cfg.d_model))
    _, _, aux_shard, _ = layer_results(cfg, sh.ExpertParallel(mesh_of(data=2, expert=4), balance_stats="shard"), x_BLD)
    per_slice = [float(layer_results(cfg, None, x_BLD[i:i + 1])[2].losses["balance_loss"]) for i in range(B)]
    np.testing.assert_allclose(aux_shard.losses["balance_loss"], np.mean(per_slice), rtol=RTOL)
    _, _, aux_whole, _ = layer_results(cfg, None, x_BLD)
    assert abs(np.mean(per_slice) - float(aux_whole.losses["balance_loss"])) > 1e-3  # the statistics differ here
    # The metrics, and the loads that drive the bias update, stay global.
    np.testing.assert_allclose(aux_shard.metrics["routed_per_expert"], aux_whole.metrics["routed_per_expert"])


# ---- the train step and the state ----

def tiny_run(**model):
    """Two layers, the second MoE (8 experts, top-2, capacity factor 1 and min capacity 1: drops happen)."""
    model = base.tiny_model(**{**dict(d_model=32, num_layers=2, num_heads=4, num_kv_heads=2, d_ff=64, moe_d_ff=32,
                                      num_experts=8, max_seq_len=64, capacity_factor=1.0, min_capacity=1,
                                      moe_every=2, first_dense_layers=1, router_init_scale=3.0), **model})
    return build_run_config(base.make(
        "t", model, data=dict(corpus="synthetic", seq_len=16, batch_size=8),
        train=dict(steps=4, warmup_steps=1, learning_rate=1e-2, schedule="constant")))


def run_steps(run, mesh, batches, key, *, check_init=False):
    """Train steps on `mesh` (state initialised sharded) and on one device from the same initial numbers:
    with check_init, a separate single-device jit(init), which must equal the sharded init exactly
    (partitionable threefry); else a copy of the sharded state."""
    tx = make_optimizer(run.train)
    schedule = learning_rate_schedule(run.train)
    make_model = lambda: Transformer(run.model, rngs=nnx.Rngs(params=0))
    graphdef, state, placement = init_sharded_state(make_model, tx, mesh, sh.ExpertParallel(mesh))
    plain_graphdef = init_state(nnx.eval_shape(make_model), tx)[0]
    if check_init:
        ref_state = jax.jit(lambda: init_state(make_model(), tx)[1])()
        assert_trees_close(state, ref_state, rtol=0, atol=0)
    else:
        ref_state = jax.device_put(jax.device_get(state), jax.devices()[0])
    out = []
    for gdef, st, pl, put in ((graphdef, state, placement, placement.put_batch),
                              (plain_graphdef, ref_state, None, jnp.asarray)):
        step = make_train_step(gdef, tx, schedule, placement=pl)
        history = []
        for batch in batches:
            st, metrics = step(st, put(batch), key)
            history.append(jax.device_get(metrics))
        out.append((st, history))
    return out


@pytest.mark.parametrize("sizes,model", [
    (dict(expert=8), dict(dispatch="einsum")),
    (dict(fsdp=2, expert=2, model=2), dict(score_fn="sigmoid", use_correction_bias=True, bias_update_rate=0.1)),
], ids=["expert8_einsum", "fsdp2_expert2_model2_bias"])
def test_train_step_matches_single_device(eight_devices, sizes, model):
    """Losses, every metric, and params, AdamW state and router biases after two steps."""
    run = tiny_run(**model)
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, size=(8, 17)).astype(np.int32) for _ in range(2)]
    mesh = mesh_of(**sizes)
    check_init = "fsdp" in sizes
    (state, hist), (ref_state, ref_hist) = run_steps(run, mesh, batches, jax.random.PRNGKey(0), check_init=check_init)
    for ref, got in zip(ref_hist, hist):
        assert set(ref) == set(got)
        for name in ref:
            np.testing.assert_allclose(got[name], ref[name], rtol=RTOL, atol=ATOL, err_msg=name)
    assert_trees_close(state.params, ref_state.params)
    assert_trees_close(state.opt_state, ref_state.opt_state)
    assert_trees_close(state.rest, ref_state.rest)
    assert any(float(h["moe/1/dropped_fraction"]) > 0 for h in ref_hist)
    # The state stayed on the mesh: experts split over 'expert' in params and in AdamW's moments.
    w = state.params["blocks"][1]["ffn"]["experts"]["w_in_EDF"][...]
    mu = state.opt_state[1][0].mu["blocks"][1]["ffn"]["experts"]["w_in_EDF"][...]
    fsdp, tp = ("fsdp" if "fsdp" in sizes else None), ("model" if "model" in sizes else None)
    for a in (w, mu):
        assert a.sharding.is_equivalent_to(NamedSharding(mesh, P("expert", fsdp, tp)), 3)
        assert a.addressable_shards[0].data.shape == (
            8 // sizes["expert"], 32 // sizes.get("fsdp", 1), 32 // sizes.get("model", 1))
    emb = state.params["embed_VD"][...]  # vocab over 'model', d_model over 'fsdp'
    assert emb.addressable_shards[0].data.shape == (256 // sizes.get("model", 1), 32 // sizes.get("fsdp", 1))


def test_expert_parallel_wrappers_swap_in_and_out(eight_devices):
    """apply_expert_parallel swaps an ExpertParallelMoE in for the MoE block's FFN (once, however often it is
    applied) and the plain layer back for plan=None; the layer itself holds no plan or mesh. Shapes only."""
    run = tiny_run()
    model = nnx.eval_shape(lambda: Transformer(run.model, rngs=nnx.Rngs(params=0)))
    layer = model.blocks[1].ffn
    plan = sh.ExpertParallel(mesh_of(expert=8))
    for _ in range(2):
        assert sh.apply_expert_parallel(model, plan) is model
        wrapper = model.blocks[1].ffn
        assert isinstance(wrapper, sh.ExpertParallelMoE) and wrapper.layer is layer and wrapper.plan == plan
    assert not isinstance(model.blocks[0].ffn, sh.ExpertParallelMoE)  # the dense block
    assert sh.apply_expert_parallel(model, None).blocks[1].ffn is layer
    assert not any(isinstance(v, sh.ExpertParallel) for v in vars(layer).values())
    assert isinstance(sh.apply_expert_parallel(layer, plan), sh.ExpertParallelMoE)  # a bare layer comes back wrapped


def test_rule_table_places_every_parameter_kind():
    """Specs from parameter paths alone: experts over 'expert', heads/mlp/vocab over 'model', d_model over
    'fsdp'; the router, norms and the one-expert dense FFN's E axis stay whole. Runs on shapes only."""
    mla = dict(attention="mla", num_kv_heads=None, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=8,
               qk_nope_head_dim=8, v_head_dim=8, num_shared_experts=1)
    run = tiny_run(**mla)
    tx = make_optimizer(run.train)
    abstract = jax.eval_shape(lambda: init_state(Transformer(run.model, rngs=nnx.Rngs(params=0)), tx)[1])
    sizes = dict(data=1, fsdp=2, expert=4, model=2)
    specs = {sh.rules.path_str(p): s for p, s in
             jax.tree_util.tree_leaves_with_path(sh.tree_specs(abstract, sizes), is_leaf=lambda x: isinstance(x, P))}
    assert specs["params/blocks/1/ffn/experts/w_in_EDF"] == P("expert", "fsdp", "model")
    assert specs["params/blocks/1/ffn/experts/w_out_EFD"] == P("expert", "model", "fsdp")
    assert specs["opt_state/1/0/nu/blocks/1/ffn/experts/w_gate_EDF"] == P("expert", "fsdp", "model")
    assert specs["params/blocks/1/ffn/shared/experts/w_in_EDF"] == P(None, "fsdp", "model")  # E = 1: whole
    assert specs["params/blocks/0/ffn/experts/w_in_EDF"] == P(None, "fsdp", "model")  # dense FFN
    assert specs["params/blocks/1/ffn/router/w_DE"] == P()
    assert specs["params/blocks/1/attn/w_uk_ZHO"] == P(None, "model")
    assert specs["params/blocks/1/attn/w_dkv_DZ"] == P("fsdp")
    assert specs["params/blocks/1/attn/w_o_HUD"] == P("model", None, "fsdp")
    assert specs["params/embed_VD"] == P("model", "fsdp")
    assert specs["params/final_norm/scale"] == P()
    assert specs["step"] == P()
    with pytest.raises(ValueError, match="w_q_DHQ.*does not divide"):
        sh.partition_spec("params/blocks/0/attn/w_q_DHQ", (32, 3, 8), sizes)


# ---- checkpoints: save on one mesh, restore onto another ----

def loop_run(tmp_path, steps, **mesh):
    """A constant learning rate, so a run of 3 steps and the first 3 of a run of 6 are the same."""
    model = base.tiny_model(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=8,
                            max_seq_len=64, capacity_factor=1.0, min_capacity=1)
    config = base.make(
        "ckpt", model, data=dict(corpus="synthetic", seq_len=16, batch_size=8, data_dir=str(tmp_path / "data")),
        train=dict(steps=steps, learning_rate=1e-2, warmup_steps=1, schedule="constant", log_every=1,
                   eval_batches=0, checkpoint_every=3, sample_tokens=0, progress=False))
    for name, size in mesh.items():
        setattr(config.mesh, name, size)
    return build_run_config(config)


def test_checkpoint_saved_on_one_mesh_resumes_on_another(eight_devices, tmp_path):
    from moe_jax.train import loop as loop_lib
    from moe_jax.train.metrics import read_jsonl

    def losses(workdir):
        return {r["step"]: r["ce"] for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"}

    quiet = lambda *_: None
    loop_lib.train(loop_run(tmp_path, 6, expert=8), str(tmp_path / "a"), log=quiet)  # saves steps 3 and 6
    # A copy of that run stopped after step 3 (its step-6 checkpoint and later metrics removed) ...
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "checkpoints" / "6")
    rows = [r for r in read_jsonl(str(tmp_path / "b" / "metrics.jsonl")) if r["step"] <= 3]
    with open(tmp_path / "b" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    # ... resumes on a mesh with half the expert axis: restored onto expert=4 x data=2, it trains steps 4-6.
    loop_lib.train(loop_run(tmp_path, 6, data=2, expert=4), str(tmp_path / "b"), log=quiet)
    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose([b[s] for s in range(4, 7)], [a[s] for s in range(4, 7)], rtol=RTOL)
    assert len({round(a[s], 4) for s in a}) == 6  # it trains: six different losses

    # The step-6 checkpoint (written from 8 devices) restores onto 1 device and onto a 4-device mesh alike.
    from moe_jax.train.checkpoint import Checkpoints

    run = loop_run(tmp_path, 6)
    tx = make_optimizer(run.train)
    abstract = jax.eval_shape(lambda: init_state(Transformer(run.model, rngs=nnx.Rngs(params=0)), tx)[1])
    one = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=SingleDeviceSharding(jax.devices()[0])),
                       abstract)
    four = sh.make_mesh(sh.ShardingConfig(expert=4), devices=jax.devices()[:4])
    ckpt = Checkpoints(str(tmp_path / "b"), keep=3)
    on_one = ckpt.restore(6, one)
    on_four = ckpt.restore(6, jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                           abstract, sh.tree_shardings(abstract, four)))
    ckpt.close()
    assert_trees_close(on_four, on_one, rtol=0, atol=0)
    w = on_four.params["blocks"][0]["ffn"]["experts"]["w_in_EDF"][...]
    assert w.addressable_shards[0].data.shape == (2, 32, 32) and int(on_one.step) == 6


# ---- errors before compile ----

def test_bad_meshes_fail_before_compile_naming_the_field(eight_devices):
    run = tiny_run()
    with pytest.raises(ValueError, match=r"expert = 3 does not divide the routed experts"):
        sh.check_layout(run.model, 6, 16, sh.ShardingConfig(expert=3), 3)
    with pytest.raises(ValueError, match=r"data x fsdp x expert = 2 x 1 x 4 = 8 does not divide the batch batch_size=6"):
        sh.check_layout(run.model, 6, 16, sh.ShardingConfig(expert=4, data=2), 8)
    with pytest.raises(ValueError, match=r"model = 8 does not divide the attention heads num_heads=4"):
        sh.check_layout(run.model, 8, 16, sh.ShardingConfig(model=8), 8)
    with pytest.raises(ValueError, match=r"model = 4 does not divide the key/value heads num_kv_heads=2"):
        sh.check_layout(run.model, 8, 16, sh.ShardingConfig(model=4, data=2), 8)
    with pytest.raises(ValueError, match="multiply to the device count"):
        sh.check_layout(run.model, 8, 16, sh.ShardingConfig(expert=4), 8)
    with pytest.raises(ValueError, match="group_size=32: routing groups .* must not straddle devices"):
        sh.check_moe_layout(moe(group_size=32), 8, 16, {"data": 1, "fsdp": 1, "expert": 8, "model": 1})
    with pytest.raises(ValueError, match="grouping='position'"):
        sh.check_moe_layout(moe(grouping="position"), 8, 10, {"expert": 2})
    # The same checks guard the layer itself, before anything is traced: a batch of 6 over 8 devices.
    layer = sh.apply_expert_parallel(MoELayer(moe(), rngs=nnx.Rngs(params=0)), sh.ExpertParallel(mesh_of(expert=8)))
    with pytest.raises(ValueError, match="batch_size=6"):
        layer(jnp.zeros((6, 4, 16)), train=True)
    with pytest.raises(ValueError, match="token mask"):  # padding masks: single-device paths only
        layer(jnp.zeros((8, 4, 16)), train=True, token_mask_BL=jnp.ones((8, 4), bool))


def test_train_loop_refuses_a_mesh_that_does_not_divide_the_batch(eight_devices, tmp_path):
    from moe_jax.train import loop as loop_lib

    config = base.make("bad", base.tiny_model(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_d_ff=32),
                       data=dict(corpus="synthetic", seq_len=16, batch_size=6, data_dir=str(tmp_path / "data")),
                       train=dict(steps=2, warmup_steps=1, progress=False, sample_tokens=0))
    config.mesh.data, config.mesh.expert = 2, 4
    with pytest.raises(ValueError, match=r"2 x 1 x 4 = 8 does not divide the batch batch_size=6"):
        loop_lib.train(build_run_config(config), str(tmp_path / "w"), log=lambda *_: None)
    assert not os.path.exists(tmp_path / "w" / "checkpoints")  # nothing was built


def test_sharding_config_fields_are_validated():
    with pytest.raises(ValueError, match=r"config.mesh.data=0"):
        sh.ShardingConfig(data=0)
    with pytest.raises(ValueError, match="only one mesh axis may be -1"):
        sh.ShardingConfig(data=-1, expert=-1)
    with pytest.raises(ValueError, match="balance_stats"):
        sh.ShardingConfig(balance_stats="local")
    with pytest.raises(ValueError, match="coordinator_address"):
        sh.ShardingConfig(num_processes=2, coordinator_address="localhost")
    assert sh.ShardingConfig(data=-1, expert=4).resolve(8) == {"data": 2, "fsdp": 1, "expert": 4, "model": 1}
    assert not sh.ShardingConfig().is_sharded and sh.ShardingConfig(expert=2).is_sharded
    config = base.make("m", base.tiny_model(), data=dict(corpus="synthetic"))
    config.mesh.expert = 4
    assert build_run_config(config).mesh == sh.ShardingConfig(expert=4)
    del config.mesh  # a config without the section: one device
    assert build_run_config(config).mesh == sh.ShardingConfig()
    config = base.make("m", base.tiny_model(), data=dict(corpus="synthetic"))
    config.mesh.experts = 4
    with pytest.raises(ValueError, match=r"config.mesh.experts is not a known field. Did you mean expert"):
        build_run_config(config)


# ---- the collectives of the compiled layer (benchmarks/collectives.py reads them the same way) ----

def test_hlo_parser_on_cpu_tuple_and_iota_forms():
    from benchmarks.collectives import moved_bytes, parse_collectives

    hlo = """
  %all-to-all.3 = (f32[1,4,16]{2,1,0}, f32[1,4,16]{2,1,0}) all-to-all(%a, %b), channel_id=2, replica_groups={{0,1},{2,3}}
  ROOT %all-reduce.1 = f32[8,2]{1,0} all-reduce(f32[8,2]{1,0} %p), channel_id=3, replica_groups=[2,4]<=[8], to_apply=%add
  %ag = bf16[4,6]{1,0} all-gather(bf16[1,6]{1,0} %q), dimensions={0}
  %add.1 = f32[8,2]{1,0} add(%x, %y)
"""
    a2a, ar, ag = parse_collectives(hlo, num_devices=8)
    assert (a2a["op"], a2a["bytes"], a2a["group"]) == ("all-to-all", 2 * 1 * 4 * 16 * 4, 2)  # 512 B over pairs
    assert moved_bytes(a2a) == 256  # half of it leaves the device
    assert (ar["op"], ar["bytes"], ar["group"]) == ("all-reduce", 8 * 2 * 4, 4)  # iota groups: 2 groups of 4
    assert moved_bytes(ar) == 2 * 64 * 3 / 4  # ring all-reduce
    assert (ag["op"], ag["bytes"], ag["group"]) == ("all-gather", 4 * 6 * 2, 8)  # no groups: every device


def test_compiled_layer_moves_only_capacity_buffers(eight_devices):
    """Forward + backward of the expert-parallel layer on expert=8: exactly four all-to-alls (dispatch and
    return, and their transposes), each of one [E, X, D] buffer; no expert weight is ever gathered."""
    from benchmarks.collectives import parse_collectives

    cfg = moe(dispatch="gather")
    fn, params = layer_fn(cfg, sh.ExpertParallel(mesh_of(expert=8)))
    x_BLD = jnp.zeros((8, 16, cfg.d_model))
    found = parse_collectives(fn.lower(params, x_BLD, None).compile().as_text(), 8)
    a2a = [c for c in found if c["op"] == "all-to-all"]
    # One sequence of 16 tokens per device, one group: C = ceil(1.0 * 16 * 2 / 8) = 4 slots per expert,
    # so a buffer is E x C x D = 8 x 4 x 16 floats = 2048 bytes, in 8 pieces of [1, 4, 16].
    assert cfg.capacity(16, True) == 4
    assert [c["bytes"] for c in a2a] == [2048] * 4 and {c["group"] for c in a2a} == {8}
    assert not [c for c in found if c["op"] == "all-gather"]
