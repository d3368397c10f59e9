"""Capacity assignment: hand-computed goldens per policy, an exact numpy oracle, and invariants.

Claim order everywhere: k-major (every token's first choice before any token's second), then
position order or batch-priority (top_prob) order within one k.
"""
from __future__ import annotations

import functools

import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from flax import nnx

from moe_jax import MoEConfig
from moe_jax.capacity import assign_capacity
from moe_jax.routers import Router

assign = jax.jit(assign_capacity, static_argnames=(
    "num_experts", "capacity", "priority", "overflow", "nominal_capacity", "max_rounds"))


def _arr(x, dtype):
    return jnp.asarray(np.asarray(x, dtype))[None]  # one group


def _np(routing):
    return {k: np.asarray(getattr(routing, k))[0] for k in
            ("slot_GSK", "weight_GSK", "expert_GSK", "src_GEC", "dropped_GSK")}


# ---- goldens ----

# S = 4 tokens, K = 2, E = 2 experts, C = 2 slots each.
EXPERT_4x2 = [[0, 1], [0, 1], [0, 1], [1, 0]]
WEIGHT_4x2 = [[0.5, 0.1], [0.6, 0.2], [0.9, 0.05], [0.7, 0.3]]


def test_drop_position_priority_is_k_major():
    # k = 0 claims in position order: t0->e0 (c0), t1->e0 (c1), t2->e0 (full: drop), t3->e1 (c0).
    # k = 1: t0->e1 (c1), t1->e1 (full), t2->e1 (full), t3->e0 (full).
    # (Token-major order would instead keep both choices of t1 and drop t3's first choice.)
    r = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(WEIGHT_4x2, np.float32), num_experts=2, capacity=2))
    E_C = 4  # the "dropped" slot index E * C
    np.testing.assert_array_equal(r["slot_GSK"], [[0, 3], [1, E_C], [E_C, E_C], [2, E_C]])
    np.testing.assert_array_equal(r["dropped_GSK"], [[0, 0], [0, 1], [1, 1], [0, 1]])
    # src = s * K + k: e0 <- (t0,k0)=0, (t1,k0)=2; e1 <- (t3,k0)=6, (t0,k1)=1.
    np.testing.assert_array_equal(r["src_GEC"], [[0, 2], [6, 1]])
    np.testing.assert_array_equal(r["weight_GSK"], np.float32([[0.5, 0.1], [0.6, 0], [0, 0], [0.7, 0]]))


def test_drop_top_prob_priority():
    # Top weights 0.5, 0.6, 0.9, 0.7 -> claim order t2, t3, t1, t0.
    # k = 0: t2->e0 (c0), t3->e1 (c0), t1->e0 (c1), t0->e0 (full).
    # k = 1: t2->e1 (c1), t3->e0 (full), t1->e1 (full), t0->e1 (full).
    r = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(WEIGHT_4x2, np.float32), num_experts=2, capacity=2,
                   priority="top_prob"))
    np.testing.assert_array_equal(r["dropped_GSK"], [[1, 1], [0, 1], [0, 0], [0, 1]])
    np.testing.assert_array_equal(r["slot_GSK"], [[4, 4], [1, 4], [0, 3], [2, 4]])
    np.testing.assert_array_equal(r["src_GEC"], [[4, 2], [6, 5]])


def test_top_prob_ties_keep_position_order():
    # All top weights equal: top_prob must reduce to position order (stable sort).
    w = [[0.5, 0.1]] * 4
    a = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(w, np.float32), num_experts=2, capacity=2, priority="top_prob"))
    b = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(w, np.float32), num_experts=2, capacity=2))
    np.testing.assert_array_equal(a["slot_GSK"], b["slot_GSK"])


def test_reduced_weight_scales_by_capacity_over_load():
    # S = 6, K = 1, E = 2; nominal C = 2, buffer 3. Choices e = [0, 0, 0, 0, 1, 0]: load e0 = 5, e1 = 1.
    # scale e0 = C / load = 2 / 5 = 0.4; e1 = min(1, 2 / 1) = 1.
    # Buffer of 3: e0 keeps t0, t1, t2; t3 and t5 drop. e1 keeps t4.
    # Weights: 0.9*0.4 = 0.36, 0.8*0.4 = 0.32, 0.7*0.4 = 0.28, 0, 0.5, 0.
    e = [[0], [0], [0], [0], [1], [0]]
    w = [[0.9], [0.8], [0.7], [0.6], [0.5], [0.4]]
    r = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=2, capacity=3,
                   overflow="reduced_weight", nominal_capacity=2))
    np.testing.assert_allclose(r["weight_GSK"][:, 0], [0.36, 0.32, 0.28, 0.0, 0.5, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(r["dropped_GSK"][:, 0], [0, 0, 0, 1, 0, 1])
    # e0's combine mass 0.96 <= C * max weight = 2 * 0.9 (the bound in the docstring).
    assert r["weight_GSK"][:4, 0].sum() <= 2 * 0.9
    np.testing.assert_array_equal(r["src_GEC"], [[0, 1, 2], [4, 6, 6]])  # 6 = S * K: empty


def test_reduced_weight_needs_nominal_capacity():
    with pytest.raises(ValueError, match="nominal_capacity"):
        assign_capacity(_arr([[0]], np.int32), _arr([[1.0]], np.float32), num_experts=1, capacity=1,
                        overflow="reduced_weight")


def test_reroute_moves_to_next_best_expert_with_room():
    # S = 3, K = 1, E = 4, C = 1. Router picks e = [0, 0, 1]: t1 overflows e0.
    # t1's selection scores [0.5, 0.3, 0.05, 0.15]: e0 is its own (full), e1 is next best but full
    # (t2 holds it), so it moves to e3 (0.15 > 0.05), keeping its weight 0.4.
    e = [[0], [0], [1]]
    w = [[0.5], [0.4], [0.6]]
    sel = [[0.6, 0.2, 0.1, 0.1], [0.5, 0.3, 0.05, 0.15], [0.1, 0.7, 0.1, 0.1]]
    r = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=4, capacity=1, overflow="reroute",
                   selection_GSE=_arr(sel, np.float32)))
    np.testing.assert_array_equal(r["expert_GSK"][:, 0], [0, 3, 1])
    np.testing.assert_array_equal(r["dropped_GSK"][:, 0], [0, 0, 0])
    np.testing.assert_array_equal(r["slot_GSK"][:, 0], [0, 3, 1])
    np.testing.assert_allclose(r["weight_GSK"][:, 0], [0.5, 0.4, 0.6])
    np.testing.assert_array_equal(r["src_GEC"][:, 0], [0, 2, 3, 1])  # e2 empty (S * K = 3)


def test_reroute_contention_in_priority_order():
    # S = 4, K = 1, E = 3, C = 1. Picks [0, 0, 0, 1]: t1 and t2 overflow e0; t3 holds e1.
    # Round 1: both want e2 (their best expert with room); t1 claims first (position order), t2 fails.
    # Round 2: t2 has tried e0 and e2, e1 is full: it stays dropped with weight 0.
    e = [[0], [0], [0], [1]]
    w = [[0.5], [0.6], [0.4], [0.9]]
    sel = [[0.5, 0.3, 0.2], [0.6, 0.1, 0.3], [0.4, 0.35, 0.25], [0.0, 0.9, 0.1]]
    r = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=3, capacity=1, overflow="reroute",
                   selection_GSE=_arr(sel, np.float32)))
    np.testing.assert_array_equal(r["expert_GSK"][:, 0], [0, 2, 0, 1])
    np.testing.assert_array_equal(r["dropped_GSK"][:, 0], [0, 0, 1, 0])
    np.testing.assert_allclose(r["weight_GSK"][:, 0], [0.5, 0.6, 0.0, 0.9])


def test_reroute_never_uses_masked_or_own_experts():
    # S = 2, K = 2, E = 3, C = 1. t0 takes e0, e1; t1 picks e0, e1 too and both overflow.
    # t1 may not use e0/e1 again and e2 is -inf (e.g. an excluded DeepSeek group): nothing moves.
    e = [[0, 1], [0, 1]]
    w = [[0.6, 0.4], [0.7, 0.3]]
    sel = [[0.6, 0.4, -jnp.inf], [0.7, 0.3, -jnp.inf]]
    r = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=3, capacity=1, overflow="reroute",
                   selection_GSE=_arr(sel, np.float32)))
    np.testing.assert_array_equal(r["dropped_GSK"], [[0, 0], [1, 1]])
    # With e2 allowed, t1's first waiting choice moves to e2, the second finds no room.
    sel2 = [[0.6, 0.4, 0.0], [0.7, 0.3, 0.0]]
    r2 = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=3, capacity=1, overflow="reroute",
                    selection_GSE=_arr(sel2, np.float32)))
    np.testing.assert_array_equal(r2["dropped_GSK"], [[0, 0], [0, 1]])
    np.testing.assert_array_equal(r2["expert_GSK"][1], [2, 1])


def test_reroute_needs_selection():
    with pytest.raises(ValueError, match="selection_GSE"):
        assign_capacity(_arr([[0]], np.int32), _arr([[1.0]], np.float32), num_experts=1, capacity=1,
                        overflow="reroute")


def test_unknown_policy_and_bad_capacity():
    with pytest.raises(ValueError, match="overflow"):
        assign_capacity(_arr([[0]], np.int32), _arr([[1.0]], np.float32), num_experts=1, capacity=1,
                        overflow="spill")
    with pytest.raises(ValueError, match="priority"):
        assign_capacity(_arr([[0]], np.int32), _arr([[1.0]], np.float32), num_experts=1, capacity=1,
                        priority="random")
    with pytest.raises(ValueError, match="capacity"):
        assign_capacity(_arr([[0]], np.int32), _arr([[1.0]], np.float32), num_experts=1, capacity=0)


# ---- batch priority ranks by the router's top probability, not the normalised weight ----

def _route(logits, k, E, C, **kw):
    """Router.route on one group of given logits: C = ceil(cf * S * k / E) with cf chosen to hit C."""
    S = len(logits)
    cfg = MoEConfig(d_model=4, d_ff=8, num_experts=E, num_experts_per_token=k, priority="top_prob",
                    capacity_factor=C * E / (S * k), min_capacity=1, **kw)
    router = Router(cfg, rngs=nnx.Rngs(0))
    out = router.route(jnp.asarray(logits, jnp.float32)[None], train=True)
    assert out.routing.capacity == C
    return out


def test_top_prob_top1_normalized_ranks_by_probability():
    # One group of 4 tokens, E = 2, k = 1, C = 1; every token picks e0 (logit > 0).
    # p(e0) = sigmoid(logit gap) = sigmoid(.1), sigmoid(.2), sigmoid(.3), sigmoid(2) = .525, .550, .574, .881.
    # normalize_topk renormalises the one weight to 1.0 for all four: ranking by it ties everywhere and
    # keeps token 0 (position order). Batch priority must keep token 3, the most confident.
    logits = [[.1, 0], [.2, 0], [.3, 0], [2, 0]]
    out = _route(logits, k=1, E=2, C=1, normalize_topk=True)
    np.testing.assert_array_equal(np.asarray(out.weight_GSK)[0, :, 0], [1.0, 1.0, 1.0, 1.0])
    np.testing.assert_array_equal(np.asarray(out.routing.dropped_GSK)[0, :, 0], [1, 1, 1, 0])
    np.testing.assert_array_equal(np.asarray(out.routing.src_GEC)[0], [[3], [4]])  # 4 = S * K: empty
    # The old key (the combine weight after normalisation) kept token 0 instead.
    old = assign(out.expert_GSK, out.weight_GSK, num_experts=2, capacity=1, priority="top_prob")
    np.testing.assert_array_equal(np.asarray(old.dropped_GSK)[0, :, 0], [0, 1, 1, 1])
    # Unnormalised weights are the probabilities themselves: the same decision.
    raw = _route(logits, k=1, E=2, C=1, normalize_topk=False)
    np.testing.assert_array_equal(raw.routing.dropped_GSK, out.routing.dropped_GSK)


def test_top_prob_top2_normalized_ranks_by_probability():
    # S = 2, E = 3, k = 2, C = 1; logits = log p.
    # t0: p = [.5, .45, .05] -> choices e0, e1; top p .5, normalised top weight .5 / .95 = .526.
    # t1: p = [.4, .32, .28] -> choices e0, e1; top p .4, normalised top weight .4 / .72 = .556.
    # By probability t0 claims first: k = 0: t0 -> e0 (c0), t1 -> e0 full; k = 1: t0 -> e1 (c0), t1 -> e1 full.
    # By the normalised weight (the old key) t1 would claim first and keep both, t0 nothing.
    logits = np.log([[.5, .45, .05], [.4, .32, .28]])
    out = _route(logits, k=2, E=3, C=1, normalize_topk=True)
    np.testing.assert_array_equal(np.asarray(out.expert_GSK)[0], [[0, 1], [0, 1]])
    np.testing.assert_array_equal(np.asarray(out.routing.dropped_GSK)[0], [[0, 0], [1, 1]])
    np.testing.assert_allclose(np.asarray(out.routing.weight_GSK)[0], [[.5 / .95, .45 / .95], [0, 0]], rtol=1e-6)
    old = assign(out.expert_GSK, out.weight_GSK, num_experts=3, capacity=1, priority="top_prob")
    np.testing.assert_array_equal(np.asarray(old.dropped_GSK)[0], [[1, 1], [0, 0]])


def test_top_prob_key_ignores_routed_scaling_and_correction_bias():
    # DeepSeek-style sigmoid scores with a bias: the key is the unbiased score of the first choice.
    # t0: sigmoid(0) = .5 on e0; t1: sigmoid(1) = .731 on e0, so t1 claims first with C = 1.
    logits = [[0., -5.], [1., -5.]]
    out = _route(logits, k=1, E=2, C=1, score_fn="sigmoid", routed_scaling_factor=2.5, use_correction_bias=True)
    np.testing.assert_array_equal(np.asarray(out.routing.dropped_GSK)[0, :, 0], [1, 0])


# ---- overflow='renormalize': kept weights share the token's whole weight (NLLB-MoE) ----

def test_renormalize_golden():
    # S = 4, K = 2, E = 2, C = 2, position order: the k-major golden above keeps
    # t0: both; t1: first only; t2: nothing; t3: first only.
    # Weights (unnormalised here, to show the total is preserved): t0 [.5, .1] both kept: unchanged.
    # t1 [.6, .2]: total .8 on the kept first -> [.8, 0]. t2: all dropped -> [0, 0]. t3 [.7, .3] -> [1.0, 0].
    r = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(WEIGHT_4x2, np.float32), num_experts=2, capacity=2,
                   overflow="renormalize"))
    np.testing.assert_array_equal(r["dropped_GSK"], [[0, 0], [0, 1], [1, 1], [0, 1]])
    np.testing.assert_allclose(r["weight_GSK"], [[.5, .1], [.8, 0], [0, 0], [1.0, 0]], rtol=1e-6)
    # Normalised weights (sum 1): a token that loses its second expert weighs exactly 1 on its first.
    w = np.asarray(WEIGHT_4x2, np.float32)
    w = w / w.sum(-1, keepdims=True)
    r = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(w, np.float32), num_experts=2, capacity=2,
                   overflow="renormalize"))
    np.testing.assert_allclose(r["weight_GSK"], [[.5 / .6, .1 / .6], [1, 0], [0, 0], [1, 0]], rtol=1e-6)


def test_renormalize_keeps_a_lone_second_choice():
    # S = 2, K = 2, E = 3, C = 1. t0 -> [e0, e1], t1 -> [e0, e2].
    # k = 0: t0 -> e0 (c0), t1 -> e0 full.  k = 1: t0 -> e1 (c0), t1 -> e2 (c0).
    # t1 loses its first choice and keeps its second, which then carries t1's whole weight .7 + .3 = 1.
    e = [[0, 1], [0, 2]]
    w = [[.6, .4], [.7, .3]]
    r = _np(assign(_arr(e, np.int32), _arr(w, np.float32), num_experts=3, capacity=1, overflow="renormalize"))
    np.testing.assert_array_equal(r["dropped_GSK"], [[0, 0], [1, 0]])
    np.testing.assert_allclose(r["weight_GSK"], [[.6, .4], [0, 1]], rtol=1e-6)


def test_renormalize_config_needs_token_choice():
    with pytest.raises(ValueError, match="renormalize"):
        MoEConfig(d_model=4, d_ff=8, router="expert_choice", overflow="renormalize")
    MoEConfig(d_model=4, d_ff=8, overflow="renormalize")


# ---- token mask: masked tokens claim no slot ----

def test_masked_tokens_claim_no_capacity():
    # The k-major golden (S = 4, K = 2, E = 2, C = 2) with t0 masked: t0's choices claim nothing, so
    # k = 0: t1 -> e0 (c0), t2 -> e0 (c1), t3 -> e1 (c0); k = 1: t1 -> e1 (c1), t2 -> e1 full, t3 -> e0 full.
    mask = _arr([False, True, True, True], np.bool_)
    r = _np(assign(_arr(EXPERT_4x2, np.int32), _arr(WEIGHT_4x2, np.float32), num_experts=2, capacity=2,
                   token_mask_GS=mask))
    np.testing.assert_array_equal(r["slot_GSK"], [[4, 4], [0, 3], [1, 4], [2, 4]])
    np.testing.assert_array_equal(r["dropped_GSK"], [[0, 0], [0, 0], [0, 1], [0, 1]])  # masked: not "dropped"
    np.testing.assert_array_equal(r["src_GEC"], [[2, 4], [6, 3]])
    np.testing.assert_array_equal(r["weight_GSK"][0], [0, 0])
    # The same as routing the three real tokens alone.
    alone = _np(assign(_arr(EXPERT_4x2[1:], np.int32), _arr(WEIGHT_4x2[1:], np.float32), num_experts=2,
                       capacity=2))
    np.testing.assert_array_equal(r["dropped_GSK"][1:], alone["dropped_GSK"])
    np.testing.assert_array_equal(r["slot_GSK"][1:], alone["slot_GSK"])


@pytest.mark.parametrize("overflow", ("drop", "reduced_weight", "reroute", "renormalize"))
def test_masked_tokens_never_move_others(overflow):
    # Random choices with half the tokens masked, under every policy and both priorities: the real tokens
    # get exactly what they get routed alone (the masked ones removed from the group).
    rng = np.random.default_rng(0)
    S, K, E, C = 8, 2, 4, 2
    scores = rng.random((1, S, E)).astype(np.float32)
    expert = np.argsort(-scores, -1)[..., :K].astype(np.int32)
    weight = np.take_along_axis(scores, expert, -1)
    mask = np.array([[1, 0, 1, 1, 0, 0, 1, 1]], bool)
    kw = dict(num_experts=E, capacity=C, overflow=overflow, nominal_capacity=1 if overflow == "reduced_weight" else None)
    for priority in ("position", "top_prob"):
        sel = jnp.asarray(scores) if overflow == "reroute" else None
        r = assign_capacity(jnp.asarray(expert), jnp.asarray(weight), priority=priority, selection_GSE=sel,
                            token_mask_GS=jnp.asarray(mask), **kw)
        keep = mask[0]
        sel_alone = None if sel is None else sel[:, keep]
        a = assign_capacity(jnp.asarray(expert[:, keep]), jnp.asarray(weight[:, keep]), priority=priority,
                            selection_GSE=sel_alone, **kw)
        np.testing.assert_array_equal(np.asarray(r.dropped_GSK)[:, keep], a.dropped_GSK)
        np.testing.assert_array_equal(np.asarray(r.expert_GSK)[:, keep], a.expert_GSK)
        np.testing.assert_allclose(np.asarray(r.weight_GSK)[:, keep], a.weight_GSK, rtol=1e-6)
        assert not np.asarray(r.dropped_GSK)[:, ~keep].any()
        assert np.all(np.asarray(r.weight_GSK)[:, ~keep] == 0)
        assert np.all(np.asarray(r.slot_GSK)[:, ~keep] == E * C)
        np.testing.assert_array_equal(r.tokens_per_expert_E(), a.tokens_per_expert_E())


# ---- numpy oracle (drop and reduced_weight) and invariants, by hypothesis ----

def oracle(expert_GSK, weight_GSK, E, C, priority, overflow, nominal=None):
    """Straight loop: k-major, then position / stable top-weight order; first come, first served."""
    G, S, K = expert_GSK.shape
    slot = np.full((G, S, K), E * C, np.int64)
    src = np.full((G, E, C), S * K, np.int64)
    weight = np.array(weight_GSK, np.float32)
    for g in range(G):
        order = range(S) if priority == "position" else np.argsort(-weight_GSK[g, :, 0], kind="stable")
        fill = np.zeros(E, np.int64)
        for k in range(K):
            for s in order:
                e = expert_GSK[g, s, k]
                if fill[e] < C:
                    slot[g, s, k] = e * C + fill[e]
                    src[g, e, fill[e]] = s * K + k
                    fill[e] += 1
        if overflow == "reduced_weight":
            load = np.bincount(expert_GSK[g].ravel(), minlength=E)
            scale = np.minimum(1.0, nominal / np.maximum(load, 1)).astype(np.float32)
            weight[g] = weight[g] * scale[expert_GSK[g]]
    weight = np.where(slot < E * C, weight, 0.0)
    return slot, src, weight


SHAPES = ((8, 1, 4, 2), (8, 2, 4, 3), (6, 3, 4, 2))  # (S, K, E, C); G = 2


@st.composite
def choices(draw):
    """Router-like choices: distinct experts per token from integer scores (many ties)."""
    S, K, E, C = draw(st.sampled_from(SHAPES))
    skew = draw(st.sampled_from(("none", "one_expert", "empty_expert")))
    scores = np.array(draw(st.lists(st.integers(0, 3), min_size=2 * S * E, max_size=2 * S * E)),
                      np.float32).reshape(2, S, E)
    if skew == "one_expert":
        scores[..., 0] += 10.0  # every token's first choice is e0
    elif skew == "empty_expert":
        scores[..., E - 1] -= 10.0  # nobody picks the last expert unless K = E
    expert = np.argsort(-scores, axis=-1, kind="stable")[..., :K].astype(np.int32)
    weight = (np.take_along_axis(scores, expert, -1) + 1.0) / 20.0  # ties in weights too
    return expert, weight.astype(np.float32), scores, E, C


def check_invariants(r, expert_in, weight_in, E, C):
    slot, src, w = (np.asarray(getattr(r, k)) for k in ("slot_GSK", "src_GEC", "weight_GSK"))
    expert, dropped = np.asarray(r.expert_GSK), np.asarray(r.dropped_GSK)
    G, S, K = slot.shape
    kept = slot < E * C
    np.testing.assert_array_equal(kept, ~dropped)
    # Every expert holds <= C choices per group, and slot e * C + c belongs to expert e.
    for g in range(G):
        counts = np.bincount(expert[g][kept[g]], minlength=E)
        assert np.all(counts <= C)
        np.testing.assert_array_equal(slot[g][kept[g]] // C, expert[g][kept[g]])
    # src_GEC and slot_GSK are mutually inverse.
    for g in range(G):
        filled = src[g] < S * K
        assert filled.sum() == kept[g].sum()
        for e, c in zip(*np.nonzero(filled)):
            s, k = divmod(src[g, e, c], K)
            assert slot[g, s, k] == e * C + c
        for s, k in zip(*np.nonzero(kept[g])):
            e, c = divmod(slot[g, s, k], C)
            assert src[g, e, c] == s * K + k
    # Dropped choices weigh exactly 0; a token's kept experts are distinct.
    assert np.all(w[dropped] == 0.0)
    for g in range(G):
        for s in range(S):
            ex = expert[g, s][kept[g, s]]
            assert len(set(ex.tolist())) == len(ex)
    return kept


@settings(max_examples=25, deadline=None)
@given(choices(), st.sampled_from(("position", "top_prob")))
def test_drop_matches_oracle(ch, priority):
    expert, weight, _, E, C = ch
    r = assign(jnp.asarray(expert), jnp.asarray(weight), num_experts=E, capacity=C, priority=priority)
    slot, src, w = oracle(expert, weight, E, C, priority, "drop")
    np.testing.assert_array_equal(r.slot_GSK, slot)
    np.testing.assert_array_equal(r.src_GEC, src)
    np.testing.assert_array_equal(r.weight_GSK, w)
    np.testing.assert_array_equal(r.expert_GSK, expert)
    check_invariants(r, expert, weight, E, C)


@settings(max_examples=15, deadline=None)
@given(choices())
def test_reduced_weight_matches_oracle(ch):
    expert, weight, _, E, C = ch
    nominal = max(1, C - 1)
    r = assign(jnp.asarray(expert), jnp.asarray(weight), num_experts=E, capacity=C,
               overflow="reduced_weight", nominal_capacity=nominal)
    slot, src, w = oracle(expert, weight, E, C, "position", "reduced_weight", nominal)
    np.testing.assert_array_equal(r.slot_GSK, slot)
    np.testing.assert_array_equal(r.src_GEC, src)
    np.testing.assert_allclose(r.weight_GSK, w, rtol=1e-6)
    check_invariants(r, expert, weight, E, C)
    # An expert's combine mass is at most nominal C times its largest weight.
    rw, re_ = np.asarray(r.weight_GSK), np.asarray(r.expert_GSK)
    for g in range(2):
        for e in range(E):
            mine = re_[g] == e
            if mine.any():
                assert rw[g][mine].sum() <= nominal * weight[g][mine].max() * (1 + 1e-6)


@settings(max_examples=20, deadline=None)
@given(choices(), st.sampled_from(("position", "top_prob")))
def test_reroute_invariants(ch, priority):
    expert, weight, scores, E, C = ch
    r = assign(jnp.asarray(expert), jnp.asarray(weight), num_experts=E, capacity=C, priority=priority,
               overflow="reroute", selection_GSE=jnp.asarray(scores))
    kept = check_invariants(r, expert, weight, E, C)
    slot_drop, _, _ = oracle(expert, weight, E, C, priority, "drop")
    kept_drop = slot_drop < E * C
    # What drop keeps stays where it was; rerouting only adds.
    np.testing.assert_array_equal(np.asarray(r.slot_GSK)[kept_drop], slot_drop[kept_drop])
    assert kept.sum() >= kept_drop.sum()
    # Rerouted choices keep their weights; dropped ones weigh 0.
    np.testing.assert_array_equal(np.asarray(r.weight_GSK), np.where(kept, weight, 0.0))
    # An expert left with room means no waiting choice could use it: every still-dropped choice's
    # token already uses that expert.
    expert_out = np.asarray(r.expert_GSK)
    for g in range(2):
        fill = np.bincount(expert_out[g][kept[g]], minlength=E)
        for s, k in zip(*np.nonzero(~kept[g])):
            used = set(expert_out[g, s][kept[g, s]].tolist()) | set(expert[g, s].tolist())
            assert all(fill[e] == C or e in used for e in range(E)), (g, s, k, fill, used)


@settings(max_examples=10, deadline=None)
@given(choices())
def test_reroute_k1_with_enough_room_drops_nothing(ch):
    expert, weight, scores, E, C = ch
    expert, weight = expert[..., :1], weight[..., :1]
    S = expert.shape[1]
    C = -(-S // E)  # E * C >= S
    r = assign(jnp.asarray(expert), jnp.asarray(weight), num_experts=E, capacity=C, overflow="reroute",
               selection_GSE=jnp.asarray(scores))
    assert not np.asarray(r.dropped_GSK).any()
    check_invariants(r, expert, weight, E, C)


def test_all_tokens_to_one_expert_and_empty_experts():
    # S = 8 tokens all pick e0 (K = 1), E = 4, C = 3: the first 3 are kept, the rest dropped;
    # e1..e3 stay empty (src = S * K = 8 everywhere).
    expert = np.zeros((1, 8, 1), np.int32)
    r = assign(jnp.asarray(expert), jnp.ones((1, 8, 1)), num_experts=4, capacity=3)
    np.testing.assert_array_equal(np.asarray(r.dropped_GSK)[0, :, 0], [0, 0, 0, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(np.asarray(r.src_GEC)[0], [[0, 1, 2], [8, 8, 8], [8, 8, 8], [8, 8, 8]])
    np.testing.assert_array_equal(r.tokens_per_expert_E(), [3, 0, 0, 0])
    np.testing.assert_array_equal(r.unserved_GS()[0], [0, 0, 0, 1, 1, 1, 1, 1])


def test_dispatch_and_combine_tensors_from_slots():
    r = assign(_arr(EXPERT_4x2, np.int32), _arr(WEIGHT_4x2, np.float32), num_experts=2, capacity=2)
    d = np.asarray(r.dispatch_tensor())[0]  # [S, E, C]
    c = np.asarray(r.combine_tensor())[0]
    expected_d, expected_c = np.zeros((4, 2, 2)), np.zeros((4, 2, 2), np.float32)
    # (token, expert, slot, weight) of the kept choices of the k-major golden above.
    for s, e, cc, w in [(0, 0, 0, 0.5), (1, 0, 1, 0.6), (3, 1, 0, 0.7), (0, 1, 1, 0.1)]:
        expected_d[s, e, cc], expected_c[s, e, cc] = 1, w
    np.testing.assert_array_equal(d, expected_d)
    np.testing.assert_array_equal(c, expected_c)
