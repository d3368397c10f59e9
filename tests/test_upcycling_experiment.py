"""experiments/upcycling.py at smoke scale: every arm trains, the upcycled arm starts as the dense base, the
arms get equal extra FLOPs, and the report, plot and results name their paths relative to --out."""
import json

import pytest

from experiments import scales, upcycling


def test_arms_get_equal_extra_flops():
    base, arms = upcycling.specs(scales.get("cpu"), "s", 0, 0.5)
    assert base["steps"] == 1200 and [a["arm"] for a in arms] == list(upcycling.ARMS)
    by = {a["arm"]: a for a in arms}
    assert by["upcycled"]["steps"] == by["scratch"]["steps"] == 600
    budget = 600 * by["upcycled"]["flops_per_step"]
    for a in arms:  # rounding to whole steps: within one step's FLOPs
        assert abs(a["steps"] * a["flops_per_step"] - budget) <= a["flops_per_step"] / 2 + 1e-6, a["arm"]
    # top-2 of full-width experts costs more per step than dense; the granular arm about as much as dense
    assert by["dense_continued"]["steps"] > 1.3 * by["upcycled"]["steps"]
    assert by["upcycled_granular"]["flops_per_step"] < 1.1 * by["dense_continued"]["flops_per_step"]
    assert all(a["config"].data.seed == 1000 for a in arms) and base["config"].data.seed == 0


def test_smoke_protocol(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_JAX_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.chdir(tmp_path)  # a relative --out, as the committed results are made from the repository root
    out = tmp_path / "up"
    # two arms keep it cheap; test_arms_get_equal_extra_flops checks the others' budgets
    assert upcycling.main(["--scale=smoke", "--out=up", "--extra_fraction=0.25",
                           "--arms=dense_continued,upcycled"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["seeds"]) == ["0"]  # the smoke scale's seeds
    rows = results["seeds"]["0"]
    base_ce = rows["base"]["eval_curve"][-1][1]
    # normalised top-2 copies, eval capacity 4.0 x S x 2 / 8 = S per expert (nothing can drop): the upcycled
    # model's eval loss before training is the dense base's
    assert rows["upcycled"]["start_eval_ce"] == pytest.approx(base_ce, abs=1e-4)
    assert rows["dense_continued"]["start_eval_ce"] == pytest.approx(base_ce, abs=1e-4)
    assert set(rows) == {"base", "dense_continued", "upcycled"}
    for arm in ("dense_continued", "upcycled"):
        assert rows[arm]["workdir"] == f"runs/{rows[arm]['name']}" and rows[arm]["eval_curve"], arm
        # each arm's recorded config names the dense base as given: under the relative --out, no machine's path
        recorded = json.loads((out / rows[arm]["workdir"] / "config.json").read_text())
        assert recorded["upcycle"]["from_workdir"] == f"up/runs/{rows['base']['name']}", arm
    summary = results["summary"]
    assert summary["upcycled"]["n"] == 1 and summary["dense_continued"]["minus_dense_continued_mean"] == 0.0
    assert summary["upcycled"]["minus_dense_continued_mean"] == pytest.approx(
        rows["upcycled"]["eval_curve"][-1][1] - rows["dense_continued"]["eval_curve"][-1][1])
    report = (out / "report.md").read_text()
    assert "Komatsuzaki" in report and "| upcycled |" in report
    assert (out / "upcycling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_summary_pairs_arms_with_dense_continued_seed_by_seed():
    def rows(base, dense, upcycled):
        def arm(name, ce):
            return {"name": name, "steps": 2, "flops_per_step": 1.0, "start_eval_ce": None,
                    "eval_curve": [[1, ce + 1.0], [2, ce]], "extra_flops_curve": [[1.0, ce + 1.0], [2.0, ce]]}

        return {"base": arm("b", base), "dense_continued": arm("d", dense), "upcycled": arm("u", upcycled)}

    by_seed = {"0": rows(2.0, 1.9, 1.8), "1": rows(2.1, 2.0, 1.95), "2": rows(2.0, 1.95, 1.8)}
    summary = upcycling.summarise(by_seed)
    up = summary["upcycled"]
    assert up["n"] == 3 and up["final_mean"] == pytest.approx((1.8 + 1.95 + 1.8) / 3)
    # paired differences -0.1, -0.05, -0.15: mean -0.1, sd 0.05
    assert up["minus_dense_continued_mean"] == pytest.approx(-0.1)
    assert up["minus_dense_continued_sd"] == pytest.approx(0.05)
    assert "upcycled ahead of dense_continued (-0.1000)" in upcycling.report(by_seed, summary, "cpu", "x", noise=0.02)
    assert "upcycled within noise of dense_continued" in upcycling.report(by_seed, summary, "cpu", "x", noise=0.06)
