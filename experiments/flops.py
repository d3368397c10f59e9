"""Training FLOPs of a run, three ways, so that comparisons can be matched on any of them.

    run_flops(run_cfg) -> {"per_step": {...}, "per_token": {...}, "run": {...}}, each with
        useful_flops    what the model needs: attention, dense FFNs, output projection, the router and k
                        expert FFNs per token (shared experts included)
        router_flops    the router matmuls alone (part of useful_flops); they grow with the number of
                        routed experts E * G: Krajewski et al. 2024, Eq. 10
        executed_flops  what the configured path computes: every capacity slot (padding included), the
                        one-hot dispatch/combine einsums or the dropless block padding
        useful_flops_no_router

Everything is forward + backward of one training step (3x the forward for matmuls, see
`moe_jax.flops.layer_train_flops`). The MoE layers come from `moe_jax.flops.layer_train_flops`; the
rest from `moe_jax.flops.non_moe_train_flops_per_token`: 6 x matmul parameters per token (attention
projections, dense FFNs, the output projection; the embedding lookup excluded) plus 6 x the attention
score and value matmuls over the full L x L matrix, the count the training loop's `model_flops_per_s`
also uses. Elementwise work is not counted.
Evaluation FLOPs are not part of a run's budget.
"""
from __future__ import annotations

import functools

from moe_jax.flops import layer_flops, layer_train_flops, non_moe_train_flops_per_token
from moe_jax.params import count_params
from moe_jax.train.run_config import RunConfig


@functools.lru_cache(maxsize=256)
def _count_params(model_cfg) -> dict:
    return count_params(model_cfg)


def run_flops(run: RunConfig, counts: dict | None = None) -> dict:
    counts = counts or _count_params(run.model)
    tokens = run.data.batch_size * run.data.seq_len
    dense = non_moe_train_flops_per_token(run.model, counts, run.data.seq_len) * tokens
    step = {"useful_flops": dense, "router_flops": 0.0, "executed_flops": dense}
    moe = run.model.moe
    if moe is not None:
        n_layers = len(run.model.moe_layer_indices)
        S = moe.tokens_per_group(run.data.batch_size, run.data.seq_len)
        train = layer_train_flops(moe, num_tokens=tokens, group_size=S)
        router_forward = layer_flops(moe, num_tokens=tokens, group_size=S, train=True)["router_flops"]
        step["useful_flops"] += n_layers * train["useful_flops"]
        step["executed_flops"] += n_layers * train["executed_flops"]
        step["router_flops"] = n_layers * 3.0 * router_forward  # forward, input gradient, weight gradient
    step["useful_flops_no_router"] = step["useful_flops"] - step["router_flops"]
    steps = run.train.steps
    return {"per_step": step,
            "per_token": {k: v / tokens for k, v in step.items()},
            "run": {k: v * steps for k, v in step.items()}}
