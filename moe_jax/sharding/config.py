"""`ShardingConfig`: the mesh shape, how load-balancing statistics are reduced, and multi-host setup.

A run config's `mesh` section becomes this dataclass at the boundary. Its defaults (every axis 1, one
process) are the single-device run: nothing is sharded and the train loop takes its plain path.

    mesh axes, outermost first     what is split over them
      data    pure data parallelism  the batch
      fsdp    data parallelism with  the batch; and the d_model ("embed") axis of the weights and their
              sharded weights        optimizer state (gathered for use, ZeRO-3 / FSDP)
      expert  expert parallelism     the batch; and the experts (each device holds E / expert of them)
      model   tensor parallelism     heads, the hidden width of FFNs and experts, the vocabulary

Tokens are split over data x fsdp x expert (`batch_shards`) and replicated over `model`.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import Optional

AXES = ("data", "fsdp", "expert", "model")
BATCH_AXES = ("data", "fsdp", "expert")
BALANCE_STATS = ("global", "shard")
DROPLESS_EXCHANGES = ("auto", "ragged", "padded")
PROCESS_ID_ENV = "MOE_JAX_PROCESS_ID"
NUM_PROCESSES_ENV = "MOE_JAX_NUM_PROCESSES"


def _err(field: str, value, fix: str) -> ValueError:
    return ValueError(f"config.mesh.{field}={value!r}: {fix}")


@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    """Mesh axis sizes (one may be -1: every device the others leave), statistics, processes.

    balance_stats: 'global' reduces the load-balancing statistics f_i and P_i over the whole batch,
        across data-parallel shards, so the auxiliary loss equals the single-device one (Qiu et al. 2025,
        "Demons in the detail: ... global-batch load balancing", arXiv 2501.11873); 'shard' computes a
        balance_loss_scope='batch' loss per shard of the batch and averages it (the micro-batch loss of
        most data-parallel codebases). Group and sequence scopes are per group / sequence either way. The
        aux-loss-free bias update always uses the global expert loads: the bias is one replicated vector.
    dropless_exchange: how dropless routing (capacity_factor=None) with expert > 1 sends each device's rows
        to the devices holding their experts (moe_jax/sharding/dropless.py): 'ragged' (`ragged_all_to_all`,
        exactly the routed rows; GPU/TPU only), 'padded' (`all_to_all` of buffers sized for the worst case;
        any backend), 'auto' (padded on CPU, ragged elsewhere). The numerics are the same.
    dropless_buffer_factor: the exchange buffers' rows per peer as a multiple of the balanced share
        T * K / n (None: T * K, the worst case): the padded exchange's send buffers, the ragged one's receive
        buffer; a step that overflows them on any device takes the worst-case exchange instead, so no token
        is dropped either way.
    num_processes: 1 = this process alone. N > 1 = `jax.distributed.initialize` with N processes (one per
        host); -1 = let JAX detect them (Cloud TPU, Slurm, Open MPI). The same command then runs on every
        host: `coordinator_address` (host:port of process 0; None = $JAX_COORDINATOR_ADDRESS or detection)
        and `process_id` (None = $MOE_JAX_PROCESS_ID or detection) can come from the environment.
    """

    data: int = 1
    fsdp: int = 1
    expert: int = 1
    model: int = 1
    balance_stats: str = "global"
    dropless_exchange: str = "auto"
    dropless_buffer_factor: Optional[float] = None
    num_processes: int = 1
    coordinator_address: Optional[str] = None
    process_id: Optional[int] = None

    def __post_init__(self):
        sizes = self.axis_sizes
        for name, size in sizes.items():
            if isinstance(size, bool) or not isinstance(size, int) or not (size >= 1 or size == -1):
                raise _err(name, size, "must be an int >= 1, or -1 for every device the other axes leave.")
        if sum(size == -1 for size in sizes.values()) > 1:
            free = [n for n, s in sizes.items() if s == -1]
            raise _err(free[1], -1, f"only one mesh axis may be -1 (here {free}); give the others sizes.")
        if self.balance_stats not in BALANCE_STATS:
            raise _err("balance_stats", self.balance_stats, f"set it to one of {BALANCE_STATS}.")
        if self.dropless_exchange not in DROPLESS_EXCHANGES:
            raise _err("dropless_exchange", self.dropless_exchange, f"set it to one of {DROPLESS_EXCHANGES}.")
        f = self.dropless_buffer_factor
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not f > 0):
            raise _err("dropless_buffer_factor", f, "must be a number > 0 (a multiple of the balanced share of "
                                                    "rows per peer), or None for the worst case.")
        n = self.num_processes
        if isinstance(n, bool) or not isinstance(n, int) or not (n >= 1 or n == -1):
            raise _err("num_processes", n, "must be 1 (one process), N > 1, or -1 (detected by JAX).")
        if self.process_id is not None and not (self.process_id >= 0 and (n == -1 or self.process_id < n)):
            raise _err("process_id", self.process_id, f"must be in [0, num_processes={n}), or None.")
        if self.coordinator_address is not None and ":" not in self.coordinator_address:
            raise _err("coordinator_address", self.coordinator_address, "must be host:port of process 0.")

    @property
    def axis_sizes(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in AXES}

    @property
    def multi_process(self) -> bool:
        return self.num_processes != 1

    @property
    def is_sharded(self) -> bool:
        """Whether this config asks for anything but one device in one process."""
        return self.multi_process or any(size != 1 for size in self.axis_sizes.values())

    def resolve(self, num_devices: int) -> dict[str, int]:
        """Axis sizes with -1 filled in; raises (naming the fields) unless they multiply to `num_devices`."""
        sizes = self.axis_sizes
        known = math.prod(s for s in sizes.values() if s != -1)
        if -1 in sizes.values():
            free = next(n for n, s in sizes.items() if s == -1)
            if num_devices % known:
                raise _err(free, -1, f"the other axes use {known} devices, which does not divide the "
                                     f"{num_devices} devices available; change their sizes.")
            sizes[free] = num_devices // known
        total = math.prod(sizes.values())
        if total != num_devices:
            shape = " x ".join(f"{n}={s}" for n, s in sizes.items())
            raise ValueError(f"config.mesh: {shape} = {total} devices, but {num_devices} are available; "
                             "make the axis sizes multiply to the device count (or set one of them to -1).")
        return sizes

    def process_args(self) -> dict:
        """Arguments for `jax.distributed.initialize`, the environment filling what the config leaves None."""
        if not self.multi_process:
            return {}
        process_id = self.process_id
        if process_id is None and os.environ.get(PROCESS_ID_ENV):
            process_id = int(os.environ[PROCESS_ID_ENV])
        num_processes = None if self.num_processes == -1 else self.num_processes
        if num_processes is None and os.environ.get(NUM_PROCESSES_ENV):
            num_processes = int(os.environ[NUM_PROCESSES_ENV])
        return {"coordinator_address": self.coordinator_address, "num_processes": num_processes,
                "process_id": process_id}
