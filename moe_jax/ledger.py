"""The routing ledger: every MoE layer's decisions on a fixed set of tokens, recorded, stored and replayed.

    recorder = Recorder(graphdef)                            # one jitted eval-mode forward pass
                                                             # (placement=: on a mesh, MoE layers expert-parallel)
    ledger = recorder(params, rest, batches, step=step)     # batches: [B, L + 1] eval batches (inputs = [:, :-1])
    ledger.save(ledger_path(workdir, step))                 # compressed .npz, np.load opens it
    logits, aux = model(tokens_BL, replay=replay_choices(ledger, rows=slice(0, B)))   # replay it

A ledger holds, for N sequences of L tokens (T = N * L, row-major) and the M MoE layers in depth order:
    tokens       <int32>[N, L]       the input token ids
    layers       <int32>[M]          each MoE layer's block index
    expert       <int32>[M, T, K]    the router's token choices, best first (before capacity)
    weight       <float32>[M, T, K]  their combine weights before capacity (a dropped choice contributes 0)
    dropped      <bool>[M, T, K]     the choice found no room in its expert (capacity)
    score        <float32>[M, T, K]  the router's raw score of each chosen expert (softmax probability or
                                     sigmoid, before normalisation, scaling and correction bias)
    correction_bias <float32>[M, E]  the routers' DeepSeek-V3 correction biases (zeros without one)
    next_token   <int32>[N]          the token after each sequence (its eval batch's last target), so that
                                     [tokens | next_token] is the `[N, L + 1]` batch again (None in ledgers
                                     written before it was recorded)
    num_experts, batch_size (sequences per forward pass), step (-1: unknown)
The choices are the router's decisions; capacity is a deterministic function of them (and, for
overflow='reroute', of the logits), so replaying them reproduces the layer's output exactly. Only token-choice
routers (top_k, hash) make choices: expert choice and Soft MoE have no ledger.

Stored with `np.savez_compressed`: expert ids in the smallest unsigned type that holds E (uint8 up to 256
experts), the rest as listed. The analyses are in moe_jax.ledger_analysis. Training on a ledger's tokens with
its routing (`config.train.replay_ledger`) is moe_jax.train.replay.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from typing import Iterable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

LEDGER_DIR = "ledgers"
_FIELDS = ("tokens", "layers", "expert", "weight", "dropped", "score", "correction_bias")


@dataclasses.dataclass
class Ledger:
    tokens: np.ndarray
    layers: np.ndarray
    expert: np.ndarray
    weight: np.ndarray
    dropped: np.ndarray
    score: np.ndarray
    correction_bias: np.ndarray
    num_experts: int
    batch_size: int
    step: int = -1
    next_token: Optional[np.ndarray] = None

    def __post_init__(self):
        M, T, K = self.expert.shape
        if self.tokens.size != T:
            raise ValueError(f"Ledger: {self.tokens.size} tokens but decisions for {T}.")
        if self.next_token is not None and self.next_token.shape != self.tokens.shape[:1]:
            raise ValueError(f"Ledger.next_token has shape {self.next_token.shape}, expected {self.tokens.shape[:1]}.")
        for name in ("weight", "dropped", "score"):
            if getattr(self, name).shape != (M, T, K):
                raise ValueError(f"Ledger.{name} has shape {getattr(self, name).shape}, expected {(M, T, K)}.")
        if self.layers.shape != (M,):
            raise ValueError(f"Ledger.layers has shape {self.layers.shape}, expected ({M},).")

    @property
    def num_layers(self) -> int:
        return self.expert.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.expert.shape[1]

    @property
    def k(self) -> int:
        return self.expert.shape[2]

    def position(self, layer: int) -> int:
        """Index into the M axis of the MoE layer with block index `layer`."""
        hits = np.flatnonzero(self.layers == layer)
        if not hits.size:
            raise ValueError(f"layer {layer} is not an MoE layer of this ledger; its layers are {self.layers.tolist()}.")
        return int(hits[0])

    def save(self, path: str) -> int:
        """Writes the compressed .npz (atomically); returns its size in bytes."""
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        E = self.num_experts
        id_dtype = np.uint8 if E <= 2**8 else np.uint16 if E <= 2**16 else np.int32
        arrays = {name: np.asarray(getattr(self, name)) for name in _FIELDS}
        arrays["expert"] = arrays["expert"].astype(id_dtype)
        arrays["tokens"] = arrays["tokens"].astype(np.int32)
        if self.next_token is not None:
            arrays["next_token"] = np.asarray(self.next_token, np.int32)
        meta = {"num_experts": self.num_experts, "batch_size": self.batch_size, "step": self.step}
        tmp = path + ".tmp.npz"
        np.savez_compressed(tmp, **arrays, **{k: np.asarray(v, np.int64) for k, v in meta.items()})
        os.replace(tmp, path)
        return os.path.getsize(path)

    @classmethod
    def load(cls, path: str) -> "Ledger":
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} does not exist: give a ledger .npz (written under <workdir>/{LEDGER_DIR}/ "
                                    "at each evaluation, or by `python -m experiments.ledger record`).")
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in _FIELDS if k not in f]
            if missing:
                raise ValueError(f"{path} is not a routing ledger (missing {missing}).")
            arrays = {k: f[k] for k in _FIELDS}
            meta = {k: int(f[k]) for k in ("num_experts", "batch_size", "step")}
            next_token = f["next_token"] if "next_token" in f else None
        arrays["expert"] = arrays["expert"].astype(np.int32)
        arrays["next_token"] = next_token
        return cls(**arrays, **meta)


def ledger_path(workdir: str, step: int) -> str:
    return os.path.join(workdir, LEDGER_DIR, f"step_{int(step):08d}.npz")


def list_ledgers(workdir: str) -> list[tuple[int, str]]:
    """(step, path) of the ledgers of a workdir, by step."""
    out = []
    for path in glob.glob(os.path.join(workdir, LEDGER_DIR, "step_*.npz")):
        m = re.fullmatch(r"step_(\d+)\.npz", os.path.basename(path))
        if m:
            out.append((int(m.group(1)), path))
    return sorted(out)


def check_recordable(model_cfg) -> Optional[str]:
    """Why a model has no ledger (None: it has one): a dense model, or routers that make no token choices."""
    moe = model_cfg.moe
    if moe is None or not model_cfg.moe_layer_indices:
        return "the model has no MoE layers"
    if moe.router in ("soft", "expert_choice"):
        return f"router={moe.router!r} makes no token choices"
    return None


class Recorder:
    """Eval-mode (train=False) forward passes that return every MoE layer's choices: one jitted function,
    compiled once per batch shape, separate from the train and eval steps (which do not change)."""

    def __init__(self, graphdef, *, placement=None):
        """placement: a `moe_jax.sharding.placement.Placement` to record on its mesh, the MoE layers run
        expert-parallel as the train and eval steps run them (None: one device)."""
        def record(params, rest, tokens_BL):
            model = nnx.merge(graphdef, params, rest)
            biases = []
            for _, layer in model.moe_layers(mtp=False):  # the ledger records the model's own layers
                bias = layer.router.correction_bias_E
                biases.append(jnp.zeros((layer.cfg.num_routed_experts,), jnp.float32) if bias is None else bias[...])
            if placement is not None:
                model = placement.expert_parallel(model)
            _, aux = model(tokens_BL, train=False)
            return tuple(entry["choices"] for entry in aux.layers), tuple(biases)

        # on a mesh the choices come back replicated, so that every process can read them whole
        self._record = jax.jit(record) if placement is None else jax.jit(record, out_shardings=placement.replicated)
        self._graphdef = graphdef
        self._placement = placement

    def __call__(self, params, rest, batches: Iterable[np.ndarray], *, step: int = -1) -> Ledger:
        """batches: `[B, L + 1]` eval batches (the inputs, [:, :-1], are recorded), all of one shape."""
        tokens, next_token, per_layer, bias = [], [], None, None
        for batch in batches:
            inputs_BL = np.asarray(batch)[:, :-1]
            next_token.append(np.asarray(batch)[:, -1])
            if self._placement is None:
                tokens_BL = jnp.asarray(inputs_BL)
            else:  # every host holds the whole eval batch; each puts the rows of its own devices
                tokens_BL = self._placement.put_batch(inputs_BL[self._placement.rows_of(inputs_BL.shape)],
                                                      inputs_BL.shape[0])
            choices, biases = jax.device_get(self._record(params, rest, tokens_BL))
            if any(c is None for c in choices):
                raise ValueError("Recorder: an MoE layer returned no token choices (router 'soft' or "
                                 "'expert_choice'); only token-choice routers have a ledger.")
            tokens.append(inputs_BL)
            per_layer = [[c] for c in choices] if per_layer is None else [p + [c] for p, c in zip(per_layer, choices)]
            bias = biases
        if not tokens:
            raise ValueError("Recorder: no batches given.")
        layers = nnx.merge(self._graphdef, params, rest).moe_layers(mtp=False)

        def stack(name, dtype):
            return np.stack([np.concatenate([c[name] for c in chunks]).reshape(-1, chunks[0][name].shape[-1])
                             for chunks in per_layer]).astype(dtype)

        return Ledger(tokens=np.concatenate(tokens).astype(np.int32),
                      layers=np.asarray([i for i, _ in layers], np.int32),
                      expert=stack("expert", np.int32), weight=stack("weight", np.float32),
                      dropped=stack("dropped", bool), score=stack("score", np.float32),
                      correction_bias=np.stack([np.asarray(b, np.float32) for b in bias]),
                      num_experts=layers[0][1].cfg.num_routed_experts, batch_size=int(tokens[0].shape[0]),
                      step=int(step), next_token=np.concatenate(next_token).astype(np.int32))


def record(model, batches: Iterable[np.ndarray], *, step: int = -1) -> Ledger:
    """A model's ledger on `[B, L + 1]` batches (see `Recorder`; for one-off use: it compiles each call)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return Recorder(graphdef)(params, rest, batches, step=step)


def replay_choices(ledger: Ledger, rows: slice = slice(None), *, weights: bool = False) -> tuple:
    """The `replay` argument of `Transformer.__call__` for the ledger's sequences `rows` (e.g. the first
    batch: slice(0, ledger.batch_size)): per MoE layer (expert <int32>[B, L, K], weight <float32>[B, L, K] or
    None). weights=False lets the router weigh the replayed experts itself (and so train through them)."""
    N, L = ledger.tokens.shape
    M, _, K = ledger.expert.shape
    expert = ledger.expert.reshape(M, N, L, K)[:, rows]
    weight = ledger.weight.reshape(M, N, L, K)[:, rows]
    return tuple((jnp.asarray(expert[m], jnp.int32), jnp.asarray(weight[m]) if weights else None) for m in range(M))


def ledger_batch(ledger: Ledger, rows: slice = slice(None)) -> np.ndarray:
    """<int32>[n, L + 1]: the ledger's sequences `rows` with the token after each, i.e. the eval batch it was
    recorded on (inputs `[:, :-1]`, targets `[:, 1:]`)."""
    if ledger.next_token is None:
        raise ValueError("this ledger has no next_token (written before it was recorded), so its batches cannot be "
                         "rebuilt: record it again (`python -m experiments.ledger record --workdir=...`).")
    return np.concatenate([ledger.tokens[rows], ledger.next_token[rows, None]], axis=1).astype(np.int32)
