"""The train state created directly sharded, and where batches and metrics live on the mesh.

    graphdef, state, placement = init_sharded_state(make_model, tx, mesh, plan)
    train_step = make_train_step(graphdef, tx, schedule, placement=placement)
    batch = placement.put_batch(host_rows_of_the_batch)
    model = placement.expert_parallel(nnx.merge(graphdef, state.params, state.rest))   # what the steps run

Initialisation never materialises an unsharded copy: `eval_shape` gives the state's shapes, the rule
table (rules.py) turns their paths into shardings, and `jit(init, out_shardings=...)` builds each shard
on the device that holds it. With JAX's partitionable threefry the values equal an unsharded init.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Optional

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.sharding.expert_parallel import ExpertParallel, apply_expert_parallel
from moe_jax.sharding.rules import batch_spec, tree_shardings
from moe_jax.train.state import init_state, split_model


def host_rows(sharding: NamedSharding, global_shape: tuple[int, ...]) -> slice:
    """The rows of a `[B, ...]` global batch whose shards this process's devices hold (one contiguous
    range: the mesh puts a process's devices next to each other), i.e. what this host must load."""
    starts, stops = [], []
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        rows = index[0]
        starts.append(rows.start or 0)
        stops.append(global_shape[0] if rows.stop is None else rows.stop)
    lo, hi = min(starts), max(stops)
    covered = np.zeros(hi - lo, bool)
    for a, b in zip(starts, stops):
        covered[a - lo:b - lo] = True
    if not covered.all():
        raise ValueError(f"process {jax.process_index()} holds batch rows that are not contiguous "
                         f"({sorted(zip(starts, stops))}); order the mesh so each host's devices are adjacent.")
    return slice(lo, hi)


@dataclasses.dataclass(frozen=True)
class Placement:
    """Shardings of a sharded run: the train state, the token batch, and replicated values (metrics, keys);
    and `plan`, how its MoE layers run on the mesh (None: plain layers, GSPMD partitions them)."""

    mesh: Mesh
    state: Any  # a pytree of NamedSharding, the structure of TrainState
    batch: NamedSharding
    plan: Optional[ExpertParallel] = None

    def expert_parallel(self, model: nnx.Module) -> nnx.Module:
        """`model` with its MoE layers run through `plan` (`apply_expert_parallel`: wrappers swapped in)."""
        return model if self.plan is None else apply_expert_parallel(model, self.plan)

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    def put_batch(self, rows: np.ndarray, global_batch: Optional[int] = None) -> jax.Array:
        """A global `[B, ...]` token array from this process's rows (`host_rows`); in a single process
        `rows` is the whole batch. `global_batch`: B (default: rows x processes)."""
        rows = np.asarray(rows)
        if jax.process_count() == 1:
            return jax.device_put(rows, self.batch)
        B = rows.shape[0] * jax.process_count() if global_batch is None else global_batch
        return jax.make_array_from_process_local_data(self.batch, rows, (B,) + rows.shape[1:])

    def rows_of(self, global_shape: tuple[int, ...]) -> slice:
        return host_rows(self.batch, global_shape)


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
