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


def rope_order(nope: int, rope: int) -> np.ndarray:
    """Feature order of one MLA query/key head, ours from HF's: `ours[..., i] = hf[..., order[i]]`.

    DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... of the RoPE features; ours rotates
    (x_i, x_{i + P/2}) (rotate-half). Taking the even features then the odd ones turns one into the other
    (q.k is unchanged when q and k are permuted alike), so the layout change is a row permutation of the
    weights that produce RoPE features."""
    return np.concatenate([np.arange(nope), nope + np.arange(0, rope, 2), nope + np.arange(1, rope, 2)])


def _mla(cfg: ModelConfig, i: int, p: str) -> list[Entry]:
    import jax.numpy as jnp

    a, at = ("blocks", i, "attn"), p + "self_attn."
    O, P, Z = cfg.nope_head_dim, cfg.qk_rope_head_dim, cfg.kv_lora_rank
    order = rope_order(O, P)
    inverse = np.argsort(order)
    rope_order_P = order[O:] - O
    rope_inverse_P = np.argsort(rope_order_P)

    def q_to_hf(xs):  # [A, H, Q] -> [H * Q, A]
        x = xs[0][:, :, inverse]
        return [x.transpose(1, 2, 0).reshape(-1, x.shape[0])]

    def q_from_hf(hs, shapes):
        A, H, Q = shapes[0]
        return [hs[0].reshape(H, Q, A)[:, order, :].transpose(2, 0, 1)]

    def kv_a_to_hf(xs):  # w_dkv_DZ [D, Z], w_kr_DP [D, P] -> [Z + P, D]
        return [jnp.concatenate([xs[0].T, xs[1][:, rope_inverse_P].T], axis=0)]

    def kv_a_from_hf(hs, shapes):
        w = hs[0]
        return [w[:Z].T, w[Z:][rope_order_P].T]

    def kv_b_to_hf(xs):  # w_uk_ZHO [Z, H, O], w_uv_ZHU [Z, H, U] -> [H * (O + U), Z]
        w = jnp.concatenate([xs[0], xs[1]], axis=-1)
        return [w.transpose(1, 2, 0).reshape(-1, w.shape[0])]

    def kv_b_from_hf(hs, shapes):
        (Zk, H, _), (_, _, U) = shapes
        w = hs[0].reshape(H, O + U, Zk)
        return [w[:, :O].transpose(2, 0, 1), w[:, O:].transpose(2, 0, 1)]

    out = []
    if cfg.q_lora_rank is None:
        out.append(Entry((a + ("w_q_AHQ",),), (at + "q_proj.weight",), q_to_hf, q_from_hf))
    else:
        out += [linear(a + ("w_dq_DA",), at + "q_a_proj.weight"),
                vector(a + ("q_norm", "scale"), at + "q_a_layernorm.weight"),
                Entry((a + ("w_q_AHQ",),), (at + "q_b_proj.weight",), q_to_hf, q_from_hf)]
    out += [Entry((a + ("w_dkv_DZ",), a + ("w_kr_DP",)), (at + "kv_a_proj_with_mqa.weight",), kv_a_to_hf, kv_a_from_hf),
            vector(a + ("kv_norm", "scale"), at + "kv_a_layernorm.weight"),
            Entry((a + ("w_uk_ZHO",), a + ("w_uv_ZHU",)), (at + "kv_b_proj.weight",), kv_b_to_hf, kv_b_from_hf),
            linear(a + ("w_o_HUD",), at + "o_proj.weight", n_in=2)]
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
    if m.use_correction_bias:
        out.append(vector(f + ("router", "correction_bias_E"), mlp + "gate.e_score_correction_bias"))
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
        out += _mla(cfg, i, p) if cfg.attention == "mla" else _attention(cfg, i, p)
        out += [vector(("blocks", i, "attn_norm", "scale"), p + "input_layernorm.weight"),
                vector(("blocks", i, "ffn_norm", "scale"), p + "post_attention_layernorm.weight")]
        if cfg.is_moe_layer(i):
            out += _moe(cfg, family, i, p)
        else:
            out += _ffn(("blocks", i, "ffn"), lambda j: [f"{p}mlp.{_DEFAULT_FFN[j]}.weight"])
    return out
