"""Runs that survive what pods do to them: SIGTERM (preemption), SIGKILL at seeded moments (one inside a
checkpoint write), corrupt checkpoints, and resumed metrics that equal an uninterrupted run's.

The subprocess tests run `python -m experiments.train` on a tiny config through a small wrapper that can
SIGKILL the process before a given batch or inside orbax's commit of a given checkpoint step, or stop before
a batch until the test has sent it SIGTERM; they share one persistent compilation cache, so only the first
run compiles.
"""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx

from moe_jax.train.checkpoint import Checkpoints, model_differences
from moe_jax.train.metrics import read_jsonl

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 12

CONFIG = textwrap.dedent('''
    from configs import base

    def get_config(arg=None):
        model = base.tiny_model(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                                max_seq_len=64)
        return base.make("faults", model, data=dict(corpus="synthetic", seq_len=32, batch_size=4, data_dir={data_dir!r}),
                         train=dict(steps={steps}, learning_rate=1e-2, warmup_steps=2, log_every=3, eval_every=6,
                                    eval_batches=1, checkpoint_every=4, sample_tokens=0, progress=False),
                         health=dict(ledger_batches=0, pictures=False))
''')

# Runs experiments.train with faults from $FAULTS (JSON): kill_before_batch / term_before_batch (batch index =
# the step about to run) and kill_in_save (the step whose checkpoint commit is killed, after its files are written).
WRAPPER = textwrap.dedent('''
    import asyncio, json, os, runpy, signal, sys, time
    plan = json.loads(os.environ["FAULTS"])
    from moe_jax.train import distributed, preemption
    real_batch = distributed.train_batch

    def train_batch(data, step, placement):
        if plan.get("kill_before_batch") == step:
            os.kill(os.getpid(), signal.SIGKILL)
        if plan.get("term_before_batch") == step:
            open(plan["marker"], "w").close()  # the test now sends SIGTERM
            deadline = time.time() + 120
            while not preemption._requested.is_set() and time.time() < deadline:
                time.sleep(0.01)
        return real_batch(data, step, placement)

    distributed.train_batch = train_batch
    if "kill_in_save" in plan:
        from orbax.checkpoint._src.path import atomicity
        real_finalize = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self):
            if self.get_final().name == str(plan["kill_in_save"]):
                os.kill(os.getpid(), signal.SIGKILL)
            return await real_finalize(self)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    sys.argv = ["experiments.train"] + sys.argv[1:]
    runpy.run_module("experiments.train", run_name="__main__", alter_sys=True)
''')

TIMING = ("tokens_per_s", "model_flops_per_s")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("resilience")
    config = root / "faults.py"
    config.write_text(CONFIG.format(data_dir=str(root / "data"), steps=STEPS))
    # The XLA flags and matmul precision of this process, so the subprocesses' numbers equal the in-process
    # reference run's bit for bit.
    environ = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS=os.environ.get("XLA_FLAGS", ""),
                   JAX_DEFAULT_MATMUL_PRECISION=str(jax.config.jax_default_matmul_precision),
                   JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    environ.pop("MOE_JAX_DEBUG", None)
    return root, str(config), environ


def start(env, workdir, faults=None):
    root, config, environ = env
    return subprocess.Popen([sys.executable, "-c", WRAPPER, f"--config={config}", f"--workdir={workdir}"],
                            cwd=REPO, env=dict(environ, FAULTS=json.dumps(faults or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def train(env, workdir, faults=None):
    return finish(start(env, workdir, faults))


def metrics(workdir):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_jsonl(os.path.join(workdir, "metrics.jsonl"))]


def summary(workdir):
    with open(os.path.join(workdir, "summary.json")) as f:
        s = json.load(f)
    return {k: v for k, v in s.items() if k not in ("tokens_per_s_median", "plot")}


def final_params(workdir):
    from moe_jax.train.restore import load_run

    loaded = load_run(str(workdir))
    assert loaded.step == STEPS
    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(loaded.model))]


def test_preempted_and_killed_runs_resume_to_the_uninterrupted_result(env):
    """SIGTERM, then SIGKILL at seeded moments (one inside a checkpoint commit), each followed by the same
    command: the metrics (no step twice, windows of log_every steps), the summary and the final parameters
    equal an uninterrupted run's bit for bit."""
    root, config, _ = env
    reference = root / "reference"
    namespace = {}
    exec(open(config).read(), namespace)
    from moe_jax.train.loop import train as train_in_process
    from moe_jax.train.run_config import build_run_config

    train_in_process(build_run_config(namespace["get_config"]()), str(reference), log=lambda *_: None)

    workdir, checkpoints = root / "run", root / "run" / "checkpoints"
    # 1. SIGTERM from this test while the run waits before batch 4: it finishes step 5, checkpoints it, exits 75.
    marker = root / "before_batch_4"
    proc = start(env, workdir, {"term_before_batch": 4, "marker": str(marker)})
    deadline = time.time() + 240
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, finish(proc)
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    code, out, err = finish(proc)
    assert code == 75, out[-2000:] + err[-3000:]  # moe_jax.cli.PREEMPTED
    assert "preempted (SIGTERM) at step 5" in out
    with open(workdir / "summary.json") as f:
        preempted = json.load(f)
    assert preempted["preempted"] is True and preempted["steps"] == 5
    assert sorted(int(s) for s in os.listdir(checkpoints) if s.isdigit()) == [4, 5]
    assert max(r["step"] for r in metrics(workdir)) == 3  # steps 4 and 5 wait in the checkpoint for window 4-6

    # 2. SIGKILL at seeded moments. Checkpoints (every 4 steps) are written in the background: a kill soon
    # after a save may find it uncommitted, and the next attempt resumes from the step before.
    rng = random.Random(1234)
    for faults in ({"kill_in_save": 8},  # step 8's files are written, their commit (a rename) is killed
                   {"kill_before_batch": rng.choice([6, 7, 9, 10, 11])}):  # before or after step 8's checkpoint
        code, out, err = train(env, workdir, faults)
        assert code == -signal.SIGKILL, (faults, out[-2000:] + err[-3000:])
        assert "resumed from step" in out, (faults, out[-2000:])
        if "kill_in_save" in faults:
            assert "8" not in os.listdir(checkpoints)
            assert any(name.startswith("8.orbax-checkpoint-tmp") for name in os.listdir(checkpoints))

    # 3. The same command once more finishes the run.
    code, out, err = train(env, workdir)
    assert code == 0, out[-2000:] + err[-3000:]
    assert "resumed from step" in out
    assert not [name for name in os.listdir(checkpoints) if "tmp" in name]  # the partial write was removed
    rows = metrics(workdir)
    keys = [(r["split"], r["step"]) for r in rows]
    assert len(keys) == len(set(keys)), f"duplicated steps: {keys}"
    assert rows == metrics(reference)
    assert summary(workdir) == summary(reference)
    for a, b in zip(final_params(workdir), final_params(reference), strict=True):
        np.testing.assert_array_equal(a, b)


AGREE = textwrap.dedent('''
    import sys, time
    import jax
    address, pid, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    jax.distributed.initialize(coordinator_address=address, num_processes=2, process_id=pid)
    from moe_jax.train.preemption import Preemption
    with Preemption() as preemption:
        assert preemption.uses_jax_service
        for step in range(1, 3000):
            if step == 20 and pid == 1:
                open(marker, "w").close()
            time.sleep(0.01 * (1 + pid))  # the hosts step at different speeds
            if preemption.reached(step):
                print("stop at", step, flush=True)
                break
''')


def test_hosts_agree_on_the_preemption_step(tmp_path):
    """SIGTERM to one of two jax.distributed processes: both stop after the same step (JAX's preemption sync
    point), as the training loop needs to write one checkpoint together."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    marker = tmp_path / "host1_at_step_20"
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    procs = [subprocess.Popen([sys.executable, "-c", AGREE, f"127.0.0.1:{port}", str(i), str(marker)], cwd=REPO,
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    deadline = time.time() + 120
    while not marker.exists():
        assert all(p.poll() is None for p in procs) and time.time() < deadline, [finish(p) for p in procs]
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)  # one host is preempted
    results = [finish(p, timeout=120) for p in procs]
    assert [code for code, _, _ in results] == [0, 0], results
    stops = [out.strip() for _, out, _ in results]
    assert stops[0] == stops[1] and stops[0].startswith("stop at "), results
    assert int(stops[0].split()[-1]) > 20


# ---- in-process: corrupt checkpoints, the model record ----

def test_unreadable_checkpoint_is_moved_aside_and_the_one_before_restored(tmp_path):
    state = {"w": jax.numpy.arange(1000.0), "b": {"v": jax.numpy.ones((30, 4))}}
    ckpt = Checkpoints(str(tmp_path), keep=3, async_save=True)
    for step in (4, 8, 12):
        ckpt.save(step, jax.tree.map(lambda x: x * step, state), {"step": step, "model": {"d_model": 32}})
    ckpt.close()
    os.remove(tmp_path / "checkpoints" / "12" / "state" / "manifest.ocdbt")  # a missing file
    os.truncate(tmp_path / "checkpoints" / "8" / "meta" / "metadata", 3)  # a truncated one
    logs = []
    ckpt = Checkpoints(str(tmp_path), keep=3, log=logs.append)
    step, restored, meta = ckpt.restore_latest(state, expect_model={"d_model": 32})
    assert step == 4 and meta["step"] == 4
    np.testing.assert_array_equal(restored["w"], np.arange(1000.0) * 4)
    assert [line.split("WARNING: checkpoint ")[1].split(" ")[0] for line in logs] == [
        str(tmp_path / "checkpoints" / "12"), str(tmp_path / "checkpoints" / "8")]
    assert sorted(ckpt.manager.all_steps()) == [4] and len(os.listdir(tmp_path / "corrupt_checkpoints")) == 2
    ckpt.save(8, state, {"step": 8})  # the step can be written again
    ckpt.close()

    shutil.rmtree(tmp_path / "checkpoints" / "4" / "state")
    os.remove(tmp_path / "checkpoints" / "8" / "meta" / "metadata")
    with pytest.raises(ValueError, match=r"No readable checkpoint .*step 8 .*step 4 .*keep_checkpoints >= 2"):
        Checkpoints(str(tmp_path), keep=3, log=lambda *_: None).restore_latest(state)


def test_model_record_ignores_fields_the_saved_record_lacks(tmp_path):
    old = {"d_model": 32, "moe": {"num_experts": 4, "capacity_factor": 1.25}}  # written before "new_field"
    new = {"d_model": 32, "new_field": "default", "moe": {"num_experts": 4, "capacity_factor": 1.25, "extra": 1}}
    assert model_differences(old, new) == []
    assert model_differences(old, dict(new, d_model=64)) == ["d_model"]
    assert model_differences(old, dict(new, moe=None)) == ["moe.capacity_factor", "moe.num_experts"]
    assert model_differences(dict(old, gone=1), new) == ["gone"]  # a field the library dropped still counts

    state = {"w": jax.numpy.ones(3)}
    ckpt = Checkpoints(str(tmp_path), keep=2)
    ckpt.save(1, state, {"step": 1, "model": old})
    np.testing.assert_array_equal(ckpt.restore(1, state, expect_model=new)["w"], np.ones(3))
    with pytest.raises(ValueError, match=r"config.model fields \['moe.num_experts'\] differ"):
        ckpt.restore(1, state, expect_model=dict(new, moe=dict(new["moe"], num_experts=8)))
    ckpt.close()


def test_a_sigterm_that_stopped_a_run_is_forgotten_and_a_late_one_is_kept():
    from moe_jax.train import preemption

    with preemption.Preemption(log=lambda *_: None) as p:
        assert not p.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # caught by the handler: the flag, not the default action
        time.sleep(0.01)
        assert p.reached(2) and p.reached(3)
    with preemption.Preemption(log=lambda *_: None) as p:  # the next run in this process runs normally
        assert not p.reached(1)
        os.kill(os.getpid(), signal.SIGTERM)  # after its last check: not acted on
        time.sleep(0.01)
    with preemption.Preemption(log=lambda *_: None) as p:  # kept for the next run, which stops at once
        assert p.reached(1)
    with preemption.Preemption(log=lambda *_: None) as p:
        assert not p.reached(1)
