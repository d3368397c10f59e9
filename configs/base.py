"""The shared layout of a run config, and the tiny model every preset's `tiny` variant starts from.

Sections (validated by `moe_jax.train.run_config.build_run_config`):
  model  ModelConfig fields plus the MoE layer's fields (MoEConfig) flattened in; `use_moe`, `moe_d_ff`.
  data   DataConfig fields (corpus, seq_len, batch_size, tokenizer, ...).
  train  TrainConfig fields (steps, learning_rate, schedule, eval/checkpoint cadence, ...).
  mesh   ShardingConfig fields (one device unless set).
  health HealthConfig fields (moe_jax.train.health): the routing ledger and the routing alarms' thresholds.
A field a preset does not set takes its dataclass default: the dataclasses are the one place defaults
are written (tests/test_configs.py checks that `make` adds none of its own).
"""
from __future__ import annotations

import ml_collections

from moe_jax.train.run_config import make_config_dict


def make(name: str, model: dict, data: dict | None = None, train: dict | None = None,
         health: dict | None = None) -> ml_collections.ConfigDict:
    """A run config with every field present (the dataclasses' defaults under the given values), so any
    of them can be overridden."""
    return make_config_dict(name, model, data or {}, train or {}, health=health)


def tiny_model(**overrides) -> dict:
    """A byte-level model that trains on 2 CPU cores in minutes: d 128, 4 layers, 8 experts top-2."""
    model = dict(
        vocab_size=256, d_model=128, num_layers=4, num_heads=4, d_ff=512, activation="swiglu",
        norm="rmsnorm", max_seq_len=512,
        use_moe=True, moe_d_ff=256, num_experts=8, num_experts_per_token=2, moe_every=1,
        router="top_k", capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
        dispatch="gather", balance_loss_coef=1e-2, z_loss_coef=1e-3)
    model.update(overrides)
    return model


def check_arg(arg, allowed=("tiny", "full")) -> str:
    arg = arg or allowed[0]
    if arg not in allowed:
        raise ValueError(f"config argument {arg!r} is not one of {allowed}: use e.g. --config=configs/x.py:{allowed[0]}")
    return arg
