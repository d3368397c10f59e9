"""Sparse upcycling: a dense model's parameters -> an MoE model's (Komatsuzaki et al. 2022, arXiv 2212.05055).

    check_upcycle(dense_cfg, moe_cfg, upcycle_cfg)              # ValueError naming the field, before any array
    params = upcycle_params(dense_params, fresh_moe_params, dense_cfg, moe_cfg, upcycle_cfg)

Both parameter trees are pure nested dicts (`nnx.State.to_pure_dict()` of `Transformer` params). What the
target gets:
  attention, norms, embeddings, unembedding, the target's dense FFN layers   copied from the dense model.
  every MoE layer's experts   copies of that layer's dense FFN (Komatsuzaki et al.: "each expert is
                initialised as a copy of the original MLP"), each plus optional Gaussian noise of std
                `noise_std * std(W)` per weight matrix W (`UpcycleConfig.noise_std`, relative).
                Granular upcycling (`UpcycleConfig.granular`): experts of width F_e = d_ff / S (S slices per
                FFN, S = dense d_ff / expert width) hold hidden units [s F_e, (s + 1) F_e) of the FFN,
                routed expert e holding slice s = e mod S of copy e // S: w_in / w_gate columns and w_out
                rows. FFN(x) = sum_s W_out[s] act(...)[s] exactly (the hidden units are independent), so
                choosing all S slices of one copy with combine weight 1 each reproduces the FFN.
  routers       the fresh initialisation passed in (`fresh_params`), never copied.
  expert biases left as initialised (zeros): the dense FFN has none.
The optimizer state is not part of this: an upcycled run starts with a fresh optimizer (zero moments,
step 0, a new learning-rate schedule). Komatsuzaki et al. reuse the dense optimizer state for vision only.

When the upcycled model reproduces the dense model's logits at initialisation (tests/test_upcycle.py
checks each condition, and that breaking it changes the logits). All of:
  1. noise_std = 0 and granular = False (every expert an exact copy);
  2. every token's combine weights sum to exactly 1: top-k with `normalize_topk=True` or
     `topk_order='topk_softmax'` (softmax over the chosen logits), or hash routing (1/k each), with
     `routed_scaling_factor=1` (`combine_weights_sum_to_one`). Switch-style unnormalised top-1 scales
     the FFN by the router probability p < 1; expert choice and Soft MoE do not give per-token
     weights summing to 1;
  3. nothing is dropped: dropless (capacity_factor None), or a capacity of at least the group size
     (`eval_capacity_factor >= E / k` at evaluation; likewise in training);
  4. no shared experts and moe_output_norm=False (both are checked: upcycling rejects them);
  5. router noise off (evaluation, or jitter_eps = logit_noise_std = 0).
Then y = sum_k w_k FFN(x) = FFN(x) up to float rounding. Granular upcycling reproduces the FFN only when
all S slices of one copy are chosen with weight 1 each (e.g. num_experts=1, k=1, granularity=S: k G = S
choices of the S experts, uniform router and routed_scaling_factor=S with normalize_topk).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp

from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig

# ModelConfig fields an upcycled model may set differently from its dense source.
FREE_FIELDS = ("moe", "moe_every", "first_dense_layers", "dtype", "param_dtype", "max_seq_len", "remat")
EXPERT_WEIGHTS = ("w_in_EDF", "w_gate_EDF", "w_out_EFD")


@dataclasses.dataclass(frozen=True)
class UpcycleConfig:
    """Where the dense parameters come from and how they become experts (config section `upcycle`).

    from_workdir: a workdir of a dense run (`use_moe=False`) with at least one checkpoint; or
    from_hf: a Hugging Face directory of a dense model (model_type llama or qwen2: config.json + safetensors,
        read by moe_jax.hf.load_hf). Exactly one of the two.
    step: the checkpoint of from_workdir to read; None = the latest.
    noise_std: each expert copy gets W + noise_std * std(W) * N(0, 1), per weight matrix W; 0 = exact copies.
    granular: split the dense FFN's hidden units into S = d_ff / expert width slices (experts narrower than
        the FFN); False requires experts as wide as the dense FFN.
    seed: the noise's random seed.
    """

    from_workdir: str = ""
    step: Optional[int] = None
    noise_std: float = 0.0
    granular: bool = False
    seed: int = 0
    from_hf: str = ""

    def __post_init__(self):
        for name in ("from_workdir", "from_hf"):
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"UpcycleConfig.{name}={getattr(self, name)!r} must be a directory path (a string).")
        if bool(self.from_workdir) == bool(self.from_hf):
            raise ValueError(f"UpcycleConfig.from_workdir={self.from_workdir!r}, from_hf={self.from_hf!r}: give "
                             "exactly one: the workdir of a trained dense run (config.upcycle.from_workdir / "
                             "--from_workdir) or a dense Hugging Face model directory (config.upcycle.from_hf / "
                             "--from_hf).")
        if self.from_hf and self.step is not None:
            raise ValueError(f"UpcycleConfig.step={self.step!r} selects a checkpoint of from_workdir; a Hugging Face "
                             "directory (from_hf) has none: leave step None.")
        if self.step is not None and (isinstance(self.step, bool) or not isinstance(self.step, int) or self.step < 0):
            raise ValueError(f"UpcycleConfig.step={self.step!r} must be an int >= 0, or None for the latest "
                             "checkpoint.")
        if isinstance(self.noise_std, bool) or not isinstance(self.noise_std, (int, float)) or not (
                math.isfinite(self.noise_std) and self.noise_std >= 0):
            raise ValueError(f"UpcycleConfig.noise_std={self.noise_std!r} must be a finite float >= 0 (relative to "
                             "each weight matrix's std; 0 = exact copies).")
        if not isinstance(self.granular, bool):
            raise ValueError(f"UpcycleConfig.granular={self.granular!r} must be True or False.")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"UpcycleConfig.seed={self.seed!r} must be an int.")


def combine_weights_sum_to_one(moe: MoEConfig) -> bool:
    """Whether every token's combine weights sum to 1 before capacity (condition 2 of the module docstring)."""
    if moe.routed_scaling_factor != 1.0:
        return False
    if moe.router == "hash":
        return True
    if moe.router != "top_k":
        return False
    return moe.normalize_topk or moe.topk_order == "topk_softmax"


def slices_per_ffn(dense_cfg: ModelConfig, moe: MoEConfig) -> int:
    """S = dense d_ff / expert width (1: experts are copies); 0 if the expert width does not divide d_ff."""
    F, F_e = dense_cfg.d_ff, moe.expert_d_ff
    return F // F_e if F % F_e == 0 else 0


def check_upcycle(dense_cfg: ModelConfig, target_cfg: ModelConfig, upcycle: UpcycleConfig) -> int:
    """Raises ValueError naming the field and the fix if `target_cfg` cannot be upcycled from `dense_cfg`;
    returns S, the slices per dense FFN (1 = copies). A dense target (moe None) is a plain copy (continued
    dense training with a fresh optimizer)."""
    src = (f"the dense Hugging Face model in {upcycle.from_hf}" if upcycle.from_hf
           else f"the dense run in {upcycle.from_workdir}")
    if dense_cfg.moe is not None:
        field = f"from_hf={upcycle.from_hf!r}" if upcycle.from_hf else f"from_workdir={upcycle.from_workdir!r}"
        raise ValueError(f"UpcycleConfig.{field} holds an MoE model; upcycling starts from a dense model "
                         "(config.model.use_moe=False, or a llama / qwen2 Hugging Face directory).")
    for name, cfg in (("config.model", target_cfg), (src, dense_cfg)):
        if cfg.scan_layers:
            raise ValueError(f"{name} has scan_layers=True: upcycling copies parameters layer by layer in the unrolled "
                             "layout; upcycle with scan_layers=False (moe_jax.layer_stack.stack_layers converts the "
                             "result afterwards).")
    for f in dataclasses.fields(ModelConfig):
        if f.name in FREE_FIELDS:
            continue
        mine, theirs = getattr(target_cfg, f.name), getattr(dense_cfg, f.name)
        if mine != theirs:
            raise ValueError(f"config.model.{f.name}={mine!r} differs from {src} ({f.name}={theirs!r}); "
                             f"upcycling copies every non-expert parameter, so set config.model.{f.name}={theirs!r}.")
    moe = target_cfg.moe
    if moe is None:
        if upcycle.granular or upcycle.noise_std:
            raise ValueError("config.upcycle.granular / noise_std apply to MoE targets; the target is dense "
                             "(use_moe=False): set granular=False and noise_std=0, or use_moe=True.")
        return 1
    if moe.activation != dense_cfg.activation:
        raise ValueError(f"config.model.activation={moe.activation!r} (the experts') differs from {src} "
                         f"(activation={dense_cfg.activation!r}); experts copy the dense FFN, so they need the "
                         "same activation.")
    if moe.num_shared_experts:
        raise ValueError(f"config.model.num_shared_experts={moe.num_shared_experts}: upcycling makes every routed "
                         "expert a copy of the dense FFN and has nothing to put in shared experts; set "
                         "num_shared_experts=0.")
    if target_cfg.moe_output_norm:
        raise ValueError("config.model.moe_output_norm=True adds a norm the dense model lacks (the upcycled model "
                         "would not start from the dense function); set moe_output_norm=False.")
    if moe.router == "soft":
        raise ValueError("config.model.router='soft' mixes tokens into slots, so copies of the dense FFN do not "
                         "give the dense function; use router='top_k' (or 'expert_choice', 'hash').")
    F, F_e, G = dense_cfg.d_ff, moe.expert_d_ff, moe.granularity
    S = slices_per_ffn(dense_cfg, moe)
    width = f"moe_d_ff={moe.d_ff} / granularity={G} = {F_e}"
    if S == 0:
        raise ValueError(f"config.model.moe_d_ff: the expert width ({width}) does not divide the dense d_ff={F} of "
                         f"{src}; set moe_d_ff={F} (copies, or with granularity G and granular=True, G slices "
                         "per FFN).")
    if S == 1 and upcycle.granular:
        raise ValueError(f"config.upcycle.granular=True, but the experts ({width}) are as wide as the dense FFN "
                         f"(d_ff={F}): nothing to split. Set granularity=G > 1 (with moe_d_ff={F}) for G slices "
                         "per FFN, or granular=False for copies.")
    if S > 1 and not upcycle.granular:
        raise ValueError(f"config.model: the experts ({width}) are narrower than the dense FFN (d_ff={F}); copies "
                         f"need moe_d_ff={F} and granularity=1, or set config.upcycle.granular=True to split "
                         f"each FFN into {S} slices.")
    if moe.num_routed_experts % S:
        raise ValueError(f"config.model.num_experts: the {moe.num_routed_experts} routed experts are not whole copies "
                         f"of {S} slices each; use a multiple of {S} routed experts (num_experts x granularity).")
    return S


def _split(w_1DF_or_1FD, name: str, S: int):
    """Dense `[1, D, F]` (w_in, w_gate) or `[1, F, D]` (w_out) -> S slices `[S, D, F/S]` / `[S, F/S, D]`."""
    w = w_1DF_or_1FD[0]
    if name == "w_out_EFD":
        F, D = w.shape
        return w.reshape(S, F // S, D)
    D, F = w.shape
    return jnp.transpose(w.reshape(D, S, F // S), (1, 0, 2))


def expert_weights(dense_ffn: dict, num_routed_experts: int, S: int, noise_std: float = 0.0,
                   key: Optional[jax.Array] = None) -> dict:
    """A dense FFN's `{w_in_EDF [1, D, F], w_gate_EDF, w_out_EFD [1, F, D]}` -> E experts' weights
    `[E, D, F/S]` / `[E, F/S, D]`: expert e is slice e mod S of copy e // S, plus noise
    `noise_std * std(W) * N(0, 1)` (std over the whole dense matrix W)."""
    out = {}
    names = [n for n in EXPERT_WEIGHTS if dense_ffn.get(n) is not None]
    keys = dict(zip(names, jax.random.split(key, len(names)))) if noise_std else {}
    for name in names:
        w = jnp.asarray(dense_ffn[name])
        slices = _split(w, name, S)
        experts = jnp.tile(slices, (num_routed_experts // S, 1, 1))
        if noise_std:
            std = jnp.std(w.astype(jnp.float32))
            noise = jax.random.normal(keys[name], experts.shape, jnp.float32) * (noise_std * std)
            experts = (experts.astype(jnp.float32) + noise).astype(w.dtype)
        out[name] = experts
    return out


def _check_shape(path: str, got, want) -> None:
    if tuple(got.shape) != tuple(want.shape):
        raise ValueError(f"upcycle: parameter {path} has shape {tuple(got.shape)} in the dense model and "
                         f"{tuple(want.shape)} in the target; the configs disagree on a size.")


def upcycle_params(dense_params: dict, fresh_params: dict, dense_cfg: ModelConfig, target_cfg: ModelConfig,
                   upcycle: UpcycleConfig) -> dict:
    """The target model's parameters (pure nested dict like `fresh_params`): see the module docstring.

    dense_params: the dense `Transformer`'s params as a pure dict; fresh_params: the target's freshly
    initialised params (their routers are kept). Arrays keep the target's dtypes."""
    S = check_upcycle(dense_cfg, target_cfg, upcycle)
    key = jax.random.PRNGKey(upcycle.seed)

    def copy(src, dst, path):
        if isinstance(dst, dict):
            return {k: copy(src[k], v, f"{path}.{k}") for k, v in dst.items()}
        _check_shape(path, src, dst)
        return jnp.asarray(src).astype(dst.dtype)

    out = {}
    for name, value in fresh_params.items():
        if name != "blocks":
            out[name] = copy(dense_params[name], value, name)
    blocks = {}
    for i, block in fresh_params["blocks"].items():
        dense_block = dense_params["blocks"][i]
        new = {k: copy(dense_block[k], v, f"blocks.{i}.{k}") for k, v in block.items() if k != "ffn"}
        if not target_cfg.is_moe_layer(int(i)):
            new["ffn"] = copy(dense_block["ffn"], block["ffn"], f"blocks.{i}.ffn")
        else:
            ffn = dict(block["ffn"])  # router (and anything else) as freshly initialised
            experts = dict(ffn["experts"])
            made = expert_weights(dense_block["ffn"]["experts"], target_cfg.moe.num_routed_experts, S,
                                  upcycle.noise_std, jax.random.fold_in(key, int(i)))
            for name, w in made.items():
                _check_shape(f"blocks.{i}.ffn.experts.{name}", w, experts[name])
                experts[name] = w.astype(experts[name].dtype)
            ffn["experts"] = experts
            new["ffn"] = ffn
        blocks[i] = new
    out["blocks"] = blocks
    return out


def describe(dense_cfg: ModelConfig, target_cfg: ModelConfig, upcycle: UpcycleConfig) -> str:
    """One line for the log: what was made, and whether the upcycled model starts as the dense function."""
    moe = target_cfg.moe
    if moe is None:
        return "upcycle: dense -> dense (a copy; continued training with a fresh optimizer)"
    S = slices_per_ffn(dense_cfg, moe)
    what = (f"{moe.num_routed_experts} experts = {moe.num_routed_experts // S} copies x {S} slices of the dense FFN"
            if S > 1 else f"{moe.num_routed_experts} experts = copies of the dense FFN")
    exact = (upcycle.noise_std == 0 and S == 1 and combine_weights_sum_to_one(moe))
    note = ("starts as the dense model (combine weights sum to 1; while nothing is dropped)" if exact else
            "does not start as the dense model (" + ("noise on the copies" if upcycle.noise_std else
                                                     "granular slices" if S > 1 else
                                                     "combine weights do not sum to 1") + ")")
    return (f"upcycle: {what} in layers {list(target_cfg.moe_layer_indices)}, router fresh, noise_std "
            f"{upcycle.noise_std:g}; {note}; optimizer state fresh")


def to_pure(state: Any) -> dict:
    """`nnx.State` -> pure nested dict (a dict passes through)."""
    from flax import nnx

    return nnx.to_pure_dict(state) if isinstance(state, nnx.State) else state
