"""YaRN RoPE scaling (moe_jax/rope.py, ModelConfig.rope_scaling): hand-computed values and errors naming the field.

Parity with transformers 5.23.0 on whole models is in tests/test_hf_checkpoints.py (deepseek_v3_yarn, deepseek_v2).
"""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from moe_jax import rope
from moe_jax.attention import apply_rope
from moe_jax.model_config import ModelConfig

YARN = dict(rope_scaling="yarn", yarn_factor=4.0, yarn_original_max_len=16, yarn_beta_slow=0.01)


def mla(**kw) -> ModelConfig:
    base = dict(vocab_size=32, d_model=16, num_layers=1, num_heads=2, d_ff=32, attention="mla", kv_lora_rank=8,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8)
    return ModelConfig(**dict(base, **kw))


def test_correction_range_by_hand():
    # dim(r) = P ln(L0 / (2 pi r)) / (2 ln theta), P = 8, L0 = 16, theta = 1e4 (2 ln theta = 18.4207):
    # r = 32:   8 ln(16 / 201.06) = 8 * -2.5311 = -20.249 -> -1.0993, floor -2, clipped to 0
    # r = 0.01: 8 ln(16 / 0.062832) = 8 * 5.5399 = 44.319 -> 2.4060, ceil 3 (<= P - 1 = 7)
    assert rope.yarn_correction_range(8, 1e4, 16, 32, 0.01) == (0, 3)
    low, high = rope.yarn_correction_range(8, 1e4, 16, 32, 0.01, truncate=False)
    assert low == 0 and high == pytest.approx(2.4060, abs=1e-4)


def test_inv_freq_by_hand():
    # kept theta^(-2i/8) = 1, 0.1, 0.01, 0.001; interpolated (/ 4) = 0.25, 0.025, 0.0025, 0.00025;
    # ramp over [0, 3] = 0, 1/3, 2/3, 1 is the interpolated share:
    # i = 1: 0.025 / 3 + 0.1 * 2 / 3 = 0.075;  i = 2: 0.0025 * 2 / 3 + 0.01 / 3 = 0.005
    got = rope.yarn_inv_freq(8, 1e4, 4.0, 16, 32, 0.01)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, [1.0, 0.075, 0.005, 0.00025], rtol=1e-6)
    # factor 1: interpolation is the identity, so the plain frequencies come back
    np.testing.assert_allclose(rope.yarn_inv_freq(8, 1e4, 1.0, 16), [1.0, 0.1, 0.01, 0.001], rtol=1e-6)


def test_mscale_factors_by_hand():
    m = 0.1 * math.log(40) + 1  # m(40, 1) = 1.368888
    assert rope.yarn_get_mscale(40, 1.0) == pytest.approx(1.368888, abs=1e-6)
    assert rope.yarn_get_mscale(1.0, 1.0) == 1.0  # no extension, no temperature
    assert rope.yarn_softmax_factor(40, 1.0) == pytest.approx(m * m)  # DeepSeek-V3's release: 1.873854
    assert rope.yarn_softmax_factor(40, 0.0) == 1.0
    assert rope.yarn_attention_factor(40, 1.0, 1.0) == 1.0  # mscale == mscale_all_dim: the ratio is 1
    assert rope.yarn_attention_factor(40) == pytest.approx(m)  # no mscales: m(s, 1)
    # m(4, 1) / m(4, 0.8) = 1.138629 / 1.110904 = 1.024958 (the deepseek_v3_yarn fixture)
    assert rope.yarn_attention_factor(4.0, 1.0, 0.8) == pytest.approx(1.024958, abs=1e-6)
    assert rope.yarn_attention_factor(4.0, 1.0, 0.8, attention_factor=0.5) == 0.5  # given: used as is


def test_model_config_derives_yarn_frequencies_and_softmax_scale():
    cfg = mla(**YARN, yarn_mscale=1.0, yarn_mscale_all_dim=0.8)
    inv_freq, factor = cfg.rope_frequencies()
    np.testing.assert_allclose(inv_freq, [1.0, 0.075, 0.005, 0.00025], rtol=1e-6)  # rope_dim = qk_rope_head_dim
    assert factor == pytest.approx(1.024958, abs=1e-6)
    m = 0.1 * 0.8 * math.log(4) + 1
    assert cfg.softmax_scale == pytest.approx(m * m / math.sqrt(16))  # qk head 8 + 8
    plain = mla()
    assert plain.rope_frequencies() == (None, 1.0) and plain.softmax_scale == 1 / math.sqrt(16)


def test_apply_rope_with_given_frequencies_and_factor():
    x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 2, 8)), jnp.float32)
    pos = jnp.array([[0, 5, 17]])
    plain = tuple((1e4 ** (-np.arange(4) * 2.0 / 8)).astype(np.float32).tolist())
    np.testing.assert_allclose(apply_rope(x, pos, 1e4, plain), apply_rope(x, pos, 1e4), rtol=1e-6, atol=1e-6)
    # the factor scales cos and sin, so every rotated vector's norm
    scaled = apply_rope(x, pos, 1e4, plain, 1.5)
    np.testing.assert_allclose(jnp.linalg.norm(scaled, axis=-1), 1.5 * jnp.linalg.norm(x, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("kw,field", [
    (dict(yarn_factor=4.0), "yarn_factor"),  # a YaRN field without rope_scaling
    (dict(yarn_mscale_all_dim=1.0), "yarn_mscale_all_dim"),
    (dict(rope_scaling="ntk"), "rope_scaling"),
    (dict(rope_scaling="yarn", yarn_factor=4.0), "yarn_original_max_len"),
    (dict(YARN, yarn_factor=0.5), "yarn_factor"),
    (dict(YARN, yarn_beta_slow=64.0), "yarn_beta_slow"),
    (dict(YARN, yarn_mscale=-1.0), "yarn_mscale"),
    (dict(YARN, yarn_attention_factor=0.0), "yarn_attention_factor"),
])
def test_bad_rope_scaling_field_is_named(kw, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        mla(**kw)


def test_yarn_fields_survive_the_run_record_and_the_config_section():
    """The JSON record (checkpoints, collect) and the flattened config.model section (experiments.convert's
    hf_config.py) both rebuild the same ModelConfig."""
    from experiments.convert import model_section
    from moe_jax.moe_config import MoEConfig
    from moe_jax.train.run_config import build_run_config, make_config_dict, model_record

    moe = MoEConfig(d_model=16, d_ff=16, num_experts=4, capacity_factor=None, eval_capacity_factor=None,
                    expert_backend="ragged_dot")
    cfg = mla(**YARN, yarn_mscale=0.707, yarn_mscale_all_dim=0.707, moe=moe, vocab_size=256)
    assert ModelConfig.from_dict(model_record(cfg)) == cfg
    assert build_run_config(make_config_dict("yarn", model_section(cfg), {"seq_len": 32}, {})).model == cfg
