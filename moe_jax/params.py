"""Parameter accounting from a `ModelConfig` alone, via `nnx.eval_shape` (shapes only, nothing allocated):
a 671B DeepSeek-V3 layout is counted in seconds.

    count_params(cfg) -> {"total", "active_per_token", "embedding", "unembedding", "non_embedding",
                          "active_non_embedding", "attention", "dense_ffn", "routed_experts",
                          "routed_experts_active", "shared_experts", "router", "norms", "buffers",
                          "mtp", "mtp_active", "main_model"}

Active per token: routed experts count k / E of their parameters (each token runs k of E experts:
`MoEConfig.top_k` / `num_routed_experts`, after granularity); everything else -- attention, dense
FFNs, shared experts, routers, norms, the embedding and the unembedding -- counts in full. For expert
choice k is the mean number of experts per token at capacity factor 1; for Soft MoE the split of
compute over tokens depends on the group size and "active per token" is only nominal.

"embedding" is the input table, "unembedding" the output head (0 when tied); "non_embedding" excludes
both (Kaplan et al. 2020's N). "buffers" counts non-trainable state (DeepSeek-V3 correction biases),
which is not in "total".

Multi-token prediction (`ModelConfig.mtp_depth`, moe_jax/mtp.py): "mtp" counts every parameter of the
MTP modules (per module: M_k 2D x D, three norms, one block; the embedding and the output head are the
main model's and are not counted again), and is in "total" and "non_embedding", but in none of the
other categories; "main_model" = total - mtp. The MTP modules are training-only: "active_per_token"
(and "active_non_embedding") are the main model's, what inference runs; "mtp_active" is what a token
runs through in the MTP modules during training (their routed experts at k / E).
"""
from __future__ import annotations

import dataclasses
import math

import jax
from flax import nnx

from moe_jax.model_config import ModelConfig
from moe_jax.transformer import Transformer


def _size(module, kind=nnx.Param) -> int:
    if module is None:
        return 0
    if isinstance(module, nnx.Variable):
        return math.prod(module.shape) if isinstance(module, kind) else 0
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(module, kind)))


def abstract_model(cfg: ModelConfig) -> Transformer:
    """The model with `jax.ShapeDtypeStruct` leaves: shapes and dtypes without memory."""
    return nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(params=0)))


def _prototype(cfg: ModelConfig) -> tuple[ModelConfig, dict[bool, int]]:
    """A config with one block of each kind present (dense, MoE), and how many blocks of each kind `cfg` has.

    Blocks of one kind have identical parameters (a block depends on its index only through
    `is_moe_layer`), so counting one of each and multiplying is exact. It keeps the traced init small:
    under `eval_shape` every rng draw costs time linear in the trace so far (flax 0.12.8 / JAX 0.10.2
    build an error message per `RngStream` update), which makes a 61-layer trace quadratic (~22 s).
    """
    n_moe = len(cfg.moe_layer_indices)
    n_dense = cfg.num_layers - n_moe
    proto = dataclasses.replace(cfg, num_layers=int(n_dense > 0) + int(n_moe > 0),
                                first_dense_layers=int(n_dense > 0), moe_every=1, scan_layers=False)
    return proto, {False: n_dense, True: n_moe}


def count_params(cfg: ModelConfig) -> dict[str, int]:
    """Parameter counts of the model `cfg` describes (see the module docstring for the categories)."""
    proto, multiplicity = _prototype(cfg)
    model = abstract_model(proto)
    counts = dict(embedding=_size(model.embed_VD), unembedding=_size(model.unembed_DV), attention=0,
                  dense_ffn=0, routed_experts=0, routed_experts_active=0, shared_experts=0, router=0,
                  norms=_size(model.final_norm))
    mtp = _size(model.mtp)
    total = _size(model) - sum(_size(b) for b in model.blocks)  # the MTP modules counted once: D in the prototype
    buffers = _size(model, nnx.Variable) - _size(model) - sum(_size(b, nnx.Variable) - _size(b) for b in model.blocks)
    mtp_routed = mtp_routed_active = 0
    for _, layer in ([] if model.mtp is None else model.mtp.moe_layers()):
        routed = _size(layer.experts)
        mtp_routed += routed
        mtp_routed_active += routed * layer.cfg.top_k // layer.cfg.num_routed_experts
    counts["mtp"] = mtp
    for block in model.blocks:
        n = multiplicity[block.is_moe]
        total += n * _size(block)
        buffers += n * (_size(block, nnx.Variable) - _size(block))
        counts["attention"] += n * _size(block.attn)
        counts["norms"] += n * (_size(block.attn_norm) + _size(block.ffn_norm) + _size(block.moe_norm))
        if not block.is_moe:
            counts["dense_ffn"] += n * _size(block.ffn)
            continue
        moe, mcfg = block.ffn, block.ffn.cfg
        routed = _size(moe.experts)  # every routed-expert tensor is stacked over E
        counts["routed_experts"] += n * routed
        counts["routed_experts_active"] += n * (routed * mcfg.top_k // mcfg.num_routed_experts)
        counts["shared_experts"] += n * (_size(moe.shared) + _size(moe.shared_gate_D1))
        counts["router"] += n * _size(moe.router)
    parts = sum(v for k, v in counts.items() if k != "routed_experts_active")
    if parts != total:  # a parameter this accounting does not know about: fail rather than misreport
        raise RuntimeError(f"count_params: categories sum to {parts}, the model holds {total}; "
                           "classify the new parameter in moe_jax/params.py.")
    embed = counts["embedding"] + counts["unembedding"]
    active = total - mtp - counts["routed_experts"] + counts["routed_experts_active"]
    return dict(total=total, active_per_token=active, non_embedding=total - embed,
                active_non_embedding=active - embed, buffers=buffers, main_model=total - mtp,
                mtp_active=mtp - mtp_routed + mtp_routed_active, **counts)
