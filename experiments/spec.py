"""`RunSpec`: one run of a sweep (its axes, its config) and the canonical run name.

The name spells the run's configuration, not the sweep that asked for it: size label, then
`dense` or `E<experts>_K<k>_G<granularity>`, then every other field that differs from the scale's
default model of that size, then the training fields a sweep overrides (`lr`, `warmup`), then `steps<n>` if the budget differs, then `seed<s>`:

    s_E8_K1_G1_seed0        s_dense_seed2        s_E8_K1_G1_cf0.75_seed0
    s_E63_K7_G1_F32_shared1_seed1                 s_E8_K1_G16_steps281_seed0
    s_dense_lr0.001_seed0

Two sweeps that ask for the same configuration (the granularity sweep's G = 1 point is the expert
sweep's E = 8 point) get the same name, hence the same workdir, and the run is trained once.
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections

from experiments.scales import Scale

# Short labels of MoE/model fields in run names; a field not listed appears under its own name.
LABELS = {
    "num_experts": "E", "num_experts_per_token": "K", "granularity": "G", "moe_d_ff": "F",
    "capacity_factor": "cf", "eval_capacity_factor": "ecf", "num_shared_experts": "shared",
    "shared_d_ff": "sharedF", "balance_loss_coef": "bal", "z_loss_coef": "z", "router": "",
    "overflow": "", "grouping": "", "min_capacity": "mincap", "group_size": "S",
    "learning_rate": "lr", "warmup_steps": "warmup", "expert_backend": "", "topk_order": "",
    "first_dense_layers": "FD",
}
_FIRST = ("num_experts", "num_experts_per_token", "granularity")


@dataclasses.dataclass(frozen=True, eq=False)
class RunSpec:
    """sweep: the ablation's name; axes: what it varies here (table columns, e.g. {"E": 8, "seed": 0});
    config: the full run ConfigDict (what `experiments.train` / `moe_jax.train.loop.train` take)."""

    sweep: str
    name: str
    axes: dict
    config: ml_collections.ConfigDict

    @property
    def steps(self) -> int:
        return int(self.config.train.steps)

    def fingerprint(self) -> str:
        return json.dumps(self.config.to_dict(), sort_keys=True, default=str)


def workdir_of(out: str, name: str) -> str:
    """Where run `name` of a results folder `out` trains: `<out>/runs/<name>`."""
    return os.path.join(os.path.abspath(out), "runs", name)


def _fmt(value) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def run_name(scale: Scale, size: str, model: dict, *, seed: int, steps: int, train: dict | None = None) -> str:
    parts = [size]
    if not model.get("use_moe", True):
        parts.append("dense")
        default = scale.model(size, dense=True)
    else:
        default = scale.model(size)
        parts += [f"{LABELS[k]}{model[k]}" for k in _FIRST]
    for key in sorted(model):
        if key in _FIRST or key == "use_moe" or model[key] == default.get(key, object()):
            continue
        if key not in default and model[key] is None:
            continue
        parts.append(f"{LABELS.get(key, key)}{_fmt(model[key])}")
    for key in sorted(train or {}):
        if train[key] != scale.train[key]:
            parts.append(f"{LABELS.get(key, key)}{_fmt(train[key])}")
    if steps != scale.steps(size):
        parts.append(f"steps{steps}")
    parts.append(f"seed{seed}")
    return "_".join(parts)


def make_spec(sweep: str, scale: Scale, *, size: str, seed: int, axes: dict, model: dict,
              steps: int | None = None, train: dict | None = None) -> RunSpec:
    """A run of `sweep` at `scale`: `model` from `scale.model(size, ...)`, training from the scale (`train`
    overrides the learning rate or warm-up)."""
    steps = steps or scale.steps(size)
    name = run_name(scale, size, model, seed=seed, steps=steps, train=train)
    config = scale.config(name, model, size=size, seed=seed, steps=steps, train=train)
    return RunSpec(sweep=sweep, name=name, axes=dict(axes, size=size, seed=seed), config=config)
