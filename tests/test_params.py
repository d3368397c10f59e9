"""count_params: hand counts on small configs, agreement with the full abstract model, and the published
Mixtral 8x7B and DeepSeek-V3 sizes (counted from shapes alone, in well under a second)."""
import math
import time

import jax
from flax import nnx

from moe_jax.moe_config import MoEConfig
from moe_jax.model_config import ModelConfig
from moe_jax.params import abstract_model, count_params


def gqa_cfg(**kw):
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, num_experts_per_token=2, num_shared_experts=1,
                    shared_expert_gate=True)
    fields = dict(vocab_size=64, d_model=32, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=48, moe=moe,
                  moe_every=2, first_dense_layers=1)
    return ModelConfig(**{**fields, **kw})


def test_hand_count_gqa_dense_and_moe_layers():
    c = count_params(gqa_cfg())
    # V 64, D 32, H 4, kv heads 2, head 8; layers 0, 2 dense (SwiGLU d_ff 48), layers 1, 3 MoE
    # (4 SwiGLU experts of width 16, k 2, one gated shared expert of width 16); RMSNorm (scale only); untied.
    assert c["embedding"] == 64 * 32 == 2048
    assert c["unembedding"] == 32 * 64 == 2048
    assert c["attention"] == 4 * (32 * 4 * 8 + 2 * 32 * 2 * 8 + 4 * 8 * 32) == 4 * 3072 == 12288  # q, k+v, o
    assert c["dense_ffn"] == 2 * (3 * 32 * 48) == 9216
    assert c["routed_experts"] == 2 * 4 * (3 * 32 * 16) == 12288
    assert c["routed_experts_active"] == 2 * 2 * (3 * 32 * 16) == 6144  # k / E = 2 / 4 of them
    assert c["shared_experts"] == 2 * (3 * 32 * 16 + 32) == 3136  # FFN + sigmoid gate vector
    assert c["router"] == 2 * 32 * 4 == 256
    assert c["norms"] == 4 * 2 * 32 + 32 == 288  # two per block + the final norm
    # 2048 + 2048 + 12288 + 9216 + 12288 + 3136 + 256 + 288
    assert c["total"] == 41568
    assert c["active_per_token"] == 41568 - 12288 + 6144 == 35424
    assert c["non_embedding"] == 41568 - 4096 == 37472
    assert c["active_non_embedding"] == 35424 - 4096
    assert c["buffers"] == 0


def test_hand_count_mla_tied_layernorm_biased_experts():
    moe = MoEConfig(d_model=32, d_ff=16, num_experts=4, num_experts_per_token=1, activation="gelu",
                    expert_bias=True, use_correction_bias=True)
    cfg = ModelConfig(vocab_size=64, d_model=32, num_layers=2, num_heads=4, d_ff=48, attention="mla",
                      q_lora_rank=10, kv_lora_rank=12, qk_nope_head_dim=6, qk_rope_head_dim=4, v_head_dim=5,
                      norm="layernorm", tie_embeddings=True, moe=moe, moe_output_norm=True)
    c = count_params(cfg)
    # MLA per layer: W_DQ 32*10 = 320, q RMSNorm 10, W_UQ 10*4*(6+4) = 400, W_DKV 32*12 = 384, W_KR 32*4 = 128,
    # kv RMSNorm 12, W_UK 12*4*6 = 288, W_UV 12*4*5 = 240, W_O 4*5*32 = 640: 2422
    assert c["attention"] == 2 * 2422 == 4844
    # experts per layer: w_in 4*32*16 = 2048, w_out 4*16*32 = 2048, b_in 4*16 = 64, b_out 4*32 = 128: 4288
    assert c["routed_experts"] == 2 * 4288 == 8576
    assert c["routed_experts_active"] == 2 * 4288 // 4 == 2144  # k / E = 1 / 4
    assert c["unembedding"] == 0 and c["embedding"] == 2048
    assert c["norms"] == 2 * 3 * 64 + 64 == 448  # LayerNorm scale + bias; attn, ffn, moe-output norms
    assert c["total"] == 2048 + 4844 + 8576 + 2 * 32 * 4 + 448 == 16172
    assert c["active_per_token"] == 16172 - 8576 + 2144 == 9740
    assert c["buffers"] == 2 * 4  # the correction biases are state, not parameters


def test_agrees_with_the_full_abstract_model():
    """count_params counts one block per kind and multiplies; the full model, every block traced, agrees."""
    cfg = gqa_cfg(num_layers=7)  # layers 1, 3, 5 MoE; 0, 2, 4, 6 dense
    model = abstract_model(cfg)
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert count_params(cfg)["total"] == sum(math.prod(p.shape) for p in params)
    assert all(isinstance(p, jax.ShapeDtypeStruct) for p in params)  # nothing was allocated


def test_mixtral_8x7b():
    moe = MoEConfig(d_model=4096, d_ff=14336, num_experts=8, num_experts_per_token=2)
    cfg = ModelConfig(vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, d_ff=14336,
                      moe=moe, max_seq_len=32768, rope_theta=1e6)
    c = count_params(cfg)
    # per layer: attention 4096*4096*2 + 4096*1024*2 = 41,943,040; experts 8 * 3*4096*14336 = 1,409,286,144;
    # router 4096*8 = 32,768; norms 2*4096 = 8,192 -> 1,451,270,144; x 32 = 46,440,644,608;
    # + embedding and head 2 * 32000*4096 = 262,144,000 + final norm 4096 = 46,702,792,704 (Mistral: 46.7B)
    assert c["total"] == 46_702_792_704
    # active: experts 2 of 8 -> 352,321,536 per layer; 394,305,536 * 32 + 262,148,096 = 12,879,925,248 (12.9B)
    assert c["active_per_token"] == 12_879_925_248


def test_deepseek_v3_671b_in_seconds():
    moe = MoEConfig(d_model=7168, d_ff=2048, num_experts=256, num_experts_per_token=8, num_shared_experts=1,
                    score_fn="sigmoid", normalize_topk=True, routed_scaling_factor=2.5, n_expert_groups=8,
                    topk_groups=4, use_correction_bias=True)
    cfg = ModelConfig(vocab_size=129280, d_model=7168, num_layers=61, num_heads=128, d_ff=18432, attention="mla",
                      q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                      v_head_dim=128, first_dense_layers=3, moe=moe, max_seq_len=4096)
    start = time.perf_counter()
    c = count_params(cfg)
    assert time.perf_counter() - start < 10
    # MLA per layer: 7168*1536 + 1536 + 1536*128*192 + 7168*576 + 512 + 512*128*256 + 128*128*7168 = 187,107,328
    assert c["attention"] == 61 * 187_107_328
    # dense layer: 187,107,328 + 3*7168*18432 + 2*7168 = 583,483,392 (x 3)
    # MoE layer: 187,107,328 + 257 experts * 44,040,192 + router 7168*256 + 2*7168 = 11,507,286,016 (x 58)
    # + embedding and head 2 * 129280*7168 = 1,853,358,080 + final norm 7168
    assert c["total"] == 3 * 583_483_392 + 58 * 11_507_286_016 + 1_853_358_080 + 7168 == 671_026_404_352
    # active MoE layer: 187,107,328 + 9 * 44,040,192 + 1,835,008 + 14,336 = 585,318,400
    assert c["active_per_token"] == 3 * 583_483_392 + 58 * 585_318_400 + 1_853_358_080 + 7168 == 37_552_282_624
    # the paper's 671B total; its "37B activated" is 37.55B here with both embedding tables, 35.70B without
    assert round(c["total"] / 1e9) == 671
    assert c["active_non_embedding"] == 37_552_282_624 - 1_853_358_080
    assert c["buffers"] == 58 * 256  # the correction biases


def test_deepseek_v3_with_mtp_685b():
    """configs/deepseek_v3.py:full (mtp_depth=1): the MTP module shares the embedding and the output head."""
    import importlib

    from moe_jax.train.run_config import build_run_config

    cfg = build_run_config(importlib.import_module("configs.deepseek_v3").get_config("full")).model
    assert cfg.mtp_depth == 1
    c = count_params(cfg)
    # MTP module: M_1 2*7168*7168 = 102,760,448 + hidden, embedding and final RMSNorms 3*7168 = 21,504
    # + one MoE decoder layer 11,507,286,016 (as in test_deepseek_v3_671b_in_seconds) = 11,610,067,968
    assert c["mtp"] == 102_760_448 + 21_504 + 11_507_286_016 == 11_610_067_968
    assert c["main_model"] == 671_026_404_352  # unchanged by the MTP module
    assert c["total"] == 671_026_404_352 + 11_610_067_968 == 682_636_472_320
    # DeepSeek's release stores the MTP layer with its own copies of the embedding and the output head,
    # 2 * 129280*7168 = 1,853,358,080: 684,489,830,400, the "671B + 14B = 685B" of the Hugging Face release
    # (its MTP "14B" = 11.61B + 1.85B = 13.46B; README_WEIGHTS: "11.5B unique parameters").
    assert c["total"] + c["embedding"] + c["unembedding"] == 684_489_830_400
    assert abs((c["total"] + c["embedding"] + c["unembedding"]) / 685e9 - 1) < 0.001
    # inference runs the main model only; a training token also runs M_1 and the MTP layer's active part:
    # 102,781,952 + 585,318,400 = 688,100,352
    assert c["active_per_token"] == 37_552_282_624
    assert c["mtp_active"] == 688_100_352
    assert c["buffers"] == 59 * 256  # the MTP layer's router has a correction bias too
