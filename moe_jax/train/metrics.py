"""Metric sinks: a JSONL file (everything, vectors included) and TensorBoard event files (scalars; routing
alarms as text, routing pictures as images).

TensorBoard files are written with tensorboardX, so no TensorFlow is needed. Each JSONL line is
`{"step": int, "split": "train"|"eval", <name>: float or [floats]}`.

A resumed run opens the writer at the restored step: the JSONL rows past it (written by the attempt that
was killed after its last checkpoint) are dropped, and TensorBoard is told to hide its events past it
(`purge_step`), so each step appears once in both.
"""
from __future__ import annotations

import json
import os

import numpy as np


def to_python(value):
    a = np.asarray(value)
    return float(a) if a.ndim == 0 else [float(v) for v in a.reshape(-1)]


class MetricWriter:
    def __init__(self, workdir: str, *, tensorboard: bool = True, resume_step: int | None = None):
        """resume_step: the step the run restarts from (0: from scratch); rows and events past it are dropped."""
        os.makedirs(workdir, exist_ok=True)
        self.jsonl_path = os.path.join(workdir, "metrics.jsonl")
        if resume_step is not None:
            truncate_jsonl(self.jsonl_path, resume_step)
        self._jsonl = open(self.jsonl_path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            from tensorboardX import SummaryWriter

            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"), purge_step=purge)

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

    def alarm(self, step: int, record: dict) -> None:
        """One routing alarm (moe_jax.train.health.Alarm.record()): a JSONL row of split "alarm", and in
        TensorBoard the message as text and the metric's value as a scalar under `alarm/<layer>/<metric>`."""
        self._jsonl.write(json.dumps({"step": int(step), "split": "alarm", **record}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:
            self._tb.add_text("alarm", record["message"], step)
            self._tb.add_scalar(f"alarm/{record['layer']}/{record['metric']}", record["value"], step)

    def image(self, tag: str, pixels, step: int) -> None:
        """An image <uint8>[H, W, 3] in TensorBoard (nothing without TensorBoard)."""
        if self._tb is not None:
            self._tb.add_image(tag, pixels, step, dataformats="HWC")

    def close(self) -> None:
        self._jsonl.close()
        if self._tb is not None:
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def truncate_jsonl(path: str, last_step: int) -> None:
    """Keeps the rows of steps <= `last_step` (and drops a line cut short by a kill), atomically."""
    if not os.path.exists(path):
        return
    kept = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                continue
            if int(row.get("step", 0)) <= last_step:
                kept.append(json.dumps(row) + "\n")
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def rows_to_json(rows: list[dict]) -> list[dict]:
    """Per-step metric rows (numpy scalars and vectors) as JSON, exactly: `rows_from_json` gives back the same
    values and dtypes, so a window of steps averaged across a checkpoint equals one averaged without it."""
    return [{k: {"dtype": str(np.asarray(v).dtype), "value": np.asarray(v).tolist()} for k, v in r.items()}
            for r in rows]


def rows_from_json(rows: list[dict]) -> list[dict]:
    return [{k: np.asarray(v["value"], dtype=v["dtype"]) for k, v in r.items()} for r in rows]
