r"""Qwen1.5-MoE-A2.7B (Qwen team 2024, https://qwenlm.github.io/blog/qwen-moe/; HF Qwen/Qwen1.5-MoE-A2.7B).

    python -m experiments.train --config=configs/qwen_moe.py:tiny --workdir=runs/qwen_tiny

Published: 14.3B total parameters, 2.7B activated per token (2.0B of them non-embedding; blog post
and model card). 24 layers, d_model 2048, 16 heads, vocab 151936, untied;
60 fine-grained routed experts of width 1408 (an FFN of 5632 split 4 ways, i.e. granularity 4 of 15
experts), top-4 with softmax -> top-4 and no renormalisation (norm_topk_prob false), plus a shared
expert of width 5632 whose output is scaled per token by sigmoid(x w). Attention q/k/v biases of
the original (0.15M parameters) are not modelled.
tiny: 4 layers of width 128, 16 experts of width 64, top-4, one gated shared expert of width 256.
"""
from configs import base

PUBLISHED = {"total": 14.3e9, "active_per_token": 2.7e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="softmax", normalize_topk=False, activation="swiglu",
               num_shared_experts=1, shared_expert_gate=True, moe_every=1)
    if arg == "tiny":
        return base.make("qwen_moe_tiny", base.tiny_model(
            **moe, num_experts=16, num_experts_per_token=4, moe_d_ff=64, shared_d_ff=256))
    model = dict(vocab_size=151936, d_model=2048, num_layers=24, num_heads=16, d_ff=5632, rope_theta=1e6,
                 max_seq_len=8192, use_moe=True, num_experts=60, num_experts_per_token=4, moe_d_ff=1408,
                 shared_d_ff=5632, capacity_factor=None, eval_capacity_factor=None, expert_backend="ragged_dot",
                 **moe)
    return base.make("qwen1.5_moe_a2.7b", model, data=dict(seq_len=8192, batch_size=64))
