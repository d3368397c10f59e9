"""Routing ledger: analyses on hand-built ledgers (goldens worked out in the comments), recording from a tiny
model, save/load, replay (own ledger: identical outputs; a hand-built routing: a hand-computed output), and
the dispatch paths' decisions agreeing where nothing drops."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import ledger as ledger_lib
from moe_jax import ledger_analysis as la
from moe_jax.ledger import Ledger
from moe_jax.model_config import ModelConfig
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoELayer
from moe_jax.transformer import Transformer


def hand_ledger(expert, weight=None, dropped=None, tokens=(5, 6, 5), E=3, step=0):
    expert = np.asarray(expert, np.int32)[None]  # M = 1
    weight = np.full(expert.shape, 0.5, np.float32) if weight is None else np.asarray(weight, np.float32)[None]
    dropped = np.zeros(expert.shape, bool) if dropped is None else np.asarray(dropped, bool)[None]
    return Ledger(tokens=np.asarray([tokens], np.int32), layers=np.asarray([1], np.int32), expert=expert,
                  weight=weight, dropped=dropped, score=weight * 0.5 + 0.1, correction_bias=np.zeros((1, E), np.float32),
                  num_experts=E, batch_size=1, step=step)


# tokens t0, t1, t2 (ids 5, 6, 5); E = 3, k = 2
A = hand_ledger([[0, 1], [2, 0], [1, 2]], weight=[[.6, .4], [.7, .3], [.5, .5]],
                dropped=[[0, 0], [0, 0], [0, 1]], step=100)
B = hand_ledger([[1, 0], [2, 1], [1, 2]], weight=[[.6, .4], [.9, .1], [.5, .25]], step=200)


def test_saturation_golden():
    # t0: {0,1} vs {0,1} same (order ignored); t1: {0,2} vs {1,2} differs; t2 same -> 2/3
    np.testing.assert_allclose(la.saturation(A, B), [2 / 3])
    np.testing.assert_allclose(la.saturation(A, A), [1.0])


def test_diff_golden():
    (row,) = la.diff(A, B)
    # choices differing in order: t0 both (0,1 vs 1,0), t1 k=1 (0 vs 1) -> 3 of 6
    assert row["changed_choices"] == pytest.approx(0.5)
    assert row["changed_sets"] == pytest.approx(1 / 3)
    # only A drops t2's second choice -> 1 of 6
    assert row["changed_drops"] == pytest.approx(1 / 6)
    assert row["changed_tokens"] == pytest.approx(1.0)
    assert row["first_tokens"] == [(0, 0), (0, 1), (0, 2)]
    # same expert in both: t1 k0 |.7 - .9| = .2, t2 k0 0, t2 k1 |.5 - .25| = .25 -> .25
    assert row["weight_max_abs"] == pytest.approx(0.25)
    (same,) = la.diff(A, A)
    assert same["changed_tokens"] == 0 and same["first_tokens"] == [] and same["weight_max_abs"] == 0


def test_diff_refuses_different_tokens():
    with pytest.raises(ValueError, match="different tokens"):
        la.saturation(A, hand_ledger([[0, 1], [2, 0], [1, 2]], tokens=(5, 6, 7)))


def test_coactivation_golden():
    # A's sets: t0 {0,1}, t1 {0,2}, t2 {1,2}: each expert chosen twice, each pair once
    np.testing.assert_array_equal(la.coactivation(A, 0), [[2, 1, 1], [1, 2, 1], [1, 1, 2]])
    # served only: t2's choice of expert 2 is dropped -> t2 {1}
    np.testing.assert_array_equal(la.coactivation(A, 0, served_only=True), [[2, 1, 1], [1, 2, 0], [1, 0, 1]])


def test_specialisation_golden():
    s = la.specialisation(A, 0, vocab_size=8)
    # expert 0: t0 (id 5), t1 (id 6) -> entropy ln 2; expert 1: t0, t2 (both id 5) -> 0; expert 2: t1 (6), t2 (5) -> ln 2
    assert s["counts"][0, 5] == 1 and s["counts"][0, 6] == 1 and s["counts"][1, 5] == 2 and s["counts"].sum() == 6
    np.testing.assert_allclose(s["entropy"], [math.log(2), 0.0, math.log(2)])
    assert s["top"][1] == [(5, 1.0)]
    # an expert no token chose has no distribution: NaN
    s4 = la.specialisation(hand_ledger([[0, 1], [2, 0], [1, 2]], E=4), 0, vocab_size=8)
    assert np.isnan(s4["entropy"][3])


def test_load_summary_golden():
    (s,) = la.load_summary(A)
    np.testing.assert_array_equal(s["routed"], [2, 2, 2])
    np.testing.assert_array_equal(s["served"], [2, 2, 1])  # t2's choice of expert 2 dropped
    assert s["dropped_fraction"] == pytest.approx(1 / 6) and s["load_cv"] == 0 and s["dead_experts"] == 0
    np.testing.assert_allclose(s["dropped_fraction_per_k"], [0, 1 / 3])
    assert s["min_score"] == pytest.approx(0.5 * 0.3 + 0.1)
    (s4,) = la.load_summary(hand_ledger([[0, 1], [2, 0], [1, 2]], E=4))
    # routed [2, 2, 2, 0]: mean 1.5, variance (3 * .25 + 2.25) / 4 = .75 -> CV sqrt(.75) / 1.5
    assert s4["dead_experts"] == 1 and s4["load_cv"] == pytest.approx(math.sqrt(0.75) / 1.5)


def test_save_load_roundtrip(tmp_path):
    path = str(tmp_path / "l.npz")
    size = A.save(path)
    assert size > 0
    with np.load(path) as f:  # plain numpy opens it
        assert f["expert"].dtype == np.uint8 and f["tokens"].shape == (1, 3)
    back = Ledger.load(path)
    for name in ("tokens", "layers", "expert", "weight", "dropped", "score", "correction_bias"):
        np.testing.assert_array_equal(getattr(back, name), getattr(A, name))
    assert back.expert.dtype == np.int32 and back.step == 100 and back.num_experts == 3
    with pytest.raises(FileNotFoundError, match="ledger"):
        Ledger.load(str(tmp_path / "missing.npz"))


def test_list_ledgers(tmp_path):
    A.save(ledger_lib.ledger_path(str(tmp_path), 200))
    A.save(ledger_lib.ledger_path(str(tmp_path), 100))
    assert [s for s, _ in ledger_lib.list_ledgers(str(tmp_path))] == [100, 200]


# ---- recording and replay on a tiny model ----

V, D, Bsz, L = 64, 16, 2, 8


def tiny_cfg(**moe_kw) -> ModelConfig:
    moe = dict(d_model=D, d_ff=16, num_experts=4, num_experts_per_token=2, capacity_factor=1.0,
               eval_capacity_factor=2.0, min_capacity=1)  # eval cf 2.0 = E / k: C = S, nothing drops
    moe.update(moe_kw)
    return ModelConfig(vocab_size=V, d_model=D, num_layers=2, num_heads=2, d_ff=32, max_seq_len=L,
                       moe=MoEConfig(**moe), moe_every=1)


def tiny_model(**moe_kw):
    return Transformer(tiny_cfg(**moe_kw), rngs=nnx.Rngs(params=0))


def batches(n=2, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, V, (Bsz, L + 1)).astype(np.int32) for _ in range(n)]


forward = nnx.jit(lambda m, t, r: m(t, train=False, replay=r))


@pytest.mark.parametrize("moe_kw", [{}, {"eval_capacity_factor": 0.5}], ids=["no_drops", "drops"])
def test_record_and_replay_own_ledger_is_exact(moe_kw):
    model = tiny_model(**moe_kw)
    bs = batches()
    ledger = ledger_lib.record(model, bs, step=7)
    assert ledger.expert.shape == (2, 2 * Bsz * L, 2) and ledger.tokens.shape == (2 * Bsz, L)
    assert ledger.step == 7 and ledger.batch_size == Bsz
    np.testing.assert_array_equal(ledger_lib.ledger_batch(ledger, slice(Bsz, 2 * Bsz)), bs[1])  # the batch again
    assert np.all(ledger.expert[:, :, 0] != ledger.expert[:, :, 1])  # k distinct experts
    assert ledger.dropped.any() == ("eval_capacity_factor" in moe_kw)
    tokens = jnp.asarray(bs[1][:, :-1])
    rows = slice(Bsz, 2 * Bsz)
    logits, aux = forward(model, tokens, None)
    for use_weights in (False, True):
        replayed, raux = forward(model, tokens, ledger_lib.replay_choices(ledger, rows, weights=use_weights))
        np.testing.assert_array_equal(np.asarray(replayed), np.asarray(logits))
        np.testing.assert_array_equal(np.asarray(raux.aux_loss), np.asarray(aux.aux_loss))


def test_replay_other_routing_changes_output_and_router_still_trains():
    model = tiny_model()
    bs = batches(1)
    ledger = ledger_lib.record(model, bs)
    shifted = ledger_lib.replay_choices(ledger)
    shifted = tuple(((e + 1) % 4, None) for e, _ in shifted)  # every choice moved to the next expert
    tokens = jnp.asarray(bs[0][:, :-1])
    logits, _ = forward(model, tokens, None)
    moved, aux = forward(model, tokens, shifted)
    assert not np.allclose(np.asarray(moved), np.asarray(logits))
    got = np.asarray(aux.layers[0]["choices"]["expert"]).reshape(-1, 2)
    np.testing.assert_array_equal(got, (ledger.expert[0] + 1) % 4)

    def aux_loss(params, rest):
        m = nnx.merge(graphdef, params, rest)
        return m(tokens, train=True, replay=shifted)[1].aux_loss

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    grads = jax.grad(aux_loss)(params, rest)
    assert float(jnp.abs(grads["blocks"][0]["ffn"]["router"]["w_DE"][...]).sum()) > 0


def hand_layer():
    # D = F = 2, E = 2, k = 1, relu: expert e computes c_e * relu(x) with c = (1, 3) (w_in = I, w_out = c_e I);
    # router w = I, so the logits are x itself.
    cfg = MoEConfig(d_model=2, d_ff=2, num_experts=2, num_experts_per_token=1, activation="relu",
                    capacity_factor=4.0, eval_capacity_factor=4.0, min_capacity=1)
    layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))
    layer.router.w_DE[...] = jnp.eye(2)
    layer.experts.w_in_EDF[...] = jnp.stack([jnp.eye(2), jnp.eye(2)])
    layer.experts.w_out_EFD[...] = jnp.stack([jnp.eye(2), 3 * jnp.eye(2)])
    return layer


def test_replay_hand_computed_layer():
    layer = hand_layer()
    x = jnp.asarray([[[1.0, -2.0], [2.0, 1.0]]])  # t0, t1
    expert = jnp.asarray([[[1], [0]]])  # t0 -> expert 1, t1 -> expert 0 (the router would pick 0 then 0)
    # given weights (0.5, 2.0): y0 = 0.5 * 3 * relu(1, -2) = (1.5, 0); y1 = 2 * 1 * (2, 1) = (4, 2)
    y, aux = layer(x, replay=(expert, jnp.asarray([[[0.5], [2.0]]])))
    np.testing.assert_allclose(np.asarray(y[0]), [[1.5, 0.0], [4.0, 2.0]], rtol=1e-6)
    # router's own weights: t0's softmax(1, -2)[1] = 1 / (1 + e^3); t1's softmax(2, 1)[0] = 1 / (1 + e^-1)
    y, aux = layer(x, replay=(expert, None))
    w0, w1 = 1 / (1 + math.exp(3)), 1 / (1 + math.exp(-1))
    np.testing.assert_allclose(np.asarray(y[0]), [[3 * w0, 0.0], [2 * w1, 1 * w1]], rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(aux.choices["expert"])[0, :, 0], [1, 0])
    np.testing.assert_allclose(np.asarray(aux.choices["score"])[0, :, 0], [w0, w1], rtol=1e-5)


def test_replay_errors_name_the_problem():
    layer = hand_layer()
    x = jnp.ones((1, 2, 2))
    with pytest.raises(ValueError, match="do not match"):
        layer(x, replay=(jnp.zeros((1, 3, 1), jnp.int32), None))
    ec = MoELayer(MoEConfig(d_model=2, d_ff=2, num_experts=2, num_experts_per_token=1, router="expert_choice",
                            min_capacity=1), rngs=nnx.Rngs(params=0))
    with pytest.raises(ValueError, match="no token choices"):
        ec(x, replay=(jnp.zeros((1, 2, 1), jnp.int32), None))
    model = tiny_model()
    with pytest.raises(ValueError, match="one .* per MoE layer"):
        model(jnp.zeros((1, 4), jnp.int32), replay=((jnp.zeros((1, 4, 2), jnp.int32), None),))


def test_dispatch_paths_make_identical_decisions_where_nothing_drops():
    # Same weights (same seed, same parameter shapes); gather, einsum and dropless must route identically.
    bs = batches(1)
    ledgers = [ledger_lib.record(tiny_model(dispatch=d, expert_backend="blocked", eval_capacity_factor=cf), bs)
               for d, cf in (("gather", 2.0), ("einsum", 2.0), ("gather", None))]
    assert not ledgers[0].dropped.any()
    for other in ledgers[1:]:
        for row in la.diff(ledgers[0], other):
            assert row["changed_tokens"] == 0, row
            assert row["weight_max_abs"] < 1e-6


def test_ledger_and_replay_on_an_expert_parallel_mesh(eight_devices):
    """On 8 devices (data 2 x expert 4, one expert per device, one sequence per device) the ledger recorded
    through the expert-parallel path equals the single-device one, drops included, and replaying it on the
    mesh reproduces the single-device logits; another routing replayed there changes them."""
    from jax.sharding import NamedSharding

    from moe_jax import sharding as sh
    from moe_jax.sharding.placement import Placement

    single = tiny_model(eval_capacity_factor=0.5)  # C = 2 of 8 tokens' 16 choices per expert: drops
    bs = [np.random.default_rng(3).integers(0, V, (8, L + 1)).astype(np.int32)]
    mesh = sh.make_mesh(sh.ShardingConfig(data=2, expert=4))
    # the parameters go onto the mesh inside the jitted calls (the layers' shard_map splits the experts)
    placement = Placement(mesh=mesh, state=None, batch=NamedSharding(mesh, sh.batch_spec(2)),
                          plan=sh.ExpertParallel(mesh))
    graphdef, params, rest = nnx.split(single, nnx.Param, ...)
    on_mesh = ledger_lib.Recorder(graphdef, placement=placement)(params, rest, bs)
    one = ledger_lib.record(single, bs)
    assert one.dropped.any() and not one.dropped.all()
    for name in ("tokens", "next_token", "layers", "expert", "dropped"):
        np.testing.assert_array_equal(getattr(on_mesh, name), getattr(one, name), err_msg=name)
    np.testing.assert_allclose(on_mesh.weight, one.weight, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(on_mesh.score, one.score, rtol=1e-5, atol=1e-7)

    @jax.jit
    def mesh_logits(params, rest, tokens_BL, replay):
        return placement.expert_parallel(nnx.merge(graphdef, params, rest))(tokens_BL, train=False, replay=replay)[0]

    tokens = jnp.asarray(bs[0][:, :-1])
    ref, _ = forward(single, tokens, None)
    put = placement.put_batch(bs[0][:, :-1])
    for use_weights in (False, True):
        got = mesh_logits(params, rest, put, ledger_lib.replay_choices(on_mesh, weights=use_weights))
        np.testing.assert_allclose(np.asarray(got), np.asarray(ref), rtol=1e-5, atol=1e-5)
    shifted = tuple(((e + 1) % 4, None) for e, _ in ledger_lib.replay_choices(on_mesh))
    moved = mesh_logits(params, rest, put, shifted)
    assert not np.allclose(np.asarray(moved), np.asarray(ref), atol=1e-3)
