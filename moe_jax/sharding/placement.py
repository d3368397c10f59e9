"""Where batches, the train state and replicated values live on the mesh, and which rows each host loads.

    graphdef, state, placement = init_sharded_state(make_model, tx, mesh, plan)  # moe_jax.train.distributed
    train_step = make_train_step(graphdef, tx, schedule, placement=placement)
    batch = placement.put_batch(host_rows_of_the_batch)
    model = placement.expert_parallel(nnx.merge(graphdef, state.params, state.rest))   # what the steps run
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.sharding.expert_parallel import ExpertParallel, apply_expert_parallel


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
