"""FLOP accounting of one MoE layer's forward pass (multiply-adds count 2), from the config alone.

useful_flops:   what the model needs: the router, k expert FFNs per token, the shared experts.
executed_flops: what the configured path computes: every capacity slot (padding included), the
                one-hot dispatch/combine einsums, or the dropless path's per-expert block padding.
Elementwise work (activations, softmax) is not counted; it is small next to the matmuls.
A backward pass costs about twice the forward for each term.
"""
from __future__ import annotations

from moe_jax.config import MoEConfig


def ffn_flops_per_token(d_model: int, d_ff: int, gated: bool) -> int:
    return 2 * d_model * d_ff * (3 if gated else 2)


def layer_flops(cfg: MoEConfig, *, num_tokens: int, group_size: int, train: bool) -> dict[str, int]:
    T, S, D = num_tokens, group_size, cfg.d_model
    G = T // S
    E = cfg.num_routed_experts
    per_row = ffn_flops_per_token(D, cfg.expert_d_ff, cfg.gated)
    router_out = E * cfg.soft_slots_per_expert if cfg.router == "soft" else E
    router = 0 if cfg.router == "hash" else 2 * T * D * router_out
    shared = T * ffn_flops_per_token(D, cfg.shared_width, cfg.gated) if cfg.num_shared_experts else 0
    if cfg.shared_expert_gate:
        shared += 2 * T * D

    C = cfg.capacity(S, train)
    dispatch = 0
    if C is None:  # dropless: sorted rows, each expert padded to a block multiple (static worst case)
        b = cfg.dropless_block_size if cfg.expert_backend == "blocked" else 1
        rows = -(-(T * cfg.top_k + E * (b - 1)) // b) * b
        useful_rows = T * cfg.top_k
        dispatch = 2 * T * cfg.top_k * D  # weighted sum over the k choices
    else:
        rows = E * G * C
        if cfg.router in ("expert_choice", "soft"):
            useful_rows = rows  # every slot holds a token (or a token mixture)
        else:
            useful_rows = T * cfg.top_k
        if cfg.dispatch == "einsum":
            dispatch = 2 * (2 * G * S * E * C * D)  # dispatch and combine one-hot einsums
        else:
            dispatch = 2 * T * cfg.top_k * D
    return {
        "router_flops": router,
        "useful_flops": router + useful_rows * per_row + shared,
        "executed_flops": router + rows * per_row + dispatch + shared,
    }
