"""experiments.convert: a Hugging Face directory -> a workdir that training and sampling restore -> back."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from flax import nnx

from experiments import convert
from moe_jax.hf import files as hf_files
from moe_jax.train.checkpoint import Checkpoints
from moe_jax.train.restore import load_run, load_run_config
from moe_jax.train.state import init_state, make_optimizer
from moe_jax.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
MIXTRAL = ROOT / "tests" / "fixtures" / "hf_models" / "mixtral"


def test_from_hf_workdir_resumes_samples_and_converts_back(tmp_path):
    workdir, out = tmp_path / "run", tmp_path / "back"
    logs = []
    result = convert.from_hf(str(MIXTRAL), str(workdir), log=logs.append)
    assert "bit-exact" in logs[-1]
    model = result["model"]
    # The run record rebuilds the imported model; hf_config.py is a config file that builds the same run.
    run = load_run_config(str(workdir))
    assert run.model == model.cfg and run.model.moe.capacity_factor is None
    from moe_jax.train.run_config import build_run_config, load_config_file

    config = load_config_file(str(workdir / "hf_config.py"))
    section = convert.model_section(model.cfg)
    assert {k: config.model[k] for k in section} == section and config.model.moe_d_ff == 32
    # This tiny vocabulary (96) cannot train on byte data (a real model's >= 32000 can): said, with the fix.
    with pytest.raises(ValueError, match="vocab_size=96 is smaller than the byte tokenizer"):
        build_run_config(config)
    # Sampling's restore (params only) and training's (the whole TrainState, at step 0) both read it.
    loaded = load_run(str(workdir))
    assert loaded.step == 0 and not convert._params_equal(model, loaded.model)
    _, target = init_state(Transformer(run.model, rngs=nnx.Rngs(params=1)), make_optimizer(run.train))
    ckpt = Checkpoints(str(workdir), keep=3)
    try:
        step, state, meta = ckpt.restore_latest(target, expect_model=json.loads(
            (workdir / "config.json").read_text())["model"])
    finally:
        ckpt.close()
    assert step == 0 and int(state.step) == 0
    np.testing.assert_array_equal(np.asarray(state.params["embed_VD"][...]), np.asarray(model.embed_VD[...]))
    # The tokenizer came along and decodes a greedy continuation.
    assert (workdir / convert.TOKENIZER_DIR / "tokenizer.json").exists()
    text = convert.greedy_text(model, result["tokenizer_dir"], "ROMEO:", 5)
    assert text.startswith("ROMEO:") and len(text) >= len("ROMEO:")
    # Back to Hugging Face: the fixture's tensors, name for name, and its tokenizer.
    convert.to_hf(str(workdir), str(out), log=logs.append)
    src, dst = hf_files.CheckpointReader(str(MIXTRAL)), hf_files.CheckpointReader(str(out))
    assert src.names() == dst.names()
    for name in src.names():
        np.testing.assert_array_equal(src.get(name), dst.get(name), err_msg=name)
    assert (out / "tokenizer.json").read_bytes() == (MIXTRAL / "tokenizer.json").read_bytes()
    with pytest.raises(FileExistsError, match="new --workdir"):
        convert.from_hf(str(MIXTRAL), str(workdir), log=logs.append)


def test_cli_unsupported_architecture_is_one_line(tmp_path):
    d = tmp_path / "gpt2"
    shutil.copytree(MIXTRAL, d)
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    proc = subprocess.run([sys.executable, "-m", "experiments.convert", f"--from_hf={d}", f"--workdir={tmp_path / 'w'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, JAX_PLATFORMS="cpu"))
    assert proc.returncode == 2, proc.stderr
    lines = [l for l in proc.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "model_type='gpt2'" in lines[0] and "config.json" in lines[0], proc.stderr
    assert not (tmp_path / "w").exists()  # nothing written before the check


def test_from_hf_onto_a_mesh(tmp_path, eight_devices):
    """--mesh: the weights are read straight onto 8 CPU devices (expert 2 x fsdp 2 x model 2), the sharded
    checkpoint restores bit-exact (compared on the same shardings), the run record and hf_config.py carry the
    mesh, and sampling's single-device restore reads the same weights."""
    from jax.sharding import PartitionSpec as P

    from moe_jax.train.run_config import load_config_file

    workdir, logs = tmp_path / "run", []
    result = convert.from_hf(str(MIXTRAL), str(workdir), mesh=convert.parse_mesh("expert=2, fsdp=2,model=2"),
                             log=logs.append)
    assert "bit-exact" in logs[-1]
    model = result["model"]
    w = model.blocks[1].ffn.experts.w_out_EFD[...]
    assert w.sharding.spec == P("expert", "model", "fsdp") and len(w.sharding.device_set) == 8
    record = json.loads((workdir / "config.json").read_text())
    sizes = {k: record["mesh"][k] for k in ("data", "fsdp", "expert", "model")}
    assert sizes == dict(data=1, fsdp=2, expert=2, model=2)
    assert record["data"]["batch_size"] % 8 == 0
    config = load_config_file(str(workdir / "hf_config.py"))
    assert (config.mesh.expert, config.mesh.fsdp, config.mesh.model, config.mesh.data) == (2, 2, 2, 1)
    loaded = load_run(str(workdir))
    assert not convert._params_equal(model, loaded.model)
    with pytest.raises(ValueError, match="is not AXIS=SIZE"):
        convert.parse_mesh("expert:2")


def test_dense_llama_converts_and_back(tmp_path):
    """A dense directory (no MoE layer) makes a workdir whose run record rebuilds it, and exports to the same
    tensors."""
    llama = ROOT / "tests" / "fixtures" / "hf_models" / "llama"
    logs = []
    model = convert.from_hf(str(llama), str(tmp_path / "run"), log=logs.append)["model"]
    assert model.cfg.moe is None and "; dense;" in logs[-1]
    assert load_run_config(str(tmp_path / "run")).model == model.cfg
    convert.to_hf(str(tmp_path / "run"), str(tmp_path / "back"), log=logs.append)
    src, dst = hf_files.CheckpointReader(str(llama)), hf_files.CheckpointReader(str(tmp_path / "back"))
    assert src.names() == dst.names()
    for name in src.names():
        np.testing.assert_array_equal(src.get(name), dst.get(name), err_msg=name)


def test_upcycle_cli_from_a_hugging_face_directory(tmp_path):
    """`experiments.upcycle --from_hf=DIR` end to end: a dense Llama directory with the byte tokenizer's 256 ids
    (our export of the llama fixture's weights, vocabulary widened), the config that `experiments.convert` wrote
    for it, MoE fields on the command line: the upcycled workdir's model (4 copies, top-2 renormalised, dropless)
    gives the dense model's logits. (Training resumes an upcycled workdir's step 0: tests/test_upcycle.py.)"""
    import dataclasses

    import jax.numpy as jnp

    from moe_jax.hf import load_hf, save_hf

    fixture, _ = load_hf(str(ROOT / "tests" / "fixtures" / "hf_models" / "llama"), log=lambda *_: None)
    cfg = dataclasses.replace(fixture.cfg, vocab_size=256)
    dense = Transformer(cfg, rngs=nnx.Rngs(params=0))
    source = tmp_path / "llama256"
    save_hf(dense, str(source), family="llama")
    convert.from_hf(str(source), str(tmp_path / "imported"), log=lambda *_: None)
    config = str(tmp_path / "imported" / "hf_config.py")
    flags = ["--config.model.use_moe=True", f"--config.model.moe_d_ff={cfg.d_ff}", "--config.model.num_experts=4",
             "--config.model.num_experts_per_token=2", "--config.model.normalize_topk=True",
             "--config.model.capacity_factor=None", "--config.model.eval_capacity_factor=None",
             "--config.model.expert_backend=blocked", "--config.data.batch_size=2", "--config.data.seq_len=16"]
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    workdir = tmp_path / "upcycled"
    proc = subprocess.run([sys.executable, "-m", "experiments.upcycle", f"--from_hf={source}", f"--config={config}",
                           f"--workdir={workdir}", *flags], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "upcycled run written to" in proc.stdout
    upcycled = load_run(str(workdir)).model
    assert upcycled.cfg.moe is not None and upcycled.cfg.moe.num_experts == 4
    tokens = jnp.arange(32, dtype=jnp.int32).reshape(2, 16) * 7 % 256
    np.testing.assert_allclose(np.asarray(upcycled(tokens, train=False)[0]), np.asarray(dense(tokens, train=False)[0]),
                               atol=1e-5, rtol=1e-5)
