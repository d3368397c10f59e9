"""Parity with Hugging Face transformers' PyTorch MoE blocks.

The fixture tests read `tests/fixtures/hf/*.npz` (written by `tests/fixtures/make_hf_fixtures.py`,
whose docstring defines every key and HF's exact semantics) and never skip. The `live` variants
rebuild the HF blocks through that same script and run only where torch and transformers import.

Layouts: HF stores `nn.Linear` weights as `[out, in]`. Ours: router `w_DE = gate_weight.T`;
experts `w_gate_EDF = w_gate.transpose(0, 2, 1)`, `w_in_EDF = w_up.transpose(0, 2, 1)` (our SwiGLU
computes `silu(x w_gate) * (x w_in)`), `w_out_EFD = w_down.transpose(0, 2, 1)`; Switch's `wi` is our
`w_in` (ReLU, no gate).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from moe_jax import MoEConfig, MoELayer
from moe_jax import routing as routing_lib

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
CASES = ("switch", "mixtral", "qwen2_moe_norm", "qwen2_moe_nonorm", "deepseek_v3", "deepseek_v2")
ATOL = 1e-5

# Execution paths of our layer for a case that drops nothing: two capacity paths with a capacity
# of S (nothing can drop), "gather" and "einsum", and the two dropless backends "blocked" and "ragged_dot".


def load_case(name: str) -> dict:
    with np.load(FIXTURES / f"{name}.npz") as f:
        arrays = {k: f[k] for k in f.files}
    arrays["meta"] = json.loads(str(arrays["meta"]))
    return arrays


def config_for(arrays: dict, path: str) -> MoEConfig:
    """Our config for a fixture case, on one execution path: gather | einsum | blocked | ragged_dot."""
    m = arrays["meta"]
    L = m["seq_len"]
    common = dict(d_model=m["d_model"], d_ff=m["d_ff"], num_experts=m["num_experts"],
                  num_experts_per_token=m["top_k"], group_size=L, grouping="tokens")
    if m["case"] == "switch":
        # HF counts capacity per sequence in position order: group = one sequence (S = L = 8),
        # C = max(min_capacity=1, ceil(cf * S * k / E)) = ceil(1.5 * 8 * 1 / 4) = ceil(3.0) = 3.
        assert path in ("gather", "einsum")
        return MoEConfig(**common, activation="relu", capacity_factor=1.5, eval_capacity_factor=1.5,
                         min_capacity=1, overflow="drop", priority="position", dispatch=path,
                         balance_loss_scope="sequence")
    common.update(activation="swiglu", normalize_topk=bool(m["norm_topk_prob"]),
                  routed_scaling_factor=float(m["routed_scaling_factor"]))
    if path in ("gather", "einsum"):
        # C = min(S, ceil(cf * S * k / E)) = S: every choice fits, as in HF's dropless blocks.
        cf = float(m["num_experts"])
        common.update(capacity_factor=cf, eval_capacity_factor=cf, dispatch=path)
    else:
        common.update(capacity_factor=None, eval_capacity_factor=None, expert_backend=path,
                      dropless_block_size=4)
    if m["case"] in ("mixtral", "qwen2_moe_norm", "qwen2_moe_nonorm"):
        common.update(balance_loss_scope="batch")  # HF's statistics are over all T tokens
    if m["case"].startswith("qwen2_moe"):
        common.update(num_shared_experts=1, shared_d_ff=m["shared_d_ff"], shared_expert_gate=True)
    if m["case"] == "deepseek_v3":
        common.update(score_fn="sigmoid", use_correction_bias=True, n_expert_groups=m["n_group"],
                      topk_groups=m["topk_group"], num_shared_experts=m["n_shared_experts"],
                      shared_d_ff=m["shared_d_ff"])
    if m["case"] == "deepseek_v2":
        # group_limited_greedy: softmax scores, a group scored by its best expert, no renormalisation.
        common.update(score_fn="softmax", group_score="max", n_expert_groups=m["n_group"],
                      topk_groups=m["topk_group"], num_shared_experts=m["n_shared_experts"],
                      shared_d_ff=m["shared_d_ff"])
    return MoEConfig(**common)


def _set(var, value):
    value = jnp.asarray(value, jnp.float32)
    assert var[...].shape == value.shape, (var[...].shape, value.shape)
    var[...] = value


def build_layer(arrays: dict, cfg: MoEConfig) -> MoELayer:
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    t = lambda a: np.transpose(a, (0, 2, 1))
    _set(layer.router.w_DE, arrays["gate_weight"].T)
    if arrays["meta"]["case"] == "switch":
        _set(layer.experts.w_in_EDF, t(arrays["wi"]))
        _set(layer.experts.w_out_EFD, t(arrays["wo"]))
    else:
        _set(layer.experts.w_gate_EDF, t(arrays["w_gate"]))
        _set(layer.experts.w_in_EDF, t(arrays["w_up"]))
        _set(layer.experts.w_out_EFD, t(arrays["w_down"]))
    if "shared_w_gate" in arrays:
        shared = layer.shared.experts
        _set(shared.w_gate_EDF, arrays["shared_w_gate"].T[None])
        _set(shared.w_in_EDF, arrays["shared_w_up"].T[None])
        _set(shared.w_out_EFD, arrays["shared_w_down"].T[None])
    if "shared_gate" in arrays:
        _set(layer.shared_gate_D1, arrays["shared_gate"].T)
    if "correction_bias" in arrays:
        _set(layer.router.correction_bias_E, arrays["correction_bias"])
    return layer


@nnx.jit
def forward(layer: MoELayer, x_BLD):
    """Everything compared, in one compiled call: logits, choices, output, aux, (capacity routing)."""
    logits_GSE = layer.router.logits(x_BLD)  # groups = sequences in every case here (group_size = L)
    expert_GSK, weight_GSK, _ = layer.router.choices(logits_GSE, None)
    y_BLD, aux = layer(x_BLD, train=False)
    routing = None
    if layer.cfg.capacity_factor_for(False) is not None:
        routing = layer.router.route(logits_GSE, train=False).routing
    return logits_GSE, expert_GSK, weight_GSK, y_BLD, aux, routing


def check_case(arrays: dict, path: str) -> None:
    """Our layer with HF's weights reproduces HF's logits, choices, weights, output and losses."""
    m = arrays["meta"]
    cfg = config_for(arrays, path)
    layer = build_layer(arrays, cfg)
    x_BLD = jnp.asarray(arrays["x"])
    B, L, D = x_BLD.shape
    T, E = B * L, m["num_experts"]
    logits_GSE, expert_GSK, weight_GSK, y_BLD, aux, routing = forward(layer, x_BLD)

    np.testing.assert_allclose(logits_GSE.reshape(T, E), arrays["router_logits"].reshape(T, E), atol=ATOL)
    expert_TK = np.asarray(expert_GSK).reshape(T, -1)
    weight_TK = np.asarray(weight_GSK).reshape(T, -1)
    hf_idx, hf_w = arrays["topk_idx"], arrays["topk_weight"]
    if m["case"] in ("deepseek_v3", "deepseek_v2"):
        # HF's topk(sorted=False): compare as sets, weights aligned by expert id.
        ours_order, hf_order = np.argsort(expert_TK, -1), np.argsort(hf_idx, -1)
        expert_TK, weight_TK = (np.take_along_axis(a, ours_order, -1) for a in (expert_TK, weight_TK))
        hf_idx, hf_w = (np.take_along_axis(a, hf_order, -1) for a in (hf_idx, hf_w))
    if m["case"] == "switch":
        np.testing.assert_array_equal(expert_TK, hf_idx)  # before the capacity cut
        kept_T = arrays["kept"].reshape(T)
        np.testing.assert_allclose(weight_TK[kept_T], hf_w[kept_T], atol=ATOL)
    else:
        np.testing.assert_array_equal(expert_TK, hf_idx)
        np.testing.assert_allclose(weight_TK, hf_w, atol=ATOL)

    np.testing.assert_allclose(np.asarray(y_BLD), arrays["y"], atol=ATOL)
    assert aux.metrics["dropped_fraction"] == (m.get("n_dropped", 0) / T)

    if m["case"] == "switch":
        assert routing.capacity == m["capacity"] == 3
        np.testing.assert_array_equal(~np.asarray(routing.dropped_GSK)[..., 0], arrays["kept"])
        dropped = ~arrays["kept"]
        assert dropped.sum() == 3
        assert np.all(np.asarray(y_BLD)[dropped] == 0.0)  # exactly zero, not p * x
        # HF's per-sequence aux loss = E**2 mean_{b,e} f P = our balance loss with scope 'sequence'.
        assert cfg.balance_loss_scope == "sequence"
        np.testing.assert_allclose(aux.losses["balance_loss"], arrays["aux_loss"], rtol=1e-5)
        np.testing.assert_allclose(aux.losses["z_loss"], arrays["z_loss"], rtol=1e-5)
    elif "aux_loss" in arrays:
        # Mixtral / Qwen count f summed over the K choices (f sums to K) over the whole batch:
        # HF aux = K * our balance loss with scope 'batch' (ours: f sums to 1).
        assert cfg.balance_loss_scope == "batch"
        K = m["top_k"]
        np.testing.assert_allclose(K * aux.losses["balance_loss"], arrays["aux_loss"], rtol=1e-5)
        assert not np.isclose(aux.losses["balance_loss"], arrays["aux_loss"], rtol=1e-3)


@pytest.mark.parametrize("path", ("gather", "einsum"))
def test_switch_fixture(path):
    check_case(load_case("switch"), path)


# Every case on at least one of the four execution paths, every path on two cases (with Switch).
@pytest.mark.parametrize("case,path", [
    ("mixtral", "einsum"), ("mixtral", "ragged_dot"),
    ("qwen2_moe_norm", "blocked"), ("qwen2_moe_nonorm", "gather"),
    ("deepseek_v3", "blocked"), ("deepseek_v3", "ragged_dot"),
    ("deepseek_v2", "gather"), ("deepseek_v2", "ragged_dot"),
])
def test_no_drop_fixture(case, path):
    check_case(load_case(case), path)


def test_switch_fixture_distinguishes_per_sequence_capacity():
    """Counting capacity over the flattened batch (one group of 16) would keep other tokens."""
    arrays = load_case("switch")
    cfg = config_for(arrays, "gather")
    # One group of 16 tokens with C = 3 (cf = 0.75: ceil(0.75 * 16 / 4) = 3).
    flat_cfg = dataclasses.replace(cfg, group_size=16, capacity_factor=0.75, eval_capacity_factor=0.75)
    layer = build_layer(arrays, flat_cfg)
    logits = layer.router.logits(jnp.asarray(arrays["x"]).reshape(1, 16, -1))
    routing = layer.router.route(logits, train=False).routing
    assert routing.capacity == 3
    kept_flat = ~np.asarray(routing.dropped_GSK).reshape(2, 8)
    assert np.any(kept_flat != arrays["kept"])


def test_deepseek_fixture_needs_minus_inf_mask():
    """The fixture's biased scores make a 0-masked group limit pick different experts than -inf."""
    arrays = load_case("deepseek_v3")
    s = jax.nn.sigmoid(jnp.asarray(arrays["router_logits"]))[None]
    biased = s + arrays["correction_bias"]
    masked_inf = routing_lib.group_limited_mask(biased, 4, 2)
    masked_zero = jnp.where(jnp.isneginf(masked_inf), 0.0, masked_inf)
    _, idx_inf = jax.lax.top_k(masked_inf, 2)
    _, idx_zero = jax.lax.top_k(masked_zero, 2)
    idx_inf, idx_zero = np.sort(np.asarray(idx_inf[0]), -1), np.sort(np.asarray(idx_zero[0]), -1)
    np.testing.assert_array_equal(idx_inf, np.sort(arrays["topk_idx"], -1))
    assert np.any(idx_inf != idx_zero)
    # And the group scores (sum of the top-2 biased scores per group) are HF's.
    top2 = jax.lax.top_k(biased.reshape(16, 4, 2), 2)[0].sum(-1)
    np.testing.assert_allclose(top2, arrays["group_scores"], atol=ATOL)


def test_deepseek_v2_fixture_needs_max_group_score():
    """Scoring groups by their top-2 sum (DeepSeek-V3's rule) picks other experts on the tokens the
    fixture names, so the V2 parity above would fail if group_score were ignored."""
    arrays = load_case("deepseek_v2")
    m = arrays["meta"]
    T, K = m["batch"] * m["seq_len"], m["top_k"]
    cfg = config_for(arrays, "gather")
    assert cfg.group_score == "max"
    hf_TK = np.sort(arrays["topk_idx"], -1)
    top2_TK = arrays["topk_idx_top2_sum"]  # ascending, from the generator's float64 reference
    differs_T = np.any(top2_TK != hf_TK, -1)
    assert differs_T.sum() == m["n_tokens_top2_sum_changes_selection"] > 0
    x_BLD = jnp.asarray(arrays["x"])
    for group_score, want_TK in (("max", hf_TK), ("top2_sum", top2_TK)):
        layer = build_layer(arrays, dataclasses.replace(cfg, group_score=group_score))
        _, expert_GSK, _, y_BLD, _, _ = forward(layer, x_BLD)
        np.testing.assert_array_equal(np.sort(np.asarray(expert_GSK).reshape(T, K), -1), want_TK)
        y_diff_T = np.abs(np.asarray(y_BLD) - arrays["y"]).reshape(T, -1).max(-1) > 1e-3
        np.testing.assert_array_equal(y_diff_T, differs_T if group_score == "top2_sum" else False)
    # HF's group scores are the per-group max of the softmax probabilities.
    p = jax.nn.softmax(jnp.asarray(arrays["router_logits"]), -1)
    np.testing.assert_allclose(p.reshape(T, m["n_group"], -1).max(-1), arrays["group_scores"], atol=ATOL)


# ---- live: rebuild the HF blocks (only where torch and transformers import) ----

@pytest.mark.parametrize("case,seed_shift", [(c, 0) for c in CASES] + [
    ("mixtral", 1), ("qwen2_moe_norm", 1), ("qwen2_moe_nonorm", 1), ("deepseek_v3", 1), ("deepseek_v2", 1)])
def test_live_hf_block(case, seed_shift, monkeypatch):
    """seed_shift 0 rebuilds the fixture's block; 1 a block with fresh weights and inputs (the
    Switch case is left at its seed: the generator asserts its data drop tokens per sequence)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import sys
    sys.path.insert(0, str(Path(__file__).parent / "fixtures"))
    try:
        import make_hf_fixtures
    finally:
        sys.path.pop(0)
    manual_seed = torch.manual_seed
    monkeypatch.setattr(torch, "manual_seed", lambda s: manual_seed(s + seed_shift))
    arrays = make_hf_fixtures.build_case(case)  # runs the HF block (and the script's self-check)
    arrays["meta"] = json.loads(str(arrays["meta"]))
    if seed_shift:
        assert not np.allclose(arrays["y"], load_case(case)["y"])
    for path in (("gather",) if case == "switch" else ("gather", "blocked")):
        check_case(arrays, path)
