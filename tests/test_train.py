"""The training loop: learning, determinism, exact kill-and-resume, the NaN guard, checkpoint safety."""
import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from configs import base
from moe_jax.train import loop as loop_lib
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.run_config import build_run_config, run_record
from moe_jax.upcycle import UpcycleConfig


def tiny_run(tmp_path, steps=12, **train):
    model = base.tiny_model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                            max_seq_len=64)
    config = base.make(
        "test", model,
        data=dict(corpus="synthetic", seq_len=32, batch_size=4, data_dir=str(tmp_path / "data")),
        train=dict(dict(steps=steps, learning_rate=1e-2, warmup_steps=2, log_every=1, eval_every=steps,
                        eval_batches=1, checkpoint_every=4, sample_tokens=0, progress=False), **train),
        health=dict(ledger_batches=0, pictures=False))  # tests/test_health.py trains with them
    return build_run_config(config)


def losses_by_step(workdir):
    """Last logged train ce per step (a resumed run re-logs the steps after its checkpoint)."""
    out = {}
    for r in read_jsonl(os.path.join(workdir, "metrics.jsonl")):
        if r["split"] == "train":
            out[r["step"]] = r["ce"]
    return out


def tensorboard_restarts(workdir):
    """Steps of the SessionLog.START events in the TensorBoard files, oldest file first: TensorBoard hides the
    earlier files' events from that step on (tensorboardX's purge_step)."""
    import struct

    from tensorboardX.proto import event_pb2

    folder = os.path.join(workdir, "tensorboard")
    steps = []
    for name in sorted(os.listdir(folder), key=lambda n: os.path.getmtime(os.path.join(folder, n))):
        data, i = open(os.path.join(folder, name), "rb").read(), 0
        while i < len(data):  # TFRecord framing: length, crc, payload, crc
            (n,) = struct.unpack("<Q", data[i:i + 8])
            event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
            i += 16 + n
            if event.HasField("session_log") and event.session_log.status == event_pb2.SessionLog.START:
                steps.append(event.step)
    return steps


def test_loss_decreases_and_summary_files(tmp_path):
    run = tiny_run(tmp_path, steps=40, eval_every=40, checkpoint_every=40)
    summary = loop_lib.train(run, str(tmp_path / "w"), log=lambda *_: None)
    ce = losses_by_step(tmp_path / "w")
    first, last = np.mean([ce[s] for s in range(1, 6)]), np.mean([ce[s] for s in range(36, 41)])
    assert last < first - 0.5, (first, last)
    assert summary["steps"] == 40 and np.isfinite(summary["final_eval_ce"])
    for name in ("config.json", "summary.json", "training.png", "metrics.jsonl"):
        assert os.path.exists(tmp_path / "w" / name), name
    assert summary["plot"] == "training.png"  # relative to the workdir: no machine path in the results
    recorded = json.loads((tmp_path / "w" / "config.json").read_text())
    assert recorded == json.loads(json.dumps(run_record(run)))
    assert os.listdir(tmp_path / "w" / "tensorboard")

    # Restore for evaluation: the restored model reproduces the run's final eval loss.
    import jax.numpy as jnp

    from moe_jax.data import make_lm_data
    from moe_jax.train.restore import load_run
    from moe_jax.train.step import cross_entropy

    loaded = load_run(str(tmp_path / "w"))
    assert loaded.step == 40
    (batch,) = list(make_lm_data(loaded.run.data).eval_batches(1))
    batch = jnp.asarray(batch)
    ce = cross_entropy(loaded.model(batch[:, :-1], train=False)[0], batch[:, 1:])
    np.testing.assert_allclose(float(ce), summary["final_eval_ce"], rtol=1e-5)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_run(str(tmp_path / "nowhere"))


def test_run_record_writes_the_home_directory_as_tilde_and_reads_back(tmp_path, monkeypatch):
    from moe_jax.train.restore import load_run_config

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    run = tiny_run(tmp_path / "home")  # data_dir = <home>/data
    record = run_record(run)
    assert record["data"]["data_dir"] == "~/data"
    assert run_record(tiny_run(tmp_path))["data"]["data_dir"] == str(tmp_path / "data")  # outside home: as given
    # an upcycled run's source: a relative path as given (a committed results folder names no machine's path)
    for given, recorded in (("runs/./dense", "runs/dense"), (str(tmp_path / "home" / "dense"), "~/dense"),
                            ("/elsewhere/dense", "/elsewhere/dense")):
        up = dataclasses.replace(run, upcycle=UpcycleConfig(from_workdir=given))
        assert run_record(up)["upcycle"]["from_workdir"] == recorded
    (tmp_path / "w").mkdir()
    (tmp_path / "w" / "config.json").write_text(json.dumps(record))
    loaded = load_run_config(str(tmp_path / "w"))
    assert loaded.data == run.data and loaded.train == run.train and loaded.model == run.model


def test_same_seed_same_losses_and_kill_resume_is_exact(tmp_path, monkeypatch):
    run = tiny_run(tmp_path)
    loop_lib.train(run, str(tmp_path / "a"), log=lambda *_: None)
    uninterrupted = losses_by_step(tmp_path / "a")

    # Kill the third run during step 7 (after the checkpoint at step 4), then rerun the same command.
    from moe_jax import data as data_lib

    real = data_lib.make_lm_data

    class Killed(Exception):
        pass

    def dying_data(cfg):
        data = real(cfg)
        original = data.train_batch

        def train_batch(step):
            if step == 6:
                raise Killed()
            return original(step)

        data.train_batch = train_batch
        return data

    monkeypatch.setattr(loop_lib, "make_lm_data", dying_data)
    with pytest.raises(Killed):
        loop_lib.train(tiny_run(tmp_path), str(tmp_path / "c"), log=lambda *_: None)
    monkeypatch.setattr(loop_lib, "make_lm_data", real)
    first_attempt = losses_by_step(tmp_path / "c")
    assert list(first_attempt) == [1, 2, 3, 4, 5, 6]
    logs = []
    loop_lib.train(tiny_run(tmp_path), str(tmp_path / "c"), log=logs.append)
    assert any("resumed from step 4" in line for line in logs), logs
    # Same seed, same losses (the killed attempt), and the resumed run continues bit-identically; the rows
    # the killed attempt logged past its checkpoint (steps 5, 6) were replaced, not repeated.
    assert first_attempt == {s: uninterrupted[s] for s in range(1, 7)}
    steps = [r["step"] for r in read_jsonl(os.path.join(tmp_path / "c", "metrics.jsonl")) if r["split"] == "train"]
    assert steps == sorted(set(steps)) == list(range(1, 13))
    assert losses_by_step(tmp_path / "c") == uninterrupted
    assert tensorboard_restarts(tmp_path / "c") == [1, 5]  # TensorBoard too: steps 5, 6 of the first attempt hidden


def test_non_finite_steps_are_not_applied(tmp_path, monkeypatch):
    """A NaN batch loss leaves the parameters untouched, is counted, and never reaches a checkpoint."""
    from moe_jax.train import step as step_lib

    real = step_lib.cross_entropy
    calls = {"n": 0}

    def poisoned(logits, targets):
        return real(logits, targets) * jax.numpy.nan

    monkeypatch.setattr(step_lib, "cross_entropy", poisoned)
    with pytest.raises(FloatingPointError, match="non-finite"):
        loop_lib.train(tiny_run(tmp_path, steps=20, checkpoint_every=5), str(tmp_path / "w"), log=lambda *_: None)
    del calls
    rows = [r for r in read_jsonl(os.path.join(tmp_path / "w", "metrics.jsonl")) if r["split"] == "train"]
    assert all(r["applied"] == 0.0 for r in rows)
    assert rows[-1]["skipped_steps"] == rows[-1]["step"]


def test_checkpoint_of_another_model_is_refused(tmp_path):
    loop_lib.train(tiny_run(tmp_path, steps=4), str(tmp_path / "w"), log=lambda *_: None)
    written = (tmp_path / "w" / "config.json").read_text()
    other = base.tiny_model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=8,
                            max_seq_len=64)
    config = base.make("other", other, data=dict(corpus="synthetic", seq_len=32, batch_size=4,
                                                 data_dir=str(tmp_path / "data")),
                       train=dict(steps=8, warmup_steps=2, progress=False, sample_tokens=0, eval_batches=0))
    with pytest.raises(ValueError, match="num_experts"):
        loop_lib.train(build_run_config(config), str(tmp_path / "w"), log=lambda *_: None)
    assert (tmp_path / "w" / "config.json").read_text() == written  # the record still matches the checkpoints


def test_bad_config_fields_are_named(tmp_path):
    config = base.make("bad", base.tiny_model(), data=dict(corpus="synthetic"))
    config.model.num_expert = 3  # typo
    with pytest.raises(ValueError, match=r"config.model.num_expert .*Did you mean num_experts"):
        build_run_config(config)
    config = base.make("bad", base.tiny_model(num_experts_per_token=9), data=dict(corpus="synthetic"))
    with pytest.raises(ValueError, match="num_experts_per_token"):
        build_run_config(config)
    config = base.make("bad", base.tiny_model(), data=dict(corpus="synthetic"), train=dict(warmup_steps=10**6))
    with pytest.raises(ValueError, match="warmup_steps"):
        build_run_config(config)
    config = base.make("bad", base.tiny_model(capacity_factor="big"), data=dict(corpus="synthetic"))
    with pytest.raises(ValueError, match="capacity_factor"):
        build_run_config(config)


def test_train_step_updates_correction_bias_by_the_sign_rule():
    """DeepSeek-V3 aux-loss-free balancing inside the step: b_i += rate * sign(mean load - load_i)."""
    import jax.numpy as jnp
    from flax import nnx

    from moe_jax.train.state import init_state, learning_rate_schedule, make_optimizer
    from moe_jax.train.step import make_train_step
    from moe_jax.transformer import Transformer

    model_dict = base.tiny_model(d_model=32, num_layers=1, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                                 score_fn="sigmoid", use_correction_bias=True, bias_update_rate=0.25,
                                 capacity_factor=None, eval_capacity_factor=None, expert_backend="ragged_dot",
                                 max_seq_len=64)
    run = build_run_config(base.make("b", model_dict, data=dict(corpus="synthetic", seq_len=16, batch_size=2),
                                     train=dict(steps=2, warmup_steps=1)))
    tx = make_optimizer(run.train)
    graphdef, state = init_state(Transformer(run.model, rngs=nnx.Rngs(params=0)), tx)
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train))
    tokens = jnp.arange(2 * 17, dtype=jnp.int32).reshape(2, 17) % 200
    before = np.asarray(jax.tree.leaves(state.rest)[0]).copy()
    state, metrics = step(state, tokens, jax.random.PRNGKey(0))
    after = np.asarray(jax.tree.leaves(state.rest)[0])
    load = np.asarray(metrics["moe/0/tokens_per_expert"])  # dropless: served == routed
    assert load.sum() == 2 * 16 * run.model.moe.top_k  # every choice of the 32 tokens is served
    np.testing.assert_allclose(after - before, 0.25 * np.sign(load.mean() - load))
    assert np.any(after != before)


def test_deepseek_v3_tiny_trains_with_mtp_and_restores_it(tmp_path):
    """The tiny DeepSeek-V3 preset (one MTP module, an MoE block): a short run logs the MTP loss and the MTP
    block's MoE metrics, and its checkpoint brings the MTP parameters back."""
    import importlib

    from moe_jax.train.restore import load_run

    config = importlib.import_module("configs.deepseek_v3").get_config("tiny")
    assert config.model.mtp_depth == 1
    config.model.num_layers = 2
    config.data.update(dict(corpus="synthetic", seq_len=16, batch_size=2, data_dir=str(tmp_path / "data")))
    config.train.update(dict(steps=4, warmup_steps=1, log_every=1, eval_every=4, eval_batches=1,
                             checkpoint_every=4, sample_tokens=0, progress=False, async_checkpointing=False))
    summary = loop_lib.train(build_run_config(config), str(tmp_path / "w"), log=lambda *_: None)
    assert summary["steps"] == 4
    train = [r for r in read_jsonl(os.path.join(tmp_path / "w", "metrics.jsonl")) if r["split"] == "train"]
    assert len(train) == 4 and all(np.isfinite(r["mtp_loss/1"]) for r in train)
    assert all(r["mtp_loss"] == pytest.approx(0.3 * r["mtp_loss/1"], rel=1e-5) for r in train)
    assert "moe/2/tokens_per_expert" in train[-1]  # the MTP block is layer num_layers + 1 - 1 = 2
    loaded = load_run(str(tmp_path / "w"))
    assert loaded.step == 4 and loaded.model.mtp is not None
    proj = np.asarray(loaded.model.mtp.modules[0].w_proj_2DD[...])
    from flax import nnx

    from moe_jax.transformer import Transformer

    fresh = Transformer(loaded.run.model, rngs=nnx.Rngs(params=loaded.run.train.seed))
    assert not np.array_equal(proj, np.asarray(fresh.mtp.modules[0].w_proj_2DD[...]))  # trained, restored


def test_resumes_a_checkpoint_saved_without_optimizer_state(tmp_path):
    """A step-0 checkpoint written with `fresh_optimizer=True` (experiments.convert --from_hf's) holds no AdamW
    moments and is written with orbax's bytes in flight bounded; the loop (orbax's default handler) resumes it
    with the fresh optimizer state it initialised, so a run resumed from the initial parameters saved that way
    has the losses of a run started from scratch."""
    from flax import nnx

    from moe_jax.train.checkpoint import Checkpoints
    from moe_jax.train.state import TrainState, split_model
    from moe_jax.transformer import Transformer

    run = tiny_run(tmp_path, steps=3, eval_batches=0)
    loop_lib.train(run, str(tmp_path / "a"), log=lambda *_: None)
    _, params, rest = split_model(Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed)))
    zero = jax.numpy.zeros((), jax.numpy.int32)
    ckpt = Checkpoints(str(tmp_path / "b"), keep=3, save_concurrent_gb=0.01)  # as the import writes it
    ckpt.save(0, TrainState(step=zero, params=params, opt_state=None, rest=rest, skipped=zero),
              {"step": 0, "model": run_record(run)["model"], "window": []}, fresh_optimizer=True)
    ckpt.close()
    assert not any("opt_state" in f for f in os.listdir(tmp_path / "b" / "checkpoints" / "0" / "state"))
    logs = []
    loop_lib.train(run, str(tmp_path / "b"), log=logs.append)
    assert any("resumed from step 0" in line for line in logs), logs
    assert losses_by_step(tmp_path / "b") == losses_by_step(tmp_path / "a")
