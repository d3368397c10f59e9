r"""Grok-1 (xAI 2024, open release https://github.com/xai-org/grok-1).

    python -m experiments.train --config=configs/grok1.py:tiny --workdir=runs/grok_tiny

Published: 314B parameters, 8 experts, 2 active per token (release README). From the released
model code: 64 layers, d_model 6144, 48 query heads / 8 key-value heads of width 128, vocab 131072,
expert FFN widening factor 8 -> hidden width int(8 * 6144) * 2 // 3 = 32768 with a GELU-gated
(GeGLU) unit, every layer MoE, softmax top-2; the output projection reuses the embedding matrix.
Active parameters are not published (83.8B by this count: attention 5.6B + 2 of 8 experts 77.3B + embeddings).
tiny: 4 layers of width 128, 8 experts of width 256, top-2, GeGLU.
"""
from configs import base

PUBLISHED = {"total": 314e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="softmax", normalize_topk=True, num_experts=8, num_experts_per_token=2,
               activation="geglu", moe_every=1, tie_embeddings=True)
    if arg == "tiny":
        return base.make("grok1_tiny", base.tiny_model(**moe, num_kv_heads=2, moe_d_ff=256))
    model = dict(vocab_size=131072, d_model=6144, num_layers=64, num_heads=48, num_kv_heads=8, head_dim=128,
                 d_ff=32768, max_seq_len=8192, use_moe=True, moe_d_ff=32768, capacity_factor=None,
                 eval_capacity_factor=None, expert_backend="ragged_dot", **moe)
    return base.make("grok1", model, data=dict(seq_len=8192, batch_size=64))
