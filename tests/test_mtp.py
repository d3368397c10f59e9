"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437 section 2.2; moe_jax/mtp.py): a plain-jnp golden of
the modules, the target shift (t_{i+k+1}), mtp_depth=0 leaving the model and the step as they were, decoding
and sampling untouched, the loss and the MTP routers' bias update in the train step, checkpoints, and
config errors naming their field.
"""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig
from moe_jax.sampling import generate
from moe_jax.train.state import init_state, split_model
from moe_jax.train.step import cross_entropy, make_eval_step, make_train_step, mtp_losses
from moe_jax.transformer import Transformer

V, D = 64, 32


def dense_cfg(**kw):
    fields = dict(vocab_size=V, d_model=D, num_layers=1, num_heads=4, d_ff=48, max_seq_len=16, mtp_depth=2,
                  mtp_loss_weight=0.5)
    return ModelConfig(**{**fields, **kw})


def moe_cfg(**kw):
    # dropless sigmoid routing with a correction bias (DeepSeek-V3's kind): no capacity, so no drops to reason about
    moe = MoEConfig(d_model=D, d_ff=16, num_experts=4, num_experts_per_token=2, score_fn="sigmoid",
                    use_correction_bias=True, bias_update_rate=0.25, capacity_factor=None,
                    eval_capacity_factor=None, expert_backend="ragged_dot", balance_loss_coef=1e-2)
    return dense_cfg(**{"moe": moe, "num_kv_heads": 2, "mtp_depth": 1, **kw})


def rngs(seed=0):
    return nnx.Rngs(params=jax.random.key(seed, impl="rbg"))


def tokens(B=2, L=10, seed=0):
    return jax.random.randint(jax.random.key(seed), (B, L), 0, V)


mtp_forward = nnx.jit(lambda m, t: m(t, train=False, mtp=True))


# ---- (a) golden: the modules written out in plain jnp, from the model's own parameters ----

def _rms(x, scale, eps=1e-6):
    return x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def _rope(x_LHP, positions_L, theta=10000.0):
    # rotate-half: feature pairs (j, j + P/2) turned by position * theta^(-2j/P)
    P = x_LHP.shape[-1]
    angle_Lp = positions_L[:, None] * theta ** (-np.arange(P // 2) * 2.0 / P)
    cos, sin = np.cos(angle_Lp)[:, None, :], np.sin(angle_Lp)[:, None, :]
    x1, x2 = x_LHP[..., :P // 2], x_LHP[..., P // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def _block(x_LD, b):
    """Pre-norm block, MHA + SwiGLU FFN, one sequence."""
    L = x_LD.shape[0]
    pos = np.arange(L, dtype=np.float64)
    a = b.attn
    h = _rms(x_LD, b.attn_norm.scale[...])
    q = _rope(jnp.einsum("ld,dhq->lhq", h, a.w_q_DHQ[...]), pos)
    k = _rope(jnp.einsum("ld,dhq->lhq", h, a.w_k_DNQ[...]), pos)
    v = jnp.einsum("ld,dhu->lhu", h, a.w_v_DNU[...])
    scores = jnp.einsum("lhq,jhq->hlj", q, k) / np.sqrt(q.shape[-1])
    scores = jnp.where(np.tril(np.ones((L, L), bool)), scores, -jnp.inf)
    out = jnp.einsum("hlj,jhu->lhu", jax.nn.softmax(scores, axis=-1), v)
    x_LD = x_LD + jnp.einsum("lhu,hud->ld", out, a.w_o_HUD[...])
    e = b.ffn.experts
    h = _rms(x_LD, b.ffn_norm.scale[...])
    hidden = jax.nn.silu(h @ e.w_gate_EDF[...][0]) * (h @ e.w_in_EDF[...][0])
    return x_LD + hidden @ e.w_out_EFD[...][0]


def test_golden_plain_jnp_two_depths():
    """Main stack -> h^0 (before the final norm); depth k: M_k [Norm(h^{k-1}_i); Norm(Emb(t_{i+k}))], a block,
    its own final norm, the shared head; positions i < L - k."""
    model = Transformer(dense_cfg(), rngs=rngs(0))
    t = tokens()
    L = t.shape[1]
    logits_BLV, aux = mtp_forward(model, t)

    @nnx.jit  # one compilation instead of one per eager op
    def golden(model, seq):
        emb, head = model.embed_VD[...], model.unembed_DV[...]
        h = emb[seq]
        for b in model.blocks:
            h = _block(h, b)
        out = [_rms(h, model.final_norm.scale[...]) @ head]
        for k, module in enumerate(model.mtp.modules, start=1):
            h = h[:L - k]
            e = emb[seq[k:]]  # t_{i+k}
            x = jnp.concatenate([_rms(h, module.hidden_norm.scale[...]), _rms(e, module.embed_norm.scale[...])], -1)
            h = _block(x @ module.w_proj_2DD[...], module.block)
            out.append(_rms(h, module.final_norm.scale[...]) @ head)
        return out

    assert [x.shape for x in aux.mtp_logits] == [(2, L - 1, V), (2, L - 2, V)]
    for b in (0, 1):
        expected = golden(model, t[b])
        np.testing.assert_allclose(logits_BLV[b], expected[0], rtol=1e-5, atol=1e-5)
        for k in (1, 2):
            np.testing.assert_allclose(aux.mtp_logits[k - 1][b], expected[k], rtol=1e-5, atol=1e-5)


def test_module_layout_and_moe_blocks():
    model = Transformer(moe_cfg(num_layers=2, first_dense_layers=1, mtp_depth=2), rngs=rngs(0))
    module = model.mtp.modules[0]
    assert module.w_proj_2DD.shape == (2 * D, D)
    # the MTP blocks are MoE blocks numbered after the main layers; moe_layers lists them last
    assert [m.block.layer_index for m in model.mtp.modules] == [2, 3]
    assert [i for i, _ in model.moe_layers()] == [1, 2, 3]
    assert model.cfg.mtp_layer_indices == (2, 3) and model.cfg.moe_layer_indices == (1,)
    # (their aux losses and metrics in a forward pass: test_train_step_adds_the_weighted_mtp_loss...)


# ---- (b) the shift: depth k at position i sees t_0 .. t_{i+k} and predicts t_{i+k+1} ----

def test_depth_k_sees_up_to_t_i_plus_k_and_not_its_target():
    model = Transformer(dense_cfg(), rngs=rngs(1))
    t = tokens()
    _, base = mtp_forward(model, t)
    j = 5
    _, changed = mtp_forward(model, t.at[0, j].set((t[0, j] + 1) % V))
    for k, (a, b) in enumerate(zip(base.mtp_logits, changed.mtp_logits), start=1):
        diff = np.abs(np.asarray(a[0]) - np.asarray(b[0])).max(axis=-1)
        # input t_j reaches depth k first at position j - k (as its embedded token t_{i+k}), never before:
        # position j - k - 1 predicts t_j itself, so seeing it would leak the target
        assert np.all(diff[:j - k] == 0), (k, diff)
        assert np.all(diff[j - k:] > 0), (k, diff)


def test_loss_targets_are_the_batch_shifted_by_k_plus_one():
    """mtp_losses against a batch [B, L + 1]: depth k's target at position i is batch[:, i + k + 1]. Logits
    that put all their mass on batch[:, i + 2] have CE ~0 at depth 1 only with the shift of 2; shifted by 1
    (the main model's targets) or by 3 they would cost ~40 nats."""
    batch = tokens(B=2, L=10, seed=3)
    targets = batch[:, 1:]
    depth1 = 40.0 * jax.nn.one_hot(batch[:, 2:], V)  # [B, L - 1, V]
    depth2 = 40.0 * jax.nn.one_hot(batch[:, 3:], V)  # [B, L - 2, V]
    ce1, ce2 = mtp_losses((depth1, depth2), targets)
    assert float(ce1) < 1e-6 and float(ce2) < 1e-6
    wrong = 40.0 * jax.nn.one_hot(batch[:, 1:-1], V)
    assert float(mtp_losses((wrong,), targets)[0]) > 10


# ---- the train step ----

def _step_setup(cfg, seed=0):
    tx = optax.adamw(1e-2)
    graphdef, state = init_state(Transformer(cfg, rngs=rngs(seed)), tx)
    return graphdef, state, make_train_step(graphdef, tx, lambda s: 1e-2)


def test_train_step_adds_the_weighted_mtp_loss():
    """loss = ce + aux + lambda / D * (CE_1 + CE_2), CE_k against the batch shifted by k + 1."""
    graphdef, state, step = _step_setup(dense_cfg())
    batch = jnp.concatenate([tokens(seed=4), tokens(B=2, L=1, seed=5)], axis=1)  # [2, 11]: inputs as elsewhere
    key = jax.random.PRNGKey(0)
    model = nnx.merge(graphdef, state.params, state.rest)
    logits, aux = mtp_forward(model, batch[:, :-1])  # dense: train=True would change nothing
    ce = cross_entropy(logits, batch[:, 1:])
    ce1 = cross_entropy(aux.mtp_logits[0], batch[:, 2:])  # depth 1: the batch shifted by 2
    ce2 = cross_entropy(aux.mtp_logits[1], batch[:, 3:])
    assert abs(float(ce1) - float(cross_entropy(aux.mtp_logits[0], batch[:, 1:-1]))) > 1e-3  # a wrong shift differs
    proj_before = np.asarray(model.mtp.modules[1].w_proj_2DD[...])  # the step donates the state
    state, m = step(state, batch, key)
    np.testing.assert_allclose(m["mtp_loss/1"], ce1, rtol=1e-5)
    np.testing.assert_allclose(m["mtp_loss/2"], ce2, rtol=1e-5)
    np.testing.assert_allclose(m["mtp_loss"], 0.5 / 2 * (ce1 + ce2), rtol=1e-5)
    np.testing.assert_allclose(m["loss"], ce + 0.5 / 2 * (ce1 + ce2), rtol=1e-5)
    after = nnx.merge(graphdef, state.params, state.rest)
    assert not np.allclose(after.mtp.modules[1].w_proj_2DD[...], proj_before)  # the MTP loss trains them


def test_train_step_reports_and_rebalances_the_mtp_moe_layer():
    """The MTP block's MoE layer: its aux loss in the loss, metrics under moe/<num_layers + k - 1>/, and the
    DeepSeek-V3 bias update b_i += rate * sign(mean load - load_i) like the main layers'."""
    graphdef, state, step = _step_setup(moe_cfg(num_layers=1, mtp_depth=1))
    model = nnx.merge(graphdef, state.params, state.rest)
    assert [i for i, _ in model.moe_layers()] == [0, 1]
    before = [np.asarray(layer.router.correction_bias_E[...]) for _, layer in model.moe_layers()]
    state, m = step(state, tokens(B=2, L=11, seed=4), jax.random.PRNGKey(0))
    np.testing.assert_allclose(m["loss"], m["ce"] + m["aux_loss"] + 0.5 * m["mtp_loss/1"], rtol=1e-6)
    np.testing.assert_allclose(m["aux_loss"], m["moe/0/aux_loss"] + m["moe/1/aux_loss"], rtol=1e-6)
    assert float(m["moe/1/aux_loss"]) > 0
    after = nnx.merge(graphdef, state.params, state.rest)
    for (index, layer), b in zip(after.moe_layers(), before):
        load = np.asarray(m[f"moe/{index}/tokens_per_expert"])  # dropless: served == routed
        assert load.sum() == 2 * (10 - index) * 2  # layer 1 (MTP depth 1) routes L - 1 = 9 positions, k = 2
        np.testing.assert_allclose(np.asarray(layer.router.correction_bias_E[...]) - b,
                                   0.25 * np.sign(load.mean() - load))


# ---- (c) mtp_depth = 0 is today's model and step ----

def test_depth_zero_is_the_model_without_mtp():
    plain = Transformer(moe_cfg(mtp_depth=0), rngs=rngs(2))
    with_mtp = Transformer(moe_cfg(mtp_depth=1), rngs=rngs(2))
    assert plain.mtp is None
    assert not any("mtp" in jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(nnx.state(plain)))
    # the MTP modules are initialised after everything else: the main parameters do not depend on mtp_depth
    main = nnx.state(with_mtp)
    del main["mtp"]
    assert jax.tree.all(jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), nnx.state(plain), main))


def test_depth_zero_step_loss_is_bit_identical_to_the_plain_loss():
    """The step's loss for mtp_depth=0 is ce + aux_loss as the step computed it before MTP existed: the same
    loss_fn, value_and_grad and jit, written out here; equal bit for bit, and no mtp metric."""
    cfg = moe_cfg(num_layers=1, mtp_depth=0)
    graphdef, state, step = _step_setup(cfg)
    batch = tokens(B=2, L=11, seed=5)
    key = jax.random.PRNGKey(1)

    @jax.jit
    def old_loss(state, batch_BL1, key):
        rng = jax.random.fold_in(key, state.step)

        def loss_fn(params):
            logits_BLV, aux = nnx.merge(graphdef, params, state.rest)(batch_BL1[:, :-1], train=True, rng=rng)
            ce = cross_entropy(logits_BLV, batch_BL1[:, 1:])
            return ce + aux.aux_loss, ce

        (loss, ce), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return loss, ce, optax.tree.norm(grads)

    loss, ce, grad_norm = jax.device_get(old_loss(state, batch, key))
    _, m = step(state, batch, key)
    assert float(m["loss"]) == float(loss) and float(m["ce"]) == float(ce)
    assert float(m["grad_norm"]) == float(grad_norm)
    assert not any(name.startswith("mtp") for name in m)


# ---- (e) inference ignores the MTP modules ----

def test_decode_sampling_and_eval_ignore_mtp():
    plain = Transformer(dense_cfg(mtp_depth=0), rngs=rngs(3))
    with_mtp = Transformer(dense_cfg(), rngs=rngs(3))
    assert len(with_mtp.init_cache(2, 8).layers) == with_mtp.cfg.num_layers
    t = tokens(B=2, L=6, seed=6)
    kw = dict(max_new_tokens=4, temperature=1.0, rng=jax.random.key(7))
    assert np.array_equal(generate(plain, t, **kw), generate(with_mtp, t, **kw))
    batch = tokens(B=2, L=7, seed=8)
    evaluated = []
    for model in (plain, with_mtp):
        graphdef, state = init_state(model, optax.adamw(1e-2))
        evaluated.append(make_eval_step(graphdef)(state, batch))
    assert float(evaluated[0]["ce"]) == float(evaluated[1]["ce"])  # the main head's CE, bit for bit


# ---- (f) checkpoints ----

def test_checkpoint_round_trip_with_mtp(tmp_path):
    from moe_jax.train.checkpoint import Checkpoints

    cfg = moe_cfg(mtp_depth=1)
    tx = optax.adamw(1e-2)
    _, saved = init_state(Transformer(cfg, rngs=rngs(4)), tx)
    _, target = init_state(Transformer(cfg, rngs=rngs(5)), tx)
    ckpt = Checkpoints(str(tmp_path), keep=2)
    try:
        ckpt.save(3, saved, {"step": 3})
        ckpt.wait()
        step, restored, _ = ckpt.restore_latest(target)
    finally:
        ckpt.close()
    assert step == 3
    assert "mtp" in restored.params and "mtp" in restored.rest  # the MTP router's correction bias is state
    same = jax.tree.map(lambda a, b: bool(np.array_equal(a, b)), restored, saved)
    assert jax.tree.all(same)
    assert not np.array_equal(target.params["mtp"]["modules"][0]["w_proj_2DD"][...],
                              saved.params["mtp"]["modules"][0]["w_proj_2DD"][...])


# ---- config errors ----

@pytest.mark.parametrize("fields, message", [
    (dict(mtp_depth=-1), "mtp_depth"),
    (dict(mtp_depth=1.0), "mtp_depth"),
    (dict(mtp_depth=16), "max_seq_len"),
    (dict(mtp_depth=1, mtp_loss_weight=-0.1), "mtp_loss_weight"),
    (dict(mtp_depth=1, mtp_loss_weight=0.0), "mtp_loss_weight"),
])
def test_bad_mtp_fields_are_named(fields, message):
    with pytest.raises(ValueError, match=message):
        dense_cfg(**fields)


def test_run_config_needs_sequences_longer_than_the_depth():
    from configs import base
    from moe_jax.train.run_config import build_run_config

    model = base.tiny_model(mtp_depth=3)
    with pytest.raises(ValueError, match=r"mtp_depth=3 needs config.data.seq_len > 3"):
        build_run_config(base.make("m", model, data=dict(seq_len=3)))
    with pytest.raises(ValueError, match=r"group_size=32 does not divide .* MTP depth 1"):
        build_run_config(base.make("m", dict(model, group_size=32), data=dict(seq_len=32, batch_size=2)))
    build_run_config(base.make("m", model, data=dict(seq_len=4)))  # one position left for depth 3
    model = Transformer(dense_cfg(mtp_depth=2), rngs=rngs(0))
    with pytest.raises(ValueError, match="mtp_depth"):
        model(tokens(L=2), mtp=True)
