"""User errors: one line naming the field or file and the fix, a non-zero exit code, no traceback.

Every validated field of every config section gets one bad value, checked in-process through
`build_run_config` (what `experiments.train` calls); a representative subset goes through the real
command lines in subprocesses (run side by side), with `--debug` / MOE_JAX_DEBUG=1 bringing the traceback back.
"""
import json
import os
import subprocess
import sys

import pytest

from configs import base
from moe_jax import cli
from moe_jax.train.run_config import build_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def config(tmp_path):
    model = base.tiny_model(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4,
                            max_seq_len=64)
    return base.make("bad", model, data=dict(corpus="synthetic", seq_len=32, batch_size=4,
                                             data_dir=str(tmp_path / "data"))).to_dict()


# (section, {field: bad value, ...}, text the one-line message must contain). One bad value per validated field.
CASES = [
    # model: ModelConfig
    ("model", dict(vocab_size=0), "vocab_size"), ("model", dict(d_model=0), "d_model"),
    ("model", dict(num_layers=0), "num_layers"), ("model", dict(num_heads=3), "num_heads"),
    ("model", dict(d_ff=0), "d_ff"), ("model", dict(max_seq_len=0), "max_seq_len"),
    ("model", dict(num_kv_heads=3), "num_kv_heads"), ("model", dict(head_dim=7), "head_dim"),
    ("model", dict(activation="tanh"), "activation"), ("model", dict(norm="batchnorm"), "norm"),
    ("model", dict(norm_eps=0.0), "norm_eps"), ("model", dict(rope_theta=0.0), "rope_theta"),
    ("model", dict(attention="gqa"), "attention"), ("model", dict(q_lora_rank=8), "q_lora_rank"),
    ("model", dict(attention="mla"), "kv_lora_rank"),
    ("model", dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=3), "qk_rope_head_dim"),
    ("model", dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, v_head_dim=0), "v_head_dim"),
    ("model", dict(attention="mla", kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=0), "qk_nope_head_dim"),
    ("model", dict(moe_every=0), "moe_every"), ("model", dict(first_dense_layers=3), "first_dense_layers"),
    ("model", dict(moe_output_norm="yes"), "moe_output_norm"), ("model", dict(tie_embeddings="yes"), "tie_embeddings"),
    ("model", dict(dtype="float8"), "dtype"), ("model", dict(param_dtype="int8"), "param_dtype"),
    # model: the MoE layer's fields (MoEConfig)
    ("model", dict(moe_d_ff=None), "moe_d_ff"), ("model", dict(moe_d_ff=0), "d_ff"),
    ("model", dict(num_experts=0), "num_experts"), ("model", dict(num_experts_per_token=9), "num_experts_per_token"),
    ("model", dict(granularity=3), "granularity"), ("model", dict(router="random"), "router"),
    ("model", dict(score_fn="relu"), "score_fn"), ("model", dict(topk_order="sorted"), "topk_order"),
    ("model", dict(normalize_topk="yes"), "normalize_topk"),
    ("model", dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    ("model", dict(n_expert_groups=3), "n_expert_groups"), ("model", dict(topk_groups=2), "topk_groups"),
    ("model", dict(group_score="mean"), "group_score"),
    ("model", dict(router="hash", use_correction_bias=True), "use_correction_bias"),
    ("model", dict(bias_update_rate=-1.0), "bias_update_rate"), ("model", dict(jitter_eps=1.0), "jitter_eps"),
    ("model", dict(logit_noise_std=-1.0), "logit_noise_std"), ("model", dict(router_init_scale=0.0), "router_init_scale"),
    ("model", dict(soft_slots_per_expert=0), "soft_slots_per_expert"),
    ("model", dict(capacity_factor=0.0), "capacity_factor"), ("model", dict(eval_capacity_factor=-1.0), "eval_capacity_factor"),
    ("model", dict(capacity_factor="big"), "capacity_factor"), ("model", dict(min_capacity=0), "min_capacity"),
    ("model", dict(group_size=0), "group_size"), ("model", dict(grouping="random"), "grouping"),
    ("model", dict(priority="random"), "priority"), ("model", dict(overflow="spill"), "overflow"),
    ("model", dict(overflow_buffer_factor=0.5), "overflow_buffer_factor"),
    ("model", dict(max_reroute_rounds=-1), "max_reroute_rounds"), ("model", dict(dispatch="scatter"), "dispatch"),
    ("model", dict(expert_backend="cuda"), "expert_backend"), ("model", dict(expert_backend="ragged_dot"), "expert_backend"),
    ("model", dict(dropless_block_size=0), "dropless_block_size"), ("model", dict(expert_bias="yes"), "expert_bias"),
    ("model", dict(expert_init_scale=0.0), "expert_init_scale"), ("model", dict(num_shared_experts=-1), "num_shared_experts"),
    ("model", dict(shared_d_ff=0), "shared_d_ff"), ("model", dict(shared_expert_gate=True), "shared_expert_gate"),
    ("model", dict(balance_loss_coef=-1.0), "balance_loss_coef"), ("model", dict(z_loss_coef=-1.0), "z_loss_coef"),
    ("model", dict(balance_loss_scope="global"), "balance_loss_scope"),
    ("model", dict(num_expert=4), "num_expert"),  # a typo
    # data
    ("data", dict(corpus="wikipedia"), "corpus"), ("data", dict(data_dir="relative/dir"), "data_dir"),
    ("data", dict(seq_len=0), "seq_len"), ("data", dict(batch_size=0), "batch_size"), ("data", dict(seed=-1), "seed"),
    ("data", dict(tokenizer="wordpiece"), "tokenizer"), ("data", dict(bpe_vocab_size=100), "bpe_vocab_size"),
    ("data", dict(val_fraction=1.5), "val_fraction"), ("data", dict(download=True), "download"),
    ("data", dict(seqlen=4), "seqlen"),
    # train
    ("train", dict(steps=0), "steps"), ("train", dict(learning_rate=0.0), "learning_rate"),
    ("train", dict(warmup_steps=10**6), "warmup_steps"), ("train", dict(schedule="linear"), "schedule"),
    ("train", dict(end_lr_fraction=2.0), "end_lr_fraction"), ("train", dict(decay_fraction=0.0), "decay_fraction"),
    ("train", dict(weight_decay=-1.0), "weight_decay"), ("train", dict(b1=1.0), "b1"), ("train", dict(b2=-0.1), "b2"),
    ("train", dict(grad_clip=0.0), "grad_clip"), ("train", dict(seed="zero"), "seed"),
    ("train", dict(log_every=0), "log_every"), ("train", dict(eval_every=0), "eval_every"),
    ("train", dict(eval_batches=-1), "eval_batches"), ("train", dict(checkpoint_every=0), "checkpoint_every"),
    ("train", dict(keep_checkpoints=0), "keep_checkpoints"), ("train", dict(async_checkpointing="yes"), "async_checkpointing"),
    ("train", dict(sample_tokens=-1), "sample_tokens"), ("train", dict(sample_prompt=None), "sample_prompt"),
    ("train", dict(sample_temperature=-1.0), "sample_temperature"), ("train", dict(progress="yes"), "progress"),
    ("train", dict(microbatches=0), "microbatches"), ("train", dict(microbatches=3), "microbatches"),
    ("train", dict(stepz=3), "stepz"),
    # mesh
    ("mesh", dict(data=0), "data"), ("mesh", dict(fsdp=-2), "fsdp"), ("mesh", dict(expert="two"), "expert"),
    ("mesh", dict(model=0), "model"), ("mesh", dict(expert=-1, model=-1), "model"),
    ("mesh", dict(balance_stats="local"), "balance_stats"), ("mesh", dict(num_processes=0), "num_processes"),
    ("mesh", dict(process_id=5), "process_id"), ("mesh", dict(num_processes=2, coordinator_address="host"),
                                                  "coordinator_address"),
    ("mesh", dict(dropless_exchange="sparse"), "dropless_exchange"),
    ("mesh", dict(dropless_buffer_factor=0.0), "dropless_buffer_factor"),
    ("mesh", dict(dropless_exchange="ragged"), "dropless_exchange"),  # this CPU has no ragged_all_to_all
    # between sections (checked before any data is read)
    ("model", dict(group_size=100), "group_size"), ("model", dict(grouping="position", group_size=3), "group_size"),
    ("model", dict(max_seq_len=16), "seq_len"), ("model", dict(vocab_size=100), "vocab_size"),
    ("mesh", dict(expert=3), "batch_size"), ("mesh", dict(model=3), "num_heads"), ("mesh", dict(fsdp=4, data=-1), "fsdp"),
]


@pytest.mark.parametrize("section,values,field", CASES, ids=[f"{s}.{'+'.join(v)}" for s, v, _ in CASES])
def test_bad_field_is_named_on_one_line(tmp_path, section, values, field):
    cfg = config(tmp_path)
    cfg[section].update(values)
    with pytest.raises(ValueError) as err:
        build_run_config(cfg, on_this_machine=True)
    line = cli.one_line(str(err.value))
    assert field in line, line


def test_what_this_machine_lacks_is_named(tmp_path, eight_devices):
    cfg = config(tmp_path)
    cfg["mesh"]["expert"] = 2  # a valid layout for 2 devices; this process has 8
    build_run_config(cfg)  # the config itself is fine
    with pytest.raises(ValueError, match=r"config\.mesh: .* = 2 devices, but 8 are available"):
        build_run_config(cfg, on_this_machine=True)
    cfg = config(tmp_path)
    cfg["data"]["corpus"] = "tfds:lm1b"
    build_run_config(cfg)  # e.g. emitting commands for a pod that has the data
    with pytest.raises(FileNotFoundError, match=r"config\.data\.corpus='tfds:lm1b'.*tfds build lm1b"):
        build_run_config(cfg, on_this_machine=True)


# ---- through the command lines ----

def _commands(tmp):
    train = [sys.executable, "-m", "experiments.train", "--config=configs/default.py", f"--workdir={tmp / 'w'}"]
    workdir = tmp / "trained_nothing"  # config.json but no checkpoint yet
    return {
        "typo": (train + ["--config.model.num_expert=4"], "num_expert", "num_experts"),
        "no_config_file": ([sys.executable, "-m", "experiments.train", "--config=configs/nope.py", "--workdir=w"],
                           "configs/nope.py", "configs/default.py"),
        "group_size": (train + ["--config.model.group_size=100"], "config.model.group_size=100", "divide"),
        "mesh": (train + ["--config.mesh.expert=2"], "config.mesh", "2 devices, but 1 are available"),
        "tfds": (train + ["--config.data.corpus=tfds:lm1b", f"--config.data.data_dir={tmp / 'data'}"],
                 "config.data.corpus='tfds:lm1b'", "tfds build lm1b"),
        "sample": ([sys.executable, "-m", "experiments.sample", f"--workdir={workdir}"], "No finished checkpoint",
                   str(workdir)),
        "runner": ([sys.executable, "-m", "experiments.runner", "--scale=smoke", "--bogus"], "--bogus", "--help"),
    }


@pytest.fixture(scope="module")
def command_results(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    run = build_run_config(config(tmp))
    workdir = tmp / "trained_nothing"
    os.makedirs(workdir)
    import dataclasses

    from moe_jax.train.run_config import model_record

    with open(workdir / "config.json", "w") as f:
        json.dump({"name": run.name, "model": model_record(run.model), "data": dataclasses.asdict(run.data),
                   "train": dataclasses.asdict(run.train)}, f)
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    env.pop("MOE_JAX_DEBUG", None)
    commands = _commands(tmp)
    procs = {name: subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True) for name, (argv, _, _) in commands.items()}
    debug = subprocess.Popen(commands["group_size"][0], cwd=REPO, env=dict(env, MOE_JAX_DEBUG="1"),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    results = {name: (p.wait(timeout=300), *p.communicate()) for name, p in procs.items()}
    results["debug"] = (debug.wait(timeout=300), *debug.communicate())
    return commands, results, tmp


@pytest.mark.parametrize("name", list(_commands(__import__("pathlib").Path("/tmp"))))
def test_command_line_error_is_one_line_without_traceback(command_results, name):
    commands, results, tmp = command_results
    code, out, err = results[name]
    _, *expected = commands[name]
    assert code == cli.USER_ERROR, (code, out[-1000:], err[-3000:])
    lines = [line for line in err.splitlines() if line.strip() and "Warning" not in line]
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]
    for text in expected:
        assert text in lines[0], lines[0]
    assert not os.path.exists(tmp / "w"), "nothing is written before the config is checked"


def test_debug_shows_the_traceback(command_results):
    _, results, _ = command_results
    code, out, err = results["debug"]
    assert code != 0 and "Traceback" in err and "config.model.group_size=100" in err


def test_only_this_repositorys_errors_are_one_line_user_errors(tmp_path):
    cfg = config(tmp_path)
    cfg["model"]["num_experts"] = 0
    with pytest.raises(ValueError) as ours:
        build_run_config(cfg)
    with pytest.raises(ValueError) as library:  # e.g. a bug: a library's ValueError keeps its traceback
        json.loads("{")
    assert cli.is_user_error(ours.value) and not cli.is_user_error(library.value)
    assert cli.one_line("flag --config=x.py: Error whilst parsing config file:\n\nTraceback (most recent call last):\n"
                        '  File "x.py", line 3\nValueError: bad arg') == \
        "flag --config=x.py: Error whilst parsing config file: ValueError: bad arg"
