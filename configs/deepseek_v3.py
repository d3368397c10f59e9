r"""DeepSeek-V3 (DeepSeek-AI 2024, arXiv 2412.19437).

    python -m experiments.train --config=configs/deepseek_v3.py:tiny --workdir=runs/dsv3_tiny

Published: 671B total parameters, 37B activated per token (abstract), the multi-token-prediction
module (14B) not included; 685B with it (the Hugging Face release). 61 layers, d_model 7168, 128
heads with MLA (q_lora_rank 1536, kv_lora_rank 512, qk_nope 128 + qk_rope 64, v 128), vocab 129280,
untied; the first 3 layers dense (FFN 18432), the rest with 1 shared + 256 routed experts of width 2048, top-8 by sigmoid scores plus
a correction bias used for selection only (auxiliary-loss-free balancing, bias update speed 1e-3),
group-limited (8 groups, top-4 groups by the sum of each group's top-2 biased scores), weights
normalised then scaled by 2.5; a tiny sequence-wise balance loss (alpha 1e-4). One multi-token-
prediction module (section 2.2; moe_jax/mtp.py): mtp_depth=1, an MoE block; mtp_loss_weight=0.3, the
paper's weight for the first 10T of its 14.8T training tokens (0.1 after): a run from scratch starts
there, and nothing here schedules the weight down.
tiny: 4 layers of width 128, MLA, first layer dense, 16 routed experts of width 64 in 4 groups
(keep 2), top-4, sigmoid + bias, 1 shared expert, one MTP module (an MoE block) like the full model's.
"""
from configs import base

# total: the Hugging Face release, 671B main model + "14B" MTP module = 685B, whose MTP layer stores its own
# copies of the embedding and the output head (1.85B); we share them (682.6B built, 684.5B with the copies:
# tests/test_params.py). mtp: DeepSeek's README_WEIGHTS, "11.5B unique parameters" (ours 11.61B).
PUBLISHED = {"total": 685e9, "main_model": 671e9, "mtp": 11.5e9, "active_per_token": 37e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="sigmoid", normalize_topk=True, use_correction_bias=True,
               bias_update_rate=1e-3, activation="swiglu", num_shared_experts=1, moe_every=1,
               attention="mla", balance_loss_coef=1e-4, balance_loss_scope="sequence", z_loss_coef=0.0,
               mtp_depth=1, mtp_loss_weight=0.3)
    if arg == "tiny":
        return base.make("deepseek_v3_tiny", base.tiny_model(
            **moe, first_dense_layers=1, num_experts=16, num_experts_per_token=4, moe_d_ff=64,
            n_expert_groups=4, topk_groups=2, routed_scaling_factor=1.0, q_lora_rank=64, kv_lora_rank=32,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32))
    model = dict(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, d_ff=18432, max_seq_len=4096,
                 q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                 first_dense_layers=3, use_moe=True, num_experts=256, num_experts_per_token=8, moe_d_ff=2048,
                 n_expert_groups=8, topk_groups=4, routed_scaling_factor=2.5, capacity_factor=None,
                 eval_capacity_factor=None, expert_backend="ragged_dot", **moe)
    return base.make("deepseek_v3", model, data=dict(seq_len=4096, batch_size=64))
