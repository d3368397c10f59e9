"""Runs on a device mesh, on one host or many: JAX's distributed runtime, the sharded state, per-host batches.

    initialize(run.mesh)                          # first, before any JAX computation (train() does it)
    graphdef, state, placement = init_sharded(run, tx)   # init_sharded_state(make_model, tx, mesh, plan) below it
    batch = train_batch(data, step, placement)    # this host's rows -> one global array

Multi-host uses `jax.distributed.initialize` (JAX's own coordination service; the collectives are
XLA's: NCCL on GPU, ICI/DCN on TPU, gloo between CPU processes). Every host runs the same command;
what differs per host comes from the environment (`$MOE_JAX_PROCESS_ID`, `$JAX_COORDINATOR_ADDRESS`)
or from cluster detection (Cloud TPU, Slurm, Open MPI). Each host loads only the rows of the batch that
its own devices hold.

The sharded state never exists unsharded: `eval_shape` gives the state's shapes, the rule table
(moe_jax/sharding/rules.py) turns their paths into shardings, and `jit(init, out_shardings=...)` builds
each shard on the device that holds it. With JAX's partitionable threefry the values equal an unsharded init.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

from moe_jax.sharding import (ExpertParallel, ShardingConfig, batch_spec, check_layout,
                              make_mesh, tree_shardings)
from moe_jax.sharding.placement import Placement
from moe_jax.train.state import init_state, split_model
from moe_jax.transformer import Transformer


def initialize(cfg: ShardingConfig) -> None:
    """`jax.distributed.initialize` when `cfg` asks for several processes (a no-op otherwise, or if done)."""
    if not cfg.multi_process or jax.distributed.is_initialized():
        return
    # CPU processes exchange collectives through gloo (without it: "Multiprocess computations aren't
    # implemented on the CPU backend"); GPU and TPU backends do not read this option.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    args = {k: v for k, v in cfg.process_args().items() if v is not None}
    try:
        jax.distributed.initialize(**args)
    except RuntimeError as e:
        if "must be called before" in str(e):
            raise RuntimeError(
                "config.mesh.num_processes != 1 needs jax.distributed.initialize before any JAX computation; "
                "call moe_jax.train.distributed.initialize(run.mesh) first thing in the process "
                "(moe_jax.train.loop.train does, if nothing before it used JAX).") from e
        raise


def init_sharded_state(make_model: Callable[[], nnx.Module], tx: optax.GradientTransformation, mesh: Mesh,
                       plan: Optional[ExpertParallel] = None):
    """-> (graphdef, TrainState laid out on `mesh`, Placement). `make_model()` builds the model from its
    seed (called only under `eval_shape` and `jit`); `plan` routes its MoE layers through shard_map.

    The graphdef is the plain model's (no mesh in it); `placement.plan` holds `plan`, which the train and
    eval steps apply (`Placement.expert_parallel`) to the model they merge.
    """
    graphdef, _, _ = split_model(nnx.eval_shape(make_model))

    def init():
        return init_state(make_model(), tx)[1]

    shardings = tree_shardings(jax.eval_shape(init), mesh)
    state = jax.jit(init, out_shardings=shardings)()
    return graphdef, state, Placement(mesh=mesh, state=shardings, batch=NamedSharding(mesh, batch_spec(2)), plan=plan)


def init_sharded(run, tx: optax.GradientTransformation, *, log=print):
    """The mesh of `run.mesh` over every device of every process, the MoE layers expert-parallel on it,
    and the train state initialised sharded: -> (graphdef, TrainState, Placement)."""
    sizes = check_layout(run.model, run.data.batch_size, run.data.seq_len, run.mesh, jax.device_count())
    mesh = make_mesh(run.mesh)
    plan = (ExpertParallel(mesh, balance_stats=run.mesh.balance_stats, dropless_exchange=run.mesh.dropless_exchange,
                           dropless_buffer_factor=run.mesh.dropless_buffer_factor)
            if run.model.moe is not None else None)
    log(f"[moe_jax] mesh {' x '.join(f'{a}={n}' for a, n in sizes.items())} over {jax.device_count()} devices, "
        f"{jax.process_count()} process(es)")
    return init_sharded_state(lambda: Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed)), tx, mesh, plan)


def to_device(batch: np.ndarray, placement: Placement | None) -> jax.Array:
    """A global `[B, ...]` batch that every host holds whole (the eval batches) as an array on the mesh."""
    if placement is None:
        return jnp.asarray(batch)
    return placement.put_batch(np.asarray(batch)[placement.rows_of(batch.shape)], batch.shape[0])


def train_batch(data, step: int, placement: Placement | None) -> jax.Array:
    """Training batch `step` on the mesh; each host reads only the rows its own devices hold.

    Batches are pure functions of (seed, step), so the hosts agree on the global batch without talking:
    host h reads `data.train_batch(step, rows=its rows)`, which equals `data.train_batch(step)[rows]`.
    """
    if placement is None:
        return jnp.asarray(data.train_batch(step))
    shape = (data.cfg.batch_size, data.cfg.seq_len + 1)
    return placement.put_batch(data.train_batch(step, rows=placement.rows_of(shape)), shape[0])
