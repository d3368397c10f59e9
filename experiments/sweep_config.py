r"""One run of a sweep as an `experiments.train` config: the commands `experiments.runner --mode=commands` emits.

    python -m experiments.train --config=experiments/sweep_config.py:pod,granularity,p1_E8_K1_G4_seed0 \
        --workdir=gs://bucket/moe_sweeps/pod/runs/p1_E8_K1_G4_seed0

The argument is `<scale>,<sweep>,<run name>`; the run is rebuilt from the sweep's definition in
experiments/sweeps/, so the command stays short and every field can still be overridden with
--config.<section>.<field>=... (e.g. --config.data.data_dir=/mnt/data).
"""
from __future__ import annotations


def get_config(arg=None):
    from experiments import scales, sweeps

    parts = (arg or "").split(",")
    if len(parts) != 3:
        raise ValueError(f"experiments/sweep_config.py:{arg}: the argument must be '<scale>,<sweep>,<run name>', "
                         "e.g. --config=experiments/sweep_config.py:cpu,capacity,s_E8_K1_G1_cf1_seed0.")
    scale, sweep, name = parts
    specs = sweeps.SWEEPS[sweeps.parse([sweep])[0]].sweep(scales.get(scale))
    for spec in specs:
        if spec.name == name:
            return spec.config
    raise ValueError(f"experiments/sweep_config.py: sweep {sweep!r} at scale {scale!r} has no run {name!r}; "
                     f"its runs: {', '.join(s.name for s in specs)}.")
