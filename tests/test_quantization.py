"""Expert weight quantization: round-trip bounds, hand goldens, what is (not) quantized, every expert
backend, closeness to the float model, exact byte accounting, errors."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import base
from moe_jax import MoEConfig, MoELayer
from moe_jax import quantization as Q
from moe_jax.experts import Experts
from moe_jax.sampling import generate
from moe_jax.train.run_config import build_run_config
from moe_jax.transformer import Transformer

QMAX = {8: 127, 4: 7}


def tiny_transformer(**overrides):
    model = base.tiny_model(**dict(dict(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32,
                                        num_experts=4, num_shared_experts=1, max_seq_len=32), **overrides))
    run = build_run_config(base.make("q", model, data=dict(seq_len=16, batch_size=2)))
    return Transformer(run.model, rngs=nnx.Rngs(params=0))


@pytest.mark.parametrize("bits", [8, 4])
def test_round_trip_error_at_most_half_a_scale_per_channel(bits):
    # Channels of very different magnitudes (x 1e-3 .. x 1e2) so a per-tensor scale would fail the bound.
    E, D, F = 3, 20, 7
    mag_E1F = 10.0 ** jnp.linspace(-3, 2, E * F).reshape(E, 1, F)
    w = jax.random.normal(jax.random.PRNGKey(0), (E, D, F)) * mag_E1F
    q = Q.quantize_weight(w, bits)
    assert q.qvalue.dtype == Q.QTYPES[bits] and q.scale.shape == (E, 1, F) and q.scale.dtype == jnp.float32
    # scale = absmax over the input axis of each (expert, output channel) / (qmax + 1/2)
    np.testing.assert_allclose(q.scale, jnp.abs(w).max(axis=1, keepdims=True) / (QMAX[bits] + 0.5), rtol=1e-6)
    qv = np.asarray(q.qvalue.astype(jnp.int32))
    assert qv.max() <= QMAX[bits] and qv.min() >= -QMAX[bits] - 1
    err = jnp.abs(Q.dequantize_weight(q) - w)
    # <= scale / 2, up to float32 rounding of w / scale and q * scale (a few ulps of the channel's absmax).
    bound = q.scale / 2 + 4 * jnp.finfo(jnp.float32).eps * jnp.abs(w).max(axis=1, keepdims=True)
    assert bool(jnp.all(err <= bound)), float((err / q.scale).max())
    # and the bound is tight: some weight of each channel is off by more than a quarter scale for int4
    if bits == 4:
        assert float((err / q.scale).max()) > 0.25


def test_hand_golden_one_channel():
    # w[0, :, 0] = [0.3, -0.78, 2.55]; absmax 2.55.
    # int8: scale = 2.55 / 127.5 = 0.02; q = [0.3/0.02, -0.78/0.02, 2.55/0.02] = [15, -39, 127.5 -> 127 (clipped)]
    # int4: scale = 2.55 / 7.5 = 0.34; q = [0.882 -> 1, -2.294 -> -2, 7.5 -> 7]; dequant [0.34, -0.68, 2.38]
    w = jnp.array([0.3, -0.78, 2.55]).reshape(1, 3, 1)
    q8, q4 = Q.quantize_weight(w, 8), Q.quantize_weight(w, 4)
    np.testing.assert_allclose(q8.scale.ravel(), [0.02], rtol=1e-6)
    assert q8.qvalue.ravel().tolist() == [15, -39, 127]
    np.testing.assert_allclose(q4.scale.ravel(), [0.34], rtol=1e-6)
    assert q4.qvalue.astype(jnp.int32).ravel().tolist() == [1, -2, 7]
    np.testing.assert_allclose(Q.dequantize_weight(q4).ravel(), [0.34, -0.68, 2.38], rtol=1e-6)


def _variables(model):
    return {jax.tree_util.keystr(path): v for path, v in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]}


@pytest.mark.parametrize("bits", [8, 4])
def test_only_routed_experts_change(bits):
    model = tiny_transformer()
    before = _variables(model)
    qmodel = Q.quantize_experts(model, bits)
    after = _variables(qmodel)
    assert _variables(model).keys() == before.keys()  # the float model is left as it was
    for name, value in before.items():
        np.testing.assert_array_equal(_variables(model)[name], value)
    routed = [k for k in before if "['ffn']['experts']" in k]  # not ['ffn']['shared']['experts']
    assert len(routed) == 2 * 3  # 2 MoE layers x (w_in, w_gate, w_out)
    for name, value in before.items():
        if name in routed:
            continue  # replaced by qvalue + scale
        assert after[name].dtype == value.dtype, name
        np.testing.assert_array_equal(after[name], value, err_msg=name)  # router, shared experts, attention, ...
    for _, layer in qmodel.moe_layers():
        assert isinstance(layer.experts, Q.QuantizedExperts) and layer.experts.bits == bits
        assert type(layer.shared.experts) is Experts  # shared experts: float, not quantized
        assert layer.router.w_DE[...].dtype == jnp.float32
    for name in ("w_in_EDF", "w_gate_EDF", "w_out_EFD"):
        assert Q.QuantizedWeight in {type(getattr(layer.experts, name)) for _, layer in qmodel.moe_layers()}
    # quantized weights are not Params: a train-state split puts them in the rest, not the optimizer's params
    _, params, _ = nnx.split(qmodel, nnx.Param, ...)
    assert not any(v.dtype in (jnp.int8, jnp.int4) for v in jax.tree.leaves(params))


def test_quantized_experts_compute_as_the_float_experts_do():
    # QuantizedExperts uses the float experts' computation (ExpertFFN) itself, not copies of its fields.
    experts = Experts(2, 8, 16, activation="gelu", use_bias=True, capacity_backend="blocked",
                      rngs=nnx.Rngs(params=0))
    quantized = Q.QuantizedExperts(experts, 8)
    assert quantized.ffn is experts.ffn
    assert quantized.bits == 8 and quantized.ffn.activation == "gelu" and not quantized.ffn.gated
    np.testing.assert_array_equal(quantized.b_in_EF[...], experts.b_in_EF[...])
    assert quantized.dequantized().ffn == experts.ffn


@pytest.mark.parametrize("backend,capacity_factor,activation,bias", [
    ("einsum", 1.25, "swiglu", False),
    ("einsum", 1.25, "gelu", True),
    ("ragged_dot", None, "swiglu", True),
    ("blocked", None, "swiglu", False),
    ("blocked", None, "relu", True),
])  # 'pallas' reads its weights in the same line of Experts.grouped as 'ragged_dot' (and interprets slowly on CPU)
def test_every_backend_computes_with_the_dequantized_weights(backend, capacity_factor, activation, bias):
    # The quantized layer must equal a float layer whose experts hold the dequantized weights, in every
    # backend (QuantizedExperts hands its dequantized weights to the float experts' ExpertFFN).
    cfg = MoEConfig(d_model=16, d_ff=32, num_experts=4, num_experts_per_token=2, capacity_factor=capacity_factor,
                    eval_capacity_factor=capacity_factor, expert_backend=backend, dropless_block_size=8,
                    activation=activation, expert_bias=bias, num_shared_experts=1)
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))
    if bias:  # non-zero biases, so that dropping them would show
        layer.experts.b_in_EF[...] = jax.random.normal(jax.random.PRNGKey(3), layer.experts.b_in_EF.shape)
        layer.experts.b_out_ED[...] = jax.random.normal(jax.random.PRNGKey(4), layer.experts.b_out_ED.shape)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 8, 16))
    y_float, _ = layer(x)
    for bits in (8, 4):
        qlayer = Q.quantize_experts(layer, bits)
        reference = nnx.clone(layer)
        reference.experts = qlayer.experts.dequantized()
        y_q, aux_q = qlayer(x)
        y_ref, _ = reference(x)
        np.testing.assert_allclose(y_q, y_ref, rtol=1e-6, atol=1e-6)
        assert float(jnp.abs(y_q - y_float).max()) > 0  # the weights really changed
        assert aux_q.metrics["tokens_per_expert"].shape == (4,)


def test_int8_model_close_to_float_and_int4_further():
    model = tiny_transformer()
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 16), 0, 256)
    logits, _ = model(tokens)
    rel = {}
    for bits in (8, 4):
        qlogits, _ = Q.quantize_experts(model, bits)(tokens)
        rel[bits] = float(jnp.sqrt(jnp.mean((qlogits - logits) ** 2) / jnp.mean(logits ** 2)))
    # int8 per-channel noise is about absmax / 255 / sqrt(3) per weight (~0.5 % of a channel's rms for
    # Gaussian weights over 32 inputs), int4 ~17x that; the logits' relative rms error follows.
    assert 1e-5 < rel[8] < 1e-2, rel
    assert rel[8] * 4 < rel[4] < 0.2, rel


def test_quantized_model_decodes():
    float_model = tiny_transformer(eval_capacity_factor=None, expert_backend="blocked", dropless_block_size=8)
    model = Q.quantize_experts(float_model, 8)
    # dropless at eval: decoding routes every token as the full forward does
    prompt = jax.random.randint(jax.random.PRNGKey(5), (1, 4), 0, 256)
    ids = generate(model, prompt, max_new_tokens=4)
    full, _ = nnx.jit(lambda m, t: m(t))(model, ids[:, :-1])  # one compile, not thousands of eager ops
    np.testing.assert_array_equal(ids[0, 4:], jnp.argmax(full[0, 3:], axis=-1))


def test_bytes_accounting_by_hand():
    cfg = MoEConfig(d_model=8, d_ff=16, num_experts=4, num_experts_per_token=2, activation="swiglu")
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))
    # float32: 3 matrices of 4 * 8 * 16 = 512 values * 4 B = 2048 B each -> 6144 B
    assert Q.expert_weight_bytes(layer) == {"values": 6144, "scales": 0, "total": 6144}
    # scales: w_in and w_gate [4, 1, 16] = 64 floats each, w_out [4, 1, 8] = 32 -> 160 * 4 B = 640 B
    # int8: 3 * 512 values * 1 B = 1536 B (+ 640 = 2176); int4: 3 * 512 / 2 = 768 B (+ 640 = 1408)
    assert Q.expert_weight_bytes(Q.quantize_experts(layer, 8)) == {"values": 1536, "scales": 640, "total": 2176}
    q4 = Q.quantize_experts(layer, 4)
    assert Q.expert_weight_bytes(q4) == {"values": 768, "scales": 640, "total": 1408}
    # whole layer: router 8 x 4 floats = 128 B, unchanged; experts as above
    assert Q.model_bytes(layer) == 6144 + 128
    assert Q.model_bytes(q4) == 1408 + 128
    assert Q.array_bytes(jnp.zeros((3,), jnp.int4)) == 2  # 12 bits round up to 2 bytes
    assert Q.array_bytes(jnp.zeros((3,), jnp.bfloat16)) == 6


@pytest.mark.parametrize("bits", [3, 16, 0, "8", 8.0, True, None])
def test_bad_bit_width_is_an_error_naming_bits(bits):
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4), rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match=r"bits=.*use bits=8 \(int8\) or bits=4 \(int4\)"):
        Q.quantize_experts(layer, bits)
    with pytest.raises(ValueError, match="bits="):
        Q.quantize_weight(jnp.ones((1, 2, 2)), bits)


def test_other_errors():
    dense = tiny_transformer(use_moe=False)
    with pytest.raises(ValueError, match="no MoELayer.*use_moe=True"):
        Q.quantize_experts(dense, 8)
    layer = MoELayer(MoEConfig(d_model=8, d_ff=16, num_experts=4), rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="already quantized \\(8-bit\\)"):
        Q.quantize_experts(Q.quantize_experts(layer, 8), 4)
    with pytest.raises(ValueError, match=r"\[E, in, out\]"):
        Q.quantize_weight(jnp.ones((2, 2)), 8)
