r"""DeepSeek-V2 (DeepSeek-AI 2024, arXiv 2405.04434).

    python -m experiments.train --config=configs/deepseek_v2.py:tiny --workdir=runs/dsv2_tiny

Published: 236B total parameters, 21B activated per token (abstract). 60 layers, d_model 5120,
128 heads with Multi-head Latent Attention (q_lora_rank 1536, kv_lora_rank 512, per-head
qk_nope 128 + qk_rope 64, v 128), vocab 102400, untied; the first layer dense (FFN 12288), the
other 59 DeepSeekMoE layers with 2 shared + 160 routed experts of width 1536, top-6 by softmax,
device/group-limited routing (8 groups, top-3 groups, a group scored by its best expert: the released
code's group_limited_greedy; V3 sums each group's top two), routed_scaling_factor 16, no renormalisation
(appendix / released config).
tiny: 4 layers of width 128, MLA (kv_lora_rank 32, rope 16), first layer dense, 16 routed experts of
width 64, top-4 of 4 groups keeping 2, 2 shared experts.
"""
from configs import base

PUBLISHED = {"total": 236e9, "active_per_token": 21e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="softmax", normalize_topk=False, activation="swiglu",
               num_shared_experts=2, moe_every=1, first_dense_layers=1, attention="mla", group_score="max")
    if arg == "tiny":
        return base.make("deepseek_v2_tiny", base.tiny_model(
            **moe, num_experts=16, num_experts_per_token=4, moe_d_ff=64, n_expert_groups=4, topk_groups=2,
            routed_scaling_factor=1.0, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
            qk_rope_head_dim=16, v_head_dim=32))
    model = dict(vocab_size=102400, d_model=5120, num_layers=60, num_heads=128, d_ff=12288, max_seq_len=4096,
                 q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 use_moe=True, num_experts=160, num_experts_per_token=6, moe_d_ff=1536, n_expert_groups=8,
                 topk_groups=3, routed_scaling_factor=16.0, capacity_factor=None, eval_capacity_factor=None,
                 expert_backend="ragged_dot", **moe)
    return base.make("deepseek_v2", model, data=dict(seq_len=4096, batch_size=64))
