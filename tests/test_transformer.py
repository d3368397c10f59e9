"""Transformer: shapes, MoE placement and aux collection, causality, cached decoding == full forward
(and when it cannot be), mixed precision, config errors naming their field.

Small shapes shared by every model here (D 32, 4 heads, vocab 64, 4 experts) so that JAX's compile
caches serve several tests.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax.moe_config import MoEConfig
from moe_jax.model_config import ModelConfig
from moe_jax.transformer import Transformer

V, D = 64, 32


def moe_cfg(**kw):
    # eval_capacity_factor 2.0 = E / k: C = ceil(2.0 * S * 2 / 4) = S, so evaluation never drops a choice.
    base = dict(d_model=D, d_ff=32, num_experts=4, num_experts_per_token=2, capacity_factor=1.0,
                eval_capacity_factor=2.0, min_capacity=1)
    base.update(kw)
    return MoEConfig(**base)


def model_cfg(**kw):
    base = dict(vocab_size=V, d_model=D, num_layers=4, num_heads=4, num_kv_heads=2, d_ff=64, max_seq_len=16,
                moe=moe_cfg(), moe_every=2, first_dense_layers=1)
    base.update(kw)
    return ModelConfig(**base)


MLA = dict(attention="mla", num_kv_heads=None, q_lora_rank=10, kv_lora_rank=12, qk_rope_head_dim=4,
           qk_nope_head_dim=6, v_head_dim=5)

forward = nnx.jit(lambda m, t: m(t, train=False))
train_forward = nnx.jit(lambda m, t, r: m(t, train=True, rng=r))
decode = nnx.jit(lambda m, t, c: m.decode(t, c))


def rngs(seed):
    # rbg keys: initialisation compiles ~4x faster on the CPU than with threefry (the model accepts any key)
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


@pytest.fixture(scope="module")
def gqa_model():
    return Transformer(model_cfg(), rngs=rngs(0))


@pytest.fixture(scope="module")
def mla_model():
    # dropless MoE (sorted rows, blocked expert matmuls) in layer 1 of 2
    cfg = model_cfg(num_layers=2, moe_every=1, moe=moe_cfg(capacity_factor=None, eval_capacity_factor=None,
                                                           expert_backend="blocked", dropless_block_size=8), **MLA)
    return Transformer(cfg, rngs=rngs(1))


def tokens(B=2, L=9, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


def test_shapes_dtypes_and_aux_from_every_moe_layer(gqa_model):
    """4 layers, first_dense_layers=1, moe_every=2: layers 1 and 3 are MoE, 0 and 2 dense."""
    cfg = gqa_model.cfg
    assert cfg.moe_layer_indices == (1, 3)
    assert [i for i, _ in gqa_model.moe_layers()] == [1, 3]
    assert [type(b.ffn).__name__ for b in gqa_model.blocks] == ["FeedForward", "MoELayer", "FeedForward", "MoELayer"]
    logits, aux = train_forward(gqa_model, tokens(), jax.random.key(1))
    assert logits.shape == (2, 9, V) and logits.dtype == jnp.float32
    assert [a["layer"] for a in aux.layers] == [1, 3] and aux.layer_indices == (1, 3)
    per_layer = [float(a["losses"]["aux_loss"]) for a in aux.layers]
    assert all(p > 0 for p in per_layer)  # balance loss >= 1 and z-loss > 0 in each layer
    assert float(aux.aux_loss) == pytest.approx(sum(per_layer), rel=1e-6)
    assert set(aux.layers[0]["metrics"]) >= {"tokens_per_expert", "dropped_fraction", "router_entropy"}
    # the router made 2 sequences x 9 tokens x k = 2 choices = 36 (counted before capacity drops)
    assert float(aux.layers[0]["metrics"]["routed_per_expert"].sum()) == 36


@pytest.mark.parametrize("placement, expected", [
    (dict(num_layers=6, moe_every=1, first_dense_layers=0), (0, 1, 2, 3, 4, 5)),  # Mixtral
    (dict(num_layers=6, moe_every=1, first_dense_layers=3), (3, 4, 5)),  # DeepSeek-V3 (first 3 dense)
    (dict(num_layers=6, moe_every=2, first_dense_layers=1), (1, 3, 5)),  # Switch / GShard: odd layers
    (dict(num_layers=6, moe_every=3, first_dense_layers=0), (0, 3)),
    (dict(num_layers=6, moe=None), ()),
])
def test_moe_placement(placement, expected):
    assert model_cfg(**placement).moe_layer_indices == expected


def test_router_noise_follows_rng():
    cfg = model_cfg(num_layers=2, moe=moe_cfg(logit_noise_std=1.0))
    model = Transformer(cfg, rngs=rngs(0))
    t = tokens()
    a, _ = train_forward(model, t, jax.random.key(1))
    b, _ = train_forward(model, t, jax.random.key(1))
    c, _ = train_forward(model, t, jax.random.key(2))
    np.testing.assert_array_equal(a, b)
    assert float(jnp.abs(a - c).max()) > 1e-3


@pytest.mark.parametrize("which", ["gqa", "mla"])
def test_causal(which, gqa_model, mla_model):
    """Changing token 5 leaves logits 0..4 unchanged and changes 5.. (MoE routing dropless / C = S)."""
    model = gqa_model if which == "gqa" else mla_model
    t = tokens()
    t2 = t.at[:, 5].set((t[:, 5] + 1) % V)
    a, _ = forward(model, t)
    b, _ = forward(model, t2)
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
    assert float(jnp.abs(a[:, 5:] - b[:, 5:]).max()) > 1e-4


def cached_logits(model, t, prefill=5):
    """Prefill `prefill` tokens, then one token per step, into a fixed cache of max_seq_len slots."""
    cache = model.init_cache(t.shape[0])
    logits, cache = decode(model, t[:, :prefill], cache)
    out = [logits]
    for i in range(prefill, t.shape[1]):
        logits, cache = decode(model, t[:, i:i + 1], cache)
        out.append(logits)
    assert int(cache.index) == t.shape[1]
    return jnp.concatenate(out, axis=1)


@pytest.mark.parametrize("which", ["gqa", "mla"])
def test_cached_decoding_matches_full_forward(which, gqa_model, mla_model):
    """With routing that cannot drop (C = S with grouping='tokens'; dropless), every token is routed the same
    in a one-token decode group as in the full sequence, so cached logits equal the full pass's."""
    model = gqa_model if which == "gqa" else mla_model
    t = tokens()
    full, _ = forward(model, t)
    np.testing.assert_allclose(cached_logits(model, t), full, atol=5e-5, rtol=1e-5)


def test_cached_decoding_with_capacity_drops_needs_position_grouping():
    """Tight eval capacity (cf 0.5 over B = 4: C = max(1, ceil(0.5 * 4 * 2 / 4)) = 1 per group).

    grouping='position' groups the 4 sequences' tokens at one position, the same group in a decode step as
    in the full pass, so decoding reproduces the full pass exactly, drops included. grouping='tokens' (one
    sequence per group) routes a 9-token group in the full pass (C = ceil(0.5 * 9 * 2 / 4) = 3, so choices
    drop) but a 1-token group per decode step (C = 1, nothing drops): the two disagree, which is why the
    comparison above uses C = S or dropless routing.
    """
    t = tokens(B=4)
    tight = dict(eval_capacity_factor=0.5, min_capacity=1)
    by_position = Transformer(model_cfg(num_layers=2, moe=moe_cfg(grouping="position", **tight)), rngs=rngs(0))
    full, aux = forward(by_position, t)
    assert min(float(a["metrics"]["dropped_fraction"]) for a in aux.layers) > 0.1  # capacity really binds
    np.testing.assert_allclose(cached_logits(by_position, t, prefill=1), full, atol=5e-5, rtol=1e-5)

    by_sequence = Transformer(model_cfg(num_layers=2, moe=moe_cfg(**tight)), rngs=rngs(0))
    full, aux = forward(by_sequence, t)
    assert min(float(a["metrics"]["dropped_fraction"]) for a in aux.layers) > 0.1
    assert float(jnp.abs(cached_logits(by_sequence, t, prefill=1) - full).max()) > 1e-3


def test_bfloat16_compute_float32_params_router_and_logits(gqa_model):
    cfg = dataclasses.replace(gqa_model.cfg, dtype="bfloat16")
    model = Transformer(cfg, rngs=rngs(0))
    params = jax.tree.leaves(nnx.state(model, nnx.Param))
    assert params and all(p.dtype == jnp.float32 for p in params)
    for a, b in zip(params, jax.tree.leaves(nnx.state(gqa_model, nnx.Param))):
        np.testing.assert_array_equal(a, b)  # same init, so the float32 model is the reference
    t = tokens()
    logits, aux = forward(model, t)
    assert logits.dtype == jnp.float32 and aux.aux_loss.dtype == jnp.float32
    ref, _ = forward(gqa_model, t)
    rel = float(jnp.linalg.norm(logits - ref) / jnp.linalg.norm(ref))
    assert 1e-4 < rel < 0.05, rel  # bf16 rounding is visible but small
    jaxpr = str(jax.make_jaxpr(lambda x: model(x))(t))
    dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
    assert any("bf16" in line for line in dots)
    # the router's gate einsum 'gsd,de->gse' ([G = 2 sequences, S = 9, E = 4]) stays float32
    assert any(line.split("=")[0].strip().endswith("f32[2,9,4]") for line in dots), dots


def test_hash_router_gets_token_ids_and_tied_embeddings():
    cfg = model_cfg(num_layers=2, moe=moe_cfg(router="hash"), tie_embeddings=True, moe_output_norm=True,
                    norm="layernorm")
    model = Transformer(cfg, rngs=rngs(0))
    assert model.unembed_DV is None and model.blocks[1].moe_norm is not None
    logits, aux = train_forward(model, tokens(), jax.random.key(0))
    assert logits.shape == (2, 9, V) and np.isfinite(np.asarray(logits)).all()


def test_gradients_reach_every_parameter(mla_model):
    """Dense and dropless MoE FFN, MLA, norms, embeddings: every parameter gets a nonzero gradient."""
    t = tokens()

    def loss_fn(model):
        logits, aux = model(t[:, :-1], train=True, rng=jax.random.key(0))
        ce = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), t[:, 1:, None], -1))
        return ce + aux.aux_loss

    grads = nnx.jit(nnx.grad(loss_fn))(mla_model)
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(grads, nnx.Param))
    zero = [jax.tree_util.keystr(p) for p, g in flat if not float(jnp.abs(g).max()) > 0]
    assert not zero, zero


@pytest.mark.parametrize("kw, field", [
    (dict(num_heads=5), "num_heads"),
    (dict(num_kv_heads=3), "num_kv_heads"),
    (dict(num_kv_heads=0), "num_kv_heads"),
    (dict(head_dim=7), "head_dim"),
    (dict(norm="batchnorm"), "norm"),
    (dict(dtype="float16"), "dtype"),
    (dict(attention="mla", num_kv_heads=None), "kv_lora_rank"),
    (dict(kv_lora_rank=8), "kv_lora_rank"),
    (dict(MLA, qk_rope_head_dim=3), "qk_rope_head_dim"),
    (dict(MLA, num_kv_heads=2), "num_kv_heads"),
    (dict(moe=moe_cfg(d_model=16)), "moe"),
    (dict(moe_every=0), "moe_every"),
    (dict(first_dense_layers=4), "first_dense_layers"),
    (dict(vocab_size=0), "vocab_size"),
])
def test_config_errors_name_the_field(kw, field):
    with pytest.raises(ValueError, match=rf"ModelConfig\.{field}="):
        model_cfg(**kw)


def test_input_errors():
    model = Transformer(model_cfg(num_layers=1, moe=None), rngs=rngs(0))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(jnp.zeros((1, 17), jnp.int32))
    with pytest.raises(ValueError, match="integer"):
        model(jnp.zeros((1, 4), jnp.float32))
    with pytest.raises(ValueError, match="max_len"):
        model.init_cache(1, 32)
    with pytest.raises(ValueError, match="no field"):
        ModelConfig.from_dict(dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2, d_ff=8, n_layers=3))
    cfg = ModelConfig.from_dict(dict(vocab_size=8, d_model=8, num_layers=1, num_heads=2, d_ff=8,
                                     moe=dict(d_model=8, d_ff=8)))
    assert cfg.moe == MoEConfig(d_model=8, d_ff=8)


def test_token_mask_keeps_padding_out_of_every_moe_layer():
    # Right padding (the last 3 tokens of sequence 1) under batch-priority routing with drops (eval C =
    # ceil(0.5 * 8 * 2 / 4) = 2), where a pad could take a real token's slot: with the mask, real tokens'
    # logits and every MoE layer's statistics are the same whatever the pad ids are.
    cfg = model_cfg(moe=moe_cfg(priority="top_prob", eval_capacity_factor=0.5))
    model = Transformer(cfg, rngs=rngs(2))
    masked_forward = nnx.jit(lambda m, t, k: m(t, train=False, token_mask=k))
    tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, V)
    mask = jnp.ones((2, 8), bool).at[1, 5:].set(False)
    logits_a, aux_a = masked_forward(model, tokens, mask)
    logits_b, aux_b = masked_forward(model, tokens.at[1, 5:].set(tokens[1, :3]), mask)
    real = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(logits_a)[real], np.asarray(logits_b)[real], atol=1e-5)
    assert len(aux_a.layers) == 2
    for la, lb in zip(aux_a.layers, aux_b.layers):
        np.testing.assert_allclose(la["losses"]["balance_loss"], lb["losses"]["balance_loss"], rtol=1e-5)
        np.testing.assert_array_equal(la["metrics"]["tokens_per_expert"], lb["metrics"]["tokens_per_expert"])
        assert float(la["metrics"]["routed_per_expert"].sum()) == 13 * 2
    with pytest.raises(ValueError, match="token_mask"):
        model(tokens, token_mask=mask[:, :4])
