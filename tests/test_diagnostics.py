"""Diagnoses beside the judged sweeps (experiments/diagnostics.py, identity_routing.py) and the specs of the
sweeps that measure them (rate_check, first_dense), by hand, without training."""
import numpy as np
import pytest

from experiments import scales, sweeps
from experiments.sweeps import first_dense, rate_check
from moe_jax.train.run_config import build_run_config


def test_rate_check_runs_the_judged_models_at_the_best_rate():
    """cpu: each model of claims 1, 3 and 4 at the rate x 4 (the learning_rate sweep's x 4 point is its seed-0 run);
    G4@flops and G16@flops are the granularity sweep's FLOP-matched runs at that rate; no pod runs."""
    cpu = scales.get("cpu")
    specs = sweeps.specs("rate_check", cpu)
    lr = cpu.train["learning_rate"] * cpu.rate_check_factor
    assert {s.axes["variant"] for s in specs} == set(rate_check.VARIANTS)
    assert all(s.config.train.learning_rate == pytest.approx(lr) and s.axes["seed"] in cpu.seeds for s in specs)
    lr_runs = {s.name for s in sweeps.specs("learning_rate", cpu)}
    assert {s.name for s in specs if s.axes["seed"] == 0 and s.axes["variant"] in ("dense", "G1")} <= lr_runs
    matched = {s.config.model.granularity: s.steps for s in sweeps.specs("granularity", cpu)
               if s.axes["budget"] == "flops"}
    for s in specs:
        G = s.config.model.granularity
        want = matched[G] if s.axes["variant"].endswith("@flops") else cpu.steps("s")
        assert s.steps == want, s.name
    assert matched[16] < matched[4] < cpu.steps("s")
    assert not sweeps.specs("rate_check", scales.get("pod"))


def test_rate_check_by_hand():
    """Seeds pair only where both runs exist; the protocol's run is the same name without its `_lr` part."""
    from experiments.diagnostics import analyse_rate_check

    def row(sweep, name, variant, seed, ce):
        return {"sweep": sweep, "name": name, "variant": variant, "seed": seed, "final_eval_ce": ce,
                "status": "ok", "learning_rate": 0.012 if sweep == "rate_check" else 0.003}

    rows = [row("rate_check", f"s_dense_lr0.012_seed{s}", "dense", s, 1.80 + 0.01 * s) for s in (0, 1, 2)]
    rows += [row("rate_check", f"s_E8_K1_G1_lr0.012_seed{s}", "G1", s, 1.70 + 0.02 * s) for s in (0, 1)]
    rows += [row("model_size", f"s_dense_seed{s}", "dense", s, 1.85) for s in (0, 1, 2)]
    rows += [row("num_experts", f"s_E8_K1_G1_seed{s}", None, s, 1.76 + 0.01 * s) for s in (0, 1, 2)]
    r = analyse_rate_check(rows)
    g1_dense = r["comparisons"]["G1 - dense"]
    # seeds 0, 1: (1.70 - 1.80, 1.72 - 1.81) -> mean -0.095, sd 0.005 sqrt(2)
    assert g1_dense["high"]["n"] == 2 and g1_dense["high"]["mean"] == pytest.approx(-0.095)
    assert g1_dense["high"]["std"] == pytest.approx(0.005 * np.sqrt(2))
    # the protocol's runs of the seeds trained at the higher rate (0, 1): 1.76 / 1.77 - 1.85
    assert g1_dense["protocol"]["n"] == 2 and g1_dense["protocol"]["mean"] == pytest.approx(-0.085)
    assert r["variants"]["G1"]["change"]["mean"] == pytest.approx(-0.055)  # (-0.06 - 0.05) / 2
    assert r["variants"]["dense"]["high"] == pytest.approx({"mean": 1.81, "std": 0.01, "n": 3})
    assert set(r["comparisons"]) == {"G1 - dense"}  # G4, G16, gshard, fine_x4 were not trained
    assert r["kendall_tau"] == {"high": None, "protocol": None}  # hash, switch, gshard, fine_x4 missing
    # DeepSeekMoE's five: published order dense > hash > switch > gshard > fine_x4; ours swaps hash and switch
    ce = {"hash": 1.74, "switch": 1.75, "gshard": 1.72, "fine_x4": 1.70}
    rows += [row("rate_check", f"s_{v}_lr0.012_seed0", v, 0, c) for v, c in ce.items()]
    tau = analyse_rate_check(rows)["kendall_tau"]
    assert tau["high"] == pytest.approx(0.8) and tau["protocol"] is None  # 9 of 10 pairs concordant


def test_ledger_identity_by_hand():
    """Eight tokens (ids 3 3 3 7 7 9 3 7), one top-1 layer over 3 experts, groups of 4, capacity 1."""
    from experiments.identity_routing import ledger_identity
    from moe_jax.ledger import Ledger

    expert = np.asarray([0, 0, 1, 2, 2, 2, 0, 1], np.int32)[None, :, None]
    ones = np.ones(expert.shape, np.float32)
    ledger = Ledger(tokens=np.asarray([[3, 3, 3, 7, 7, 9, 3, 7]], np.int32), layers=np.asarray([2], np.int32),
                    expert=expert, weight=ones, dropped=np.zeros(expert.shape, bool), score=ones,
                    correction_bias=np.zeros((1, 3), np.float32), num_experts=3, batch_size=1)
    (layer,) = ledger_identity(ledger, capacity=1, group=4)
    # id 3 -> expert 0 three times of four, id 7 -> expert 2 twice of three, id 9 -> expert 2: (3 + 2 + 1) / 8
    assert layer["layer"] == 2 and layer["majority"] == pytest.approx(0.75)
    assert layer["top_token_to_one_expert"] == pytest.approx(0.75)  # the most frequent id, 3
    assert layer["largest_load"] == pytest.approx(3 / 8)  # experts 0 and 2 take 3 tokens each
    assert layer["busiest_top_tokens"] == [[3, 1.0]]  # expert 0 (the first of the two): id 3 only
    # groups [0 0 1 2] and [2 2 0 1]: loads (2, 1, 1) and (1, 1, 2), one token over capacity 1 in each
    assert layer["dropped_at_capacity"] == pytest.approx(0.25)
    with pytest.raises(ValueError, match="groups of 3"):
        ledger_identity(ledger, capacity=1, group=3)


def test_final_ledgers_reads_the_last_steps_ledger_of_top1_runs(tmp_path):
    from experiments.identity_routing import final_ledgers, ledger_identity
    from experiments.spec import workdir_of
    from moe_jax.ledger import Ledger, ledger_path

    scale = scales.get("smoke")
    specs = sweeps.specs("num_experts", scale)
    moe = next(s for s in specs if s.axes["E"] > 1)
    run = build_run_config(moe.config)
    S, C = run.model.moe.tokens_per_group(4, 32), run.model.moe.capacity(32, True)
    rng = np.random.default_rng(0)
    expert = rng.integers(0, run.model.moe.num_routed_experts, (1, 2 * S, 1)).astype(np.int32)
    ones = np.ones(expert.shape, np.float32)
    ledger = Ledger(tokens=rng.integers(0, 256, (2, S)).astype(np.int32), layers=np.asarray([0], np.int32),
                    expert=expert, weight=ones, dropped=np.zeros(expert.shape, bool), score=ones,
                    correction_bias=np.zeros((1, run.model.moe.num_routed_experts), np.float32),
                    num_experts=run.model.moe.num_routed_experts, batch_size=2)
    ledger.save(ledger_path(workdir_of(str(tmp_path), moe.name), moe.steps - 1))  # not the last step: ignored
    assert final_ledgers(specs, str(tmp_path)) == {}
    ledger.save(ledger_path(workdir_of(str(tmp_path), moe.name), moe.steps))
    got = final_ledgers(specs, str(tmp_path))
    assert list(got) == [moe.name] and got[moe.name]["capacity"] == C
    assert got[moe.name]["layers"] == ledger_identity(ledger, capacity=C, group=S)


def test_drops_per_layer_over_training_by_hand():
    """diagnostics._windows_by_layer: per layer, the mean over runs of the logged drops in equal parts of training."""
    from experiments.diagnostics import _windows_by_layer

    a = {"steps": 6, "drop_curve_by_layer": [[1, [.6, .1]], [2, [.4, .1]], [3, [.3, 0]], [4, [.1, 0]], [5, [.2, 0]],
                                             [6, [0, 0]]]}
    b = {"steps": 6, "drop_curve_by_layer": [[s, [.1, 0]] for s in range(1, 7)]}
    # parts (0, 2], (2, 4], (4, 6]: run a's first layer .5 .2 .1, run b's .1 .1 .1; second layers .1 0 0 and 0 0 0
    got = _windows_by_layer([a, b], 3)
    assert np.allclose(got, [[.3, .15, .1], [.05, 0, 0]])
    assert _windows_by_layer([a, {"steps": 6, "drop_curve_by_layer": [[1, [.1]]]}], 3) is None  # layers differ
    assert _windows_by_layer([a, {"steps": 6}], 3) is None  # a run without per-layer curves


def test_first_dense_runs_the_base_moe_with_its_first_layer_dense():
    """cpu: the headline size and the long size, every seed; active parameters those of the base MoE less one
    router, one MoE layer fewer; smoke (one-layer headline): its two-layer size; the pod: the headline size."""
    from moe_jax.params import count_params

    cpu = scales.get("cpu")
    specs = sweeps.specs("first_dense", cpu)
    assert first_dense.sizes(cpu) == ["s", "m"] and len(specs) == 2 * len(cpu.seeds)
    base = {s.name: s for s in sweeps.specs("num_experts", cpu) + sweeps.specs("model_size", cpu)}
    for s in specs:
        assert s.config.model.first_dense_layers == 1 and s.name.replace("_FD1_", "_") in base, s.name
        mine = count_params(build_run_config(s.config).model)
        theirs = count_params(build_run_config(base[s.name.replace("_FD1_", "_")].config).model)
        assert mine["router"] < theirs["router"] and mine["total"] < theirs["total"], s.name
        assert mine["active_per_token"] - mine["router"] == theirs["active_per_token"] - theirs["router"], s.name
    assert first_dense.sizes(scales.get("smoke")) == ["s"]
    assert first_dense.sizes(scales.get("pod")) == ["p1"]


def test_first_dense_by_hand():
    """Drops and eval CE of the first-dense runs beside the base MoE and the dense run of the same seed."""
    from experiments.diagnostics import analyse_first_dense

    def row(sweep, name, seed, ce, drops=None, **extra):
        by_layer = None if drops is None else list(drops)
        return {"sweep": sweep, "name": name, "seed": seed, "final_eval_ce": ce, "status": "ok", "size": "s",
                "steps": 6, "params_active": 100, "params_total": 300 if "FD" in name else 500,
                "dropped_fraction": None if drops is None else float(np.mean(drops)), "dropped_by_layer": by_layer,
                **extra}

    rows = [row("first_dense", f"s_E8_K1_G1_FD1_seed{s}", s, 1.70 + 0.02 * s, [0.01 * (s + 1)],
                first_dense_layers=1) for s in (0, 1, 2)]
    rows += [row("num_experts", f"s_E8_K1_G1_seed{s}", s, 1.75, [0.05, 0.01 + 0.01 * s]) for s in (0, 1)]
    rows += [row("model_size", f"s_dense_seed{s}", s, 1.80 + 0.01 * s) for s in (0, 1, 2)]
    (size, v), = analyse_first_dense(rows).items()
    assert size == "s" and v["n"] == 3 and v["params_total"] == 300 and v["base_params_total"] == 500
    assert v["eval_ce"] == pytest.approx({"mean": 1.72, "std": 0.02, "n": 3})
    # seeds 0, 1 have a base run: 1.70 - 1.75, 1.72 - 1.75
    assert v["minus_base"]["n"] == 2 and v["minus_base"]["mean"] == pytest.approx(-0.04)
    assert v["minus_dense"]["n"] == 3 and v["minus_dense"]["mean"] == pytest.approx(-0.09)  # 0.02 s - 0.01 s
    assert v["dropped"]["mean"] == pytest.approx(0.02) and v["by_layer"] == pytest.approx([0.02])
    # base: layer 0 0.05, layer 1 0.01 / 0.02 -> means (0.03, 0.035)
    assert v["base_by_layer"] == pytest.approx([0.05, 0.015]) and v["base_dropped"]["mean"] == pytest.approx(0.0325)
    assert v["convergence"] is None  # no per-layer curves in these rows


def test_pooled_noise_by_hand():
    """sqrt(sum (n - 1) s^2 / sum (n - 1)) over the configurations with two seeds or more, each run once."""
    from experiments.analysis import pooled_noise

    def row(name, ce, sweep="a"):
        return {"name": name, "name_wo_seed": name.rsplit("_seed", 1)[0], "final_eval_ce": ce, "status": "ok",
                "sweep": sweep}

    rows = [row("x_seed0", 1.0), row("x_seed1", 1.2), row("x_seed2", 1.4)]  # s = 0.2, n - 1 = 2
    rows += [row("y_seed0", 2.0), row("y_seed1", 2.1), row("y_seed1", 2.1, sweep="b")]  # s = 0.1/sqrt(2), n - 1 = 1
    rows += [row("z_seed0", 3.0)]  # one seed: no spread
    got = pooled_noise(rows)
    assert got["df"] == 3 and got["configurations"] == 2
    assert got["std"] == pytest.approx(np.sqrt((2 * 0.04 + 0.005) / 3))
    assert pooled_noise([row("z_seed0", 3.0)]) is None


def test_explain_unmet_by_hand():
    """Sentences only for the claims checks found not met, from the numbers of the result."""
    from experiments.diagnostics import explain_unmet

    check = lambda ok: {"claim": "c", "pass": ok, "detail": ""}
    result = {
        "noise_floor": {"std": 0.01},  # threshold 0.02
        "checks": [check(False), check(True), check(False), check(None), check(False), check(False)],
        "model_size": {"s": {"moe_minus_dense": -0.05, "moe": {"tokens_per_active_param": 20.0}},
                       "l": {"moe_minus_dense": -0.01, "moe": {"tokens_per_active_param": 3.0}}},
        "budget": {"headline": {"100": {"mean": 0.01, "tokens_per_active_param": 2.0},
                                "200": {"mean": -0.03, "tokens_per_active_param": 4.0}}},
        "train_length": {"l": {"steps": 400, "final": {"mean": -0.03, "n": 3, "tokens_per_active_param": 6.0}}},
        "granularity": {"per_step": {"s": {"1": {"mean": 1.70, "n": 3}, "2": {"mean": 1.69, "n": 3},
                                           "4": {"mean": 1.72, "n": 3}}},
                        "matched_flops_runs": {"1": {"mean": 1.70, "n": 3}, "2": {"mean": 1.695, "n": 3}}},
        "drops": {"by_experts": {"8": {"by_layer": [0.05, 0.01]}}},
        "first_dense": {"s": {"dropped": {"mean": 0.008, "n": 3}, "base_dropped": {"mean": 0.03},
                              "minus_base": {"mean": 0.002}}},
    }
    why = explain_unmet(result)
    assert set(why) == {1, 3, 5, 6}  # 2 holds, 4 is not measured
    assert len(why[1]) == 3 and "size l trains 3.0 tokens" in why[1][0] and "size s" not in why[1][0]
    assert "at 4.0 tokens per active parameter" in why[1][1]  # the first evaluation beyond -0.02
    assert "-0.0300 (n=3), beyond the noise" in why[1][2]
    # three comparisons (G = 2, 4 per step, G = 2 at equal FLOPs): the largest gain is G = 2 per step, -0.01
    assert why[3] == why[6] and "3 comparisons" in why[3][0] and "is -0.0100 (G = 2 per step, size s" in why[3][0]
    assert "within 2 x the noise floor (0.0200)" in why[3][0]
    assert "drops 5.00% in the second half, the others 1.00%" in why[5][0] and "0.80% (n=3)" in why[5][1]
    assert explain_unmet({**result, "checks": [check(True)] * 6}) == {}
