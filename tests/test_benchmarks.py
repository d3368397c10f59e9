"""Smoke tests of the benchmarks: their quick modes run end to end and write every figure."""
import importlib.util
import json
import math

import pytest

from benchmarks import moe_layer


def _positive_finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


def test_moe_layer_benchmark_quick(tmp_path):
    path = tmp_path / "moe_layer.json"
    moe_layer.main(["--quick", "--json", str(path)])
    summary = json.loads(path.read_text())

    rows = summary["rows"]
    shape = moe_layer.QUICK
    S, cf = shape.group_sizes[0], shape.capacity_factors[0]
    expected = {"dense", f"gather_cf{cf:g}_S{S}", f"gather_blocked_cf{cf:g}_S{S}", f"einsum_cf{cf:g}_S{S}",
                "dropless_blocked"}
    assert expected <= set(rows), sorted(rows)
    for name in expected:
        row = rows[name]
        for key in ("time_vs_dense", "cpu_time_vs_dense", "time_vs_dense_of_medians", "median_s",
                    "xla_train_flops", "xla_executed_over_useful", "own_executed_over_useful", "own_over_xla"):
            assert _positive_finite(row[key]), (name, key, row[key])
        assert len(row["times_s"]) >= shape.repeats
        if name != "dense":
            assert len(row["ratios"]) == shape.repeats
            assert 0.0 <= row["dropped_fraction"] < 1.0
    assert rows["dense"]["time_vs_dense"] == 1.0
    # The layer's own FLOP accounting must match XLA's count of the compiled einsum step within 5 %.
    assert abs(rows[f"einsum_cf{cf:g}_S{S}"]["own_over_xla"] - 1.0) < 0.05
    # Padding makes the capacity and dropless paths execute at least the useful FLOPs.
    assert rows[f"gather_cf{cf:g}_S{S}"]["own_executed_over_useful"] >= 1.0
    assert rows["dropless_blocked"]["rows_executed"] >= shape.tokens * shape.k
    assert set(summary["einsum_overhead_predicted"]) == {f"cf{cf:g}_S{S}"}

    has_torch = all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))
    if has_torch:
        hf = summary["hf"]
        for key in ("hf_over_torch_dense", "torch_dense_over_jax_dense", f"hf_over_gather_cf{cf:g}_S{S}",
                    "hf_over_dropless_blocked"):
            assert _positive_finite(hf[key]), (key, hf.get(key))
    else:
        assert summary["hf"] == {}


def test_train_step_benchmark_quick(tmp_path):
    from benchmarks import train_step

    path = tmp_path / "train_step.json"
    out = train_step.main(["--quick", "--json", str(path)])
    assert json.loads(path.read_text()) == out
    for key in ("moe_step_s", "dense_equivalent_step_s", "matmul_s", "tokens_per_s", "model_flops_per_s",
                "matmul_flops_per_s", "mfu_vs_matmul", "moe_over_dense_equivalent"):
        assert _positive_finite(out[key]), (key, out[key])
    # The dense-equivalent model has the MoE model's active parameters (less its routers) as its total.
    router = out["num_layers"] * out["d_model"] * out["num_experts"]
    assert out["dense_equivalent_params"] == out["params_active_per_token"] - router < out["params_total"]
    assert out["tokens_per_s"] * out["moe_step_s"] == pytest.approx(out["batch"] * out["seq_len"])


def test_train_step_accumulation_benchmark_quick(tmp_path):
    from benchmarks import train_step

    path = tmp_path / "accumulation.json"
    out = train_step.main(["--quick", "--microbatches", "2", "--rounds", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == out
    assert out["microbatches"] == 2 and out["batch"] == 4
    for key in ("whole_batch_step_s", "microbatches_step_s", "microbatches_without_load_pass_step_s",
                "load_pass_overhead", "microbatches_over_whole_batch"):
        assert _positive_finite(out[key]), (key, out[key])
    assert out["load_pass_overhead"] == pytest.approx(
        out["microbatches_step_s"] / out["microbatches_without_load_pass_step_s"])


def test_health_cost_benchmark_quick(tmp_path):
    from benchmarks import health_cost

    path = tmp_path / "health_cost.json"
    out = health_cost.main(["--quick", "--rounds", "1", "--json", str(path)])
    assert json.loads(path.read_text()) == out
    for key in ("step", "at_train", "at_eval", "picture"):
        assert _positive_finite(out["seconds"][key]), key
    assert out["overhead_total_fraction"] == pytest.approx(sum(out["overhead_fraction"].values()))
    # 300 steps, a log step every 10 and an evaluation every 100: 30 training-window checks, 3 ledgers and pictures
    run_s = 300 * out["seconds"]["step"]
    assert out["overhead_fraction"]["at_train"] == pytest.approx(30 * out["seconds"]["at_train"] / run_s)
    assert out["overhead_fraction"]["picture"] == pytest.approx(3 * out["seconds"]["picture"] / run_s)
    assert out["ledger_bytes_per_eval"] > 0 and out["config"] == "configs/default.py"
