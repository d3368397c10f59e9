r"""Mixtral 8x7B (Jiang et al. 2024, arXiv 2401.04088).

    python -m experiments.train --config=configs/mixtral.py:tiny --workdir=runs/mixtral_tiny
    python -m experiments.train --config=configs/mixtral.py:tiny --config.model.num_experts=16 --workdir=...

Published: 46.7B total parameters, 12.9B active per token (paper, Section 2). 32 layers, d_model 4096,
32 query heads / 8 key-value heads of width 128 (GQA), SwiGLU experts of width 14336, 8 experts,
top-2 with softmax -> top-2 -> renormalise, every layer MoE, vocab 32000, untied embeddings,
RoPE theta 1e6, dropless (no capacity) in the reference implementation.
tiny: 4 layers of width 128, 8 experts of width 256, top-2, capacity factor 1.25 (train) so the
dispatch paths are exercised; set capacity_factor=None, eval_capacity_factor=None,
expert_backend='blocked' for the dropless path.
"""
from configs import base

PUBLISHED = {"total": 46.7e9, "active_per_token": 12.9e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="softmax", topk_order="softmax_topk", normalize_topk=True,
               num_experts=8, num_experts_per_token=2, activation="swiglu", moe_every=1)
    if arg == "tiny":
        return base.make("mixtral_tiny", base.tiny_model(**moe, num_kv_heads=2, moe_d_ff=256))
    model = dict(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                 rope_theta=1e6, max_seq_len=32768, use_moe=True, moe_d_ff=14336, capacity_factor=None,
                 eval_capacity_factor=None, expert_backend="ragged_dot", **moe)
    return base.make("mixtral_8x7b", model, data=dict(seq_len=4096, batch_size=256))
