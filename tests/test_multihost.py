"""Multi-host training through jax.distributed: two processes with 4 CPU devices each on localhost (gloo
collectives) run the same train command with an expert axis of 8 that spans both; their losses equal a
single-process run on 8 devices."""
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np

from moe_jax.data import make_lm_data
from moe_jax.train import loop as loop_lib
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.run_config import build_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3

CONFIG = textwrap.dedent('''
    from configs import base

    def get_config(arg=None):
        model = base.tiny_model(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=8,
                                max_seq_len=64, capacity_factor=1.0, min_capacity=1, router_init_scale=3.0)
        config = base.make("multihost", model,
                           data=dict(corpus="synthetic", seq_len=16, batch_size=8, data_dir={data_dir!r}),
                           train=dict(steps={steps}, learning_rate=1e-2, warmup_steps=1, log_every=1, eval_batches=1,
                                      eval_every={steps}, checkpoint_every={steps}, sample_tokens=0, progress=False),
                           health=dict(ledger_batches=0, pictures=False))
        config.mesh.expert = 8
        config.mesh.num_processes = {num_processes}
        config.mesh.coordinator_address = {address!r}
        return config
''')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path, data_dir, num_processes, address=None) -> str:
    with open(path, "w") as f:
        f.write(CONFIG.format(data_dir=str(data_dir), steps=STEPS, num_processes=num_processes, address=address))
    return str(path)


def load_config(path):
    namespace = {}
    sys.path.insert(0, REPO)
    exec(open(path).read(), namespace)
    return build_run_config(namespace["get_config"]())


def train_rows(workdir, split="train"):
    return {r["step"]: r for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")) if r["split"] == split}


def test_two_processes_with_an_expert_axis_across_them_match_one_process(eight_devices, tmp_path):
    data_dir = tmp_path / "data"
    address = f"127.0.0.1:{free_port()}"
    multi_cfg = write_config(tmp_path / "multi.py", data_dir, 2, address)
    make_lm_data(load_config(multi_cfg).data)  # build the corpus once, before two processes would race for it

    # 4 devices per process; the backend optimisation level of this process (conftest: off), as the reference's
    opt = [f for f in os.environ.get("XLA_FLAGS", "").split() if f.startswith("--xla_backend_optimization_level")]
    env = dict(os.environ, XLA_FLAGS=" ".join(["--xla_force_host_platform_device_count=4", *opt]), JAX_PLATFORMS="cpu",
               JAX_DEFAULT_MATMUL_PRECISION="highest", PYTHONPATH=REPO)
    workdir = tmp_path / "multi"
    procs = [subprocess.Popen(
        [sys.executable, "-m", "experiments.train", f"--config={multi_cfg}", f"--workdir={workdir}"],
        cwd=REPO, env=dict(env, MOE_JAX_PROCESS_ID=str(i)), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]

    # Meanwhile, the reference: one process, the same mesh over its 8 devices.
    single = load_config(write_config(tmp_path / "single.py", data_dir, 1))
    loop_lib.train(single, str(tmp_path / "single"), log=lambda *_: None)

    outputs = []
    for p in procs:
        try:
            out, _ = p.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
        outputs.append(out)
    for i, (p, out) in enumerate(zip(procs, outputs)):
        assert p.returncode == 0, f"process {i} failed:\n{out[-4000:]}"
    assert "2 process(es)" in outputs[0] and "expert=8" in outputs[0], outputs[0][-2000:]

    ref, ref_eval = train_rows(tmp_path / "single"), train_rows(tmp_path / "single", "eval")
    for folder in (workdir, workdir / "process_1"):  # process 1 writes its own (identical) metrics aside
        got, got_eval = train_rows(folder), train_rows(folder, "eval")
        assert sorted(got) == list(range(1, STEPS + 1))
        for step in got:
            for name in ("ce", "loss", "aux_loss", "grad_norm", "moe/0/tokens_per_expert", "moe/0/dropped_fraction"):
                np.testing.assert_allclose(got[step][name], ref[step][name], rtol=1e-5, err_msg=f"{name} {step}")
        np.testing.assert_allclose(got_eval[STEPS]["ce"], ref_eval[STEPS]["ce"], rtol=1e-5)
    assert len({round(r["ce"], 5) for r in ref.values()}) == STEPS  # the losses move: parameters were updated
    assert any(r["moe/0/dropped_fraction"] > 0 for r in ref.values())  # capacity binds: slot order matters
    assert os.path.isdir(workdir / "checkpoints" / str(STEPS))  # saved by both processes together


def test_a_host_reads_only_its_rows_of_the_batch(tmp_path):
    """`train_batch(step, rows=...)`, what each host calls, equals those rows of the whole batch."""
    from moe_jax.data import DataConfig

    data = make_lm_data(DataConfig(corpus="synthetic", seq_len=16, batch_size=8, data_dir=str(tmp_path)))
    packed = make_lm_data(DataConfig(corpus=f"tfds:{data.describe()['tfds_name']}", seq_len=16, batch_size=8,
                                     data_dir=str(tmp_path)))  # records read through TFDS and packed
    for source in (data, packed):
        for step, rows in ((0, slice(0, 4)), (0, slice(4, 8)), (7, slice(2, 5))):
            np.testing.assert_array_equal(source.train_batch(step, rows=rows), source.train_batch(step)[rows])
        assert not np.array_equal(source.train_batch(0, rows=slice(0, 4)), source.train_batch(0, rows=slice(4, 8)))
