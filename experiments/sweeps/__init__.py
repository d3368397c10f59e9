"""The sweeps, one file per ablation, each a `sweep(scale) -> list[RunSpec]`.

    from experiments import scales, sweeps
    specs = sweeps.specs(["granularity", "capacity"], scales.get("cpu"))
    runs = sweeps.unique_runs(specs)       # name -> RunSpec, each configuration once
"""
from __future__ import annotations

from experiments.spec import RunSpec
from experiments.sweeps import (aux_losses, capacity, first_dense, granularity, learning_rate, model_size, num_experts,
                                rate_check, routers, shared_experts, train_length)

SWEEPS = {m.NAME: m for m in (learning_rate, num_experts, granularity, model_size, shared_experts, capacity, routers,
                              aux_losses, train_length, rate_check, first_dense)}


def parse(names) -> list[str]:
    """'all', a comma-separated string or a list -> sweep names, checked."""
    if isinstance(names, str):
        names = list(SWEEPS) if names == "all" else [n for n in names.split(",") if n]
    unknown = [n for n in names if n not in SWEEPS]
    if unknown or not names:
        raise ValueError(f"--sweeps={','.join(names)!r}: unknown {unknown or 'empty'}; choose from "
                         f"{', '.join(SWEEPS)} or 'all'.")
    return list(names)


def specs(names, scale) -> list[RunSpec]:
    return [spec for name in parse(names) for spec in SWEEPS[name].sweep(scale)]


def unique_runs(all_specs: list[RunSpec]) -> dict[str, RunSpec]:
    """name -> the first spec of that name; two specs of one name must carry the same config."""
    runs: dict[str, RunSpec] = {}
    for spec in all_specs:
        first = runs.setdefault(spec.name, spec)
        if first.fingerprint() != spec.fingerprint():
            raise RuntimeError(f"run name {spec.name!r} ({first.sweep} and {spec.sweep}) names two different "
                               "configs: add the differing field to experiments/spec.py's naming.")
    return runs
