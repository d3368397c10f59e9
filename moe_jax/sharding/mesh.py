"""The device mesh from a `ShardingConfig`, and the checks that a model and batch fit it.

Every check runs on configs and shapes alone, so a mesh that does not divide the experts, the batch,
the heads or a width fails with the field names and the fix before anything is traced or compiled.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import jax
from jax.sharding import AxisType, Mesh

from moe_jax.moe_config import MoEConfig
from moe_jax.model_config import ModelConfig
from moe_jax.sharding.config import AXES, BATCH_AXES, ShardingConfig


def make_mesh(cfg: ShardingConfig, devices: Optional[Sequence[jax.Device]] = None) -> Mesh:
    """A mesh with axes ('data', 'fsdp', 'expert', 'model') over `devices` (default: all of them).

    Axes are `Auto` (GSPMD propagates shardings through the model code, which names no mesh axis);
    `jax.make_mesh` lays the axes onto the physical topology, the last (model) on the closest devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = cfg.resolve(len(devices))
    shape = tuple(sizes[a] for a in AXES)
    return jax.make_mesh(shape, AXES, axis_types=(AxisType.Auto,) * len(AXES), devices=devices)


def batch_shards(mesh_shape: Mapping[str, int]) -> int:
    """How many ways the batch is split: data x fsdp x expert."""
    return math.prod(mesh_shape.get(a, 1) for a in BATCH_AXES)


def _batch_axes(mesh_shape: Mapping[str, int]) -> str:
    return "data x fsdp x expert = " + " x ".join(str(mesh_shape.get(a, 1)) for a in BATCH_AXES)


def _divides(size: int, n: int, what: str, field: str, axes: str) -> None:
    if n > 1 and size % n:
        raise ValueError(f"config.mesh: {axes} = {n} does not divide {what} {field}={size}; choose mesh "
                         f"sizes whose product divides it, or change {field}.")


def check_moe_layout(cfg: MoEConfig, batch: int, length: int, mesh_shape: Mapping[str, int]) -> None:
    """The expert-parallel MoE layer on `[batch, length]` tokens fits the mesh (raises naming the field)."""
    ep, tp, shards = mesh_shape.get("expert", 1), mesh_shape.get("model", 1), batch_shards(mesh_shape)
    _divides(cfg.num_routed_experts, ep, "the routed experts", "num_experts x granularity", "expert")
    _divides(cfg.expert_d_ff, tp, "the expert width", "d_ff / granularity (moe_d_ff)", "model")
    _divides(batch, shards, "the batch", "batch_size", _batch_axes(mesh_shape))
    local = batch // shards
    if cfg.grouping == "tokens":
        S = cfg.tokens_per_group(local, length)
        if (local * length) % S:
            raise ValueError(
                f"config.model.group_size={S}: routing groups of consecutive tokens must not straddle devices, "
                f"but each of the {shards} batch shards holds {local} x {length} = {local * length} tokens; "
                "choose a group size that divides them.")
    else:
        if cfg.group_size is None:
            raise ValueError(
                "config.model.group_size=None with grouping='position' routes the whole batch as one group, "
                f"which spans the {shards} batch shards; set group_size to a divisor of the "
                f"{local} sequences per shard.")
        if local % cfg.group_size:
            raise ValueError(
                f"config.model.group_size={cfg.group_size} (grouping='position') does not divide the {local} "
                f"sequences of each of the {shards} batch shards; choose a divisor of {local}.")
    if tp > 1 and cfg.expert_bias:
        raise ValueError(
            "config.model.expert_bias=True with config.mesh.model > 1: tensor-parallel experts sum partial "
            "outputs over the model axis, which would add the output bias once per shard; set expert_bias=False "
            "or mesh.model=1.")


def check_layout(model: ModelConfig, batch: int, length: int, cfg: ShardingConfig, num_devices: int) -> dict:
    """The whole model and a `[batch, length]` batch fit the mesh; returns the resolved axis sizes."""
    sizes = cfg.resolve(num_devices)
    tp, fsdp = sizes["model"], sizes["fsdp"]
    _divides(model.num_heads, tp, "the attention heads", "num_heads", "model")
    if model.attention == "mha":
        _divides(model.kv_heads, tp, "the key/value heads", "num_kv_heads", "model")
    _divides(model.vocab_size, tp, "the vocabulary", "vocab_size", "model")
    _divides(model.d_model, fsdp, "the model width", "d_model", "fsdp")
    if model.moe_every > 1 or model.first_dense_layers or model.moe is None:
        _divides(model.d_ff, tp, "the dense FFN width", "d_ff", "model")
    _divides(batch, batch_shards(sizes), "the batch", "batch_size", _batch_axes(sizes))
    if model.moe is not None:
        check_moe_layout(model.moe, batch, length, sizes)
        if model.moe.num_shared_experts:
            _divides(model.moe.shared_width, tp, "the shared experts' width", "num_shared_experts x shared_d_ff",
                     "model")
    return sizes
