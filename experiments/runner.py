r"""Run sweeps on this machine (sequential, resumable), or emit one command per run for a scheduler.

    python -m experiments.runner --scale=cpu --sweeps=all --out=experiments/results/cpu
    python -m experiments.runner --scale=smoke --sweeps=granularity,capacity --out=/tmp/smoke
    python -m experiments.runner --scale=pod --sweeps=all --mode=commands --workdir_root=gs://bucket/moe/pod
    python -m experiments.runner --scale=cpu --sweeps=all --out=experiments/results/cpu --mode=report

--mode=run       trains every run of the chosen sweeps once (a configuration two sweeps share is trained
                 once), in sweep order, in this process; a finished run (summary.json at its step count)
                 is skipped and an interrupted one resumes from its checkpoint, so a killed sweep continues
                 where it stopped when the same command is run again. Then --mode=report.
--mode=commands  prints one `python -m experiments.train ...` line per run (workdir <workdir_root>/<name>)
                 and writes them to <out>/commands.sh.
--mode=report    gathers the workdirs into <out>/results.csv and results.json, fits, plots (<out>/*.png)
                 and writes <out>/report.md; missing runs are listed, not invented.
Workdirs: <out>/runs/<run name>. Each holds config.json, metrics.jsonl, summary.json (moe_jax.train.loop)
and runner.json (wall-clock seconds of this runner's attempts).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from experiments import scales, sweeps
from experiments.spec import RunSpec

COMMAND = "python -m experiments.train --config=experiments/sweep_config.py:{scale},{sweep},{name} --workdir={workdir}"


def workdir_of(out: str, name: str) -> str:
    return os.path.join(os.path.abspath(out), "runs", name)


def is_finished(workdir: str, steps: int) -> bool:
    path = os.path.join(workdir, "summary.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        return json.load(f).get("steps") == steps


def commands(specs: list[RunSpec], scale: str, workdir_root: str) -> list[str]:
    runs = sweeps.unique_runs(specs)
    return [COMMAND.format(scale=scale, sweep=spec.sweep, name=name, workdir=f"{workdir_root.rstrip('/')}/{name}")
            for name, spec in runs.items()]


def _record_seconds(workdir: str, seconds: float, skipped: bool) -> None:
    path = os.path.join(workdir, "runner.json")
    record = {"attempts": []}
    if os.path.exists(path):
        with open(path) as f:
            record = json.load(f)
    record["attempts"].append({"seconds": seconds, "finished_before": skipped, "time": time.time()})
    record["seconds"] = sum(a["seconds"] for a in record["attempts"] if not a["finished_before"])
    with open(path, "w") as f:
        json.dump(record, f, indent=2)


def stale_fields(workdir: str, run) -> list[str]:
    """Fields where the run recorded in `workdir/config.json` differs from `run` (empty: same run or none yet).

    A workdir is resumed by name; if the protocol changed since (e.g. the scale's step count), resuming
    would continue another run. data_dir is not compared (results may move between machines)."""
    import dataclasses

    from moe_jax.train.run_config import model_record

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recorded = json.load(f)
    expected = json.loads(json.dumps({"model": model_record(run.model), "data": dataclasses.asdict(run.data),
                                      "train": dataclasses.asdict(run.train)}))
    return [f"{section}.{k}" for section, values in expected.items() for k, v in values.items()
            if k != "data_dir" and recorded.get(section, {}).get(k) != v]


def run_all(specs: list[RunSpec], out: str, *, log=print) -> dict[str, str]:
    """Trains every unique run not yet finished; returns name -> 'done' | 'skipped' | 'failed: <error>'.

    Before anything is trained, every existing workdir is checked against its run's config: a workdir
    left by another version of the protocol raises ValueError naming the run and the fields."""
    from moe_jax.train.loop import train
    from moe_jax.train.run_config import build_run_config

    runs = sweeps.unique_runs(specs)
    stale = {name: fields for name, spec in runs.items()
             if (fields := stale_fields(workdir_of(out, name), build_run_config(spec.config)))}
    if stale:
        listing = "; ".join(f"{name}: {', '.join(fields[:4])}" for name, fields in stale.items())
        raise ValueError(f"{len(stale)} workdir(s) under {os.path.join(out, 'runs')} hold runs of another config "
                         f"({listing}). Delete them or use another --out.")
    status = {}
    start_all = time.perf_counter()
    for i, (name, spec) in enumerate(runs.items(), 1):
        workdir = workdir_of(out, name)
        if is_finished(workdir, spec.steps):
            status[name] = "skipped"
            continue
        start = time.perf_counter()
        try:
            summary = train(build_run_config(spec.config), workdir, log=lambda *_: None)
        except (FloatingPointError, ValueError, RuntimeError) as e:  # record it, go on with the sweep
            status[name] = f"failed: {type(e).__name__}: {e}"
            log(f"[{i}/{len(runs)}] {name}: FAILED {status[name]}")
            continue
        seconds = time.perf_counter() - start
        _record_seconds(workdir, seconds, skipped=False)
        status[name] = "done"
        log(f"[{i}/{len(runs)}] {name}: {seconds:.0f}s, eval ce {summary['final_eval_ce']:.4f} "
            f"(elapsed {(time.perf_counter() - start_all) / 60:.1f} min)")
    return status


def enable_compilation_cache(path: str) -> None:
    """Seeds of one configuration compile to the same program: cache it on disk across runs and restarts."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="experiments.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", required=True, choices=scales.SCALES)
    p.add_argument("--sweeps", default="all", help=f"comma-separated among {', '.join(sweeps.SWEEPS)}, or 'all'")
    p.add_argument("--out", help="results folder (workdirs under <out>/runs); required unless --mode=commands "
                                 "with --workdir_root")
    p.add_argument("--mode", default="run", choices=("run", "commands", "report"))
    p.add_argument("--workdir_root", help="--mode=commands: where the runs' workdirs go (default <out>/runs)")
    p.add_argument("--compilation_cache", default="~/.cache/moe_jax/jax_cache",
                   help="persistent JAX compilation cache for --mode=run ('' = off)")
    args = p.parse_args(argv)
    if not args.out and not (args.mode == "commands" and args.workdir_root):
        p.error("--out is required (or --workdir_root with --mode=commands)")
    return args


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        scale = scales.get(args.scale)
        specs = sweeps.specs(args.sweeps, scale)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.mode == "commands":
        root = args.workdir_root or os.path.join(os.path.abspath(args.out), "runs")
        lines = commands(specs, scale.name, root)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            with open(os.path.join(args.out, "commands.sh"), "w") as f:
                f.write("\n".join(lines) + "\n")
        print("\n".join(lines))
        return 0
    os.makedirs(args.out, exist_ok=True)
    if args.mode == "run":
        from absl import logging

        logging.set_verbosity(logging.WARNING)
        if args.compilation_cache:
            enable_compilation_cache(args.compilation_cache)
        try:
            status = run_all(specs, args.out)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        print(f"{sum(v == 'done' for v in status.values())} trained, "
              f"{sum(v == 'skipped' for v in status.values())} already finished, {len(failed)} failed")
    from experiments import report

    args_list = list(argv if argv is not None else sys.argv[1:])
    command = " ".join(["python -m experiments.runner"] + args_list)
    if args.mode == "report":  # name the command that trains the runs; this one only re-reads them
        run_args, skip = [], False
        for a in args_list:  # drop "--mode=report" or "--mode report"
            if not skip and not a.startswith("--mode"):
                run_args.append(a)
            skip = a == "--mode"
        command = (" ".join(["python -m experiments.runner"] + run_args)
                   + "` (runs), report rewritten by `" + command)
    path = report.write_all(specs, args.out, scale=scale, command=command)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
