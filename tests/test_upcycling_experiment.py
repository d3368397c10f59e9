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
    out = tmp_path / "up"
    # two arms keep it cheap; test_arms_get_equal_extra_flops checks the others' budgets
    assert upcycling.main(["--scale=smoke", f"--out={out}", "--extra_fraction=0.25",
                           "--arms=dense_continued,upcycled"]) == 0
    rows = json.loads((out / "results.json").read_text())
    base_ce = rows["base"]["eval_curve"][-1][1]
    # normalised top-2 copies, eval capacity 4.0 x S x 2 / 8 = S per expert (nothing can drop): the upcycled
    # model's eval loss before training is the dense base's
    assert rows["upcycled"]["start_eval_ce"] == pytest.approx(base_ce, abs=1e-4)
    assert rows["dense_continued"]["start_eval_ce"] == pytest.approx(base_ce, abs=1e-4)
    assert set(rows) == {"base", "dense_continued", "upcycled"}
    for arm in ("dense_continued", "upcycled"):
        assert rows[arm]["workdir"] == f"runs/{rows[arm]['name']}" and rows[arm]["eval_curve"], arm
    report = (out / "report.md").read_text()
    assert "Komatsuzaki" in report and "| upcycled |" in report
    assert (out / "upcycling.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
