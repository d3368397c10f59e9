r"""Switch Transformer, Switch-Base with 128 experts (Fedus et al. 2022, arXiv 2101.03961).

    python -m experiments.train --config=configs/switch.py:tiny --workdir=runs/switch_tiny
    python -m experiments.train --config=configs/switch.py:full --print_config   # parameter count only

Published: Switch-Base-128 has about 7.4B parameters (Table 9 / the released checkpoint
google/switch-base-128: 7.42B), top-1 routing, an MoE FFN in every other layer, d_model 768,
d_ff 3072 (ReLU, no gating), 12 heads, vocab 32128 (T5 SentencePiece), capacity factor 1.25 train /
2.0 eval, aux loss 1e-2, router in float32, reduced init scale 0.1.
Here: the T5 encoder-decoder (12 + 12 layers) is represented as a 24-layer decoder-only stack with
the same widths and MoE every other layer (layers 1, 3, ..., 23: 12 MoE layers, as in the original's
12 sparse layers); the decoder's cross-attention (28M parameters) is absent, so the count is
about 7.39B, within 0.5% of the published 7.42B. Tied embeddings, as T5.1.0.
tiny: 4 layers of width 128, 8 experts, top-1, trains in a few minutes on 2 CPU cores.
"""
from configs import base

PUBLISHED = {"total": 7.42e9}


def get_config(arg=None):
    arg = base.check_arg(arg)
    moe = dict(router="top_k", num_experts_per_token=1, capacity_factor=1.25, eval_capacity_factor=2.0,
               activation="relu", expert_init_scale=0.1, router_init_scale=0.1, balance_loss_coef=1e-2,
               z_loss_coef=0.0, moe_every=2, first_dense_layers=1, tie_embeddings=True, norm="rmsnorm")
    if arg == "tiny":
        return base.make("switch_tiny", base.tiny_model(**moe, num_experts=8, moe_d_ff=256, d_ff=256))
    model = dict(vocab_size=32128, d_model=768, num_layers=24, num_heads=12, d_ff=3072, max_seq_len=512,
                 use_moe=True, moe_d_ff=3072, num_experts=128, **moe)
    return base.make("switch_base_128", model, data=dict(seq_len=512, batch_size=256))
