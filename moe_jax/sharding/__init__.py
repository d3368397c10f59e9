"""Mesh, logical-axis rules, placement of batches and state, and the shard_map expert-parallel MoE path.

    config.py           ShardingConfig: mesh axis sizes (data, fsdp, expert, model), statistics, processes
    mesh.py             make_mesh; layout checks that fail before compile, naming the field
    rules.py            parameter path -> logical axes -> mesh axes: the one place arrays are placed
    expert_parallel.py  ExpertParallelMoE: the MoE layer under shard_map, buffers through all_to_all
    placement.py        where batches, the train state and metrics live; which batch rows each host loads

The train state is initialised directly sharded by moe_jax.train.distributed (this package does not
import moe_jax.train).
"""
from moe_jax.sharding.config import AXES, BATCH_AXES, ShardingConfig
from moe_jax.sharding.expert_parallel import ExpertParallel, ExpertParallelMoE, apply_expert_parallel
from moe_jax.sharding.mesh import batch_shards, check_layout, check_moe_layout, make_mesh
from moe_jax.sharding.rules import (LOGICAL_AXIS_RULES, PARAM_AXES, batch_spec, logical_axes, partition_spec,
                                    tree_shardings, tree_specs)

__all__ = [
    "AXES", "BATCH_AXES", "ShardingConfig", "ExpertParallel", "ExpertParallelMoE", "apply_expert_parallel",
    "batch_shards", "check_layout", "check_moe_layout", "make_mesh", "LOGICAL_AXIS_RULES", "PARAM_AXES",
    "batch_spec", "logical_axes", "partition_spec", "tree_shardings", "tree_specs",
]
