"""Load a Hugging Face model directory into a `Transformer`, and save one back.

    model, info = load_hf("path/to/Mixtral-dir")            # ModelConfig from config.json, weights from safetensors
    save_hf(model, "out-dir", family="mixtral")             # config.json + model.safetensors (HF's per-expert names)

Loading checks everything it can before reading a weight: the config (`configs.model_config_from_hf`), that
every tensor the model needs is in the checkpoint with the right shape (the headers), and that the
checkpoint holds no tensor the model would ignore (a bias the config does not announce, say). Then it reads
one tensor at a time into the model's parameters (built abstractly, never randomly initialised), so the
peak memory is the model plus one tensor; each shard file is unmapped once its last tensor is read. With
`mesh=`, each tensor goes straight onto its devices with the run's sharding as it is read.
"""
from __future__ import annotations

import dataclasses
import os
import re
import shutil
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moe_jax.hf import configs, files
from moe_jax.hf.weights import weight_entries
from moe_jax.model_config import ModelConfig
from moe_jax.params import abstract_model
from moe_jax.sharding.rules import partition_spec
from moe_jax.transformer import Transformer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json")
# Tensors a checkpoint may hold that no parameter of ours corresponds to (recomputed buffers).
_IGNORED = (re.compile(r".*rotary_emb\.inv_freq$"),)


@dataclasses.dataclass
class LoadInfo:
    family: str
    hf_config: dict
    notes: list


def _flat_params(model_or_abstract) -> tuple:
    graphdef, state = nnx.split(model_or_abstract)
    return graphdef, list(nnx.to_flat_state(state))


def expected_tensors(cfg: ModelConfig, family: str) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape for a model of `cfg`, from the export mapping run on shapes only."""
    _, flat = _flat_params(abstract_model(cfg))
    shapes = {path: jax.ShapeDtypeStruct(v.shape, v.dtype) for path, v in flat}
    entries = weight_entries(cfg, family)

    def export(values):
        out = {}
        for e in entries:
            out.update(zip(e.hf, e.to_hf([values[p] for p in e.ours])))
        return out

    return {k: tuple(v.shape) for k, v in jax.eval_shape(export, shapes).items()}


def check_checkpoint(reader: files.CheckpointReader, cfg: ModelConfig, family: str,
                     skip: tuple = ()) -> list[str]:
    """Raises naming the tensor and file if one is missing or has the wrong shape, or if the checkpoint holds
    tensors the model would not use. Returns notes on tensors deliberately skipped."""
    expected = expected_tensors(cfg, family)
    for name, shape in expected.items():
        if name not in reader:
            raise ValueError(f"{reader.directory}: tensor {name!r} is missing (config.json describes a model that "
                           "needs it); the checkpoint is incomplete, or config.json does not belong to it.")
        if reader.shape(name) != shape:
            raise ValueError(f"{reader.file_of(name)}: tensor {name!r} has shape {list(reader.shape(name))}, but "
                             f"config.json implies {list(shape)}; the config and the weights disagree.")
    notes, unknown = [], []
    for name in reader.names():
        if name in expected or name.endswith(files.SCALE_SUFFIX) and name[: -len(files.SCALE_SUFFIX)] in expected:
            continue
        if any(r.match(name) for r in _IGNORED):
            continue
        if any(pattern.match(name) for pattern, _ in skip):
            continue
        unknown.append(name)
    for pattern, why in skip:
        n = sum(1 for name in reader.names() if pattern.match(name))
        if n:
            notes.append(f"skipped {n} tensors: {why}")
    if unknown:
        raise ValueError(f"{reader.directory}: {len(unknown)} tensor(s) the model has no parameter for, e.g. "
                         f"{unknown[:3]} (in {reader.file_of(unknown[0])}); config.json does not announce the "
                         "feature they belong to, so loading would silently drop it.")
    return notes


def _path_str(path: tuple) -> str:
    return "/".join(str(p) for p in path)  # ('blocks', 0, 'attn', 'w_q_DHQ') -> 'blocks/0/attn/w_q_DHQ'


def _placed(array: np.ndarray, dtype, path: tuple, mesh: Optional[Mesh]) -> jax.Array:
    """One parameter as a jax array: on the default device, or laid out on `mesh` with the NamedSharding the
    logical-axis rules give its path (moe_jax.sharding.rules), each device receiving only its slice."""
    if mesh is None:
        return jnp.asarray(np.asarray(array, np.float32), dtype)
    spec = partition_spec(_path_str(path), array.shape, dict(mesh.shape))
    sharding = NamedSharding(mesh, spec)
    return jax.make_array_from_callback(array.shape, sharding,
                                        lambda index: np.asarray(np.asarray(array[index], np.float32), dtype))


def load_hf(directory: str, *, expert_backend: str = "ragged_dot", max_seq_len: Optional[int] = None,
            param_dtype: str = "float32", dtype: str = "float32", mesh: Optional[Mesh] = None,
            log=print) -> tuple[Transformer, LoadInfo]:
    """A Hugging Face directory (config.json + safetensors, one file or shards with an index) -> our model.

    mesh: a device mesh (`moe_jax.sharding.make_mesh(run.mesh)`) to place every parameter on as it is read,
    with the sharding the training run gives it (`tree_shardings`: experts over `expert`, d_model over `fsdp`,
    heads, FFN widths and the vocabulary over `model`); each process puts only the slices its own devices
    hold, so no device ever holds a whole sharded tensor. A dimension a mesh axis does not divide fails naming
    the parameter, before any weight is read. None: the default device."""
    directory = os.path.abspath(os.path.expanduser(directory))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} is not a directory: give a Hugging Face model directory "
                                "(config.json + *.safetensors).")
    hf = files.read_config(directory)
    family = configs.family_of(hf, os.path.join(directory, "config.json"))
    cfg = configs.model_config_from_hf(hf, path=os.path.join(directory, "config.json"), expert_backend=expert_backend,
                                       max_seq_len=max_seq_len, param_dtype=param_dtype, dtype=dtype)
    reader = files.CheckpointReader(directory)
    skip = ()
    if family == "deepseek_v3":  # multi-token-prediction modules sit at layer indices >= num_hidden_layers
        L = cfg.num_layers
        skip = ((re.compile(rf"model\.layers\.({'|'.join(str(L + j) for j in range(16))})\."),
                 "DeepSeek-V3 multi-token-prediction (MTP) layers, which moe_jax's model does not run"),)
    notes = check_checkpoint(reader, cfg, family, skip)
    graphdef, flat = _flat_params(abstract_model(cfg))
    shapes = {path: v.shape for path, v in flat}
    if mesh is not None:  # every parameter fits the mesh: checked before any weight is read
        for path, shape in shapes.items():
            partition_spec(_path_str(path), shape, dict(mesh.shape))
    values = {}
    entries = weight_entries(cfg, family)
    reader.plan([name for entry in entries for name in entry.hf])  # each shard unmapped once read
    for entry in entries:
        ours = entry.from_hf([reader.get(n) for n in entry.hf], [shapes[p] for p in entry.ours])
        for path, array in zip(entry.ours, ours):
            values[path] = _placed(array, cfg.param_jnp_dtype, path, mesh)  # one tensor at a time
    reader.close()
    missing = [path for path, _ in flat if path not in values]
    if missing:  # a parameter no entry fills: a bug in the tables, never the user's checkpoint
        raise AssertionError(f"moe_jax.hf.weights has no entry for parameters {missing[:4]}.")
    state = nnx.from_flat_state([(path, v.replace(values[path])) for path, v in flat])
    for note in notes:
        log(f"[moe_jax.hf] {note}")
    return nnx.merge(graphdef, state), LoadInfo(family=family, hf_config=hf, notes=notes)


def export_tensors(model: Transformer, family: str) -> dict[str, np.ndarray]:
    """HF tensor name -> numpy array (views of the parameters where the layout allows)."""
    if model.cfg.scan_layers:
        raise ValueError("export_tensors / save_hf: the model has ModelConfig.scan_layers=True; Hugging Face "
                         "checkpoints are per layer: build the model with scan_layers=False and load its state with "
                         "moe_jax.layer_stack.unstack_layers(nnx.state(model), model.cfg) first.")
    _, flat = _flat_params(model)
    values = {path: np.asarray(v[...]) for path, v in flat}
    out = {}
    for entry in weight_entries(model.cfg, family):
        out.update(zip(entry.hf, entry.to_hf([values[p] for p in entry.ours])))
    return out


def save_hf(model: Transformer, directory: str, *, family: str, dtype: Optional[str] = None,
            max_shard_bytes: Optional[int] = 2 ** 31, extra_config: Optional[dict] = None,
            tokenizer_from: Optional[str] = None) -> list[str]:
    """Writes `model` as a Hugging Face directory of `family` that transformers' from_pretrained loads.
    dtype: the tensors' dtype on disk (default: the parameters'). tokenizer_from: a directory whose tokenizer
    files (tokenizer.json, ...) are copied alongside."""
    hf = configs.hf_config_from_model(model.cfg, family, extra=extra_config)
    tensors = export_tensors(model, family)
    if dtype is not None:
        hf["torch_dtype"] = hf["dtype"] = dtype
        target = jnp.dtype(dtype)
        tensors = {k: v.astype(target) for k, v in tensors.items()}
    written = files.write_checkpoint(directory, hf, tensors, max_shard_bytes=max_shard_bytes)
    if tokenizer_from is not None:
        for name in TOKENIZER_FILES:
            src = os.path.join(tokenizer_from, name)
            if os.path.isfile(src):
                shutil.copyfile(src, os.path.join(directory, name))
    return written
