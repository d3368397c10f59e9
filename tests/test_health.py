"""Routing health: the config section (validated, defaults from the dataclass), each alarm tripping on a
constructed case and quiet on a healthy one (a router forced to send every token to one expert), and the loop:
ledgers at each evaluation, saturation, alarm rows, and stop_on_alarm checkpointing the step."""
import dataclasses
import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from moe_jax.ledger import Ledger, list_ledgers
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer
from moe_jax.train import health as health_lib
from moe_jax.train import loop as loop_lib
from moe_jax.train.health import HealthConfig
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.run_config import build_run_config


def test_health_defaults_and_validation():
    config = base.make("t", base.tiny_model())
    assert config.health.to_dict() == dataclasses.asdict(HealthConfig())
    assert build_run_config(config).health == HealthConfig()
    for field, value in (("max_dead_fraction", 1.5), ("ledger_batches", -1), ("max_load_cv", -1.0),
                         ("train_window", -1), ("train_start_step", -5), ("max_train_dropped_fraction", 1.2),
                         ("max_train_load_cv", -0.5)):
        with pytest.raises(ValueError, match=f"config.health.{field}="):
            build_run_config(base.make("t", base.tiny_model(), health={field: value}))
    with pytest.raises(ValueError, match="ledger_batches"):
        HealthConfig(min_saturation=0.5, ledger_batches=0)
    with pytest.raises(ValueError, match="config.health.max_load_vc is not a known field.*max_load_cv"):
        config = base.make("t", base.tiny_model())
        config.health.unlock()
        config.health.max_load_vc = 1.0
        build_run_config(config)
    with pytest.raises(ValueError, match="config.health.stop_on_alarm=1 must be a bool"):
        build_run_config(base.make("t", base.tiny_model(), health={"stop_on_alarm": 1}))


def layer_metrics(collapsed: bool, E=8):
    """The eval metrics of a real top-1 layer on 64 tokens: healthy = its random router on normal tokens;
    collapsed = positive tokens and router weights that send every one to expert 0 (logit 10 * sum(x) > 0,
    every other logit 0)."""
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=E, num_experts_per_token=1, capacity_factor=None,
                    eval_capacity_factor=None, expert_backend="blocked")
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))
    if collapsed:
        layer.router.w_DE[...] = jnp.zeros((4, E)).at[:, 0].set(10.0)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 16, 4)), jnp.float32)
    if collapsed:
        x = jnp.abs(x) + 0.1
    _, aux = layer(x)
    return {f"moe/3/{k}": np.asarray(v) for k, v in aux.metrics.items()}


def check(metrics, cfg=HealthConfig(), E=8, **kw):
    return health_lib.check(cfg, layers=[3], num_experts=E, score_fn=kw.pop("score_fn", "softmax"),
                            eval_metrics=metrics, **kw)


def test_forced_collapse_trips_and_healthy_router_is_quiet():
    assert check(layer_metrics(False)) == []
    alarms = check(layer_metrics(True))
    # expert 0 takes all 64 choices: 7 of 8 dead (> 0.25 * 8 = 2), load CV sqrt(7) = 2.65 > 2,
    # router entropy ~0 (softmax of logits 10 * sum(x) >= 4 apart) < 0.05 ln 8
    assert {a.metric for a in alarms} == {"dead_experts", "load_cv", "router_entropy_fraction"}
    by = {a.metric: a for a in alarms}
    assert by["dead_experts"].value == 7 and by["dead_experts"].threshold == 2
    assert by["load_cv"].value == pytest.approx(math.sqrt(7), rel=1e-5)
    assert all(a.layer == 3 and "layer 3" in a.message for a in alarms)


def test_dropped_fraction_alarm():
    assert [a.metric for a in check({"moe/3/dropped_fraction": 0.3})] == ["dropped_fraction"]
    assert check({"moe/3/dropped_fraction": 0.2}) == []
    assert check({"moe/3/dropped_fraction": 0.3}, HealthConfig(max_dropped_fraction=None)) == []


def train_metrics(collapsed: bool, E=8):
    """The train-step metrics of a real top-1 layer at training capacity factor 1.25 on 2 groups of 64 tokens
    (C = ceil(1.25 * 64 / 8) = 10 slots per expert per group): healthy = its random router; collapsed = every
    token sent to expert 0 (as in `layer_metrics`)."""
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=E, num_experts_per_token=1, capacity_factor=1.25,
                    expert_backend="blocked")
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 64, 4)), jnp.float32)
    if collapsed:
        layer.router.w_DE[...] = jnp.zeros((4, E)).at[:, 0].set(10.0)
        x = jnp.abs(x) + 0.1
    _, aux = train_forward(layer, x)
    return {f"moe/3/{k}": np.asarray(v) for k, v in aux.metrics.items()}


train_forward = nnx.jit(lambda layer, x: layer(x, train=True))  # one compilation for both routers


def test_training_window_alarms_trip_on_a_forced_collapse_after_warmup(tmp_path):
    cfg = HealthConfig(train_window=4, train_start_step=10, ledger_batches=0)
    healthy, collapsed = train_metrics(False), train_metrics(True)
    assert health_lib.check_train(cfg, layers=[3], window=[healthy] * 4) == []
    alarms = health_lib.check_train(cfg, layers=[3], window=[collapsed] * 4)
    # expert 0 is chosen by all 128 tokens and serves 10 per group: 108 of 128 dropped = 0.84375 > 0.3;
    # load CV of the routed load (128, 0 x 7) = sqrt(7) = 2.65 > 1.5
    by = {a.metric: a for a in alarms}
    assert set(by) == {"train_dropped_fraction", "train_load_cv"}
    assert by["train_dropped_fraction"].value == pytest.approx(108 / 128)
    assert by["train_load_cv"].value == pytest.approx(math.sqrt(7), rel=1e-5)
    assert "mean of 4 steps" in by["train_dropped_fraction"].message
    # the window's mean: 2 collapsed and 2 healthy steps average (0.84375 + 0.84375 + 2 d) / 4
    mixed = [collapsed, collapsed, healthy, healthy]
    d = float(healthy["moe/3/dropped_fraction"])
    (row,) = [a for a in health_lib.check_train(cfg, layers=[3], window=mixed) if a.metric == "train_dropped_fraction"]
    assert row.value == pytest.approx((2 * 108 / 128 + 2 * d) / 4)

    # the watch: nothing before the window is full, nothing before train_start_step, then at the log step where
    # an alarm trips (not again while it stays tripped: the windows of successive log steps overlap), cleared
    # in the log, and anew when it trips again
    model_cfg = build_run_config(base.make("t", base.tiny_model())).model  # MoE layers 0-3; metrics of 3 only
    logs = []
    watch = health_lib.RoutingWatch(cfg, model_cfg, None, str(tmp_path), log=logs.append, write=False)
    assert watch.at_train(3, [collapsed] * 3) == []  # 3 of 4 steps
    assert watch.at_train(6, [collapsed] * 3) == []  # full, but step 6 < 10
    both = {"train_dropped_fraction", "train_load_cv"}
    assert {a.metric for a in watch.at_train(12, [collapsed] * 6)} == both
    assert watch.at_train(14, [collapsed] * 2) == [] and logs == []  # still tripped: not repeated
    assert watch.at_train(18, [healthy] * 4) == []  # the window holds the last 4 steps only
    assert sorted(logs) == [f"[moe_jax] alarm cleared at step 18: layer 3: {m} (mean of the last 4 steps) back "
                            "within its threshold" for m in sorted(both)]
    assert {a.metric for a in watch.at_train(22, [collapsed] * 4)} == both  # trips anew
    off = health_lib.RoutingWatch(dataclasses.replace(cfg, train_window=0), model_cfg, None, str(tmp_path),
                                  log=lambda *_: None, write=False)
    assert off.at_train(100, [collapsed] * 10) == []


def ledger(expert, score=0.5, bias=0.0, step=0):
    expert = np.asarray(expert, np.int32)[None, :, None]  # M 1, k 1
    T = expert.shape[1]
    return Ledger(tokens=np.arange(T, dtype=np.int32)[None], layers=np.asarray([3], np.int32), expert=expert,
                  weight=np.ones(expert.shape, np.float32), dropped=np.zeros(expert.shape, bool),
                  score=np.full(expert.shape, score, np.float32), correction_bias=np.full((1, 4), bias, np.float32),
                  num_experts=4, batch_size=1, step=step)


def test_saturation_alarm():
    cfg = HealthConfig(min_saturation=0.5)
    before = ledger([0, 1, 2, 3], step=100)
    # 1 of 4 tokens keeps its expert: saturation 0.25 < 0.5; 3 of 4: 0.75 is quiet
    (alarm,) = check({}, cfg, E=4, ledger=ledger([0, 2, 3, 1]), previous=before)
    assert alarm.metric == "saturation" and alarm.value == 0.25 and "step 100" in alarm.message
    assert check({}, cfg, E=4, ledger=ledger([0, 1, 2, 0]), previous=before) == []
    assert check({}, cfg, E=4, ledger=ledger([0, 2, 3, 1]), previous=None) == []


def test_sigmoid_score_and_bias_drift_alarms():
    cfg = HealthConfig(max_bias_drift=0.05)
    low = ledger([0, 1, 2, 3], score=1e-4)
    (alarm,) = check({}, cfg, E=4, ledger=low, score_fn="sigmoid")
    assert alarm.metric == "min_sigmoid_score" and alarm.value == pytest.approx(1e-4)
    assert check({}, cfg, E=4, ledger=low, score_fn="softmax") == []  # sigmoid routers only
    assert check({}, cfg, E=4, ledger=ledger([0, 1, 2, 3], score=0.3), score_fn="sigmoid") == []
    drifted = dict(ledger=ledger([0, 1, 2, 3], bias=0.1), previous=ledger([0, 1, 2, 3], bias=0.0))
    (alarm,) = check({}, cfg, E=4, has_bias=True, **drifted)
    assert alarm.metric == "bias_drift" and alarm.value == pytest.approx(0.1)
    assert check({}, cfg, E=4, has_bias=False, **drifted) == []
    assert check({}, cfg, E=4, has_bias=True, ledger=ledger([0, 1, 2, 3], bias=0.02),
                 previous=ledger([0, 1, 2, 3], bias=0.0)) == []


def test_loop_records_ledgers_and_stops_on_alarm(tmp_path):
    model = base.tiny_model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                            max_seq_len=64)
    # load CV is never below 0 here, so the alarm trips at the first evaluation from start_step on
    config = base.make("h", model, data=dict(corpus="synthetic", seq_len=16, batch_size=2, data_dir=str(tmp_path / "d")),
                       train=dict(steps=6, warmup_steps=1, log_every=1, eval_every=2, eval_batches=1, checkpoint_every=100,
                                  sample_tokens=0, progress=False),
                       health=dict(max_load_cv=0.0, start_step=4, stop_on_alarm=True))
    workdir = str(tmp_path / "w")
    summary = loop_lib.train(build_run_config(config), workdir, log=lambda *_: None)
    assert summary["steps"] == 4 and summary["stopped"]["alarms"]
    assert all("load_cv" in m for m in summary["stopped"]["alarms"])
    assert os.listdir(os.path.join(workdir, "checkpoints")) and "4" in os.listdir(os.path.join(workdir, "checkpoints"))
    assert [s for s, _ in list_ledgers(workdir)] == [2, 4]
    rows = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    evals = {r["step"]: r for r in rows if r["split"] == "eval"}
    assert "moe/0/saturation" not in evals[2] and 0 <= evals[4]["moe/0/saturation"] <= 1
    alarms = [r for r in rows if r["split"] == "alarm"]
    assert {(r["step"], r["layer"], r["metric"]) for r in alarms} == {(4, 0, "load_cv"), (4, 1, "load_cv")}
    assert os.path.exists(os.path.join(workdir, "routing.png")) and summary["routing_plot"] == "routing.png"
    with open(os.path.join(workdir, "summary.json")) as f:
        assert json.load(f)["stopped"]["reason"].startswith("routing alarm")
    led = Ledger.load(list_ledgers(workdir)[-1][1])
    assert led.tokens.shape == (2, 16) and led.expert.shape == (2, 32, 2)
    # the command: record from the checkpoint (the same decisions as the loop's ledger of that step), compare, plot
    from experiments import ledger as ledger_cmd

    out = str(tmp_path / "again.npz")
    assert ledger_cmd.main(["record", f"--workdir={workdir}", f"--out={out}"]) == 0
    again = Ledger.load(out)
    assert again.step == 4
    np.testing.assert_array_equal(again.expert, led.expert)
    np.testing.assert_array_equal(again.tokens, led.tokens)
    (first, _), (last, last_path) = list_ledgers(workdir)
    assert ledger_cmd.main(["compare", list_ledgers(workdir)[0][1], last_path]) == 0
    assert ledger_cmd.main(["summary", last_path, "--vocab=256"]) == 0
    assert ledger_cmd.main(["plot", f"--workdir={workdir}", f"--out={tmp_path / 'r.png'}"]) == 0
    assert os.path.getsize(tmp_path / "r.png") > 0


def test_loop_training_window_alarm_stops_the_run(tmp_path):
    model = base.tiny_model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                            max_seq_len=64)
    config = base.make("w", model, data=dict(corpus="synthetic", seq_len=16, batch_size=2, data_dir=str(tmp_path / "d")),
                       train=dict(steps=8, warmup_steps=1, log_every=2, eval_batches=0, checkpoint_every=100,
                                  sample_tokens=0, progress=False),
                       health=dict(train_window=3, train_start_step=4, max_train_load_cv=0.0, stop_on_alarm=True))
    workdir = str(tmp_path / "w")
    summary = loop_lib.train(build_run_config(config), workdir, log=lambda *_: None)
    # log step 2: 2 of 3 window steps; log step 4: full and >= train_start_step, the mean load CV (> 0) trips
    assert summary["steps"] == 4 and all("train_load_cv" in m for m in summary["stopped"]["alarms"])
    alarms = [r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "alarm"]
    assert {(r["step"], r["layer"], r["metric"]) for r in alarms} == {(4, 0, "train_load_cv"), (4, 1, "train_load_cv")}
    assert "mean of 3 steps" in alarms[0]["message"]
    assert "4" in os.listdir(os.path.join(workdir, "checkpoints"))
