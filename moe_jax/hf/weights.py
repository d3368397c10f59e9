"""Which Hugging Face tensor is which parameter of ours, and the layout change between them.

One table (`weight_entries`) serves both directions: each `Entry` names our parameters, the HF tensors and
a pair of functions between them. `to_hf` uses only array methods (`.T`, `.reshape`, indexing), so the same
function run under `jax.eval_shape` on the abstract model gives the HF names and shapes a checkpoint must
hold: they are checked against the safetensors headers before any weight is read.

Layouts: HF's `nn.Linear` stores `[out, in]`; ours are `[in, out]` with the axes split (`w_q_DHQ` is
`q_proj.weight.T` reshaped to `[D, H, Q]`; `w_o_HUD` is `o_proj.weight.T` reshaped to `[H, U, D]`). Experts:
HF's checkpoints hold one tensor per expert (`experts.{e}.gate_proj.weight [F, D]`, Mixtral `w1`), ours one
`[E, D, F]` stack; our SwiGLU is `silu(x w_gate) * (x w_in)`, so `w_gate` is `gate_proj`/`w1` and `w_in` is
`up_proj`/`w3`, `w_out` is `down_proj`/`w2`. A dense FFN (shared experts, dense layers) is a one-expert stack.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import numpy as np

from moe_jax.model_config import ModelConfig

Path = tuple


@dataclasses.dataclass(frozen=True)
class Entry:
    ours: tuple[Path, ...]
    hf: tuple[str, ...]
    to_hf: Callable  # [our arrays] -> [HF arrays] (array methods only)
    from_hf: Callable  # ([HF numpy arrays], [our shapes]) -> [our numpy arrays]


def linear(ours: Path, hf: str, n_in: int = 1) -> Entry:
    """Our `[in axes..., out axes...]` weight <-> HF `[out, in]` (in = the product of our first n_in axes)."""
    def to_hf(xs):
        (x,) = xs
        return [x.reshape(math.prod(x.shape[:n_in]), -1).T]

    return Entry((ours,), (hf,), to_hf, lambda hs, shapes: [hs[0].T.reshape(shapes[0])])


def vector(ours: Path, hf: str) -> Entry:
    """Same numbers, HF flat (norm scales, biases)."""
    return Entry((ours,), (hf,), lambda xs: [xs[0].reshape(-1)], lambda hs, shapes: [hs[0].reshape(shapes[0])])


def same(ours: Path, hf: str) -> Entry:
    return Entry((ours,), (hf,), lambda xs: [xs[0]], lambda hs, shapes: [hs[0]])


def experts(ours: Path, hf: list[str]) -> Entry:
    """Our `[E, in, out]` stack <-> E HF tensors `[out, in]`."""
    def to_hf(xs):
        return [xs[0][e].T for e in range(len(hf))]

    return Entry((ours,), tuple(hf), to_hf, lambda hs, shapes: [np.stack([h.T for h in hs])])


# HF names of an expert's / FFN's three weights per family: (gate, up, down).
_FFN_NAMES = {"mixtral": ("w1", "w3", "w2")}
_DEFAULT_FFN = ("gate_proj", "up_proj", "down_proj")


def _ffn(ours: Path, hf_of: Callable[[str], list[str]]) -> list[Entry]:
    """w_gate/w_in/w_out of an `Experts` module at `ours`, from HF names of (gate, up, down)."""
    return [experts(ours + ("experts", "w_gate_EDF"), hf_of(0)),
            experts(ours + ("experts", "w_in_EDF"), hf_of(1)),
            experts(ours + ("experts", "w_out_EFD"), hf_of(2))]


def _attention(cfg: ModelConfig, i: int, p: str) -> list[Entry]:
    a = ("blocks", i, "attn")
    out = [linear(a + ("w_q_DHQ",), p + "self_attn.q_proj.weight"),
           linear(a + ("w_k_DNQ",), p + "self_attn.k_proj.weight"),
           linear(a + ("w_v_DNU",), p + "self_attn.v_proj.weight"),
           linear(a + ("w_o_HUD",), p + "self_attn.o_proj.weight", n_in=2)]
    if cfg.attention_bias:
        out += [vector(a + (f"b_{x}_{s}",), p + f"self_attn.{x}_proj.bias")
                for x, s in (("q", "HQ"), ("k", "NQ"), ("v", "NU"))]
    if cfg.qk_norm is not None:
        out += [vector(a + ("q_norm", "scale"), p + "self_attn.q_norm.weight"),
                vector(a + ("k_norm", "scale"), p + "self_attn.k_norm.weight")]
    return out


def _moe(cfg: ModelConfig, family: str, i: int, p: str) -> list[Entry]:
    f = ("blocks", i, "ffn")
    m = cfg.moe
    names = _FFN_NAMES.get(family, _DEFAULT_FFN)
    mlp = p + ("block_sparse_moe." if family == "mixtral" else "mlp.")
    out = [linear(f + ("router", "w_DE"), mlp + "gate.weight")]
    out += _ffn(f, lambda j: [f"{mlp}experts.{e}.{names[j]}.weight" for e in range(m.num_routed_experts)])
    if m.num_shared_experts:
        shared = "shared_expert" if family == "qwen2_moe" else "shared_experts"
        out += _ffn(f + ("shared",), lambda j: [f"{mlp}{shared}.{_DEFAULT_FFN[j]}.weight"])
    if m.shared_expert_gate:
        out.append(linear(f + ("shared_gate_D1",), mlp + "shared_expert_gate.weight"))
    return out


def weight_entries(cfg: ModelConfig, family: str) -> list[Entry]:
    """Every parameter of a `Transformer(cfg)` of `family`, with its HF tensors."""
    out = [same(("embed_VD",), "model.embed_tokens.weight"), vector(("final_norm", "scale"), "model.norm.weight")]
    if not cfg.tie_embeddings:
        out.append(linear(("unembed_DV",), "lm_head.weight"))
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        out += _attention(cfg, i, p)
        out += [vector(("blocks", i, "attn_norm", "scale"), p + "input_layernorm.weight"),
                vector(("blocks", i, "ffn_norm", "scale"), p + "post_attention_layernorm.weight")]
        if cfg.is_moe_layer(i):
            out += _moe(cfg, family, i, p)
        else:
            out += _ffn(("blocks", i, "ffn"), lambda j: [f"{p}mlp.{_DEFAULT_FFN[j]}.weight"])
    return out
