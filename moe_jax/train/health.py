"""Routing health during training: the routing ledger at each evaluation and alarms on the routers' metrics.

    watch = RoutingWatch(run.health, run.model, graphdef, workdir, log=log, start_step=start)
    alarms = watch.at_train(step, rows)                       # at each log step: the training window
    alarms = watch.at_eval(step, state, data, eval_metrics)   # writes ledgers/step_<step>.npz, adds saturation

At every evaluation (train.eval_every) the loop records the routing ledger (moe_jax.ledger) on the first
`health.ledger_batches` evaluation batches (the same tokens every time) and checks, per MoE layer, on the
evaluation metrics (eval capacity factor) and the ledger:
  dead experts          dead_experts / E > max_dead_fraction
  dropped fraction      dropped_fraction > max_dropped_fraction
  load CV               load_cv (std / mean of the routed load) > max_load_cv
  entropy collapse      router_entropy / ln E < min_entropy_fraction (every token's router distribution
                        has collapsed onto one expert)
  saturation            fraction of ledger tokens whose top-k set is unchanged since the previous
                        evaluation < min_saturation (routing churns; OLMoE's router saturation)
  sigmoid score         score_fn='sigmoid': the smallest raw score of a chosen expert < min_sigmoid_score
  bias drift            routers with a correction bias: max |bias - bias at the previous evaluation|
                        > max_bias_drift
The evaluation runs at the eval capacity factor, usually larger than the training one, so drops in training go
unseen there. The training-window alarms watch the train steps' own metrics (training capacity factor, router
noise on), per MoE layer, averaged over the last `train_window` steps; the loop checks them at each log step
(train.log_every) once the window is full and from step `train_start_step` on (a fresh router is unbalanced:
the CPU protocol's runs average load CV up to 1.9 and 20-50 % of choices dropped over their first 100 steps):
  train dropped fraction   mean dropped_fraction > max_train_dropped_fraction
  train load CV            mean load_cv > max_train_load_cv
A resumed run refills the window from its restart (its checkpoint carries the steps of one log window only).
A threshold of None turns its check off. Alarms are checked from step `start_step` on. Each tripped check
is an `Alarm` naming the layer and the metric; the loop prints it, writes it to metrics.jsonl (split
"alarm") and TensorBoard, and with `stop_on_alarm` checkpoints the step and stops the run (summary
`stopped`: the alarms). All of this reads what the steps already return: the train step does not change.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any, Callable, Optional

import numpy as np

from moe_jax import ledger as ledger_lib
from moe_jax import ledger_analysis


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    """The `health` section of a run config: the routing ledger and the alarm thresholds (None = off)."""

    ledger_batches: int = 1  # evaluation batches the ledger records at each evaluation (0 = no ledger)
    pictures: bool = True  # routing.png in the workdir and its TensorBoard image, redrawn at each evaluation
    alarms: bool = True
    start_step: int = 0  # alarms are checked at evaluations from this step on
    max_dead_fraction: Optional[float] = 0.25  # experts that served no token, as a fraction of E
    max_dropped_fraction: Optional[float] = 0.25
    max_load_cv: Optional[float] = 2.0  # one expert taking every top-1 choice of E = 8 gives sqrt(7) = 2.65
    min_entropy_fraction: Optional[float] = 0.05  # mean router entropy / ln E
    min_saturation: Optional[float] = None  # vs the previous evaluation's ledger; early training churns
    min_sigmoid_score: Optional[float] = 1e-3  # score_fn='sigmoid' only
    max_bias_drift: Optional[float] = None  # routers with a correction bias only
    train_window: int = 50  # training steps the training-window alarms average (0 = no training-window alarms)
    train_start_step: int = 200  # no training-window alarm before this step (fresh routers are unbalanced)
    # The CPU protocol's runs (experiments/results/cpu, 32 with MoE metrics) stay at or below 0.28 dropped and load
    # CV 1.08 over every 50-step window after step 200, except capacity factor 0.75 (0.36 dropped: top-1 at
    # cf < 1 drops at least 1 - cf); a collapse onto k of E = 8 experts gives load CV sqrt(E / k - 1) >= 1.73.
    max_train_dropped_fraction: Optional[float] = 0.3  # at the training capacity factor
    max_train_load_cv: Optional[float] = 1.5
    stop_on_alarm: bool = False  # checkpoint and stop the run when an alarm trips

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"config.health.{field}={getattr(self, field)!r} {why}")

        for field in ("ledger_batches", "start_step", "train_window", "train_start_step"):
            if getattr(self, field) < 0:
                bad(field, "must be >= 0.")
        for field in ("max_dead_fraction", "max_dropped_fraction", "min_entropy_fraction", "min_saturation",
                      "max_train_dropped_fraction"):
            value = getattr(self, field)
            if value is not None and not 0 <= value <= 1:
                bad(field, "must be in [0, 1] (a fraction), or None to turn the check off.")
        for field in ("max_load_cv", "min_sigmoid_score", "max_bias_drift", "max_train_load_cv"):
            value = getattr(self, field)
            if value is not None and not value >= 0:
                bad(field, "must be >= 0, or None to turn the check off.")
        if self.min_saturation is not None and self.ledger_batches == 0:
            bad("min_saturation", "needs the ledger: set config.health.ledger_batches >= 1 or min_saturation=None.")


@dataclasses.dataclass(frozen=True)
class Alarm:
    layer: int
    metric: str
    value: float
    threshold: float
    message: str

    def record(self) -> dict:
        return {"layer": self.layer, "metric": self.metric, "value": self.value, "threshold": self.threshold,
                "message": self.message}


def _alarm(layer, metric, value, op, threshold, what) -> Alarm:
    msg = f"layer {layer}: {metric} {value:.4g} {op} {threshold:.4g} ({what})"
    return Alarm(layer=int(layer), metric=metric, value=float(value), threshold=float(threshold), message=msg)


def check(cfg: HealthConfig, *, layers, num_experts: int, score_fn: str, eval_metrics: dict,
          ledger: Optional[ledger_lib.Ledger] = None, previous: Optional[ledger_lib.Ledger] = None,
          has_bias: bool = False) -> list[Alarm]:
    """The alarms tripped at one evaluation. eval_metrics: the loop's evaluation means, keyed
    `moe/<layer>/<metric>`; ledger / previous: this and the previous evaluation's ledgers (None: none)."""
    out = []
    E = num_experts
    for i, layer in enumerate(layers):
        get = lambda name: eval_metrics.get(f"moe/{layer}/{name}")
        dead, dropped, cv, entropy = get("dead_experts"), get("dropped_fraction"), get("load_cv"), get("router_entropy")
        if cfg.max_dead_fraction is not None and dead is not None and float(dead) / E > cfg.max_dead_fraction:
            out.append(_alarm(layer, "dead_experts", float(dead), ">", cfg.max_dead_fraction * E,
                              f"of {E} experts served no token"))
        if cfg.max_dropped_fraction is not None and dropped is not None and float(dropped) > cfg.max_dropped_fraction:
            out.append(_alarm(layer, "dropped_fraction", float(dropped), ">", cfg.max_dropped_fraction,
                              "choices found no room"))
        if cfg.max_load_cv is not None and cv is not None and float(cv) > cfg.max_load_cv:
            out.append(_alarm(layer, "load_cv", float(cv), ">", cfg.max_load_cv, "load is concentrated"))
        if cfg.min_entropy_fraction is not None and entropy is not None and E > 1:
            fraction = float(entropy) / math.log(E)
            if fraction < cfg.min_entropy_fraction:
                out.append(_alarm(layer, "router_entropy_fraction", fraction, "<", cfg.min_entropy_fraction,
                                  "router entropy / ln E: the router distribution collapsed"))
        if ledger is None:
            continue
        m = ledger.position(layer)
        if cfg.min_sigmoid_score is not None and score_fn == "sigmoid":
            low = float(ledger.score[m].min())
            if low < cfg.min_sigmoid_score:
                out.append(_alarm(layer, "min_sigmoid_score", low, "<", cfg.min_sigmoid_score,
                                  "smallest raw score of a chosen expert"))
        if previous is None:
            continue
        if cfg.min_saturation is not None:
            sat = float(ledger_analysis.saturation(previous, ledger)[m])
            if sat < cfg.min_saturation:
                out.append(_alarm(layer, "saturation", sat, "<", cfg.min_saturation,
                                  f"top-k sets unchanged since step {previous.step}"))
        if cfg.max_bias_drift is not None and has_bias:
            drift = float(np.abs(ledger.correction_bias[m] - previous.correction_bias[m]).max())
            if drift > cfg.max_bias_drift:
                out.append(_alarm(layer, "bias_drift", drift, ">", cfg.max_bias_drift,
                                  f"max |correction bias change| since step {previous.step}"))
    return out


def check_train(cfg: HealthConfig, *, layers, window: list[dict]) -> list[Alarm]:
    """The training-window alarms: `window`, the train steps' metrics (one dict per step, keyed
    `moe/<layer>/<metric>`, as the train step returns them), averaged per layer."""
    out = []
    n = len(window)
    for layer in layers:
        def mean(name):
            values = [float(np.asarray(row[f"moe/{layer}/{name}"])) for row in window
                      if f"moe/{layer}/{name}" in row]
            return float(np.mean(values)) if values else None

        dropped, cv = mean("dropped_fraction"), mean("load_cv")
        limit = cfg.max_train_dropped_fraction
        if limit is not None and dropped is not None and dropped > limit:
            out.append(_alarm(layer, "train_dropped_fraction", dropped, ">", limit,
                              f"choices found no room at the training capacity factor, mean of {n} steps"))
        if cfg.max_train_load_cv is not None and cv is not None and cv > cfg.max_train_load_cv:
            out.append(_alarm(layer, "train_load_cv", cv, ">", cfg.max_train_load_cv,
                              f"training load is concentrated, mean of {n} steps"))
    return out


class RoutingWatch:
    """The loop's routing ledger and alarms (see the module docstring). Every process records (the forward
    pass may be sharded); process 0 writes the files."""

    def __init__(self, cfg: HealthConfig, model_cfg, graphdef, workdir: str, *, log: Callable[[str], Any] = print,
                 start_step: int = 0, write: bool = True, placement=None):
        self.cfg, self.workdir, self.log, self.write = cfg, workdir, log, write
        moe = model_cfg.moe
        self.layers = list(model_cfg.moe_layer_indices) if moe is not None else []
        self.num_experts = moe.num_routed_experts if moe is not None else 0
        self.score_fn = moe.score_fn if moe is not None else "softmax"
        self.has_bias = bool(moe is not None and moe.use_correction_bias)
        self.recorder, self.previous = None, None
        why_not = ledger_lib.check_recordable(model_cfg)
        if cfg.ledger_batches and why_not is None:
            self.recorder = ledger_lib.Recorder(graphdef, placement=placement)
            earlier = [(s, p) for s, p in ledger_lib.list_ledgers(workdir) if s <= start_step]
            if earlier:  # a resumed run compares its next ledger with the last one before the restart
                self.previous = ledger_lib.Ledger.load(earlier[-1][1])
        elif cfg.ledger_batches and self.layers:
            log(f"[moe_jax] no routing ledger: {why_not}")
        self.ledger_bytes: list[int] = []
        self.window: collections.deque = collections.deque(maxlen=max(cfg.train_window, 1))
        self.tripped: set = set()  # (layer, metric) of the training-window alarms tripped at the last check

    def at_train(self, step: int, rows: list[dict]) -> list[Alarm]:
        """At a log step: `rows`, the metrics of the train steps since the last one (ending at `step`), join the
        training window; returns the alarms that trip there (none before the window is full or before
        train_start_step). The windows of successive log steps overlap, so an alarm still tripped from the last
        check is not returned again; one that cleared is logged as cleared and returned when it trips anew."""
        cfg = self.cfg
        if not (cfg.alarms and self.layers and cfg.train_window):
            return []
        self.window.extend({k: v for k, v in row.items() if k.startswith("moe/")} for row in rows)
        if len(self.window) < cfg.train_window or step < max(cfg.train_start_step, cfg.start_step):
            return []
        alarms = check_train(cfg, layers=self.layers, window=list(self.window))
        now = {(a.layer, a.metric) for a in alarms}
        for layer, metric in sorted(self.tripped - now):
            self.log(f"[moe_jax] alarm cleared at step {step}: layer {layer}: {metric} (mean of the last "
                     f"{cfg.train_window} steps) back within its threshold")
        new = [a for a in alarms if (a.layer, a.metric) not in self.tripped]
        self.tripped = now
        return new

    def at_eval(self, step: int, state, data, eval_metrics: dict) -> list[Alarm]:
        """Records and writes the ledger, adds `moe/<layer>/saturation` (vs the previous ledger) to
        eval_metrics, and returns the alarms tripped (none before start_step or with alarms off)."""
        ledger = None
        if self.recorder is not None:
            ledger = self.recorder(state.params, state.rest, data.eval_batches(self.cfg.ledger_batches), step=step)
            if self.write:
                self.ledger_bytes.append(ledger.save(ledger_lib.ledger_path(self.workdir, step)))
            if self.previous is not None and self.previous.tokens.shape == ledger.tokens.shape:
                for m, sat in enumerate(ledger_analysis.saturation(self.previous, ledger)):
                    eval_metrics[f"moe/{int(ledger.layers[m])}/saturation"] = float(sat)
            else:
                self.previous = None
        alarms = []
        if self.cfg.alarms and self.layers and step >= self.cfg.start_step:
            alarms = check(self.cfg, layers=self.layers, num_experts=self.num_experts, score_fn=self.score_fn,
                           eval_metrics=eval_metrics, ledger=ledger, previous=self.previous, has_bias=self.has_bias)
        if ledger is not None:
            self.previous = ledger
        return alarms


    def picture(self, writer, step: int, title: str = "") -> Optional[str]:
        """routing.png in the workdir (load heatmap, saturation, co-activation) and the same TensorBoard image."""
        if not self.layers or not self.write or not self.cfg.pictures:
            return None
        from moe_jax.train.metrics import read_jsonl
        from moe_jax.train.routing_plots import render, routing_figure, write_png

        pixels = render(routing_figure(read_jsonl(writer.jsonl_path), self.previous, title))
        path = write_png(pixels, os.path.join(self.workdir, "routing.png"))
        writer.image("routing", pixels, step)
        return path


def format_alarms(step: int, alarms: list[Alarm]) -> str:
    return "\n".join(f"[moe_jax] ALARM at step {step}: {a.message}" for a in alarms)
