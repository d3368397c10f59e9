r"""Convert Hugging Face MoE checkpoints to moe_jax workdirs and back, and check the result.

    python -m experiments.convert --from_hf=/models/Mixtral-8x7B --workdir=runs/mixtral
    python -m experiments.convert --to_hf=/tmp/mixtral_out --workdir=runs/mixtral      # back (same family)
    python -m experiments.convert --to_hf=/tmp/out --workdir=runs/trained --family=qwen3_moe
    python -m experiments.convert --from_hf=/models/Mixtral-8x7B --workdir=runs/m8 --mesh=expert=4,fsdp=2

--from_hf reads config.json + safetensors (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V2/V3, dense Llama and
Qwen2; moe_jax.hf), each tensor straight onto the --mesh of this machine's devices if one is given, and writes a
workdir like the ones `experiments.train` writes: config.json (the run record), checkpoints/0 (the train state
at step 0: the imported parameters, and no optimizer state: training starts from a fresh one, as
moe_jax.train.checkpoint describes) and, beside them,
  hf_config.py     a config file for the imported model:
                   python -m experiments.train --config=<workdir>/hf_config.py --workdir=<workdir>
                   resumes from the imported weights (fine-tuning);
                   python -m experiments.sample --workdir=<workdir> samples from them. Both read text
                   through the data section's tokenizer (byte / locally trained BPE), not the source's:
                   training with the source tokenizer is not wired into moe_jax.data yet;
  hf_source.json   the source directory, the family and its config.json (for --to_hf);
  hf_tokenizer/    the source's tokenizer files (tokenizer.json, ...), copied; with --prompt the command
                   decodes a greedy continuation through them (Hugging Face `tokenizers`).
The MoE layers come in dropless (capacity_factor=None), as Hugging Face runs them. After writing, the
checkpoint is restored a few tensors at a time and compared with the imported parameters (bit-exact), and
--to_hf re-imports what it wrote and compares it the same way. Errors (an unsupported architecture, a missing shard, a config field
moe_jax cannot honour) are one line naming the file and field (exit code 2; --debug for the traceback).
"""
from __future__ import annotations

import json
import os
import shutil

from absl import flags

from moe_jax import cli

SAVE_CONCURRENT_GB = 0.25  # orbax's bytes in flight to the disk while writing the imported weights

_FROM = flags.DEFINE_string("from_hf", None, "A Hugging Face model directory to import.")
_TO = flags.DEFINE_string("to_hf", None, "A directory to write the workdir's model to, as Hugging Face files.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The moe_jax workdir written (--from_hf) or read (--to_hf).")
_FAMILY = flags.DEFINE_string("family", None, "--to_hf: mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | "
                                              "deepseek_v3 | llama | qwen2 (default: the family the workdir was "
                                              "imported from).")
_BACKEND = flags.DEFINE_string("expert_backend", "ragged_dot", "Dropless expert backend: ragged_dot (accelerators) "
                                                               "| blocked (fastest on CPU) | pallas.")
_MAX_LEN = flags.DEFINE_integer("max_seq_len", None, "Cap ModelConfig.max_seq_len (the decode cache default).")
_PARAM_DTYPE = flags.DEFINE_string("param_dtype", "float32", "float32 | bfloat16.")
_DTYPE = flags.DEFINE_string("dtype", None, "--to_hf: tensor dtype on disk (default: the parameters').")
_PROMPT = flags.DEFINE_string("prompt", None, "--from_hf: a prompt to continue greedily with the source tokenizer.")
_TOKENS = flags.DEFINE_integer("tokens", 20, "Greedy tokens for --prompt.")
_MESH = flags.DEFINE_string("mesh", "", "--from_hf: config.mesh axis sizes of the imported run, e.g. expert=4,fsdp=2: "
                                        "each weight is read straight onto that mesh of this machine's devices.")

TOKENIZER_DIR = "hf_tokenizer"
SOURCE = "hf_source.json"


def restored_differences(workdir: str, model, *, step: int = 0, chunk_bytes: int = 128 * 2 ** 20) -> list:
    """Paths of `model`'s variables whose value in checkpoint `step` of `workdir` differs (bit for bit).

    Restores a few tensors at a time (at most `chunk_bytes`, or one larger tensor), each onto the sharding of
    the array it is compared with, and drops them once compared: the check adds one chunk, not a model."""
    import jax
    import numpy as np
    from flax import nnx

    from moe_jax.train.checkpoint import Checkpoints
    from moe_jax.train.state import split_model

    _, params, rest = split_model(model)
    leaves = [(field, path, v) for field, tree in (("params", params), ("rest", rest))
              for path, v in nnx.to_flat_state(tree)]
    chunks, size = [[]], 0
    for leaf in leaves:
        if chunks[-1] and size + leaf[2].nbytes > chunk_bytes:
            chunks, size = chunks + [[]], 0
        chunks[-1].append(leaf)
        size += leaf[2].nbytes

    def abstract(x):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)

    differ = []
    ckpt = Checkpoints(workdir, keep=1)
    try:
        for chunk in chunks:
            mine = {field: {path: v for f, path, v in chunk if f == field} for field in ("params", "rest")}
            targets = {field: jax.tree.map(abstract, nnx.from_flat_state(list(part.items())))
                       for field, part in mine.items() if part}
            restored = ckpt.restore_fields(step, targets)
            for field, tree in restored.items():
                for path, v in nnx.to_flat_state(tree):
                    if not np.array_equal(np.asarray(v[...]), np.asarray(mine[field][path][...])):
                        differ.append((field,) + tuple(path))
            del restored
    finally:
        ckpt.close()
    return differ


def _params_equal(a, b) -> list:
    """Paths whose values differ between two models (bit for bit)."""
    import numpy as np
    from flax import nnx

    fa, fb = nnx.to_flat_state(nnx.state(a)), dict(nnx.to_flat_state(nnx.state(b)))
    return [p for p, v in fa if p not in fb or not np.array_equal(np.asarray(v[...]), np.asarray(fb[p][...]))]


def model_section(cfg) -> dict:
    """The flattened `config.model` section (moe_jax.train.run_config) that builds `cfg`."""
    import dataclasses

    section = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name != "moe"}
    if cfg.moe is None:
        return dict(section, use_moe=False)
    moe = {f.name: getattr(cfg.moe, f.name) for f in dataclasses.fields(cfg.moe) if f.name not in ("d_model", "d_ff")}
    if moe.get("activation", section["activation"]) != section["activation"]:
        raise ValueError("config.model shares `activation` between dense and MoE layers; this model's differ.")
    return dict(section, **moe, use_moe=True, moe_d_ff=cfg.moe.d_ff)


def parse_mesh(text: str) -> dict:
    """'expert=4,fsdp=2' -> {'expert': 4, 'fsdp': 2} (config.mesh axis sizes)."""
    sizes = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        axis, _, value = item.partition("=")
        try:
            sizes[axis.strip()] = int(value)
        except ValueError:
            raise ValueError(f"--mesh={text!r}: {item!r} is not AXIS=SIZE; write e.g. --mesh=expert=4,fsdp=2 "
                             "(axes data, fsdp, expert, model).") from None
    return sizes


def from_hf(source: str, workdir: str, *, expert_backend: str = "ragged_dot", max_seq_len=None,
            param_dtype: str = "float32", mesh=None, log=print) -> dict:
    """mesh: `config.mesh` fields ({'expert': 4, 'fsdp': 2}) of the imported run; the weights are read straight
    onto that mesh (load_hf(mesh=...)) and the run record and hf_config.py carry it, so training resumes on it."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from moe_jax.hf import load_hf
    from moe_jax.hf.convert import TOKENIZER_FILES
    from moe_jax.data import DataConfig
    from moe_jax.train.checkpoint import Checkpoints
    from moe_jax.train.config import TrainConfig
    from moe_jax.train.run_config import RunConfig, build_run_config, make_config_dict, run_record
    from moe_jax.sharding import ShardingConfig, batch_shards, check_layout, make_mesh
    from moe_jax.train import distributed
    from moe_jax.train.state import TrainState, split_model

    workdir = os.path.abspath(os.path.expanduser(workdir))
    if os.path.isdir(os.path.join(workdir, "checkpoints")) and os.listdir(os.path.join(workdir, "checkpoints")):
        raise FileExistsError(f"{workdir}/checkpoints is not empty: give a new --workdir for the import.")
    mesh = dict(mesh or {})
    sharding = ShardingConfig(**mesh)
    device_mesh = None
    if sharding.is_sharded:
        distributed.initialize(sharding)
        device_mesh = make_mesh(sharding)
    model, info = load_hf(source, expert_backend=expert_backend, max_seq_len=max_seq_len, param_dtype=param_dtype,
                          mesh=device_mesh, log=log)
    cfg = model.cfg
    name = f"hf_{info.family}"
    section = model_section(cfg)
    data = {"seq_len": min(128, cfg.max_seq_len)}
    if sharding.is_sharded:  # a batch the mesh's data x fsdp x expert shards divide
        data["batch_size"] = max(DataConfig().batch_size, batch_shards(dict(device_mesh.shape)))
        check_layout(cfg, data["batch_size"], data["seq_len"], sharding, jax.device_count())
    # Built directly: check_run would refuse a vocabulary under the byte tokenizer's 256 (tiny test models).
    run = RunConfig(model=cfg, data=DataConfig(**data), train=TrainConfig(), name=name, mesh=sharding)
    if cfg.vocab_size >= 256:
        rebuilt = build_run_config(make_config_dict(name, section, data, {}, mesh=mesh)).model
        assert rebuilt == cfg, "the config section does not rebuild the imported ModelConfig"
    os.makedirs(workdir, exist_ok=True)
    record = run_record(run)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump(record, f, indent=2)
    with open(os.path.join(workdir, "hf_config.py"), "w") as f:
        f.write(f'"""The model imported from {os.path.abspath(source)} by experiments.convert ({info.family}).\n\n'
                f"    python -m experiments.train --config={workdir}/hf_config.py --workdir={workdir}\n"
                '"""\nfrom moe_jax.train.run_config import make_config_dict\n\n'
                f"MODEL = {section!r}\nDATA = {data!r}\nMESH = {mesh!r}\n\n\n"
                f"def get_config(arg=None):\n    return make_config_dict({name!r}, MODEL, DATA, {{}}, mesh=MESH)\n")
    with open(os.path.join(workdir, SOURCE), "w") as f:
        json.dump({"source": os.path.abspath(source), "family": info.family, "hf_config": info.hf_config}, f, indent=2)
    tok_dir = os.path.join(workdir, TOKENIZER_DIR)
    copied = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(source, n))]
    if copied:
        os.makedirs(tok_dir, exist_ok=True)
        for n in copied:
            shutil.copyfile(os.path.join(source, n), os.path.join(tok_dir, n))

    # No optimizer state is written: the training loop resumes step 0 with the fresh one it initialises (zero
    # AdamW moments), so the checkpoint and this process hold the parameters once (Checkpoints.save).
    _, params, rest = split_model(model)
    zero = jnp.zeros((), jnp.int32)
    state = TrainState(step=zero, params=params, opt_state=None, rest=rest, skipped=zero)
    # orbax writes at most SAVE_CONCURRENT_GB at a time: by default it would buffer a copy of the weights
    ckpt = Checkpoints(workdir, keep=run.train.keep_checkpoints, save_concurrent_gb=SAVE_CONCURRENT_GB)
    try:
        meta = {"step": 0, "model": record["model"], "window": [], "imported_from": os.path.abspath(source)}
        ckpt.save(0, state, meta, fresh_optimizer=True)
    finally:
        ckpt.close()
    del state, params, rest
    differ = restored_differences(workdir, model)
    if differ:
        raise RuntimeError(f"the checkpoint written in {workdir} does not restore the imported weights: {differ[:3]}")
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model)))
    log(f"[moe_jax] {info.family} from {source}: {n / 1e6:.2f}M parameters -> {workdir} (step 0, restored and "
        f"compared bit-exact); {'MoE layers dropless' if cfg.moe else 'dense'}; tokenizer files copied: "
        f"{copied or 'none'}")
    return {"model": model, "family": info.family, "tokenizer_dir": tok_dir if copied else None}


def greedy_text(model, tokenizer_dir: str, prompt: str, tokens: int) -> str:
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.data.tokenizer import BpeTokenizer
    from moe_jax.sampling import generate

    tok = BpeTokenizer.load(os.path.join(tokenizer_dir, "tokenizer.json"))
    ids = tok.encode(prompt)
    out = generate(model, jnp.asarray(ids)[None], max_new_tokens=tokens, cache_len=len(ids) + tokens)
    return tok.decode(np.asarray(out)[0])


def to_hf(workdir: str, target: str, *, family=None, dtype=None, log=print) -> list:
    from moe_jax.hf import load_hf, save_hf
    from moe_jax.train.restore import load_run

    source = os.path.join(os.path.abspath(os.path.expanduser(workdir)), SOURCE)
    extra, tokenizer_from = None, None
    if os.path.isfile(source):
        with open(source) as f:
            src = json.load(f)
        family = family or src["family"]
        keep = ("bos_token_id", "eos_token_id", "pad_token_id", "initializer_range")
        extra = {k: src["hf_config"][k] for k in keep if k in src["hf_config"]}
        tok = os.path.join(os.path.dirname(source), TOKENIZER_DIR)
        tokenizer_from = tok if os.path.isdir(tok) else None
    if family is None:
        raise ValueError(f"--family is required: {workdir} was not imported by experiments.convert (no {SOURCE}); "
                         "give one of mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3, llama, qwen2.")
    loaded = load_run(workdir)
    written = save_hf(loaded.model, target, family=family, dtype=dtype, extra_config=extra,
                      tokenizer_from=tokenizer_from)
    if dtype in (None, loaded.model.cfg.param_dtype):
        moe = loaded.model.cfg.moe
        again, _ = load_hf(target, expert_backend=moe.expert_backend if moe is not None else "ragged_dot",
                           param_dtype=loaded.model.cfg.param_dtype, log=log)
        differ = _params_equal(loaded.model, again)
        if differ:
            raise RuntimeError(f"{target} does not re-import to the workdir's weights: {differ[:3]}")
    log(f"[moe_jax] {workdir} (step {loaded.step}) -> {target} as {family}: {written} (re-imported and compared)")
    return written


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    if not _WORKDIR.value:
        cli.fail("--workdir is required.")
    if bool(_FROM.value) == bool(_TO.value):
        cli.fail("give exactly one of --from_hf=DIR (import into --workdir) or --to_hf=DIR (export --workdir).")
    if _FROM.value:
        out = from_hf(_FROM.value, _WORKDIR.value, expert_backend=_BACKEND.value, max_seq_len=_MAX_LEN.value,
                      param_dtype=_PARAM_DTYPE.value, mesh=parse_mesh(_MESH.value))
        if _PROMPT.value is not None:
            if out["tokenizer_dir"] is None:
                cli.fail(f"--prompt needs {_FROM.value}/tokenizer.json, which is not there.")
            print(greedy_text(out["model"], out["tokenizer_dir"], _PROMPT.value, _TOKENS.value))
    else:
        to_hf(_WORKDIR.value, _TO.value, family=_FAMILY.value, dtype=_DTYPE.value)


if __name__ == "__main__":
    cli.run_absl(main)
