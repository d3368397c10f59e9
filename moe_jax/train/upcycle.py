"""Upcycle a dense run's checkpoint into a run's initial `TrainState` (config section `upcycle`).

    check_source(run)                  # reads <from_workdir or from_hf>/config.json: errors before anything is built
    state = upcycled_state(run, state) # params from the dense checkpoint (moe_jax.upcycle), router fresh
    write_upcycled_workdir(run, workdir)   # config.json + checkpoint 0 + upcycle.json, for experiments.train

The training loop calls `upcycled_state` when a run with `config.upcycle` starts in a workdir without a
checkpoint; once the workdir holds a checkpoint the `upcycle` section is not read again (resuming is
ordinary). The optimizer state stays the fresh one `init_state` made (zero moments, count 0), and the run's
own learning-rate schedule starts from step 0. Under a mesh, the upcycled parameters are placed onto the
shardings of the freshly initialised (sharded) state; the dense parameters are read onto the default device
first (one dense copy in host/device memory).

The source is a dense run's workdir (`from_workdir`) or a dense Hugging Face directory (`from_hf`: llama or
qwen2, imported by moe_jax.hf.load_hf; its config.json gives the dense ModelConfig, which the run's model must
match in every non-MoE field).
"""
from __future__ import annotations

import json
import os

import jax
from flax import nnx

from moe_jax import upcycle as upcycle_lib
from moe_jax.model_config import ModelConfig
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.run_config import RunConfig, run_record

RECORD = "upcycle.json"


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir/checkpoints` holds a finished step (then a run resumes and is not upcycled again)."""
    directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
    return os.path.isdir(directory) and any(s.isdigit() for s in os.listdir(directory))


def _source_dir(run: RunConfig) -> str:
    return os.path.abspath(os.path.expanduser(run.upcycle.from_hf or run.upcycle.from_workdir))


def _hf_model_config(run: RunConfig) -> ModelConfig:
    """The ModelConfig of the Hugging Face directory `from_hf` (config.json only), in the run's dtypes."""
    from moe_jax.hf import configs as hf_configs, files as hf_files

    directory = _source_dir(run)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"config.upcycle.from_hf={run.upcycle.from_hf!r}: {directory} is not a directory; "
                                "give a Hugging Face model directory (config.json + *.safetensors) of a llama or "
                                "qwen2 model.")
    return hf_configs.model_config_from_hf(hf_files.read_config(directory), path=os.path.join(directory, "config.json"),
                                           param_dtype=run.model.param_dtype, dtype=run.model.dtype)


def source_model(run: RunConfig) -> ModelConfig:
    """The dense source's ModelConfig, read from its config.json (FileNotFoundError/ValueError name the path)."""
    if run.upcycle.from_hf:
        return _hf_model_config(run)
    path = os.path.join(_source_dir(run), "config.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"config.upcycle.from_workdir={run.upcycle.from_workdir!r}: {path} does not exist; "
                                "give the workdir of a finished dense run of `python -m experiments.train`.")
    with open(path) as f:
        return ModelConfig.from_dict(json.load(f)["model"])


def check_source(run: RunConfig) -> ModelConfig:
    """Everything checkable without reading arrays: the dense config against the run's model, and that a
    checkpoint (of `step`) exists. Returns the dense ModelConfig."""
    dense_cfg = source_model(run)
    upcycle_lib.check_upcycle(dense_cfg, run.model, run.upcycle)
    if run.upcycle.from_hf:  # its tensors are checked against the config by load_hf, before any is read
        return dense_cfg
    directory = os.path.join(_source_dir(run), "checkpoints")
    steps = sorted(int(s) for s in os.listdir(directory) if s.isdigit()) if os.path.isdir(directory) else []
    if not steps:
        raise FileNotFoundError(f"config.upcycle.from_workdir: no checkpoint in {directory}; train the dense run "
                                "first (it checkpoints every checkpoint_every steps and at the end).")
    if run.upcycle.step is not None and run.upcycle.step not in steps:
        raise ValueError(f"config.upcycle.step={run.upcycle.step} is not a checkpoint of {directory}; "
                         f"available: {steps} (None = the latest).")
    return dense_cfg


def dense_params(run: RunConfig, dense_cfg: ModelConfig) -> tuple[dict, int]:
    """(the dense checkpoint's params as a pure dict, its step; a Hugging Face source is step 0)."""
    from moe_jax.train.state import split_model
    from moe_jax.transformer import Transformer

    if run.upcycle.from_hf:
        from moe_jax.hf import load_hf

        model, _ = load_hf(_source_dir(run), param_dtype=dense_cfg.param_dtype, dtype=dense_cfg.dtype,
                           max_seq_len=dense_cfg.max_seq_len)
        if model.cfg != dense_cfg:  # the same config.json read twice: never differs unless the file changed
            raise RuntimeError(f"{_source_dir(run)}/config.json changed while upcycling from it.")
        _, params, _ = split_model(model)
        return upcycle_lib.to_pure(params), 0

    ckpt = Checkpoints(_source_dir(run), keep=1)
    try:
        step = run.upcycle.step if run.upcycle.step is not None else ckpt.latest_step()
        abstract = nnx.eval_shape(lambda: Transformer(dense_cfg, rngs=nnx.Rngs(params=0)))
        _, params, _ = split_model(abstract)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype), params)
        restored = ckpt.restore_fields(step, {"params": target})["params"]
    finally:
        ckpt.close()
    return upcycle_lib.to_pure(restored), step


def upcycled_state(run: RunConfig, state, *, log=print):
    """`state` (a fresh `TrainState` of `run.model`) with its params replaced by the upcycled dense ones."""
    dense_cfg = check_source(run)
    source, step = dense_params(run, dense_cfg)
    fresh = upcycle_lib.to_pure(state.params)
    new = upcycle_lib.upcycle_params(source, fresh, dense_cfg, run.model, run.upcycle)
    params = jax.tree.map(lambda x: x, state.params)  # a copy of the State's structure
    nnx.replace_by_pure_dict(params, new)
    params = jax.device_put(params, jax.tree.map(lambda x: x.sharding, state.params))
    where = "Hugging Face" if run.upcycle.from_hf else f"step {step}"
    log(f"[moe_jax] {upcycle_lib.describe(dense_cfg, run.model, run.upcycle)} (from {_source_dir(run)}, {where})")
    return state.replace(params=params)


def write_upcycled_workdir(run: RunConfig, workdir: str, *, log=print) -> str:
    """A workdir that `python -m experiments.train --config=<the same config> --workdir=<workdir>` resumes:
    config.json, checkpoint 0 (upcycled params, fresh optimizer) and upcycle.json (where it came from).
    Refuses a workdir that already holds a checkpoint."""
    from moe_jax.train import distributed
    from moe_jax.train.run_config import check_machine
    from moe_jax.train.state import init_state, make_optimizer
    from moe_jax.transformer import Transformer

    if run.upcycle is None:
        raise ValueError("write_upcycled_workdir: the run has no config.upcycle section (from_workdir, ...).")
    workdir = os.path.abspath(os.path.expanduser(workdir))
    if has_checkpoint(workdir):
        raise ValueError(f"--workdir={workdir} already holds checkpoints; upcycle into a new workdir.")
    check_machine(run)
    check_source(run)
    tx = make_optimizer(run.train)
    if run.mesh.is_sharded:
        distributed.initialize(run.mesh)
        _, state, _ = distributed.init_sharded(run, tx, log=log)
    else:
        _, state = init_state(Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed)), tx)
    state = upcycled_state(run, state, log=log)
    os.makedirs(workdir, exist_ok=True)
    record = run_record(run)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(workdir, RECORD), "w") as f:
        json.dump(record["upcycle"], f, indent=2)
    ckpt = Checkpoints(workdir, keep=run.train.keep_checkpoints)
    try:
        ckpt.save(0, state, {"step": 0, "model": record["model"], "window": [], "upcycle": record["upcycle"]})
    finally:
        ckpt.close()
    return workdir
