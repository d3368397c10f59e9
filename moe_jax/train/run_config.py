"""ConfigDict -> typed, validated dataclasses: the one boundary between ml_collections and the code.

A run config has three sections, and an optional fourth:
  config.model  `ModelConfig` fields, plus the MoE layer's `MoEConfig` fields flattened into the same
                section (so `--config.model.num_experts=16` works): `use_moe` turns the MoE layers on,
                `moe_d_ff` is `MoEConfig.d_ff` (one expert's hidden width at granularity 1), `d_model` and
                `activation` are shared by both.
  config.data   `DataConfig` fields.
  config.train  `TrainConfig` fields.
  config.mesh   `ShardingConfig` fields (moe_jax.sharding): mesh axis sizes and processes; absent or all 1
                = one device.
  config.upcycle `UpcycleConfig` fields (moe_jax.upcycle): absent = a fresh initialisation; else a run starting
                in an empty workdir takes its parameters from a dense run's checkpoint (sparse upcycling).
  config.health `HealthConfig` fields (moe_jax.train.health): the routing ledger recorded at each evaluation
                and the routing alarms' thresholds; absent = the defaults.
Every key must be a known field: a typo fails with the section, the key and the known names, before
anything is built or compiled. Then the sections are checked against each other (`check_run`: the batch
against the routing groups and the mesh, the sequence length and the tokenizer against the model), and, with `on_this_machine=True`, against what this machine must provide
(`check_machine`: the devices of the mesh, a prepared TFDS dataset, the ledger of
`train.replay_ledger`), all before any data is read.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
import math
import typing
from typing import Any, Optional

import ml_collections
from ml_collections import config_dict

from moe_jax.moe_config import MoEConfig
from moe_jax.data import DataConfig
from moe_jax.model_config import ModelConfig
from moe_jax.upcycle import UpcycleConfig
from moe_jax.sharding.config import BATCH_AXES, ShardingConfig
from moe_jax.train.config import TrainConfig
from moe_jax.train.health import HealthConfig

SECTIONS = ("model", "data", "train")
OPTIONAL_SECTIONS = ("mesh", "upcycle", "health")
MODEL_ONLY_KEYS = ("use_moe", "moe_d_ff")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    model: ModelConfig
    data: DataConfig
    train: TrainConfig
    name: str = "run"
    mesh: ShardingConfig = dataclasses.field(default_factory=ShardingConfig)
    upcycle: Optional[UpcycleConfig] = None  # sparse upcycling from a dense run (moe_jax.train.upcycle)
    health: HealthConfig = dataclasses.field(default_factory=HealthConfig)

    def moe_derived(self) -> dict:
        """The MoE layers' derived values on this run's `[batch_size, seq_len]` batches (MoEConfig computes
        them; `--print_config` prints these): routed experts, k, expert width, tokens per routing group, and
        slots per expert per group in training and evaluation (None: dropless). Empty for a dense model."""
        m = self.model.moe
        if m is None:
            return {}
        S = m.tokens_per_group(self.data.batch_size, self.data.seq_len)
        return {"routed experts": m.num_routed_experts, "k": m.top_k, "expert width": m.expert_d_ff,
                "group size": S, "train capacity/group": m.capacity(S, True),
                "eval capacity/group": m.capacity(S, False)}


def _fields(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def _unknown(section: str, key: str, known: set[str]) -> ValueError:
    close = difflib.get_close_matches(key, sorted(known), n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return ValueError(f"config.{section}.{key} is not a known field.{hint} Known fields: {', '.join(sorted(known))}.")


def _field_types(cls) -> dict[str, tuple[type, bool]]:
    """field -> (base type, optional) for the int / float / str / bool fields of a config dataclass."""
    out = {}
    for name, hint in typing.get_type_hints(cls).items():
        args = typing.get_args(hint)
        optional = type(None) in args
        base = next((a for a in args if a is not type(None)), hint) if args else hint
        if base in (int, float, str, bool):
            out[name] = (base, optional)
    return out


def _check_types(cls, section: str, values: dict) -> None:
    types = _field_types(cls)
    for name, value in values.items():
        if name not in types:
            continue
        base, optional = types[name]
        if value is None:
            if not optional:
                raise ValueError(f"config.{section}.{name}=None is not allowed: give a {base.__name__}.")
            continue
        ok = isinstance(value, base) and not (base is not bool and isinstance(value, bool))
        if base is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ValueError(f"config.{section}.{name}={value!r} must be a {base.__name__}"
                             f"{' or None' if optional else ''}.")


def _build(cls, section: str, values: dict) -> Any:
    factories = {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
    values = {k: v for k, v in values.items() if not (v is None and k in factories)}  # None: use the factory
    _check_types(cls, section, values)
    try:
        return cls(**values)
    except TypeError as e:  # e.g. a missing required field
        raise ValueError(f"config.{section}: {e}") from e


def _defaults(cls, skip=()) -> dict:
    """Every field of `cls` with a default, optional ones as `FieldReference(default, field_type=object)`
    so that the command line can set them to a value or to None (`--config.model.capacity_factor=None` means dropless)."""
    types = _field_types(cls)
    out = {}
    for f in dataclasses.fields(cls):
        if f.name in skip:
            continue
        if f.default_factory is not dataclasses.MISSING:  # computed at build time (e.g. data_dir)
            out[f.name] = config_dict.FieldReference(None, field_type=object)
            continue
        if f.default is dataclasses.MISSING:
            continue
        optional = types.get(f.name, (None, True))[1]
        out[f.name] = config_dict.FieldReference(f.default, field_type=object) if optional else f.default
    return out


def make_config_dict(name: str, model: dict, data: dict, train: dict,
                     mesh: dict | None = None, health: dict | None = None) -> ml_collections.ConfigDict:
    """A full run ConfigDict: every known field present (so each is overridable and listed by
    --print_config), dataclass defaults filled in under the given values."""
    model_defaults = {**_defaults(MoEConfig, skip=("d_model", "d_ff")), **_defaults(ModelConfig, skip=("moe",)),
                      "use_moe": True}
    sections = {}
    for section, defaults, given in (("model", model_defaults, model), ("data", _defaults(DataConfig), data),
                                     ("train", _defaults(TrainConfig), train),
                                     ("mesh", _defaults(ShardingConfig), mesh or {}),
                                     ("health", _defaults(HealthConfig), health or {})):
        merged = dict(defaults)
        for key, value in given.items():
            if isinstance(merged.get(key), config_dict.FieldReference):
                merged[key] = config_dict.FieldReference(value, field_type=object)
            else:
                merged[key] = value
        if section == "model" and "moe_d_ff" not in merged:
            merged["moe_d_ff"] = config_dict.FieldReference(None, field_type=object)
        sections[section] = ml_collections.ConfigDict(merged)
    config = ml_collections.ConfigDict()
    config.name = name
    for section, value in sections.items():
        setattr(config, section, value)
    return config


def load_config_file(path: str, arg: Optional[str] = None) -> ml_collections.ConfigDict:
    """`get_config(arg)` of the config file at `path` (what `--config=path:arg` gives experiments.train)."""
    spec = importlib.util.spec_from_file_location("moe_jax_config_file", path)
    if spec is None:
        raise FileNotFoundError(f"{path} is not a Python config file: give the path of a file with get_config(arg).")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg)


def to_dict(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def build_run_config(config, *, on_this_machine: bool = False) -> RunConfig:
    """Validates a ConfigDict (or nested dict) into a `RunConfig`; raises ValueError naming the field.

    on_this_machine: also `check_machine` (the mesh's devices, a prepared dataset): for a command that runs
    here, not for one that emits commands for a pod."""
    config = to_dict(config)
    for section in config:
        if section not in SECTIONS + OPTIONAL_SECTIONS + ("name",):
            raise ValueError(f"config.{section} is not a section; a run config has {SECTIONS + OPTIONAL_SECTIONS} "
                             "(and name).")
    for section in SECTIONS:
        if section not in config:
            raise ValueError(f"config.{section} is missing; a run config needs the sections {SECTIONS}.")

    model = dict(config["model"])
    model_fields = _fields(ModelConfig) - {"moe"}
    moe_fields = _fields(MoEConfig) - {"d_model", "d_ff"}
    known = model_fields | moe_fields | set(MODEL_ONLY_KEYS)
    for key in model:
        if key not in known:
            raise _unknown("model", key, known)
    use_moe = bool(model.pop("use_moe", True))
    moe_d_ff = model.pop("moe_d_ff", None)
    moe_values = {k: model[k] for k in list(model) if k in moe_fields}
    for k in moe_values:
        if k not in model_fields:
            model.pop(k)
    moe = None
    if use_moe:
        if moe_d_ff is None:
            raise ValueError("config.model.moe_d_ff is missing: set one expert's hidden width (or use_moe=False).")
        if "d_model" not in model:
            raise ValueError("config.model.d_model is missing.")
        moe = _build(MoEConfig, "model", dict(d_model=model["d_model"], d_ff=moe_d_ff, **moe_values))
    model_cfg = _build(ModelConfig, "model", dict(model, moe=moe))

    data = dict(config["data"])
    for key in data:
        if key not in _fields(DataConfig):
            raise _unknown("data", key, _fields(DataConfig))
    train = dict(config["train"])
    for key in train:
        if key not in _fields(TrainConfig):
            raise _unknown("train", key, _fields(TrainConfig))
    mesh = dict(config.get("mesh") or {})
    for key in mesh:
        if key not in _fields(ShardingConfig):
            raise _unknown("mesh", key, _fields(ShardingConfig))
    upcycle = config.get("upcycle")
    if upcycle is not None:
        upcycle = dict(upcycle)
        for key in upcycle:
            if key not in _fields(UpcycleConfig):
                raise _unknown("upcycle", key, _fields(UpcycleConfig))
        upcycle = _build(UpcycleConfig, "upcycle", upcycle)
    health = dict(config.get("health") or {})
    for key in health:
        if key not in _fields(HealthConfig):
            raise _unknown("health", key, _fields(HealthConfig))
    run = RunConfig(model=model_cfg, data=_build(DataConfig, "data", data),
                    train=_build(TrainConfig, "train", train), name=str(config.get("name", "run")),
                    mesh=_build(ShardingConfig, "mesh", mesh), upcycle=upcycle,
                    health=_build(HealthConfig, "health", health))
    check_run(run)
    if on_this_machine:
        check_machine(run)
    return run


def check_run(run: RunConfig) -> None:
    """Checks between sections that would otherwise fail only after data preparation and tracing."""
    m, d = run.model, run.data
    if d.seq_len > m.max_seq_len:
        raise ValueError(f"config.data.seq_len={d.seq_len} exceeds config.model.max_seq_len={m.max_seq_len} "
                         "(the positions the model is built for); lower seq_len or raise max_seq_len.")
    if d.tokenizer == "byte" and m.vocab_size < 256:
        raise ValueError(f"config.model.vocab_size={m.vocab_size} is smaller than the byte tokenizer's 256 tokens; "
                         "set config.model.vocab_size >= 256.")
    if m.mtp_depth and d.seq_len <= m.mtp_depth:
        raise ValueError(f"config.model.mtp_depth={m.mtp_depth} needs config.data.seq_len > {m.mtp_depth} (MTP depth k "
                         f"predicts token i + k + 1 at the first seq_len - k positions; seq_len={d.seq_len} leaves "
                         "none for the last depth); raise seq_len or lower mtp_depth.")
    moe = m.moe
    if moe is not None and moe.group_size is not None:
        B, L, S = d.batch_size, d.seq_len, moe.group_size
        if moe.grouping == "tokens" and (B * L) % S:
            raise ValueError(f"config.model.group_size={S} does not divide the {B} x {L} = {B * L} tokens of a batch "
                             "(config.data.batch_size x seq_len); choose a group size that divides them.")
        short = [k for k in range(1, m.mtp_depth + 1) if (B * (L - k)) % S]
        if moe.grouping == "tokens" and short:
            k = short[0]
            raise ValueError(f"config.model.group_size={S} does not divide the {B} x {L - k} = {B * (L - k)} tokens "
                             f"that MTP depth {k} routes (config.model.mtp_depth={m.mtp_depth}: depth k sees "
                             "seq_len - k positions); leave group_size None (one sequence per group), use "
                             "grouping='position', or set mtp_depth=0.")
        if moe.grouping == "position" and B % S:
            raise ValueError(f"config.model.group_size={S} does not divide config.data.batch_size={B} "
                             "(grouping='position' groups the same position across sequences); choose a divisor "
                             "of the batch.")
    sizes = run.mesh.axis_sizes
    if run.train.microbatches > 1 and -1 not in sizes.values():  # microbatches against the routing groups
        from moe_jax.train.microbatch import check_microbatches

        check_microbatches(moe, d.batch_size, d.seq_len, run.train.microbatches,
                           math.prod(sizes[a] for a in BATCH_AXES))
    if run.mesh.is_sharded and -1 not in sizes.values():  # the batch and the model against the mesh's shape
        from moe_jax.sharding.mesh import check_layout

        check_layout(m, d.batch_size, d.seq_len, run.mesh, math.prod(sizes.values()))


def check_machine(run: RunConfig) -> None:
    """What this machine must provide: as many devices as the mesh has (single-process runs; a multi-process
    run is checked once `jax.distributed` is up), a backend for the dropless exchange asked for, a
    prepared dataset for a 'tfds:<name>' corpus, and the routing ledger of `train.replay_ledger` (it exists and
    fits the model and the data)."""
    import jax

    if run.mesh.dropless_exchange == "ragged" and jax.default_backend() == "cpu":
        raise ValueError("config.mesh.dropless_exchange='ragged': XLA:CPU does not implement ragged_all_to_all; set "
                         "it to 'padded' (or 'auto', which picks 'padded' on CPU and 'ragged' on GPU/TPU).")
    if run.mesh.is_sharded and (not run.mesh.multi_process or jax.distributed.is_initialized()):
        from moe_jax.sharding.mesh import batch_shards, check_layout
        from moe_jax.train.microbatch import check_microbatches

        sizes = check_layout(run.model, run.data.batch_size, run.data.seq_len, run.mesh, jax.device_count())
        check_microbatches(run.model.moe, run.data.batch_size, run.data.seq_len, run.train.microbatches,
                           batch_shards(sizes))
    if run.data.is_tfds:
        from moe_jax.data.tfds_source import check_prepared

        check_prepared(run.data)
    if run.train.replay_ledger is not None:  # the file exists and fits the model and the data
        from moe_jax.train.replay import load_replay_ledger

        load_replay_ledger(run)


def model_record(model_cfg: ModelConfig) -> dict:
    """JSON-able description of the model config (stored in checkpoints to detect a mismatch)."""
    def plain(v):
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        return v if isinstance(v, (int, float, str, bool, type(None))) else str(v)

    return plain(model_cfg)


def home_relative(path: str) -> str:
    """`path` with the user's home directory written `~`, so that a record names no machine's home;
    `os.path.expanduser` reads it back."""
    home = os.path.expanduser("~").rstrip(os.sep)
    if home and (path == home or path.startswith(home + os.sep)):
        return "~" + path[len(home):]
    return path


def recorded_path(path: str) -> str:
    """A path as a record writes it: a relative one as given (relative to the directory the command ran in, as it
    is read back), an absolute one with the home directory as `~` (`home_relative`)."""
    path = os.path.expanduser(path)
    return home_relative(path) if os.path.isabs(path) else os.path.normpath(path)


def run_record(run: RunConfig) -> dict:
    """The run as the training loop writes it to a workdir's `config.json`: what `load_run_config`
    (moe_jax.train.restore) reads back and the experiment runner compares a new run with.

    {"name", "model": `model_record`, "data", "train", "mesh", "health"} and, for an upcycled run, "upcycle";
    JSON-able. data.data_dir is written with the home directory as `~` (`home_relative`); upcycle.from_workdir /
    from_hf as `recorded_path` does (relative paths as given, so a results folder names no machine's directories).
    """
    data = dict(dataclasses.asdict(run.data), data_dir=home_relative(run.data.data_dir))
    record = {"name": run.name, "model": model_record(run.model), "data": data,
              "train": dataclasses.asdict(run.train), "mesh": dataclasses.asdict(run.mesh),
              "health": dataclasses.asdict(run.health)}
    if run.upcycle is not None:
        record["upcycle"] = dict(dataclasses.asdict(run.upcycle), **{
            key: recorded_path(getattr(run.upcycle, key))
            for key in ("from_workdir", "from_hf") if getattr(run.upcycle, key)})
    return record
