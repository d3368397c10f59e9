"""Sparse upcycling (moe_jax/upcycle.py): exact reproduction of the dense model under the stated conditions,
differences when a condition is broken, granular slices, validation, and the workdir path (train/upcycle.py)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import upcycle as up
from moe_jax.experts import FeedForward
from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer
from moe_jax.transformer import Transformer

D, F, V = 16, 32, 64
DENSE = ModelConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=2, d_ff=F, max_seq_len=16)
TOKENS = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, V)


def moe_cfg(**kw):
    """An MoE target; defaults satisfy every condition (normalised top-2 of 4 copies, eval capacity = S)."""
    fields = dict(d_model=D, d_ff=F, num_experts=4, num_experts_per_token=2, normalize_topk=True,
                  eval_capacity_factor=2.0)  # C = ceil(2.0 * S * 2 / 4) = S: nothing can drop
    fields.update(kw)
    model = {k: fields.pop(k) for k in ("moe_every", "first_dense_layers") if k in fields}
    return ModelConfig(**{**DENSE.__dict__, "moe": MoEConfig(**fields), **model})


@pytest.fixture(scope="module")
def dense():
    model = Transformer(DENSE, rngs=nnx.Rngs(params=0))
    _, params, _ = nnx.split(model, nnx.Param, ...)
    logits, _ = model(TOKENS)
    return model, up.to_pure(params), np.asarray(logits)


def upcycled(dense, target_cfg, seed=3, **ucfg):
    _, dense_params, _ = dense
    model = Transformer(target_cfg, rngs=nnx.Rngs(params=seed))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    new = up.upcycle_params(dense_params, up.to_pure(params), DENSE, target_cfg,
                            up.UpcycleConfig(from_workdir="/dense", **ucfg))
    nnx.replace_by_pure_dict(params, new)
    return nnx.merge(graphdef, params, rest), new


@pytest.mark.parametrize("kw", [
    dict(),  # softmax then top-2, renormalised
    dict(topk_order="topk_softmax", normalize_topk=False),  # softmax over the 2 chosen logits
    dict(num_experts_per_token=1, eval_capacity_factor=4.0),  # top-1 renormalised: weight 1; C = 4 S / 4
    dict(capacity_factor=None, eval_capacity_factor=None, expert_backend="blocked", dropless_block_size=8),
    dict(router="hash", normalize_topk=False),  # 1/k each
    dict(moe_every=2, first_dense_layers=1),  # layer 0 dense (copied), layer 1 MoE
])
def test_copies_reproduce_dense_logits(dense, kw):
    target = moe_cfg(**kw)
    assert up.combine_weights_sum_to_one(target.moe)
    model, _ = upcycled(dense, target)
    logits, aux = model(TOKENS)
    np.testing.assert_allclose(np.asarray(logits), dense[2], atol=2e-5, rtol=1e-5)
    assert all(float(a["metrics"]["dropped_fraction"]) == 0 for a in aux.layers)


@pytest.mark.parametrize("kw,ucfg", [
    (dict(), dict(noise_std=0.05)),  # noisy copies
    (dict(num_experts_per_token=1, normalize_topk=False), dict()),  # Switch top-1: y = p FFN(x), p < 1
    (dict(routed_scaling_factor=2.0), dict()),  # weights sum to 2
    (dict(eval_capacity_factor=0.5, min_capacity=1), dict()),  # C = 2 of S = 8 tokens: drops
])
def test_breaking_a_condition_changes_the_logits(dense, kw, ucfg):
    model, _ = upcycled(dense, moe_cfg(**kw), **ucfg)
    logits, _ = model(TOKENS)
    assert np.max(np.abs(np.asarray(logits) - dense[2])) > 1e-3


def test_noise_is_relative_and_routers_are_fresh(dense):
    target = moe_cfg()
    _, exact = upcycled(dense, target)
    _, noisy = upcycled(dense, target, noise_std=0.1)
    w = np.asarray(dense[1]["blocks"][0]["ffn"]["experts"]["w_in_EDF"][0])
    diff = np.asarray(noisy["blocks"][0]["ffn"]["experts"]["w_in_EDF"]) - np.asarray(
        exact["blocks"][0]["ffn"]["experts"]["w_in_EDF"])
    assert diff.std() == pytest.approx(0.1 * w.std(), rel=0.05)  # 4 x 16 x 32 = 2048 draws
    assert not np.allclose(diff[0], diff[1])  # independent per expert
    fresh = Transformer(target, rngs=nnx.Rngs(params=3))
    np.testing.assert_array_equal(exact["blocks"][1]["ffn"]["router"]["w_DE"], fresh.blocks[1].ffn.router.w_DE[...])
    for e in range(4):
        np.testing.assert_array_equal(exact["blocks"][1]["ffn"]["experts"]["w_out_EFD"][e],
                                      dense[1]["blocks"][1]["ffn"]["experts"]["w_out_EFD"][0])


@pytest.mark.parametrize("G", [2, 4])
def test_granular_slices_are_the_ffn_split_and_sum_to_it(G):
    ffn = FeedForward(D, F, rngs=nnx.Rngs(params=0))
    dense_w = {k: getattr(ffn.experts, k)[...] for k in up.EXPERT_WEIGHTS}
    w = up.expert_weights(dense_w, 2 * G, G)  # 2 copies x G slices
    # bit-exact: slice s holds hidden units [s F/G, (s+1) F/G) of w_in/w_gate columns and w_out rows
    np.testing.assert_array_equal(np.concatenate(list(w["w_in_EDF"][:G]), axis=1), dense_w["w_in_EDF"][0])
    np.testing.assert_array_equal(np.concatenate(list(w["w_gate_EDF"][:G]), axis=1), dense_w["w_gate_EDF"][0])
    np.testing.assert_array_equal(np.concatenate(list(w["w_out_EFD"][:G]), axis=0), dense_w["w_out_EFD"][0])
    np.testing.assert_array_equal(w["w_in_EDF"][G:], w["w_in_EDF"][:G])  # copy 1 = copy 0
    x = jax.random.normal(jax.random.PRNGKey(2), (8, D))
    silu = jax.nn.silu
    parts = [(silu(x @ w["w_gate_EDF"][s]) * (x @ w["w_in_EDF"][s])) @ w["w_out_EFD"][s] for s in range(G)]
    np.testing.assert_allclose(sum(parts), ffn(x), atol=1e-5, rtol=1e-5)


def test_granular_layer_reproduces_the_ffn_when_all_slices_are_chosen_with_weight_one():
    """num_experts=1, granularity G, k=1: the router picks k G = G of the G experts. A uniform router with
    normalize_topk gives 1/G each; routed_scaling_factor=G makes each weight 1."""
    G = 4
    ffn = FeedForward(D, F, rngs=nnx.Rngs(params=0))
    dense_w = {k: getattr(ffn.experts, k)[...] for k in up.EXPERT_WEIGHTS}
    cfg = MoEConfig(d_model=D, d_ff=F, num_experts=1, num_experts_per_token=1, granularity=G, normalize_topk=True,
                    routed_scaling_factor=float(G), eval_capacity_factor=1.0)
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=1))
    for name, value in up.expert_weights(dense_w, G, G).items():
        getattr(layer.experts, name)[...] = value
    layer.router.w_DE[...] = jnp.zeros_like(layer.router.w_DE[...])
    x = jax.random.normal(jax.random.PRNGKey(2), (2, 8, D))
    y, _ = layer(x)
    np.testing.assert_allclose(y, ffn(x.reshape(16, D)).reshape(2, 8, D), atol=1e-5, rtol=1e-5)
    layer.router.w_DE[...] = jax.random.normal(jax.random.PRNGKey(3), (D, G))  # weights p_s G != 1: differs
    y2, _ = layer(x)
    assert np.max(np.abs(np.asarray(y2) - np.asarray(y))) > 1e-3


def test_granular_model_reproduces_dense_with_uniform_router(dense):
    G = 4
    target = moe_cfg(num_experts=1, num_experts_per_token=1, granularity=G, routed_scaling_factor=float(G),
                     eval_capacity_factor=1.0)
    model, _ = upcycled(dense, target, granular=True)
    for _, layer in model.moe_layers():
        layer.router.w_DE[...] = jnp.zeros_like(layer.router.w_DE[...])
    logits, _ = model(TOKENS)
    np.testing.assert_allclose(np.asarray(logits), dense[2], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("target,ucfg,match", [
    (lambda: moe_cfg(), dict(granular=True), "granular=True, but the experts"),
    (lambda: moe_cfg(granularity=2), dict(), "narrower than the dense FFN.*granular=True"),
    (lambda: moe_cfg(d_ff=24), dict(), "moe_d_ff.*does not divide the dense d_ff=32"),
    (lambda: moe_cfg(num_shared_experts=1), dict(), "num_shared_experts=1"),
    (lambda: moe_cfg(activation="gelu"), dict(), "activation='gelu'"),
    (lambda: ModelConfig(**{**DENSE.__dict__, "num_heads": 4}), dict(), r"config.model.num_heads=4 differs"),
    (lambda: ModelConfig(**{**DENSE.__dict__, "moe": MoEConfig(d_model=D, d_ff=F), "moe_output_norm": True}),
     dict(), "moe_output_norm"),
])
def test_incompatible_targets_fail_with_the_field_and_fix(target, ucfg, match):
    with pytest.raises(ValueError, match=match):
        up.check_upcycle(DENSE, target(), up.UpcycleConfig(from_workdir="/d", **ucfg))


def test_source_must_be_dense_and_routed_experts_whole_copies():
    with pytest.raises(ValueError, match="holds an MoE model"):
        up.check_upcycle(moe_cfg(), moe_cfg(), up.UpcycleConfig(from_workdir="/d"))
    wide = ModelConfig(**{**DENSE.__dict__, "d_ff": 4 * F})  # S = 4 slices of width 32 per FFN
    target = ModelConfig(**{**wide.__dict__, "moe": MoEConfig(d_model=D, d_ff=F, num_experts=6,
                                                             num_experts_per_token=1)})
    with pytest.raises(ValueError, match="not whole copies of 4 slices"):
        up.check_upcycle(wide, target, up.UpcycleConfig(from_workdir="/d", granular=True))


@pytest.mark.parametrize("fields,match", [
    (dict(from_workdir=""), "from_workdir"), (dict(from_hf="/hf"), "from_workdir"),
    (dict(from_workdir="", from_hf="/hf", step=3), "step"), (dict(noise_std=-0.1), "noise_std"),
    (dict(noise_std=float("nan")), "noise_std"), (dict(step=-1), "step"), (dict(granular=1), "granular"),
])
def test_upcycle_config_validation(fields, match):
    with pytest.raises(ValueError, match=f"UpcycleConfig.{match}"):
        up.UpcycleConfig(**{"from_workdir": "/d", **fields})


def test_workdir_upcycles_resumes_and_reproduces_the_dense_run(tmp_path):
    """Dense run (2 steps) -> upcycle command's workdir -> load_run logits equal the dense run's -> the
    training command resumes it from step 0; a mismatching config fails naming the field."""
    from configs import base
    from moe_jax.train import loop
    from moe_jax.train.restore import load_run
    from moe_jax.train.run_config import build_run_config
    from moe_jax.train.upcycle import write_upcycled_workdir

    def config(**model):
        m = base.tiny_model(d_model=D, num_layers=2, num_heads=2, d_ff=F, moe_d_ff=F, num_experts=4,
                            num_experts_per_token=2, normalize_topk=True, eval_capacity_factor=2.0, max_seq_len=16)
        m.update(model)
        return base.make("t", m, data=dict(corpus="synthetic", seq_len=16, batch_size=2,
                                           data_dir=str(tmp_path / "data")),
                         train=dict(steps=2, warmup_steps=1, log_every=1, eval_batches=0, checkpoint_every=2, sample_tokens=0,
                                    progress=False))

    quiet = lambda *_: None
    loop.train(build_run_config(config(use_moe=False)), str(tmp_path / "dense"), log=quiet)
    cfg = config().to_dict()
    cfg["upcycle"] = {"from_workdir": str(tmp_path / "dense")}
    run = build_run_config(cfg)
    lines = []
    write_upcycled_workdir(run, str(tmp_path / "moe"), log=lines.append)
    assert "starts as the dense model" in lines[0] and "optimizer state fresh" in lines[0]
    assert json.load(open(tmp_path / "moe" / "upcycle.json"))["from_workdir"].endswith("dense")
    tokens = jax.random.randint(jax.random.PRNGKey(0), (2, 16), 0, 256)
    dense_logits, _ = load_run(str(tmp_path / "dense")).model(tokens)
    loaded = load_run(str(tmp_path / "moe"))
    assert loaded.step == 0
    moe_logits, _ = loaded.model(tokens)
    np.testing.assert_allclose(np.asarray(moe_logits), np.asarray(dense_logits), atol=2e-5, rtol=1e-5)
    summary = loop.train(build_run_config(config()), str(tmp_path / "moe"), log=quiet)  # no upcycle section
    assert summary["steps"] == 2
    with pytest.raises(ValueError, match="already holds checkpoints"):
        write_upcycled_workdir(run, str(tmp_path / "moe"), log=quiet)
    bad = config(d_model=32, moe_d_ff=F).to_dict()
    bad["upcycle"] = {"from_workdir": str(tmp_path / "dense")}
    with pytest.raises(ValueError, match="config.model.d_model=32 differs"):
        loop.train(build_run_config(bad), str(tmp_path / "bad"), log=quiet)
    assert not os.path.exists(tmp_path / "bad" / "checkpoints")
    missing = dict(cfg, upcycle={"from_workdir": str(tmp_path / "nowhere")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        write_upcycled_workdir(build_run_config(missing), str(tmp_path / "moe2"), log=quiet)


def test_command_reports_a_missing_source_on_one_line(tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "experiments.upcycle", "--config=configs/default.py",
                           f"--from_workdir={tmp_path / 'nowhere'}", f"--workdir={tmp_path / 'up'}"],
                          cwd=root, env=dict(os.environ, XLA_FLAGS=""), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: config.upcycle.from_workdir=") and "nowhere" in last, last


HF_FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "hf_models")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_upcycling_an_imported_hugging_face_model_reproduces_its_logits(family):
    """config.upcycle.from_hf: a dense Llama / Qwen2 directory (tests/fixtures/hf_models) -> 4 dropless copies,
    top-2 renormalised, no noise: the upcycled MoE gives the imported dense model's logits (and so
    transformers'); noise on the copies moves them."""
    import dataclasses

    from moe_jax.data import DataConfig
    from moe_jax.hf import load_hf
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.run_config import RunConfig, run_record
    from moe_jax.train.state import init_state, make_optimizer
    from moe_jax.train.upcycle import upcycled_state

    source = os.path.join(HF_FIXTURES, family)
    dense_model, _ = load_hf(source, log=lambda *_: None)
    c = dense_model.cfg
    target = dataclasses.replace(c, moe=MoEConfig(d_model=c.d_model, d_ff=c.d_ff, num_experts=4,
                                                  num_experts_per_token=2, normalize_topk=True, capacity_factor=None,
                                                  eval_capacity_factor=None, expert_backend="ragged_dot"))
    with np.load(os.path.join(source, "reference.npz")) as f:
        tokens, hf_logits = jnp.asarray(f["input_ids"]), f["logits"]
    dense_logits = np.asarray(dense_model(tokens, train=False)[0])
    np.testing.assert_allclose(dense_logits, hf_logits, atol=1e-4, rtol=0)

    def upcycled_logits(**ucfg):
        run = RunConfig(model=target, data=DataConfig(seq_len=16), train=TrainConfig(),
                        upcycle=up.UpcycleConfig(from_hf=source, **ucfg))
        graphdef, state = init_state(Transformer(target, rngs=nnx.Rngs(params=3)), make_optimizer(run.train))
        lines = []
        state = upcycled_state(run, state, log=lines.append)
        assert run_record(run)["upcycle"]["from_hf"].endswith(family) and "Hugging Face" in lines[0]
        return np.asarray(nnx.merge(graphdef, state.params, state.rest)(tokens, train=False)[0]), lines[0]

    logits, line = upcycled_logits()
    assert "starts as the dense model" in line
    np.testing.assert_allclose(logits, dense_logits, atol=1e-5, rtol=1e-5)
    noisy, _ = upcycled_logits(noise_std=0.1)
    assert np.abs(noisy - dense_logits).max() > 1e-3


def test_hugging_face_source_is_checked_against_the_target():
    from moe_jax.data import DataConfig
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.run_config import RunConfig
    from moe_jax.train.upcycle import check_source

    def run(source, model):
        return RunConfig(model=model, data=DataConfig(seq_len=8), train=TrainConfig(),
                         upcycle=up.UpcycleConfig(from_hf=os.path.join(HF_FIXTURES, source)))

    with pytest.raises(ValueError, match=r"config.model.vocab_size=64 differs from the dense Hugging Face model"):
        check_source(run("llama", moe_cfg()))
    with pytest.raises(ValueError, match=r"from_hf=.*mixtral.* holds an MoE model"):
        check_source(run("mixtral", moe_cfg()))
    with pytest.raises(FileNotFoundError, match="from_hf="):
        check_source(run("nowhere", moe_cfg()))
