"""Preemption: SIGTERM (what Kubernetes, Slurm and Cloud TPU send before they evict a job) stops training
at a step that every host agrees on, so the loop can checkpoint it and exit.

    with Preemption(log) as preemption:
        while ...:
            state = train_step(...); step += 1
            if preemption.reached(step):   # called once per step, with the same step on every host
                save(step); break

One process: a Python SIGTERM handler sets a flag; `reached` is true after the step in progress when the
signal arrived. Several processes (`jax.distributed`): JAX's preemption service catches SIGTERM on whichever
host gets it, tells the others through the coordination service, and
`jax.experimental.multihost_utils.reached_preemption_sync_point(step)` turns true at the same step on every
host (the largest step any host has reached, plus one). Without that service (jax_enable_preemption_service
off) a multi-process run keeps the default SIGTERM action: hosts stopping at different steps would hang.
The handler is installed from the main thread only and put back on exit. A SIGTERM that stopped the run is
then forgotten (a later `train` in the same process, e.g. a notebook's, runs normally); one that arrived after
the last `reached` check is kept, so the next run in the process (the experiments runner's) stops at its
first step with a checkpoint instead of the signal being lost.
"""
from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import jax

_requested = threading.Event()  # set by the SIGTERM handler (signals are process-wide)


def _on_sigterm(signum, frame):
    del signum, frame
    _requested.set()


def _sync_manager_available() -> bool:
    from jax._src import distributed

    return distributed.global_state.client is not None and distributed.global_state.preemption_sync_manager is not None


class Preemption:
    def __init__(self, log: Callable[[str], Any] = print):
        self.log = log
        self._previous = None
        self._stopped = False  # reached() said stop: the request is consumed on exit
        self.multi_host = jax.process_count() > 1
        self.uses_jax_service = self.multi_host and _sync_manager_available()

    def __enter__(self) -> "Preemption":
        if self.multi_host:
            if not self.uses_jax_service:
                self.log("[moe_jax] WARNING: JAX's preemption service is off (jax_enable_preemption_service): "
                         "SIGTERM will end this multi-host run without a checkpoint.")
        elif threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, _on_sigterm)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
        if self._stopped and not self.uses_jax_service:
            _requested.clear()

    def reached(self, step: int) -> bool:
        """Whether to checkpoint `step` and stop (the same answer on every host for the same step)."""
        if self.uses_jax_service:
            from jax.experimental import multihost_utils

            return bool(multihost_utils.reached_preemption_sync_point(step))
        self._stopped = self._stopped or _requested.is_set()
        return self._stopped
