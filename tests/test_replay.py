"""Training on a routing ledger (config.train.replay_ledger): a step with the model's own ledger equals the normal
step where nothing drops, another routing changes it, the loop trains on the ledger's batches, and a ledger that
does not fit the run fails before anything compiles, naming the field and the fix."""
import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from moe_jax import ledger as ledger_lib
from moe_jax.train import loop as loop_lib
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.replay import replay_batch
from moe_jax.train.run_config import build_run_config
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

B, L, E = 4, 8, 4


def config(tmp_path, model=None, data=None, train=None):
    # both layers MoE, 4 experts top-2, capacity factor 2 = E / k: C = S, so nothing drops in training either
    model = base.tiny_model(**{**dict(d_model=16, num_layers=2, num_heads=2, d_ff=32, moe_d_ff=16, num_experts=E,
                                      max_seq_len=16, capacity_factor=2.0, eval_capacity_factor=2.0,
                                      min_capacity=1), **(model or {})})
    data = {**dict(corpus="synthetic", seq_len=L, batch_size=B, data_dir=str(tmp_path / "d")), **(data or {})}
    train = {**dict(steps=2, warmup_steps=0, learning_rate=1e-2, schedule="constant", log_every=1, eval_batches=0,
                    checkpoint_every=100, sample_tokens=0, progress=False), **(train or {})}
    return base.make("replay", model, data=data, train=train)


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    """The initial model's ledger on 2 batches (8 sequences), saved; the run, its model and its batches."""
    tmp = tmp_path_factory.mktemp("replay")
    run = build_run_config(config(tmp))
    model = Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed))  # the loop's initial parameters
    rng = np.random.default_rng(0)
    batches = [rng.integers(0, 256, (B, L + 1)).astype(np.int32) for _ in range(2)]
    ledger = ledger_lib.record(model, batches)
    path = str(tmp / "ledger.npz")
    ledger.save(path)
    return dict(tmp=tmp, run=run, model=model, batches=batches, ledger=ledger, path=path)


def test_replay_batch_cycles_through_the_ledger(recorded):
    ledger, batches = recorded["ledger"], recorded["batches"]
    for step, want in ((0, 0), (1, 1), (2, 0), (5, 1)):  # 8 sequences / B = 4: two batches, in turn
        batch, experts = replay_batch(ledger, step, B)
        np.testing.assert_array_equal(batch, batches[want])
        assert len(experts) == 2 and experts[0].shape == (B, L, 2) and experts[0].dtype == np.int32
        np.testing.assert_array_equal(experts[1].reshape(-1, 2), ledger.expert[1, want * B * L:(want + 1) * B * L])


@pytest.fixture(scope="module")
def normal_step(recorded):
    """The normal train step (the data's batch, the routers' choices) of the initial model on the ledger's
    first batch, as the loop runs its first step: (graphdef, tx, schedule, initial state, new state, metrics)."""
    run, model = recorded["run"], recorded["model"]
    tx, schedule = make_optimizer(run.train), learning_rate_schedule(run.train)
    graphdef, state = init_state(model, tx)
    fresh = jax.tree.map(jnp.copy, state)  # the step donates its state
    new_state, metrics = make_train_step(graphdef, tx, schedule)(
        fresh, jnp.asarray(recorded["batches"][0]), jax.random.PRNGKey(run.train.seed))
    return graphdef, tx, schedule, state, new_state, jax.device_get(metrics)


def test_step_with_own_ledger_equals_normal_step(recorded, normal_step):
    graphdef, tx, schedule, state, normal_state, normal = normal_step
    batch, experts = replay_batch(recorded["ledger"], 0, B)
    batch, experts, key = jnp.asarray(batch), tuple(map(jnp.asarray, experts)), jax.random.PRNGKey(0)
    fresh = lambda: jax.tree.map(jnp.copy, state)  # the steps donate their state
    replayed = make_train_step(graphdef, tx, schedule, replay=True)
    got_state, got = replayed(fresh(), batch, key, experts)
    assert float(normal["moe/0/dropped_fraction"]) == 0 and float(normal["moe/1/dropped_fraction"]) == 0
    assert set(got) == set(normal)
    for name in normal:  # loss, ce, aux loss, gradient norm, every routing metric
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(normal[name]), rtol=1e-5, atol=1e-7,
                                   err_msg=name)
    assert float(normal["learning_rate"]) > 0
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(normal_state.params)):  # grads -> AdamW
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # another routing (every choice moved to the next expert) is really the one trained with
    shifted_state, shifted = replayed(fresh(), batch, key, tuple((e + 1) % E for e in experts))
    assert abs(float(shifted["ce"]) - float(normal["ce"])) > 1e-4
    router = lambda s: np.asarray(s.params["blocks"][0]["ffn"]["router"]["w_DE"][...])
    assert not np.allclose(router(shifted_state), router(normal_state))


def test_loop_trains_on_the_ledger(recorded, normal_step, tmp_path):
    run = build_run_config(config(tmp_path, train=dict(replay_ledger=recorded["path"])), on_this_machine=True)
    logs = []
    summary = loop_lib.train(run, str(tmp_path / "w"), log=logs.append)
    assert summary["steps"] == 2 and any("routing ledger" in line for line in logs)
    rows = [r for r in read_jsonl(os.path.join(tmp_path, "w", "metrics.jsonl")) if r["split"] == "train"]
    # step 1 trained the initial model on the ledger's first batch with its routing: the normal step's loss there
    assert rows[0]["step"] == 1
    np.testing.assert_allclose(rows[0]["ce"], float(normal_step[-1]["ce"]), rtol=1e-5)


def test_bad_ledgers_fail_naming_the_field(recorded, tmp_path):
    path = recorded["path"]

    def build(**kw):
        sections = {k: kw.pop(k, None) for k in ("model", "data", "train")}
        train = {"replay_ledger": path, **(sections["train"] or {})}
        return build_run_config(config(tmp_path, sections["model"], sections["data"], train), on_this_machine=True)

    build()  # the ledger fits
    with pytest.raises(ValueError, match=r"config.train.replay_ledger='.*missing.npz' does not exist.*record"):
        build(train=dict(replay_ledger=str(tmp_path / "missing.npz")))
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="config.train.replay_ledger=.*not a routing ledger"):
        build(train=dict(replay_ledger=str(tmp_path / "other.npz")))
    with pytest.raises(ValueError, match=r"another model: its MoE layers are \[0, 1\], the model's \[0, 1, 2\]"):
        build(model=dict(num_layers=3))
    with pytest.raises(ValueError, match="records k=2 choices per token, the model makes 1"):
        build(model=dict(num_experts_per_token=1))
    with pytest.raises(ValueError, match="it routes to 4 experts, the model to 8"):
        build(model=dict(num_experts=8))
    with pytest.raises(ValueError, match="of 8 tokens, but config.data.seq_len=12: set config.data.seq_len=8"):
        build(data=dict(seq_len=12))
    with pytest.raises(ValueError, match="holds 8 sequences, which config.data.batch_size=3 does not divide"):
        build(data=dict(batch_size=3))
    with pytest.raises(ValueError, match="microbatches=2.*set microbatches=1"):
        build(train=dict(microbatches=2))
    with pytest.raises(ValueError, match="cannot replay.*router='top_k' or 'hash'"):
        build(model=dict(router="expert_choice"))
    old = str(tmp_path / "old.npz")
    dataclasses.replace(recorded["ledger"], next_token=None).save(old)
    with pytest.raises(ValueError, match="no next_token.*record it again"):
        build(train=dict(replay_ledger=old))
    wide = str(tmp_path / "wide.npz")
    dataclasses.replace(recorded["ledger"], tokens=recorded["ledger"].tokens + 256).save(wide)  # ids 256..511
    with pytest.raises(ValueError, match="token ids >= config.model.vocab_size=256"):
        build(train=dict(replay_ledger=wide))
    with pytest.raises(ValueError, match="config.train.replay_ledger='' must be the path"):
        build(train=dict(replay_ledger=""))


def test_replayed_step_on_an_expert_parallel_mesh_equals_the_normal_step(recorded, normal_step, eight_devices):
    """The replayed step on 8 devices (expert 4 x model 2): the recorded experts go in sharded like the batch and
    through the expert-parallel layers (all-to-all), and with the model's own ledger the step gives the
    single-device normal step's losses, metrics and updated parameters."""
    from jax.sharding import NamedSharding

    from moe_jax import sharding as sh
    from moe_jax.sharding.placement import Placement

    graphdef, tx, schedule, state, normal_state, normal = normal_step
    mesh = sh.make_mesh(sh.ShardingConfig(expert=4, model=2))
    shardings = sh.tree_shardings(state, mesh)
    batch_sharding = NamedSharding(mesh, sh.batch_spec(2))
    placement = Placement(mesh=mesh, state=shardings, batch=batch_sharding, plan=sh.ExpertParallel(mesh))
    step = make_train_step(graphdef, tx, schedule, placement=placement, replay=True)
    batch, experts = replay_batch(recorded["ledger"], 0, B)
    batch = jax.device_put(jnp.asarray(batch), batch_sharding)
    experts = tuple(jax.device_put(jnp.asarray(e), NamedSharding(mesh, sh.batch_spec(3))) for e in experts)
    key = jax.random.PRNGKey(0)
    sharded = jax.device_put(jax.tree.map(jnp.copy, state), shardings)  # the step donates its state
    assert "all-to-all" in step.lower(sharded, batch, key, experts).as_text().replace("_", "-")
    got_state, got = step(sharded, batch, key, experts)
    got = jax.device_get(got)
    for name in ("loss", "ce", "moe/0/dropped_fraction", "moe/1/tokens_per_expert"):
        np.testing.assert_allclose(np.asarray(got[name]), np.asarray(normal[name]), rtol=1e-5, atol=1e-6,
                                   err_msg=name)
    for a, b in zip(jax.tree.leaves(got_state.params), jax.tree.leaves(normal_state.params)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
