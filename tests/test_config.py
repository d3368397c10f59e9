"""MoEConfig: derived values (capacity, granularity) by hand, and clear errors naming the field."""
from __future__ import annotations

import jax.numpy as jnp
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer


def cfg(**kw) -> MoEConfig:
    base = dict(d_model=8, d_ff=16, num_experts=4, num_experts_per_token=1, min_capacity=1)
    base.update(kw)
    return MoEConfig(**base)


# ---- capacity: C = ceil(cf * S * k / E), at least min_capacity, at most S ----

@pytest.mark.parametrize("kw,S,train,expected", [
    # 1.25 * 64 * 2 / 8 = 20 exactly -> 20
    (dict(num_experts=8, num_experts_per_token=2, capacity_factor=1.25), 64, True, 20),
    # 1.0 * 10 * 1 / 4 = 2.5 -> ceil 3
    (dict(capacity_factor=1.0), 10, True, 3),
    # eval factor 2.0: 2.0 * 10 * 1 / 4 = 5.0 -> 5 (train would be 1.25 * 10 / 4 = 3.125 -> 4)
    (dict(capacity_factor=1.25, eval_capacity_factor=2.0), 10, False, 5),
    (dict(capacity_factor=1.25, eval_capacity_factor=2.0), 10, True, 4),
    # 1.0 * 8 * 1 / 8 = 1, but min_capacity 4 -> 4
    (dict(num_experts=8, capacity_factor=1.0, min_capacity=4), 8, True, 4),
    # 4.0 * 8 * 2 / 2 = 32 -> capped at S = 8
    (dict(num_experts=2, num_experts_per_token=2, capacity_factor=4.0), 8, True, 8),
    # min_capacity 16 > S = 8 -> still capped at S
    (dict(capacity_factor=1.0, min_capacity=16), 8, True, 8),
    # float: 1.1 * 100 * 1 / 10 = 11.000000000000002 in binary -> must be 11, not 12
    (dict(num_experts=10, capacity_factor=1.1), 100, True, 11),
    # granularity 2: E = 4 * 2 = 8, k = 1 * 2 = 2 -> 1.0 * 16 * 2 / 8 = 4
    (dict(granularity=2, capacity_factor=1.0), 16, True, 4),
    # reduced_weight: nominal 1.0 * 16 / 4 = 4, buffer ceil(1.5 * 4) = 6
    (dict(capacity_factor=1.0, overflow="reduced_weight", overflow_buffer_factor=1.5), 16, True, 6),
    # reduced_weight buffer capped at S: nominal ceil(1.0 * 6 / 4) = 2, buffer ceil(4.0 * 2) = 8 -> 6
    (dict(capacity_factor=1.0, overflow="reduced_weight", overflow_buffer_factor=4.0), 6, True, 6),
    # Soft MoE: C = slots per expert
    (dict(router="soft", dispatch="einsum", soft_slots_per_expert=3), 16, True, 3),
])
def test_capacity_formula(kw, S, train, expected):
    assert cfg(**kw).capacity(S, train) == expected


def test_nominal_capacity_of_reduced_weight():
    c = cfg(capacity_factor=1.0, overflow="reduced_weight", overflow_buffer_factor=1.5)
    assert c.nominal_capacity(16, True) == 4  # 1.0 * 16 / 4
    assert c.capacity(16, True) == 6  # ceil(1.5 * 4)


def test_dropless_capacity_is_none():
    c = cfg(capacity_factor=None, eval_capacity_factor=None, expert_backend="blocked")
    assert c.capacity(16, True) is None and c.capacity(16, False) is None


def test_granularity_derived_values():
    c = cfg(d_ff=24, num_experts=4, num_experts_per_token=2, granularity=3)
    assert (c.num_routed_experts, c.top_k, c.expert_d_ff) == (12, 6, 8)
    # Total expert width E * F is unchanged: 4 * 24 = 12 * 8; active k * F: 2 * 24 = 6 * 8.
    assert c.num_routed_experts * c.expert_d_ff == 4 * 24 and c.top_k * c.expert_d_ff == 2 * 24


def test_shared_width():
    assert cfg(num_shared_experts=2).shared_width == 2 * 16
    assert cfg(num_shared_experts=2, shared_d_ff=10).shared_width == 20
    assert cfg(granularity=2, num_shared_experts=1).shared_width == 8


# ---- bad fields fail at construction with the field's name ----

@pytest.mark.parametrize("kw,field", [
    (dict(num_experts_per_token=5), "num_experts_per_token"),  # k 5 > E 4
    (dict(num_experts_per_token=3, granularity=2, num_experts=2), "num_experts_per_token"),  # k 6 > E 4
    (dict(router="hash", num_experts_per_token=5), "num_experts_per_token"),
    (dict(capacity_factor=0.0), "capacity_factor"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(eval_capacity_factor=0.0), "eval_capacity_factor"),
    (dict(router="switch"), "router"),
    (dict(overflow="spill"), "overflow"),
    (dict(priority="random"), "priority"),
    (dict(score_fn="relu"), "score_fn"),
    (dict(topk_order="sorted"), "topk_order"),
    (dict(dispatch="scatter"), "dispatch"),
    (dict(expert_backend="megablox"), "expert_backend"),
    (dict(activation="tanh"), "activation"),
    (dict(grouping="sequence"), "grouping"),
    (dict(balance_loss_scope="global"), "balance_loss_scope"),
    (dict(granularity=3), "granularity"),  # 3 does not divide d_ff 16
    (dict(granularity=0), "granularity"),
    (dict(d_model=0), "d_model"),
    (dict(d_ff=-2), "d_ff"),
    (dict(num_experts=0), "num_experts"),
    (dict(min_capacity=0), "min_capacity"),
    (dict(group_size=0), "group_size"),
    (dict(n_expert_groups=3), "n_expert_groups"),  # 3 does not divide E 4
    (dict(n_expert_groups=2, topk_groups=3), "topk_groups"),
    (dict(n_expert_groups=2, topk_groups=1, num_experts_per_token=3), "topk_groups"),  # 1 group of 2 < k 3
    (dict(n_expert_groups=2, router="hash"), "n_expert_groups"),
    (dict(n_expert_groups=2, topk_groups=1, group_score="mean"), "group_score"),
    (dict(use_correction_bias=True, router="expert_choice"), "use_correction_bias"),
    (dict(router="hash", overflow="reroute"), "overflow"),  # no router scores to rank fallbacks
    (dict(topk_order="topk_softmax", score_fn="sigmoid"), "topk_order"),
    (dict(jitter_eps=1.0), "jitter_eps"),
    (dict(jitter_eps=-0.1), "jitter_eps"),
    (dict(logit_noise_std=-1.0), "logit_noise_std"),
    (dict(routed_scaling_factor=0.0), "routed_scaling_factor"),
    (dict(overflow_buffer_factor=0.5), "overflow_buffer_factor"),
    (dict(max_reroute_rounds=-1), "max_reroute_rounds"),
    (dict(soft_slots_per_expert=0), "soft_slots_per_expert"),
    (dict(router_init_scale=0.0), "router_init_scale"),
    (dict(expert_init_scale=-0.1), "expert_init_scale"),
    (dict(bias_update_rate=-1e-3), "bias_update_rate"),  # a negative rate would invert the sign rule
    (dict(balance_loss_coef=-1e-2), "balance_loss_coef"),
    (dict(z_loss_coef=-1e-3), "z_loss_coef"),
    (dict(num_shared_experts=-1), "num_shared_experts"),
    (dict(num_shared_experts=1, shared_d_ff=0), "shared_d_ff"),
    (dict(shared_expert_gate=True), "shared_expert_gate"),  # a gate without shared experts
    (dict(router="soft"), "dispatch"),  # soft needs dispatch='einsum'
    (dict(router="expert_choice", capacity_factor=None, expert_backend="blocked"), "capacity_factor"),
    (dict(router="soft", dispatch="einsum", eval_capacity_factor=None, expert_backend="blocked"),
     "eval_capacity_factor"),
    (dict(capacity_factor=None), "expert_backend"),  # dropless with the einsum backend
    (dict(expert_backend="ragged_dot"), "expert_backend"),  # sorted backend with a capacity
    (dict(dropless_block_size=0, capacity_factor=None, eval_capacity_factor=None, expert_backend="blocked"),
     "dropless_block_size"),
])
def test_bad_field_raises_naming_it(kw, field):
    with pytest.raises(ValueError, match=rf"\b{field}\b"):
        cfg(**kw)


def test_good_configs_construct():
    cfg()
    cfg(router="expert_choice")
    cfg(router="hash", num_experts_per_token=2)
    cfg(router="soft", dispatch="einsum")
    cfg(num_experts=8, num_experts_per_token=2, n_expert_groups=4, topk_groups=2, score_fn="sigmoid",
        use_correction_bias=True)
    cfg(capacity_factor=None, eval_capacity_factor=None, expert_backend="ragged_dot")


# ---- errors raised by the layer on its input, before anything is traced ----

def _layer(**kw):
    return MoELayer(cfg(**kw), rngs=nnx.Rngs(0))


def test_group_size_not_dividing_tokens():
    layer = _layer(group_size=5)
    with pytest.raises(ValueError, match="group_size"):
        layer(jnp.zeros((2, 4, 8)))  # 8 tokens, groups of 5


def test_position_group_size_not_dividing_batch():
    layer = _layer(grouping="position", group_size=2)
    with pytest.raises(ValueError, match="group_size"):
        layer(jnp.zeros((3, 4, 8)))  # batch 3, groups of 2 sequences


def test_input_width_mismatch():
    with pytest.raises(ValueError, match="d_model"):
        _layer()(jnp.zeros((1, 4, 6)))


def test_hash_router_needs_token_ids():
    with pytest.raises(ValueError, match="token_ids"):
        _layer(router="hash")(jnp.zeros((1, 4, 8)))


def test_top1_topk_softmax_warns_that_the_router_gets_no_gradient():
    import warnings

    from moe_jax.moe_config import MoEConfig

    with pytest.warns(UserWarning, match="carries no gradient to the router"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, num_experts_per_token=1, topk_order="topk_softmax")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MoEConfig(d_model=8, d_ff=8, num_experts=4, num_experts_per_token=2, topk_order="topk_softmax")
        MoEConfig(d_model=8, d_ff=8, num_experts=4, num_experts_per_token=1)
