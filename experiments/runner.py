r"""Run sweeps on this machine (sequential, resumable), or emit one command per run for a scheduler.

    python -m experiments.runner --scale=cpu --sweeps=all --out=experiments/results/cpu
    python -m experiments.runner --scale=smoke --sweeps=granularity,capacity --out=/tmp/smoke
    python -m experiments.runner --scale=pod --sweeps=all --mode=commands --workdir_root=gs://bucket/moe/pod
    python -m experiments.runner --scale=cpu --sweeps=all --out=experiments/results/cpu --mode=report

--mode=run       trains every run of the chosen sweeps once (a configuration two sweeps share is trained
                 once), in sweep order; a finished run (summary.json at its step count) is skipped and an
                 interrupted one resumes from its last checkpoint, so a killed sweep continues where it
                 stopped when the same command is run again. Then --mode=report.
                 --workers=N trains N runs at a time, each in its own process on one CPU thread (small
                 models run ~1.4x faster in total this way on 2 cores); a lock file in each workdir keeps
                 two workers (or two runner commands) off one run. --max_minutes=M starts no run after M
                 minutes (a chunk of a long protocol: run the same command again for the next chunk).
                 A progress line gives runs done of total, elapsed time and an estimate of what remains.
                 SIGTERM (forwarded to the workers) checkpoints the runs in progress and exits with code 75
                 (moe_jax.cli.PREEMPTED); the same command resumes them.
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
import signal
import subprocess
import sys
import time

from experiments import scales, sweeps
from experiments.spec import RunSpec, workdir_of
from moe_jax import cli

COMMAND = "python -m experiments.train --config=experiments/sweep_config.py:{scale},{sweep},{name} --workdir={workdir}"


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


def _differences(expected, recorded, prefix: str) -> list[str]:
    """Keys present in both with different values (nested dicts compared key by key)."""
    out = []
    for k, v in expected.items():
        if k not in recorded or k == "data_dir":
            continue
        if isinstance(v, dict) and isinstance(recorded[k], dict):
            out += _differences(v, recorded[k], f"{prefix}{k}.")
        elif recorded[k] != v:
            out.append(f"{prefix}{k}")
    return out


def stale_fields(workdir: str, run) -> list[str]:
    """Fields where the run recorded in `workdir/config.json` differs from `run` (empty: same run or none yet).

    A workdir is resumed by name; if the protocol changed since (e.g. the scale's step count), resuming
    would continue another run. Only fields present in both are compared: a field the library added later
    (whose default keeps the old behaviour) does not make a finished run stale. data_dir is not compared
    (results may move between machines)."""
    from moe_jax.train.run_config import run_record

    path = os.path.join(workdir, "config.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        recorded = json.load(f)
    record = json.loads(json.dumps(run_record(run)))  # what the training loop would write for `run`
    expected = {section: record[section] for section in ("model", "data", "train")}
    return _differences(expected, recorded, "")


LOCK = "runner.lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def try_lock(workdir: str) -> bool:
    """Takes `workdir/runner.lock` (atomic create) unless a live process on this host holds it; a lock left by
    a dead process (a killed worker) is taken over."""
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK)
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                with open(path) as f:
                    pid = int(f.read().strip() or 0)
            except (OSError, ValueError):
                pid = 0
            if pid and _alive(pid):
                return False
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def unlock(workdir: str) -> None:
    try:
        os.remove(os.path.join(workdir, LOCK))
    except FileNotFoundError:
        pass


def progress(runs: dict, out: str, start: float, workers: int = 1) -> str:
    """'done/total runs, elapsed, ~remaining': the estimate is the mean seconds per step of the finished runs
    (runner.json) times the steps left (a run in progress counts from its last logged step), over `workers`."""
    done, secs, steps_done, left = 0, 0.0, 0, 0
    for name, spec in runs.items():
        workdir = workdir_of(out, name)
        if is_finished(workdir, spec.steps):
            done += 1
            path = os.path.join(workdir, "runner.json")
            if os.path.exists(path):
                with open(path) as f:
                    secs += json.load(f).get("seconds", 0.0)
                steps_done += spec.steps
        else:
            left += spec.steps - _last_logged_step(workdir)
    elapsed = (time.perf_counter() - start) / 60
    text = f"{done}/{len(runs)} runs done, {elapsed:.1f} min elapsed"
    if steps_done and left:
        text += f", ~{secs / steps_done * left / max(1, workers) / 60:.0f} min left (estimate)"
    return text


def _last_logged_step(workdir: str) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    last = 0
    with open(path) as f:
        for line in f:
            try:
                last = max(last, int(json.loads(line).get("step", 0)))
            except (ValueError, AttributeError):
                continue
    return last


def run_all(specs: list[RunSpec], out: str, *, log=print, deadline: float | None = None) -> dict[str, str]:
    """Trains every unique run not yet finished; returns name -> 'done' | 'skipped' | 'busy' | 'deferred' |
    'preempted' | 'failed: <error>' ('busy': another worker holds it; 'deferred': not started, `deadline`
    (time.time()) passed; 'preempted': SIGTERM stopped it after a checkpoint, and no later run was started).

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
        if deadline is not None and time.time() > deadline:
            status[name] = "deferred"
            continue
        if not try_lock(workdir):
            status[name] = "busy"
            continue
        try:
            if is_finished(workdir, spec.steps):  # finished by another worker since the check above
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
            status[name] = "preempted" if summary.get("preempted") else "done"
        finally:
            unlock(workdir)
        if status[name] == "preempted":
            log(f"[{i}/{len(runs)}] {name}: preempted at step {summary['steps']} (checkpointed; the same command "
                "resumes it)")
            break
        log(f"[{i}/{len(runs)}] {name}: {seconds:.0f}s, eval ce {summary['final_eval_ce']:.4f}; "
            f"{progress(runs, out, start_all)}")
    return status


def run_workers(args, argv: list[str], specs: list[RunSpec], *, poll_seconds: float = 60.0) -> int:
    """Starts `args.workers` copies of this command as worker processes (one CPU thread each) and prints the
    overall progress until they end (SIGTERM is passed on to them); returns their exit codes."""
    runs = sweeps.unique_runs(specs)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_cpu_multi_thread_eigen=false "
                        "intra_op_parallelism_threads=1").strip()
    worker_argv = [a for a in argv if not a.startswith("--workers")] + ["--worker"]
    if args.max_minutes is not None:
        worker_argv.append(f"--deadline={time.time() + 60 * args.max_minutes}")
    start = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-m", "experiments.runner", *worker_argv], env=env)
             for _ in range(args.workers)]
    last = time.perf_counter()

    def forward(signum, frame):  # preemption: every worker checkpoints its run and exits
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    previous = signal.signal(signal.SIGTERM, forward)
    try:
        while any(p.poll() is None for p in procs):
            time.sleep(1.0)
            if time.perf_counter() - last >= poll_seconds:
                last = time.perf_counter()
                print(f"[runner] {progress(runs, args.out, start, args.workers)}", flush=True)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    return [p.returncode for p in procs]


def enable_compilation_cache(path: str) -> None:
    """Seeds of one configuration compile to the same program: cache it on disk across runs and restarts."""
    import jax

    jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.expanduser(path)))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


def parse_args(argv):
    p = cli.ArgumentParser(prog="experiments.runner", description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", required=True, choices=scales.SCALES)
    p.add_argument("--sweeps", default="all", help=f"comma-separated among {', '.join(sweeps.SWEEPS)}, or 'all'")
    p.add_argument("--out", help="results folder (workdirs under <out>/runs); required unless --mode=commands "
                                 "with --workdir_root")
    p.add_argument("--mode", default="run", choices=("run", "commands", "report"))
    p.add_argument("--workdir_root", help="--mode=commands: where the runs' workdirs go (default <out>/runs)")
    p.add_argument("--compilation_cache", default="~/.cache/moe_jax/jax_cache",
                   help="persistent JAX compilation cache for --mode=run ('' = off)")
    p.add_argument("--workers", type=int, default=1,
                   help="--mode=run: runs trained at a time, each in its own process on one CPU thread")
    p.add_argument("--max_minutes", type=float, default=None,
                   help="--mode=run: start no run after this many minutes (the next command continues)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # a process of --workers
    p.add_argument("--deadline", type=float, default=None, help=argparse.SUPPRESS)  # time.time() of --max_minutes
    args = p.parse_args(argv)
    if args.workers < 1:
        p.error(f"--workers={args.workers}: must be >= 1")
    if args.max_minutes is not None and args.max_minutes <= 0:
        p.error(f"--max_minutes={args.max_minutes}: must be > 0")
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
    argv_list = list(argv if argv is not None else sys.argv[1:])
    if args.mode == "run" and args.workers > 1 and not args.worker:
        codes = run_workers(args, argv_list, specs)
        failed_workers = sum(c not in (0, cli.PREEMPTED) for c in codes)
        if cli.PREEMPTED in codes and not failed_workers:
            print("preempted: the workers checkpointed their runs; the same command resumes them", file=sys.stderr)
            return cli.PREEMPTED
        if failed_workers:
            print(f"error: {failed_workers} of {args.workers} workers failed (see their messages above)",
                  file=sys.stderr)
            return 1
    elif args.mode == "run":
        from absl import logging

        logging.set_verbosity(logging.ERROR if args.worker else logging.WARNING)
        if args.compilation_cache:
            enable_compilation_cache(args.compilation_cache)
        deadline = args.deadline
        if deadline is None and args.max_minutes is not None:
            deadline = time.time() + 60 * args.max_minutes
        try:
            status = run_all(specs, args.out, deadline=deadline)
        except ValueError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        failed = {k: v for k, v in status.items() if v.startswith("failed")}
        print(f"{sum(v == 'done' for v in status.values())} trained, "
              f"{sum(v == 'skipped' for v in status.values())} already finished, {len(failed)} failed, "
              f"{sum(v == 'deferred' for v in status.values())} left for the next command")
        if "preempted" in status.values():
            return cli.PREEMPTED
        if args.worker:
            return 0
    from experiments import report

    args_list = [a for a in argv_list if not a.startswith(("--workers", "--max_minutes"))]
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
    sys.exit(cli.run(main))
