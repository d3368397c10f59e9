"""The training loop: build, resume, train with periodic eval and checkpoints, summarise.

    summary = train(run_cfg, workdir)

Files in `workdir`: config.json, checkpoints/ (orbax), metrics.jsonl, tensorboard/, summary.json,
training.png, sample.txt, and for token-choice MoE models ledgers/step_<step>.npz (the routing ledger of each
evaluation, moe_jax.ledger) and routing.png (moe_jax.train.health: routing alarms are checked at evaluations and,
on the training window's metrics, at log steps). With config.train.replay_ledger the steps train on a routing
ledger's tokens with its routing (moe_jax.train.replay). Running the same command again on the same workdir
resumes from the latest checkpoint (or returns at once if the run already finished) and reaches the same
losses as an uninterrupted run: batches and RNG keys are pure functions of (seed, step). Its metrics too: rows past the
checkpoint are dropped, log windows end at multiples of log_every, and a checkpoint carries the metrics of
the window it interrupts. On SIGTERM the loop finishes the step, checkpoints it and returns a summary with
`preempted: True` (moe_jax.train.preemption; experiments.train then exits with code 75).
"""
from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from moe_jax.data import make_lm_data
from moe_jax.flops import train_flops_per_token
from moe_jax.params import count_params
from moe_jax.train import distributed
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.health import RoutingWatch, format_alarms
from moe_jax.train.metrics import MetricWriter, read_jsonl, rows_from_json, rows_to_json
from moe_jax.train.plots import plot_run
from moe_jax.train.preemption import Preemption
from moe_jax.train.replay import load_replay_ledger, replay_batch
from moe_jax.train.run_config import RunConfig, check_machine, run_record
from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_eval_step, make_train_step
from moe_jax.train.upcycle import check_source, has_checkpoint, upcycled_state
from moe_jax.transformer import Transformer

MAX_CONSECUTIVE_SKIPS = 10


def _mean_metrics(rows: list[dict]) -> dict:
    return {k: np.mean([np.asarray(r[k]) for r in rows], axis=0) for k in rows[0]}


def evaluate(eval_step, state, data, num_batches: int, placement=None) -> dict:
    rows = [jax.device_get(eval_step(state, distributed.to_device(b, placement)))
            for b in data.eval_batches(num_batches)]
    out = _mean_metrics(rows)
    out["ppl"] = math.exp(min(float(out["ce"]), 50.0))
    out["bits_per_token"] = float(out["ce"]) / math.log(2)
    return out


def train(run: RunConfig, workdir: str, *, log=print) -> dict:
    distributed.initialize(run.mesh)  # multi-host: before any other JAX call
    workdir = os.path.abspath(os.path.expanduser(workdir))
    checkpoint_dir = workdir  # shared by all processes; each process > 0 writes its metrics to its own folder
    if jax.process_index() > 0:
        workdir, log = os.path.join(workdir, f"process_{jax.process_index()}"), (lambda *_: None)
    os.makedirs(workdir, exist_ok=True)
    cfg, tcfg = run.model, run.train
    check_machine(run)  # the mesh's devices, a prepared dataset: before any data is read
    if run.upcycle is not None and not has_checkpoint(checkpoint_dir):  # the dense source against the model
        check_source(run)
    data = make_lm_data(run.data)
    if data.vocab_size > cfg.vocab_size:
        raise ValueError(f"config.model.vocab_size={cfg.vocab_size} is smaller than the tokenizer's "
                         f"{data.vocab_size} tokens; set config.model.vocab_size >= {data.vocab_size}.")
    counts = count_params(cfg)
    flops_per_token = train_flops_per_token(cfg, counts, run.data.seq_len)
    record = run_record(run)
    log(f"[moe_jax] {run.name}: {counts['total']/1e6:.2f}M params, {counts['active_per_token']/1e6:.2f}M active "
        f"per token; data {data.describe().get('corpus')}; workdir {workdir}")
    if cfg.mtp_depth:
        log(f"[moe_jax] multi-token prediction: {cfg.mtp_depth} module(s), {counts['mtp']/1e6:.2f}M of the params "
            f"(training only), loss weight {cfg.mtp_loss_weight}")

    tx = make_optimizer(tcfg)
    schedule = learning_rate_schedule(tcfg)
    placement = None  # one device; else the mesh's shardings (state created sharded, MoE layers expert-parallel)
    if run.mesh.is_sharded:
        graphdef, state, placement = distributed.init_sharded(run, tx, log=log)
    else:
        model = Transformer(cfg, rngs=nnx.Rngs(params=tcfg.seed))
        graphdef, state = init_state(model, tx)
        del model
    ckpt = Checkpoints(checkpoint_dir, keep=tcfg.keep_checkpoints, async_save=tcfg.async_checkpointing, log=log)
    try:
        window = []  # metrics of the steps since the last logged one (a checkpoint carries them over a restart)
        restored = ckpt.restore_latest(state, expect_model=record["model"])
        if restored is not None:
            latest, state, meta = restored
            window = rows_from_json(meta.get("window", []))
            log(f"[moe_jax] resumed from step {latest} ({ckpt.directory})")
        elif run.upcycle is not None:  # a new upcycled run: dense parameters, fresh router and optimizer
            state = upcycled_state(run, state, log=log)
        # after the checkpoint was checked against this config: a refused resume leaves the record of the run
        # that wrote the checkpoints
        with open(os.path.join(workdir, "config.json"), "w") as f:
            json.dump(record, f, indent=2)
        start = int(state.step)
        replayed = None  # config.train.replay_ledger: train on the ledger's tokens with its routing
        if tcfg.replay_ledger is not None:
            replayed = load_replay_ledger(run)
            log(f"[moe_jax] training on the routing ledger {tcfg.replay_ledger} ({replayed.tokens.shape[0]} "
                f"sequences, step {replayed.step}) with its recorded routing")
        train_step = make_train_step(graphdef, tx, schedule, placement=placement, microbatches=tcfg.microbatches,
                                     replay=replayed is not None)
        eval_step = make_eval_step(graphdef, placement=placement)
        key = jax.random.PRNGKey(tcfg.seed)
        writer = MetricWriter(workdir, resume_step=start)
        watch = RoutingWatch(run.health, cfg, graphdef, workdir, log=log, start_step=start,
                             write=jax.process_index() == 0, placement=placement)
        tokens_per_step = run.data.batch_size * run.data.seq_len

        def save(step):
            rows = jax.device_get(window)
            ckpt.save(step, state, {"step": step, "model": record["model"], "window": rows_to_json(rows)})

        bar = None
        if tcfg.progress and start < tcfg.steps:
            from tqdm.auto import tqdm
            bar = tqdm(total=tcfg.steps, initial=start, desc=run.name, unit="step", dynamic_ncols=True)
        # Windows of log_every steps end at multiples of log_every whether or not the run restarted in between;
        # throughput counts only the steps timed in this process, the first one (compilation) excluded.
        consecutive_skips, last_eval, timed, window_start = 0, None, 0, None
        preempted, stopped = False, None
        step = start
        with Preemption(log) as preemption:
            while step < tcfg.steps:
                if replayed is None:
                    batch = distributed.train_batch(data, step, placement)
                    state, metrics = train_step(state, batch, key)
                else:
                    batch, experts = replay_batch(replayed, step, run.data.batch_size)
                    state, metrics = train_step(state, distributed.to_device(batch, placement), key,
                                                tuple(distributed.to_device(e, placement) for e in experts))
                step += 1
                window.append(metrics)
                if window_start is None:  # the first step includes compilation: keep it out of throughput
                    jax.block_until_ready(state.step)
                    window_start = time.perf_counter()
                else:
                    timed += 1
                alarms = []  # routing alarms of this step: the training window's, then the evaluation's
                if step % tcfg.log_every == 0 or step == tcfg.steps:
                    rows = jax.device_get(window)
                    now = time.perf_counter()
                    m = _mean_metrics(rows)
                    skipped_now = int(len(rows) - np.sum([r["applied"] for r in rows]))
                    consecutive_skips = consecutive_skips + skipped_now if skipped_now == len(rows) else 0
                    if timed:
                        tps = timed * tokens_per_step / max(now - window_start, 1e-9)
                        m["tokens_per_s"] = tps
                        m["model_flops_per_s"] = tps * flops_per_token
                    m["tokens_seen"] = step * tokens_per_step
                    m["skipped_steps"] = float(jax.device_get(state.skipped))
                    writer.write(step, "train", m)
                    if skipped_now:
                        log(f"[moe_jax] step {step}: {skipped_now} step(s) had a non-finite loss or gradient and were "
                            "not applied (parameters kept)")
                    if consecutive_skips >= MAX_CONSECUTIVE_SKIPS:
                        raise FloatingPointError(
                            f"{consecutive_skips} consecutive steps were non-finite; stopping. The last good checkpoint "
                            f"in {ckpt.directory} is intact. Lower config.train.learning_rate or check the data.")
                    if bar is not None:
                        bar.set_postfix(loss=f"{float(m['ce']):.3f}", tok_s=f"{m.get('tokens_per_s', 0):.0f}")
                    alarms = watch.at_train(step, rows)  # the last health.train_window steps' drops and load CV
                    for alarm in alarms:
                        writer.alarm(step, alarm.record())
                    if alarms:
                        log(format_alarms(step, alarms))
                    window, timed, window_start = [], 0, time.perf_counter()
                if bar is not None:
                    bar.update(1)
                if tcfg.eval_batches and (step % tcfg.eval_every == 0 or step == tcfg.steps):
                    last_eval = evaluate(eval_step, state, data, tcfg.eval_batches, placement)
                    eval_alarms = watch.at_eval(step, state, data, last_eval)  # ledger, saturation, alarms
                    writer.write(step, "eval", last_eval)
                    for alarm in eval_alarms:
                        writer.alarm(step, alarm.record())
                    if eval_alarms:
                        log(format_alarms(step, eval_alarms))
                    alarms = alarms + eval_alarms
                    watch.picture(writer, step, title=run.name)
                    window_start = time.perf_counter()
                if alarms and run.health.stop_on_alarm and step < tcfg.steps:
                    save(step)
                    stopped = [a.message for a in alarms]
                    log(f"[moe_jax] stopped by a routing alarm at step {step} (config.health.stop_on_alarm): "
                        f"checkpoint written to {ckpt.directory}.")
                    break
                if step % tcfg.checkpoint_every == 0 or step == tcfg.steps:
                    save(step)
                    window_start = time.perf_counter()
                if step < tcfg.steps and preemption.reached(step):
                    save(step)
                    preempted = True
                    log(f"[moe_jax] preempted (SIGTERM) at step {step} of {tcfg.steps}: checkpoint written to "
                        f"{ckpt.directory}; run the same command again to resume.")
                    break
        if bar is not None:
            bar.close()
    except BaseException:  # an error or a kill signal: let a pending asynchronous save finish first
        ckpt.close()
        raise
    ckpt.close()  # waits for an asynchronous save to reach the disk
    if preempted:
        writer.close()
        return summarise(run, workdir, state, graphdef, data, counts, None, log, preempted=True)
    if stopped:
        writer.close()
        return summarise(run, workdir, state, graphdef, data, counts, last_eval, log, stopped=stopped)
    if last_eval is None and tcfg.eval_batches:
        last_eval = evaluate(eval_step, state, data, tcfg.eval_batches, placement)
    writer.close()
    summary = summarise(run, workdir, state, graphdef, data, counts, last_eval, log)
    return summary


def summarise(run, workdir, state, graphdef, data, counts, last_eval, log, *, preempted: bool = False,
              stopped: list | None = None) -> dict:
    """summary.json (and its text in the log). preempted: the run stopped early on SIGTERM; no final eval, plot
    or sample (the run that finishes it writes them). stopped: the messages of the routing alarms that stopped
    the run (config.health.stop_on_alarm); its checkpoint is written, and its plots."""
    records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
    train_rows = [r for r in records if r["split"] == "train"]
    final = train_rows[-1] if train_rows else {}
    tps = [r["tokens_per_s"] for r in train_rows if "tokens_per_s" in r]
    loads = {k: v for k, v in final.items() if k.endswith("/tokens_per_expert")}
    summary = {
        "name": run.name,
        "steps": int(state.step),
        "tokens_seen": int(state.step) * run.data.batch_size * run.data.seq_len,
        "final_train_ce": final.get("ce"),
        "final_eval_ce": None if last_eval is None else float(last_eval["ce"]),
        "final_eval_bits_per_token": None if last_eval is None else float(last_eval["bits_per_token"]),
        "tokens_per_s_median": float(np.median(tps)) if tps else None,
        "skipped_steps": int(state.skipped),
        "params_total": counts["total"],
        "params_active_per_token": counts["active_per_token"],
        "expert_load_final": loads,
    }
    if preempted:
        summary["preempted"] = True
    if stopped:
        summary["stopped"] = {"reason": "routing alarm (config.health.stop_on_alarm)", "alarms": list(stopped)}
    if os.path.exists(os.path.join(workdir, "routing.png")):
        summary["routing_plot"] = "routing.png"  # relative to the workdir
    if train_rows and not preempted:
        plot_run(records, os.path.join(workdir, "training.png"), title=run.name)
        summary["plot"] = "training.png"  # relative to the workdir
    if run.train.sample_tokens and jax.process_count() == 1 and not preempted and not stopped:  # (multi-host: the prompt is one host's array)
        from moe_jax.sampling import generate

        model = nnx.merge(graphdef, state.params, state.rest)  # plain MoE layers: a batch of 1 fits no mesh
        prompt = data.encode(run.train.sample_prompt)[None, :]
        ids = generate(model, jnp.asarray(prompt), max_new_tokens=run.train.sample_tokens,
                       temperature=run.train.sample_temperature, rng=jax.random.PRNGKey(run.train.seed))
        text = data.decode(np.asarray(ids)[0])
        with open(os.path.join(workdir, "sample.txt"), "w", encoding="utf-8") as f:
            f.write(text)
        summary["sample"] = text
    with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
    log(format_summary(summary))
    return summary


def format_summary(s: dict) -> str:
    lines = [f"== {s['name']}: {s['steps']} steps, {s['tokens_seen']:,} tokens =="]
    if s.get("preempted"):
        lines.append("preempted: a checkpoint holds this step; run the same command again to resume")
    if s.get("stopped"):
        lines.append(f"stopped by a routing alarm at step {s['steps']} (a checkpoint holds it):")
        lines.extend(f"  {m}" for m in s["stopped"]["alarms"])
    lines.append(f"train ce {s['final_train_ce']:.4f} nats/token" if s["final_train_ce"] is not None else "train ce -")
    if s["final_eval_ce"] is not None:
        lines.append(f"eval  ce {s['final_eval_ce']:.4f} nats/token ({s['final_eval_bits_per_token']:.3f} bits/token)")
    if s["tokens_per_s_median"]:
        lines.append(f"throughput {s['tokens_per_s_median']:,.0f} tokens/s (median of logged windows)")
    if s["skipped_steps"]:
        lines.append(f"skipped (non-finite) steps: {s['skipped_steps']}")
    for name, load in s["expert_load_final"].items():
        share = np.asarray(load) / max(sum(load), 1e-9)
        lines.append(f"{name}: " + " ".join(f"{x:.2f}" for x in share))
    if "plot" in s:
        lines.append(f"plot: {s['plot']}")
    if "sample" in s:
        lines.append("sample:\n" + s["sample"])
    return "\n".join(lines)
