"""Presets: full sizes match the published parameter counts (3%), tiny variants train; the CLI; the
defaults of every section come from the config dataclasses alone."""
import dataclasses
import importlib
import os
import subprocess
import sys

import numpy as np
import pytest

from configs import base
from moe_jax.data import DataConfig
from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig
from moe_jax.params import count_params
from moe_jax.sharding import ShardingConfig
from moe_jax.train import loop as loop_lib
from moe_jax.train.config import TrainConfig
from moe_jax.train.health import HealthConfig
from moe_jax.train.run_config import build_run_config

PRESETS = ("switch", "mixtral", "qwen_moe", "grok1", "deepseek_v2", "deepseek_v3", "gpt4_rumoured")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("name", [p for p in PRESETS if p != "gpt4_rumoured"])
def test_full_preset_matches_published_counts(name):
    module = importlib.import_module(f"configs.{name}")
    counts = count_params(build_run_config(module.get_config("full")).model)
    assert module.PUBLISHED, name
    for key, published in module.PUBLISHED.items():
        assert abs(counts[key] / published - 1) < 0.03, (name, key, counts[key], published)


def test_gpt4_rumoured_is_labelled_and_builds():
    module = importlib.import_module("configs.gpt4_rumoured")
    assert "RUMOUR" in module.__doc__.upper() and not hasattr(module, "PUBLISHED")
    counts = count_params(build_run_config(module.get_config("full")).model)
    assert counts["total"] > 1e12


def test_preset_architecture_details():
    v3 = build_run_config(importlib.import_module("configs.deepseek_v3").get_config("full")).model
    assert v3.moe.score_fn == "sigmoid" and v3.moe.use_correction_bias and v3.moe.n_expert_groups == 8
    assert v3.moe_layer_indices[0] == 3 and v3.attention == "mla" and v3.moe.num_shared_experts == 1
    v2 = build_run_config(importlib.import_module("configs.deepseek_v2").get_config("full")).model
    assert v2.moe_layer_indices[0] == 1 and v2.moe.num_shared_experts == 2 and v2.moe.top_k == 6
    assert v2.moe.group_score == "max" and v3.moe.group_score == "top2_sum"
    switch = build_run_config(importlib.import_module("configs.switch").get_config("full")).model
    assert switch.moe.top_k == 1 and len(switch.moe_layer_indices) == 12


# The README's default and one latent-attention preset also sample at the end (a decode of their cache); the
# routing ledger and pictures are off (tests/test_health.py trains with them): compiling those for each preset
# would cost more than its training.
SAMPLED = ("default", "deepseek_v2")


@pytest.mark.parametrize("name", PRESETS + ("default",))
def test_tiny_preset_trains_a_few_steps(name, tmp_path):
    config = importlib.import_module(f"configs.{name}").get_config("tiny")
    config.data.corpus = "synthetic"
    config.data.data_dir = str(tmp_path / "data")
    config.data.seq_len, config.data.batch_size = 32, 2
    config.model.num_layers = 2
    config.train.update(dict(steps=3, warmup_steps=1, log_every=1, eval_batches=1, eval_every=3,
                             sample_tokens=4 if name in SAMPLED else 0, progress=False))
    config.health.update(dict(ledger_batches=0, pictures=False))
    summary = loop_lib.train(build_run_config(config), str(tmp_path / "w"), log=lambda *_: None)
    assert summary["steps"] == 3 and np.isfinite(summary["final_train_ce"]) and np.isfinite(summary["final_eval_ce"])
    if name in SAMPLED:
        assert len(summary["sample"]) >= len(config.train.sample_prompt)
    else:
        assert "sample" not in summary


def _cli(*args):
    env = dict(os.environ, XLA_FLAGS="")
    return subprocess.run([sys.executable, "-m", "experiments.train", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_override_and_bad_field():
    out = _cli("--config=configs/mixtral.py:tiny", "--config.model.num_experts=16",
               "--config.model.capacity_factor=None", "--config.model.eval_capacity_factor=None",
               "--config.model.expert_backend=blocked", "--print_config")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "num_experts: 16" in out.stdout and "routed experts 16" in out.stdout
    bad = _cli("--config=configs/mixtral.py:tiny", "--config.model.num_experts_per_token=32", "--print_config")
    assert bad.returncode != 0 and "num_experts_per_token" in bad.stderr
    typo = _cli("--config=configs/default.py", "--config.model.num_expert=4", "--print_config")
    assert typo.returncode != 0 and "num_expert" in typo.stderr


# ---- defaults: written once, in the dataclasses ----

def _defaults(instance, skip=()) -> dict:
    return {f.name: getattr(instance, f.name) for f in dataclasses.fields(instance)
            if f.name not in skip and f.default is not dataclasses.MISSING}


def test_base_sections_are_the_dataclass_defaults():
    # base.make with nothing given: every field of every section is its dataclass default, field by field
    # (model: the MoE fields, then the ModelConfig fields over them, as run_config lays them out).
    config = base.make("defaults", {}).to_dict()
    model = ModelConfig(vocab_size=1, d_model=8, num_layers=1, num_heads=1, d_ff=1)  # required fields only
    expected_model = {**_defaults(MoEConfig(d_model=8, d_ff=1), skip=("d_model", "d_ff")),
                      **_defaults(model, skip=("moe",)), "use_moe": True, "moe_d_ff": None}
    data = dict(_defaults(DataConfig()), data_dir=None)  # data_dir: computed when the config is built
    assert config == {"name": "defaults", "model": expected_model, "data": data,
                      "train": dataclasses.asdict(TrainConfig()), "mesh": dataclasses.asdict(ShardingConfig()),
                      "health": dataclasses.asdict(HealthConfig())}
    run = build_run_config(base.make("tiny", base.tiny_model()))
    assert (run.data, run.train, run.mesh, run.health) == (DataConfig(), TrainConfig(), ShardingConfig(), HealthConfig())


def test_recorded_defaults_are_kept():
    # Run configs recorded by experiments (config.json) leave most data and train fields to these
    # defaults; changing one changes those runs. Values as configs/base.py has always produced them.
    # data_dir, a per-machine default_factory, is no recorded value.
    assert _defaults(DataConfig()) == dict(corpus="shakespeare", seq_len=128, batch_size=16, seed=0,
                                           tokenizer="byte", bpe_vocab_size=1024, val_fraction=0.05, download=False)
    assert dataclasses.asdict(TrainConfig()) == dict(
        steps=300, learning_rate=3e-3, warmup_steps=30, schedule="cosine", end_lr_fraction=0.1, decay_fraction=0.2,
        weight_decay=0.1, b1=0.9, b2=0.95, grad_clip=1.0, seed=0, log_every=10, eval_every=100, eval_batches=4,
        checkpoint_every=100, keep_checkpoints=3, sample_tokens=200, sample_prompt="ROMEO:", sample_temperature=0.8,
        progress=True, async_checkpointing=True, microbatches=1, replay_ledger=None)
    # The routing ledger and alarms read what evaluations and train steps compute (no effect on training numerics).
    assert dataclasses.asdict(HealthConfig()) == dict(
        ledger_batches=1, pictures=True, alarms=True, start_step=0, max_dead_fraction=0.25, max_dropped_fraction=0.25,
        max_load_cv=2.0, min_entropy_fraction=0.05, min_saturation=None, min_sigmoid_score=1e-3,
        max_bias_drift=None, train_window=50, train_start_step=200, max_train_dropped_fraction=0.3,
        max_train_load_cv=1.5, stop_on_alarm=False)
