"""Restore a trained run for evaluation and sampling: `load_run(workdir) -> LoadedRun`.

Reads the run's `config.json` (written by the training loop), rebuilds the typed configs and the model,
and restores the parameters and router biases of the latest (or a given) checkpoint into it.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

from flax import nnx

from moe_jax.data import DataConfig
from moe_jax.model_config import ModelConfig
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.config import TrainConfig
from moe_jax.train.health import HealthConfig
from moe_jax.train.run_config import RunConfig
from moe_jax.train.state import split_model
from moe_jax.transformer import Transformer


@dataclasses.dataclass
class LoadedRun:
    run: RunConfig
    model: Transformer
    step: int
    workdir: str


def load_run_config(workdir: str) -> RunConfig:
    path = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path} does not exist: --workdir must be a directory that "
                                "`python -m experiments.train` wrote (it holds config.json and checkpoints/).")
    with open(path) as f:
        record = json.load(f)  # run_config.run_record's layout
    data = dict(record["data"], data_dir=os.path.abspath(os.path.expanduser(record["data"]["data_dir"])))
    return RunConfig(model=ModelConfig.from_dict(record["model"]), data=DataConfig(**data),
                     train=TrainConfig(**record["train"]), name=record.get("name", "run"),
                     health=HealthConfig(**record.get("health", {})))  # runs recorded before the section: defaults


def load_run(workdir: str, step: Optional[int] = None) -> LoadedRun:
    """The model of `workdir` with the weights of checkpoint `step` (default: the latest)."""
    run = load_run_config(workdir)
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    if not os.path.isdir(directory) or not os.listdir(directory):  # before orbax starts its threads
        raise FileNotFoundError(f"No finished checkpoint in {directory}: train first (or wait for the "
                                "first checkpoint_every steps).")
    ckpt = Checkpoints(workdir, keep=run.train.keep_checkpoints)
    try:
        available = list(ckpt.manager.all_steps())  # checked before the model is built
        if not available:
            raise FileNotFoundError(f"No finished checkpoint in {ckpt.directory}: train first (or wait for the "
                                    "first checkpoint_every steps).")
        step = max(available) if step is None else step
        if step not in available:
            raise ValueError(f"Checkpoint step {step} is not in {ckpt.directory}; available: {sorted(available)}.")
        # Shapes only (no random initialisation to overwrite): the process holds the restored weights once.
        graphdef, params, rest = split_model(nnx.eval_shape(lambda: Transformer(run.model, rngs=nnx.Rngs(params=0))))
        restored = ckpt.restore_fields(step, {"params": params, "rest": rest})  # not the optimizer state
    finally:
        ckpt.close()
    return LoadedRun(run=run, model=nnx.merge(graphdef, restored["params"], restored["rest"]), step=step,
                     workdir=os.path.abspath(workdir))
