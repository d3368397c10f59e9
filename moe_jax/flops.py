"""FLOP accounting of one MoE layer, and the 6N-plus-attention count of a model, from configs alone
(multiply-adds count 2).

useful_flops:   what the model needs: the router, k expert FFNs per token, the shared experts.
executed_flops: what the configured path computes: every capacity slot (padding included), the
                one-hot dispatch/combine einsums, or the dropless path's per-expert block padding.
Elementwise work (activations, softmax) is not counted; it is small next to the matmuls.

`layer_flops` counts the forward pass; `layer_train_flops` forward plus backward, where every
matmul with a trainable or differentiated operand on each side costs twice its forward again
(gradients of both operands), except the one-hot dispatch einsum, whose one-hot operand is a
constant (once again: the input gradient). For the einsum path this agrees with XLA's
`cost_analysis()` of the compiled step within a few percent (benchmarks/moe_layer.py checks it).

One-hot einsum dispatch and combine cost 2 * G * S * E * C * D each; relative to the useful expert
FLOPs of gated experts (6 * D * F per token and choice) that is 2 * cf * S / (3F) forward and
5 * cf * S / (9F) forward+backward: it grows linearly with the group size S.

`train_flops_per_token` counts a whole model's training step the common way (PaLM, Chowdhery et al.
2022, App. B): 6 x the matmul parameters a token passes through + 6 x the attention score and value
matmuls; `non_moe_train_flops_per_token` is its part outside the MoE layers, for callers that count
those with `layer_train_flops`.
"""
from __future__ import annotations

from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig


def ffn_flops_per_token(d_model: int, d_ff: int, gated: bool) -> int:
    return 2 * d_model * d_ff * (3 if gated else 2)


def dense_train_flops(d_model: int, d_ff: int, *, num_tokens: int, gated: bool) -> int:
    """Forward+backward FLOPs of a dense FFN (the dense-equivalent baseline): 3x the forward."""
    return 3 * num_tokens * ffn_flops_per_token(d_model, d_ff, gated)


def _terms(cfg: MoEConfig, *, num_tokens: int, group_size: int, train: bool) -> dict[str, tuple[int, float]]:
    """Forward FLOPs of each executed term and the factor its backward adds (backward = factor * forward)."""
    T, S, D, K = num_tokens, group_size, cfg.d_model, cfg.top_k
    G = T // S
    E = cfg.num_routed_experts
    per_row = ffn_flops_per_token(D, cfg.expert_d_ff, cfg.gated)
    router_out = E * cfg.soft_slots_per_expert if cfg.router == "soft" else E
    terms = {"router": (0 if cfg.router == "hash" else 2 * T * D * router_out, 2.0)}
    shared = T * ffn_flops_per_token(D, cfg.shared_width, cfg.gated) if cfg.num_shared_experts else 0
    if cfg.shared_expert_gate:
        shared += 2 * T * D
    terms["shared"] = (shared, 2.0)

    C = cfg.capacity(S, train)
    if C is None:
        # Dropless: sorted rows, each expert padded to a block multiple. This is the static buffer, an
        # upper bound: the blocked backend runs only each expert's own blocks, T * K rows plus on
        # average E * (b - 1) / 2 of padding (benchmarks/moe_layer.py counts the rows it really ran).
        b = cfg.dropless_block_size if cfg.expert_backend == "blocked" else 1
        rows = -(-(T * K + E * (b - 1)) // b) * b
        terms["experts"] = (rows * per_row, 2.0)
        # y = sum_k w * out: forward T K D multiply-adds; backward d_out = w * g, d_w = <g, out>.
        terms["dispatch"] = (2 * T * K * D, 1.5)
    else:
        terms["experts"] = (E * G * C * per_row, 2.0)
        if cfg.dispatch == "einsum":
            one_einsum = 2 * G * S * E * C * D
            # dispatch: its backward is the input gradient only (the one-hot is a constant, except for
            # Soft MoE's dispatch weights); combine: gradients of the expert outputs and the weights.
            dispatch_bwd = 2.0 if cfg.router == "soft" else 1.0
            terms["dispatch"] = (2 * one_einsum, (dispatch_bwd + 2.0) / 2)
        else:
            terms["dispatch"] = (2 * T * K * D, 1.5)
    return terms


def _useful_forward(cfg: MoEConfig, *, num_tokens: int, group_size: int, train: bool, terms) -> int:
    T, S = num_tokens, group_size
    per_row = ffn_flops_per_token(cfg.d_model, cfg.expert_d_ff, cfg.gated)
    C = cfg.capacity(S, train)
    if C is not None and cfg.router in ("expert_choice", "soft"):
        useful_rows = cfg.num_routed_experts * (T // S) * C  # every slot holds a token (or a token mixture)
    else:
        useful_rows = T * cfg.top_k
    return terms["router"][0] + useful_rows * per_row + terms["shared"][0]


def layer_flops(cfg: MoEConfig, *, num_tokens: int, group_size: int, train: bool) -> dict[str, int]:
    """Forward FLOPs: router_flops, useful_flops, executed_flops."""
    terms = _terms(cfg, num_tokens=num_tokens, group_size=group_size, train=train)
    return {
        "router_flops": terms["router"][0],
        "useful_flops": _useful_forward(cfg, num_tokens=num_tokens, group_size=group_size, train=train,
                                        terms=terms),
        "executed_flops": sum(f for f, _ in terms.values()),
    }


def layer_train_flops(cfg: MoEConfig, *, num_tokens: int, group_size: int) -> dict[str, int]:
    """Forward+backward FLOPs of a training step (capacity of `capacity_factor`), and the forward alone.

    useful_flops is 3x the forward's useful FLOPs (each matmul's forward and both operand gradients).
    """
    terms = _terms(cfg, num_tokens=num_tokens, group_size=group_size, train=True)
    useful = _useful_forward(cfg, num_tokens=num_tokens, group_size=group_size, train=True, terms=terms)
    forward = sum(f for f, _ in terms.values())
    return {
        "useful_flops": 3 * useful,
        "executed_flops": int(sum(f * (1 + bwd) for f, bwd in terms.values())),
        "forward_useful_flops": useful,
        "forward_executed_flops": forward,
    }


def non_moe_train_flops_per_token(model: ModelConfig, counts: dict, seq_len: int) -> float:
    """Forward+backward FLOPs per token of everything but the MoE layers: 6 x the matmul parameters
    (attention projections, dense FFNs, the output projection; the embedding lookup excluded) + 6 x the
    attention score and value matmuls over the full L x L matrix. counts: `moe_jax.params.count_params(model)`."""
    matmul_params = counts["attention"] + counts["dense_ffn"] + model.vocab_size * model.d_model
    scores = 6 * model.num_layers * seq_len * model.num_heads * (model.qk_head_dim + model.value_head_dim)
    return 6.0 * matmul_params + scores


def mtp_train_flops_per_token(model: ModelConfig, counts: dict, seq_len: int) -> float:
    """Forward+backward FLOPs per token of the multi-token-prediction modules (0 without them): 6 x the
    parameters a token runs through in each (`counts["mtp_active"]`: M_k, the block at k / E of its routed
    experts; its few norm scales are counted as if they were matmul weights) + 6 x the shared output head
    once per depth + the attention score and value matmuls of one block per depth (counted at the full
    seq_len, as the main layers; depth k runs on seq_len - k positions)."""
    D = model.mtp_depth
    if not D:
        return 0.0
    scores = 6 * D * seq_len * model.num_heads * (model.qk_head_dim + model.value_head_dim)
    return 6.0 * (counts["mtp_active"] + D * model.vocab_size * model.d_model) + scores


def train_flops_per_token(model: ModelConfig, counts: dict, seq_len: int) -> float:
    """Forward+backward FLOPs per token of the whole model: `non_moe_train_flops_per_token` + 6 x the MoE
    layers' active parameters (routers, the k routed experts of a token, shared experts) +
    `mtp_train_flops_per_token` (training-only modules; 0 without them)."""
    moe_active = counts["router"] + counts["routed_experts_active"] + counts["shared_experts"]
    return (non_moe_train_flops_per_token(model, counts, seq_len) + 6.0 * moe_active
            + mtp_train_flops_per_token(model, counts, seq_len))
