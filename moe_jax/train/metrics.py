"""Metric sinks: a JSONL file (everything, vectors included) and TensorBoard event files (scalars).

TensorBoard files are written with tensorboardX, so no TensorFlow is needed. Each JSONL line is
`{"step": int, "split": "train"|"eval", <name>: float or [floats]}`.
"""
from __future__ import annotations

import json
import os

import numpy as np


def to_python(value):
    a = np.asarray(value)
    return float(a) if a.ndim == 0 else [float(v) for v in a.reshape(-1)]


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True):
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))

    def write(self, step: int, split: str, metrics: dict) -> dict:
        record = {"step": int(step), "split": split}
        record.update({name: to_python(value) for name, value in metrics.items()})
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            for name, value in record.items():
                if name in ("step", "split"):
                    continue
                if isinstance(value, list):
                    for i, v in enumerate(value):
                        self._tb.add_scalar(f"{split}/{name}/{i}", v, step)
                else:
                    self._tb.add_scalar(f"{split}/{name}", value, step)
        return record

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
