"""Interleaved timing, shared by the benchmarks.

    timings = time_interleaved({"a": run_a, "b": run_b}, rounds=7)
    timings.median("a") / timings.median("b")

Candidates take turns within one process, the order rotating every round, so that a slow phase of
the machine (another process, thermal throttling) falls on all of them alike; the benchmarks report
ratios of figures measured this way, not absolute seconds.
"""
from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Callable, Optional


@dataclasses.dataclass
class Timings:
    """Per candidate: wall-clock and process CPU seconds (all threads) of each timed run; with a reference,
    per round the candidate's time over the mean of the two reference runs around it."""

    wall: dict[str, list[float]]
    cpu: dict[str, list[float]]
    ratios: dict[str, list[float]]
    cpu_ratios: dict[str, list[float]]

    def median(self, name: str) -> float:
        return statistics.median(self.wall[name])


def time_interleaved(runs: dict[str, Callable[[], None]], rounds: int, *, warmup: int = 1,
                     reference: Optional[str] = None) -> Timings:
    """Calls every run once per round: `warmup` untimed rounds (compilation), then `rounds` timed ones.

    runs: name -> a call that blocks until its work is done. Round r calls them in their order
    rotated by r. With `reference` (a name in runs), a timed round is `reference, c1, reference, c2,
    ..., reference` over the other candidates (rotated), and each candidate also records its time over
    the mean of the two reference runs around it (`ratios`, `cpu_ratios`): a ratio from neighbouring
    runs, robust to the machine's speed drifting during the benchmark.
    """
    names = list(runs)
    wall = {name: [] for name in names}
    cpu = {name: [] for name in names}
    ratios = {name: [] for name in names if name != reference}
    cpu_ratios = {name: [] for name in names if name != reference}

    def timed(name: str) -> tuple[float, float]:
        t0, c0 = time.perf_counter(), time.process_time()
        runs[name]()
        w, c = time.perf_counter() - t0, time.process_time() - c0
        wall[name].append(w)
        cpu[name].append(c)
        return w, c

    for _ in range(warmup):
        for name in names:
            runs[name]()
    others = [name for name in names if name != reference]
    for r in range(rounds):
        shift = r % max(len(others), 1)
        order = others[shift:] + others[:shift]
        if reference is None:
            for name in order:
                timed(name)
            continue
        before = timed(reference)
        for name in order:
            w, c = timed(name)
            after = timed(reference)
            ratios[name].append(w / (0.5 * (before[0] + after[0])))
            cpu_ratios[name].append(c / (0.5 * (before[1] + after[1])))
            before = after
    return Timings(wall=wall, cpu=cpu, ratios=ratios, cpu_ratios=cpu_ratios)
