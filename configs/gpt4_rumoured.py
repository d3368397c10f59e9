r"""gpt4_rumoured: an MoE of the size RUMOURED for GPT-4. Built from rumour, not from any publication.

    python -m experiments.train --config=configs/gpt4_rumoured.py:full --print_config

OpenAI has published no architecture for GPT-4. This preset follows the widely repeated, unverified
2023 reports (e.g. SemiAnalysis, "GPT-4 Architecture, Infrastructure, ..."): about 1.8T parameters
over 120 layers, 16 experts of about 111B parameters each, 2 routed per token, about 280B parameters
active per token. The widths below (d_model 12288, expert width 36864, GELU) are our guesses that
land near those totals; nothing is tested against them, and nothing here should be cited as GPT-4.
tiny: the same shape of model (16 experts, top-2) at width 128.
"""
from configs import base

RUMOURED = {"total": 1.8e12, "active_per_token": 280e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", score_fn="softmax", normalize_topk=True, num_experts=16, num_experts_per_token=2,
               activation="gelu", moe_every=1)
    if arg == "tiny":
        return base.make("gpt4_rumoured_tiny", base.tiny_model(**moe, moe_d_ff=128))
    model = dict(vocab_size=100277, d_model=12288, num_layers=120, num_heads=96, d_ff=36864, max_seq_len=8192,
                 use_moe=True, moe_d_ff=36864, capacity_factor=None, eval_capacity_factor=None,
                 expert_backend="ragged_dot", **moe)
    return base.make("gpt4_rumoured", model, data=dict(seq_len=8192, batch_size=64))
