"""Gather finished runs into one table: a row per (sweep, run), with losses, parameters, FLOPs, time, drops.

    rows = collect(specs, out)                # list of dicts; a missing run has status 'missing'
    write_table(rows, out)                    # results.csv (scalars) and results.json (curves too)
    groups = aggregate(rows, by=("sweep", "E"))   # mean, std, n over seeds

Row fields (besides the sweep's axes, `size` and `seed`):
  final_eval_ce     eval cross-entropy (nats/token) after the last step, eval capacity factor
  final_train_ce    mean train cross-entropy of the last 3 logged windows
  params_*          total, active per token, and both without embeddings (count_params)
  flops_*           whole-run useful / router / executed / useful_no_router training FLOPs (experiments/flops.py)
  step_seconds      steady-state seconds per step: tokens per step / median logged tokens per second
                    (compilation and evaluation excluded); train_seconds = steps x step_seconds
  dropped_fraction  mean over MoE layers and the logged windows of the second half of training
  load_cv           coefficient of variation over experts of the router's choices (before capacity), same
                    averaging
  experts, top_k    routed experts (E * G; 1 for a dense model) and experts per token (k * G)
  granularity       MoEConfig.granularity (1 for a dense model)
  capacity, effective_cf   train capacity per expert per group, and C * E / (S * k)
JSON rows also carry `train_curve` [[step, ce], ...], `eval_curve` [[step, ce], ...], `drop_curve`
[[step, dropped fraction (mean over MoE layers)], ...], `expert_load` (final per-layer token shares), and
`dropped_by_layer`, `load_cv_by_layer` (second-half means per MoE layer, first MoE layer first) and
`drop_curve_by_layer` [[step, [dropped fraction of each MoE layer]], ...].
"""
from __future__ import annotations

import csv
import functools
import json
import math
import os

import numpy as np

from experiments.flops import run_flops
from experiments.spec import RunSpec, workdir_of
from moe_jax.params import count_params
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.run_config import build_run_config

CURVE_KEYS = ("train_curve", "eval_curve", "drop_curve", "expert_load", "dropped_by_layer", "load_cv_by_layer",
              "drop_curve_by_layer")


@functools.lru_cache(maxsize=None)
def _counts(model_json: str) -> dict:
    from moe_jax.model_config import ModelConfig

    return count_params(ModelConfig.from_dict(json.loads(model_json)))


def _last_per_step(records: list[dict], split: str) -> list[dict]:
    """One record per step (a resumed run logs again the steps after its checkpoint: keep the last)."""
    by_step = {}
    for r in records:
        if r["split"] == split:
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def _layer_mean(row: dict, metric: str) -> float | None:
    values = [v for k, v in row.items() if k.startswith("moe/") and k.endswith("/" + metric)]
    return float(np.mean(values)) if values else None


def _second_half_mean(rows: list[dict], metric: str, steps: int) -> float | None:
    values = [_layer_mean(r, metric) for r in rows if r["step"] > steps / 2]
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def _second_half_by_layer(rows: list[dict], metric: str, steps: int) -> list[float] | None:
    """Per MoE layer (in layer order), the mean of `metric` over the logged windows of the second half."""
    layers = sorted({int(k.split("/")[1]) for r in rows for k in r if k.startswith("moe/") and k.endswith("/" + metric)})
    late = [r for r in rows if r["step"] > steps / 2]
    out = [[r[f"moe/{m}/{metric}"] for r in late if f"moe/{m}/{metric}" in r] for m in layers]
    return [float(np.mean(v)) for v in out] if layers and all(out) else None


def _by_layer_curve(rows: list[dict], metric: str) -> list:
    """[[step, [metric of each MoE layer, in layer order]], ...] over the logged windows that have it."""
    out = []
    for r in rows:
        layers = sorted((int(k.split("/")[1]), v) for k, v in r.items()
                        if k.startswith("moe/") and k.endswith("/" + metric))
        if layers:
            out.append([r["step"], [float(v) for _, v in layers]])
    return out


def run_row(spec: RunSpec, workdir: str) -> dict:
    import dataclasses

    run = build_run_config(spec.config)
    row = {"sweep": spec.sweep, "name": spec.name, **spec.axes, "steps": spec.steps, "workdir": workdir}
    summary_path = os.path.join(workdir, "summary.json")
    if not os.path.exists(summary_path):
        row["status"] = "missing"
        return row
    with open(summary_path) as f:
        summary = json.load(f)
    if summary.get("steps") != spec.steps:
        row["status"] = f"incomplete ({summary.get('steps')} of {spec.steps} steps)"
        return row
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train, evals = _last_per_step(records, "train"), _last_per_step(records, "eval")
    model_json = json.dumps(dataclasses.asdict(run.model), sort_keys=True)
    counts = _counts(model_json)
    embed = counts["embedding"] + counts["unembedding"]
    tokens_per_step = run.data.batch_size * run.data.seq_len
    flops = run_flops(run, counts)
    tps = summary.get("tokens_per_s_median")
    step_seconds = tokens_per_step / tps if tps else None
    row.update(
        status="ok",
        final_eval_ce=summary["final_eval_ce"],
        final_train_ce=float(np.mean([r["ce"] for r in train[-3:]])),
        tokens=spec.steps * tokens_per_step,
        tokens_per_step=tokens_per_step,
        params_total=counts["total"], params_active=counts["active_per_token"],
        params_total_nonemb=counts["total"] - embed, params_active_nonemb=counts["active_per_token"] - embed,
        **{"flops_" + k.replace("_flops", ""): v for k, v in flops["run"].items()},
        flops_useful_per_step=flops["per_step"]["useful_flops"],
        step_seconds=step_seconds,
        train_seconds=None if step_seconds is None else spec.steps * step_seconds,
        dropped_fraction=_second_half_mean(train, "dropped_fraction", spec.steps),
        load_cv=_second_half_mean(train, "load_cv", spec.steps),
        dropped_by_layer=_second_half_by_layer(train, "dropped_fraction", spec.steps),
        load_cv_by_layer=_second_half_by_layer(train, "load_cv", spec.steps),
        drop_curve_by_layer=_by_layer_curve(train, "dropped_fraction"),
        eval_dropped_fraction=_layer_mean(evals[-1], "dropped_fraction") if evals else None,
        train_curve=[[r["step"], r["ce"]] for r in train],
        eval_curve=[[r["step"], r["ce"]] for r in evals],
        drop_curve=[[r["step"], d] for r in train if (d := _layer_mean(r, "dropped_fraction")) is not None],
        expert_load=_final_load(train),
    )
    moe = run.model.moe
    row.update(experts=1 if moe is None else moe.num_routed_experts, top_k=1 if moe is None else moe.top_k,
               granularity=1 if moe is None else moe.granularity)
    if moe is not None:
        S = moe.tokens_per_group(run.data.batch_size, run.data.seq_len)
        C = moe.capacity(S, True)
        k = 1 if moe.router == "expert_choice" else moe.top_k
        row.update(capacity=C, effective_cf=None if C is None else C * moe.num_routed_experts / (S * k))
    runner_path = os.path.join(workdir, "runner.json")
    if os.path.exists(runner_path):
        with open(runner_path) as f:
            row["wall_seconds"] = json.load(f).get("seconds")
    return row


def _final_load(train: list[dict]) -> dict:
    if not train:
        return {}
    out = {}
    for key, load in train[-1].items():
        if key.endswith("/tokens_per_expert"):
            load = np.asarray(load, float)
            out[key.split("/")[1]] = (load / max(load.sum(), 1e-9)).tolist()
    return out


def collect(specs: list[RunSpec], out: str) -> list[dict]:
    return [run_row(spec, workdir_of(out, spec.name)) for spec in specs]


def write_table(rows: list[dict], out: str) -> tuple[str, str]:
    os.makedirs(out, exist_ok=True)
    json_path, csv_path = os.path.join(out, "results.json"), os.path.join(out, "results.csv")
    rel = [dict(r, workdir=os.path.relpath(r["workdir"], out)) for r in rows]
    with open(json_path, "w") as f:
        json.dump(rel, f, indent=1)
    columns = []
    for r in rel:
        columns += [k for k in r if k not in CURVE_KEYS and k not in columns]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rel)
    return csv_path, json_path


def finished(rows: list[dict], sweep: str, **where) -> list[dict]:
    """The rows of `sweep` whose run finished (status ok) and whose fields equal `where`."""
    return [r for r in rows if r["sweep"] == sweep and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in where.items())]


def aggregate(rows: list[dict], by: tuple, value: str = "final_eval_ce") -> list[dict]:
    """Mean, sample std (ddof=1; 0 with one seed) and n of `value` over the finished rows sharing `by`."""
    groups: dict[tuple, list[float]] = {}
    for r in rows:
        if r.get("status") == "ok" and r.get(value) is not None and not math.isnan(r[value]):
            groups.setdefault(tuple(r.get(k) for k in by), []).append(float(r[value]))
    out = []
    for key, values in groups.items():
        v = np.asarray(values)
        out.append({**dict(zip(by, key)), "mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0,
                    "n": len(v)})
    return out


def loss_at(row: dict, per_step: float, x: float, curve: str = "train_curve") -> float:
    """The run's loss where its cumulative `per_step` quantity (FLOPs, seconds, tokens per step) reaches x,
    linearly interpolated between logged points; NaN outside the logged range."""
    pts = np.asarray(row[curve], float)
    if len(pts) == 0:
        return math.nan
    xs = pts[:, 0] * per_step
    if x < xs[0] or x > xs[-1] * (1 + 1e-9):
        return math.nan
    return float(np.interp(x, xs, pts[:, 1]))
