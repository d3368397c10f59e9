"""Sweeps, runner, FLOP accounting, fits, plots and report (experiments/).

The smoke protocol trains every sweep's smoke runs (23 distinct tiny runs) once, in a subprocess with two
workers and XLA's backend optimisation off (compilation dominates runs of 8 steps); the other tests check the
outputs, resumption, and the pieces without training.
"""
import json
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from experiments import fit, runner, scales, sweep_config, sweeps
from experiments.collect import aggregate, loss_at
from experiments.flops import run_flops
from experiments.spec import make_spec
from experiments.sweeps import granularity, shared_experts
from moe_jax.params import count_params
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.run_config import build_run_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIGURES = ("loss_vs_experts", "loss_vs_granularity", "joint_fit", "capacity_drop", "expert_load",
           "shared_experts", "routers_aux")


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    env = dict(os.environ, XLA_FLAGS="--xla_backend_optimization_level=0", JAX_PLATFORMS="cpu",
               MOE_JAX_DATA_DIR=str(out / "data"), PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-m", "experiments.runner", "--scale=smoke", "--sweeps=all",
                           f"--out={out}", "--compilation_cache=", "--workers=2"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "results.json") as f:
        rows = json.load(f)
    return out, proc.stdout, rows


def test_smoke_every_run_finishes_and_learns(smoke):
    out, stdout, rows = smoke
    specs = sweeps.specs("all", scales.get("smoke"))
    n_unique = len(sweeps.unique_runs(specs))
    # two workers, each printing its own counts (a run the other one finished counts as already finished)
    counts = [tuple(map(int, m)) for m in re.findall(r"(\d+) trained, \d+ already finished, (\d+) failed", stdout)]
    assert len(counts) == 2 and [sum(c) for c in zip(*counts)] == [n_unique, 0], stdout
    assert len(rows) == len(specs) and {r["sweep"] for r in rows} == set(sweeps.SWEEPS)
    for r in rows:
        assert r["status"] == "ok", r["name"]
        assert math.isfinite(r["final_eval_ce"]) and math.isfinite(r["final_train_ce"]), r["name"]
        ce = [c for _, c in r["train_curve"]]
        assert len(ce) == r["steps"] and ce[-1] < ce[0] - 0.3, (r["name"], ce)  # ln 256 = 5.55 at init
        assert r["flops_executed"] >= r["flops_useful"] - 1e-6 * r["flops_useful"], r["name"]
        if r["experts"] == 1 or "hash" in r["name"]:
            assert r["flops_router"] == 0, r["name"]
        else:
            assert r["flops_router"] > 0, r["name"]
        # the smoke scale's health section: no ledger, no routing picture (the training.png of the run is kept)
        workdir = out / "runs" / r["name"]
        assert (workdir / "training.png").exists() and not (workdir / "routing.png").exists(), r["name"]
        assert not (workdir / "ledgers").exists(), r["name"]
    for sweep in sweeps.SWEEPS:  # smoke: 2 points per axis (first_dense has none: one run per size and seed)
        assert len({r["name"] for r in rows if r["sweep"] == sweep}) >= (1 if sweep == "first_dense" else 2), sweep
    header = open(out / "results.csv").readline().strip().split(",")
    for column in ("sweep", "name", "seed", "final_eval_ce", "flops_useful", "flops_router", "flops_executed",
                   "dropped_fraction", "params_total", "params_active"):
        assert column in header, column


def test_smoke_plots_report_and_fit_self_test(smoke):
    out, _, rows = smoke
    for name in FIGURES:
        path = out / f"{name}.png"
        assert path.exists(), name
        data = path.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, name
    report = (out / "report.md").read_text()
    for title in ("## Number of experts", "## Granularity", "### Joint law", "## Shared and fine-grained",
                  "## Capacity factor", "## Router strategies", "## Auxiliary-loss", "Krajewski Table 1",
                  "## Where the drops happen", "## Training length at a larger size",
                  "## The judged comparisons at learning rate"):
        assert title in report, title
    assert "Fit self-test" in report and "PASS" in report
    result = json.loads((out / "analysis.json").read_text())
    assert result["self_test"]["ok"] and not result["missing"]
    # the smoke grid has 2 sizes x 2 G x 2 evaluations = 8 points for the joint law's 7 coefficients
    assert result["granularity"]["joint"]["n_points"] == 8
    run_command = f"python -m experiments.runner --scale=smoke --sweeps=all --out={out} --compilation_cache="
    assert f"Produced by `{run_command}` on" in report


def test_report_mode_names_the_command_that_trained_the_runs(smoke):
    out, _, _ = smoke
    assert runner.main(["--scale=smoke", "--sweeps=all", "--mode", "report", f"--out={out}"]) == 0
    line = (out / "report.md").read_text().splitlines()[2]
    assert line.startswith(f"Produced by `python -m experiments.runner --scale=smoke --sweeps=all --out={out}` "
                           f"(runs), report rewritten by `python -m experiments.runner --scale=smoke --sweeps=all "
                           f"--mode report --out={out}` on "), line


def test_finished_runs_are_skipped_and_an_interrupted_one_resumes(smoke, monkeypatch):
    out, _, rows = smoke
    specs = sweeps.specs("all", scales.get("smoke"))
    monkeypatch.setenv("MOE_JAX_DATA_DIR", str(out / "data"))
    status = runner.run_all(specs, str(out), log=lambda *_: None)
    assert set(status.values()) == {"skipped"}
    victim = "xs_E8_K1_G1_cf0.75_seed0"  # its final checkpoint stays: the rerun restores it and re-evaluates
    before = next(r for r in rows if r["name"] == victim)["final_eval_ce"]
    os.remove(out / "runs" / victim / "summary.json")
    status = runner.run_all(specs, str(out), log=lambda *_: None)
    assert status[victim] == "done" and sum(v == "skipped" for v in status.values()) == len(status) - 1
    with open(out / "runs" / victim / "summary.json") as f:
        assert json.load(f)["final_eval_ce"] == pytest.approx(before, abs=1e-5)


def test_run_names_spell_the_config_and_sweeps_share_runs():
    cpu = scales.get("cpu")
    specs = sweeps.specs("all", cpu)
    runs = sweeps.unique_runs(specs)
    names = {s.sweep: set() for s in specs}
    for s in specs:
        names[s.sweep].add(s.name)
    # the base model (8 experts, top-1, G 1, cf 1.25) is in the expert, granularity, size, capacity, router and
    # aux sweeps: trained once
    for sweep in ("num_experts", "granularity", "model_size", "capacity", "routers", "aux_losses"):
        assert "s_E8_K1_G1_seed0" in names[sweep], sweep
    assert "s_dense_seed1" in names["num_experts"] and "s_dense_seed1" in names["shared_experts"]
    assert "s_E8_K1_G1_cf0.75_seed0" in runs and "s_E63_K7_G1_F32_shared1_seed2" in runs
    assert len(runs) < len(specs)
    a = make_spec("x", cpu, size="s", seed=0, axes={}, model=cpu.model("s"))
    b = make_spec("y", cpu, size="s", seed=0, axes={}, model=cpu.model("s"))
    b.config.train.learning_rate = 1.0  # same name, another config: the naming must not hide it
    with pytest.raises(RuntimeError, match="names two different configs"):
        sweeps.unique_runs([a, b])


def test_axes_seeds_and_smoke_reduction():
    cpu, smoke = scales.get("cpu"), scales.get("smoke")
    full = sweeps.specs("all", cpu)
    for sweep in ("num_experts", "shared_experts"):  # headline comparisons: 3 seeds at every point
        counts = {}
        for s in full:
            if s.sweep == sweep:
                key = tuple(sorted((k, v) for k, v in s.axes.items() if k != "seed"))
                counts[key] = counts.get(key, 0) + 1
        assert set(counts.values()) == {3}, sweep
    for s in sweeps.specs("all", smoke):
        assert s.axes["seed"] == 0
    for name, module in sweeps.SWEEPS.items():
        axes = {}
        for s in module.sweep(smoke):
            for k, v in s.axes.items():
                axes.setdefault(k, set()).add(v)
        assert all(len(v) <= 2 for v in axes.values()), (name, axes)
    assert sorted({s.axes["E"] for s in sweeps.specs("num_experts", cpu)}) == [1, 2, 4, 8, 16, 32]
    assert sorted({s.axes["G"] for s in sweeps.specs("granularity", cpu)}) == [1, 2, 4, 8, 16]


def test_granularity_and_deepseek_variants_hold_expert_parameters_fixed():
    cpu = scales.get("cpu")
    D, F = cpu.sizes["s"].d_model, cpu.sizes["s"].ffn
    counts = {G: count_params(build_run_config(make_spec("g", cpu, size="s", seed=0, axes={},
                                                         model=cpu.model("s", granularity=G)).config).model)
              for G in granularity.GRANULARITY}
    layers = cpu.sizes["s"].num_layers
    for G, c in counts.items():
        assert c["routed_experts"] == counts[1]["routed_experts"] == layers * 8 * 3 * D * F  # SwiGLU: 3 D F each
        assert c["routed_experts_active"] == layers * 3 * D * F  # k = G experts of width F / G
        assert c["router"] == layers * D * 8 * G  # the only parameters that grow with G
    moe = {}
    for v in ("gshard", "gshard+shared", "fine_x2", "fine_x4"):
        c = count_params(build_run_config(make_spec("d", cpu, size="s", seed=0, axes={},
                                                    model=shared_experts.variant_model(cpu, "s", v)).config).model)
        moe[v] = (c["routed_experts"] + c["shared_experts"], c["routed_experts_active"] + c["shared_experts"])
    # 16 experts of width F in total, 2 of them active per token, in every variant
    assert set(moe.values()) == {(layers * 16 * 3 * D * F, layers * 2 * 3 * D * F)}


def test_flop_matched_granularity_runs_spend_the_flops_of_g1():
    cpu = scales.get("cpu")
    runs = [s for s in granularity.sweep(cpu) if s.axes["budget"] == "flops" and s.axes["seed"] == 0]
    totals = {s.axes["G"]: run_flops(build_run_config(s.config))["run"] for s in runs}
    for G, t in totals.items():
        assert t["useful_flops"] == pytest.approx(totals[1]["useful_flops"], rel=0.005), G
    steps = {s.axes["G"]: s.steps for s in runs}
    assert steps[1] == cpu.steps("s") and all(steps[G] < steps[1] for G in steps if G > 1)
    assert totals[16]["router_flops"] > 8 * totals[2]["router_flops"] * steps[16] / steps[2] * 0.99


def test_run_flops_by_hand():
    smoke = scales.get("smoke")
    run = build_run_config(make_spec("f", smoke, size="xs", seed=0, axes={}, model=smoke.model("xs")).config)
    f = run_flops(run)["per_step"]
    # xs: D 32, 1 layer, 2 heads of 16, F 64, vocab 256, 8 experts top-1; T = 4 x 32 = 128 tokens, groups S = 32.
    # router: 3 x 2 T D E = 6 * 128 * 32 * 8 = 196,608
    assert f["router_flops"] == 196_608
    # non-MoE per token: 6 x (attention 4 D^2 = 4,096 + output 256 D = 8,192) = 73,728, plus scores
    # 6 x L(1) x 32 x 2 heads x (16 + 16) = 12,288 -> 86,016; x 128 tokens = 11,010,048.
    # MoE useful: 3 x (router 2 D E = 512 + one SwiGLU expert 2 x 3 D F = 12,288) x 128 = 4,915,200.
    assert f["useful_flops"] == 11_010_048 + 4_915_200
    # executed: C = ceil(1.25 x 32 / 8) = 5 slots x 8 experts x 4 groups = 160 rows for 128 tokens: at least
    # 32 padded rows x 12,288 x 3 more than useful
    assert f["executed_flops"] - f["useful_flops"] >= 32 * 12_288 * 3
    dense = build_run_config(make_spec("f", smoke, size="xs", seed=0, axes={},
                                       model=smoke.model("xs", dense=True)).config)
    fd = run_flops(dense)["per_step"]
    # dense FFN 3 D F = 6,144 params: 6 x 6,144 x 128 = 4,718,592 more than the attention + output part
    assert fd["useful_flops"] == fd["executed_flops"] == 11_010_048 + 4_718_592 and fd["router_flops"] == 0


def test_training_loop_flop_count_is_the_useful_count():
    """The training loop's count (`model_flops_per_s`) and run_flops' useful FLOPs are one formula: for the
    xs run of test_run_flops_by_hand (untied output projection, top-1, no expert biases) both are 86,016 +
    6 x (router D E = 256 + one SwiGLU expert 3 D F = 6,144) = 124,416 per token, 15,925,248 per step."""
    from moe_jax.flops import train_flops_per_token

    smoke = scales.get("smoke")
    run = build_run_config(make_spec("f", smoke, size="xs", seed=0, axes={}, model=smoke.model("xs")).config)
    assert not run.model.tie_embeddings
    per_token = train_flops_per_token(run.model, count_params(run.model), run.data.seq_len)
    assert per_token == 124_416 and per_token * 128 == run_flops(run)["per_step"]["useful_flops"]


def test_loss_at_and_aggregate():
    row = {"train_curve": [[10, 3.0], [20, 2.0], [30, 1.5]]}
    assert loss_at(row, 5.0, 75.0) == pytest.approx(2.5)  # step 15, halfway from 3.0 to 2.0
    assert loss_at(row, 5.0, 150.0) == pytest.approx(1.5)
    assert math.isnan(loss_at(row, 5.0, 151.0)) and math.isnan(loss_at(row, 5.0, 49.0))
    rows = [{"status": "ok", "E": 8, "final_eval_ce": v} for v in (1.0, 2.0, 3.0)]
    rows.append({"status": "missing", "E": 8})
    (g,) = aggregate(rows, by=("E",))
    assert (g["mean"], g["std"], g["n"]) == (2.0, 1.0, 3)  # sample sd of 1, 2, 3


def test_fits_recover_known_coefficients():
    N, D, G = (a.ravel() for a in np.meshgrid([3e7, 1e8, 3e8, 1e9], [1e9, 3e9, 1e10, 3e10], [1, 2, 4, 8, 16]))
    L = fit.predict_joint(fit.KRAJEWSKI, N=N, D=D, G=G)
    f = fit.fit_joint(N, D, G, L)
    for k, v in fit.KRAJEWSKI.items():
        assert f.params[k] == pytest.approx(v, rel=2e-3), k
    for gamma in (0.3, 1.1):  # not a constant: two laws, two answers
        true = dict(h=1.5, g=0.8, gamma=gamma)
        Gs = np.array([1, 2, 4, 8, 16], float)
        fg = fit.fit_granularity(Gs, fit.predict_granularity(true, G=Gs))
        assert fg.params["gamma"] == pytest.approx(gamma, abs=1e-3)
        assert fg.at_bound == []
    assert f.at_bound == []
    # Only G = 1 differs: any gamma large enough fits, the optimiser runs to gamma's upper bound, and the
    # fit says so instead of reporting gamma = 5 as a measurement.
    flat = fit.fit_granularity(Gs, np.array([2.3, 2.2, 2.2, 2.2, 2.2]))
    assert flat.at_bound == ["gamma"] and flat.params["gamma"] == pytest.approx(5.0)
    true = dict(a=-0.08, b=-0.1, c=0.01, d=1.1)
    Nc, Ec = (a.ravel() for a in np.meshgrid([1e5, 1e6, 1e7], [1, 4, 16]))
    rng = np.random.default_rng(0)
    Lc = fit.predict_clark(true, N=Nc, E=Ec) * np.exp(0.002 * rng.standard_normal(Nc.shape))
    fc = fit.bootstrap(fit.fit_clark, dict(N=Nc, E=Ec, L=Lc), fit.fit_clark(Nc, Ec, Lc), n=30)
    for k in "abcd":
        lo, hi = fc.intervals[k]
        assert lo <= fc.params[k] <= hi and hi > lo, k
        assert fc.params[k] == pytest.approx(true[k], abs=0.02), k
    # N in units of N_s: the fit's b is the raw fit's slope in log10 E at N_s, b + c log10 N_s (the
    # report's identifiable slope at the headline size); a and c are unchanged
    fs = fit.fit_clark(Nc / 1e6, Ec, Lc)
    assert fs.params["b"] == pytest.approx(fc.params["b"] + 6 * fc.params["c"], abs=1e-9)
    assert fs.params["c"] == pytest.approx(fc.params["c"], abs=1e-9) and fs.params["a"] == pytest.approx(fc.params["a"])


def test_commands_for_a_pod_resolve_to_the_sweep_configs(tmp_path, capsys):
    assert runner.main(["--scale=pod", "--sweeps=all", "--mode=commands", "--workdir_root=gs://bucket/pod",
                        f"--out={tmp_path}"]) == 0
    lines = (tmp_path / "commands.sh").read_text().strip().splitlines()
    runs = sweeps.unique_runs(sweeps.specs("all", scales.get("pod")))
    assert len(lines) == len(runs)
    resolved = set()
    for line, (name, spec) in zip(lines, runs.items()):
        assert line.endswith(f" --workdir=gs://bucket/pod/{name}")
        run = build_run_config(spec.config)
        assert run.data.corpus.startswith("tfds:") and run.model.d_model >= 768
        assert run.mesh.fsdp == -1 and run.mesh.num_processes == -1  # every device, every host
        arg = line.split("sweep_config.py:")[1].split(" ")[0]
        if spec.sweep not in resolved:  # one command per sweep rebuilt from its argument (each rebuild is a sweep)
            resolved.add(spec.sweep)
            config = sweep_config.get_config(arg)
            assert json.dumps(config.to_dict(), sort_keys=True, default=str) == spec.fingerprint()
    # every sweep with runs at the pod scale (train_length has none there: each pod size already trains ~20 tokens
    # per active parameter; rate_check none until the pod's learning_rate sweep has picked a rate)
    assert resolved == {name for name, sweep in sweeps.SWEEPS.items() if sweep.sweep(scales.get("pod"))}
    assert resolved == set(sweeps.SWEEPS) - {"train_length", "rate_check"}
    with pytest.raises(ValueError, match="has no run"):
        sweep_config.get_config("pod,capacity,p1_E8_K1_G1_seed9")


def test_emitted_command_runs_unchanged():
    runs = sweeps.unique_runs(sweeps.specs("granularity", scales.get("pod")))
    name = next(n for n in runs if "G4" in n)
    line = runner.commands([runs[name]], "pod", "/tmp/unused")[0]
    argv = line.split()[1:-1] + ["--print_config"]  # drop `python`, --workdir
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable] + argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "routed experts 32, k 4" in proc.stdout, proc.stdout[-1500:]


@pytest.mark.parametrize("overrides", [{}, dict(group_size=64), dict(grouping="position"),
                                       dict(grouping="position", group_size=8)],
                         ids=["tokens", "tokens_S64", "position", "position_S8"])
def test_print_config_group_size_and_capacity_are_what_the_layer_uses(overrides):
    """The default preset's derived group size and capacities equal the routing groups and expert buffers of
    an MoE layer's forward pass on a [32, 128] batch (shapes only: traced, never run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from configs import default
    from moe_jax.moe_layer import MoELayer

    config = default.get_config()
    for name, value in overrides.items():
        setattr(config.model, name, value)
    run = build_run_config(config)
    derived, cfg = run.moe_derived(), run.model.moe
    graphdef, state = nnx.split(nnx.eval_shape(lambda: MoELayer(cfg, rngs=nnx.Rngs(params=0))))
    x_BLD = jax.ShapeDtypeStruct((run.data.batch_size, run.data.seq_len, cfg.d_model), jnp.float32)
    for train, name in ((True, "train capacity/group"), (False, "eval capacity/group")):
        buffers = []

        def forward(state, x_BLD):
            layer = nnx.merge(graphdef, state)
            run_experts = lambda buffer_EXD: (buffers.append(buffer_EXD.shape), layer.experts(buffer_EXD))[1]
            return layer.forward(x_BLD, train=train, run_experts=run_experts)[1]

        G, S, _ = jax.eval_shape(forward, state, x_BLD).logits_GSE.shape
        (E, X, _), = buffers  # X = G groups x C slots per expert
        assert (S, X) == (derived["group size"], G * derived[name]), name
    if overrides == dict(grouping="position"):
        # A group is one position across the 32 sequences: C = ceil(1.0 x 32 x 2 / 8) = 8 in training, 16 at
        # evaluation (capacity factor 2.0); --print_config once took a sequence of 128 as the group (C = 32).
        assert (derived["group size"], derived["train capacity/group"], derived["eval capacity/group"]) == (32, 8, 16)
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
        proc = subprocess.run([sys.executable, "-m", "experiments.train", "--config=configs/default.py",
                               "--config.model.grouping=position", "--print_config"],
                              cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "group size 32, train capacity/group 8, eval capacity/group 16" in proc.stdout, proc.stdout[-1500:]


def test_pod_budgets_are_about_20_tokens_per_parameter():
    pod = scales.get("pod")
    tokens_per_step = pod.data["batch_size"] * pod.data["seq_len"]
    for size in pod.sizes:
        dense = count_params(build_run_config(make_spec("p", pod, size=size, seed=0, axes={},
                                                        model=pod.model(size, dense=True)).config).model)
        assert 1e8 <= dense["total"] <= 1.05e9, size
        assert 18 <= pod.steps(size) * tokens_per_step / dense["total"] <= 22, size


def test_bad_names_fail_with_the_fix():
    with pytest.raises(ValueError, match="--sweeps"):
        sweeps.parse("granularity,typo")
    with pytest.raises(ValueError, match="--scale"):
        scales.get("huge")
    with pytest.raises(ValueError, match="not MoE fields"):
        scales.get("cpu").model("s", num_expert=4)
    with pytest.raises(ValueError, match="<scale>,<sweep>,<run name>"):
        sweep_config.get_config("cpu")
    assert runner.main(["--scale=cpu", "--sweeps=nope", "--out=/tmp/never_used_xyz", "--mode=report"]) == 2


def test_a_workdir_of_another_protocol_is_refused_before_training(tmp_path):
    import dataclasses

    from moe_jax.train.run_config import model_record

    smoke = scales.get("smoke")
    spec = make_spec("x", smoke, size="xs", seed=0, axes={}, model=smoke.model("xs"))
    run = build_run_config(spec.config)
    workdir = tmp_path / "runs" / spec.name
    workdir.mkdir(parents=True)
    old = {"model": model_record(run.model), "data": dataclasses.asdict(run.data),
           "train": dict(dataclasses.asdict(run.train), steps=run.train.steps + 1)}
    (workdir / "config.json").write_text(json.dumps(old))
    with pytest.raises(ValueError, match=r"xs_E8_K1_G1_seed0: train.steps.*Delete them or use another --out"):
        runner.run_all([spec], str(tmp_path))
    assert not (workdir / "metrics.jsonl").exists()


def test_a_field_added_to_the_library_later_does_not_make_a_finished_run_stale(tmp_path):
    import dataclasses

    from moe_jax.train.run_config import model_record

    smoke = scales.get("smoke")
    spec = make_spec("x", smoke, size="xs", seed=0, axes={}, model=smoke.model("xs"))
    run = build_run_config(spec.config)
    workdir = tmp_path / "runs" / spec.name
    workdir.mkdir(parents=True)
    model = model_record(run.model)
    del model["moe"]["balance_loss_scope"]  # recorded before the field existed
    old = {"model": model, "data": dataclasses.asdict(run.data), "train": dataclasses.asdict(run.train)}
    (workdir / "config.json").write_text(json.dumps(old))
    assert runner.stale_fields(str(workdir), run) == []
    old["model"]["moe"]["num_experts"] = 4  # a nested field that differs is still caught
    (workdir / "config.json").write_text(json.dumps(old))
    assert runner.stale_fields(str(workdir), run) == ["model.moe.num_experts"]


def test_runner_locks_deadline_and_progress(tmp_path):
    import time

    smoke = scales.get("smoke")
    specs = [make_spec("x", smoke, size="xs", seed=s, axes={}, model=smoke.model("xs")) for s in (0, 1)]
    first = runner.workdir_of(str(tmp_path), specs[0].name)
    assert runner.try_lock(first) and not runner.try_lock(first)  # held by this (live) process
    (tmp_path / "runs" / specs[0].name / runner.LOCK).write_text("999999999")  # a dead worker's lock
    assert runner.try_lock(first)
    status = runner.run_all(specs, str(tmp_path), log=lambda *_: None, deadline=time.time() - 1)
    assert status == {specs[0].name: "deferred", specs[1].name: "deferred"}  # nothing started past the deadline
    runner.unlock(first)
    text = runner.progress(sweeps.unique_runs(specs), str(tmp_path), time.perf_counter())
    assert text.startswith("0/2 runs done, 0.0 min elapsed"), text


def test_report_verdicts_are_computed_from_the_table(smoke):
    """Plant a trend in the smoke table, analyse and render: the verdict lines follow the numbers."""
    from experiments import analysis, report

    _, _, rows = smoke

    def verdicts(moe_gap: float, drops: float, dense_seeds: int = 3) -> list[str]:
        table = [dict(r) for r in rows]
        # seeds 1 and 2 of the model-size runs (claim 1 needs >= 3 paired seeds per size); the 8-expert runs'
        # seeds at base + 0, + 0.01, - 0.01: the noise floor (their sd) is 0.01
        table += [dict(r, seed=seed, name=r["name"].replace("_seed0", f"_seed{seed}"))
                  for r in rows if r["sweep"] == "model_size" for seed in (1, 2)]
        base = {r["size"]: r["final_eval_ce"] for r in rows if r["sweep"] == "model_size" and r["variant"] == "moe"}
        moe, spread = {}, {0: 0.0, 1: 0.01, 2: -0.01}
        for r in table:
            if r["sweep"] == "model_size" and r["variant"] == "moe":
                r["final_eval_ce"] = moe[r["size"], r["seed"]] = base[r["size"]] + spread[r["seed"]]
        table = [r for r in table if not (r["sweep"] == "model_size" and r["variant"] == "dense"
                                          and r["seed"] >= dense_seeds)]
        for r in table:
            if r["sweep"] == "model_size" and r["variant"] == "dense":
                r["final_eval_ce"] = moe[r["size"], r["seed"]] - moe_gap
            if r["sweep"] == "capacity" and r["capacity_factor"] == 1.25:
                r["dropped_fraction"] = drops
            if r["sweep"] == "aux_losses":
                no_balance = r["balance_loss_coef"] == 0
                r["dropped_fraction"], r["load_cv"] = (0.3, 1.0) if no_balance else (0.01, 0.1)
        result = analysis.analyse(table, bootstrap_n=3, self_test=False)
        assert result["noise_floor"]["std"] == pytest.approx(0.01)
        text = report.render(result, table, scale=scales.get("smoke"), command="x", plot_paths={}, seconds=None)
        return [line for line in text.splitlines() if line[:3] in ("1. ", "5. ")]

    holds = verdicts(moe_gap=-0.05, drops=0.01)
    assert "**holds**" in holds[0] and "xs: -0.0500" in holds[0] and "**holds**" in holds[1], holds
    within_noise = verdicts(moe_gap=-0.015, drops=0.05)  # |gap| < 2 x 0.01; 5 % dropped > 2 %
    assert "**not met**" in within_noise[0] and "**not met**" in within_noise[1], within_noise
    one_seed = verdicts(moe_gap=-0.05, drops=0.01, dense_seeds=1)  # a clear gap, but one paired seed per size
    assert "**not met**" in one_seed[0] and "(n=1)" in one_seed[0], one_seed


def test_identity_routing_predicts_the_hash_runs_drops(smoke):
    """experiments/identity_routing.py counts, from the data alone, the drops of the hash router: equal to what
    the smoke hash run logged over all its steps (every step is logged at the smoke scale)."""
    from experiments import identity_routing

    out, _, rows = smoke
    assert identity_routing._overflow(np.array([[5, 1, 0], [2, 2, 2]]), capacity=2, group=6) == pytest.approx(0.25)
    scale = scales.get("smoke")
    spec = next(s for s in sweeps.SWEEPS["shared_experts"].sweep(scale) if s.axes["variant"] == "hash")
    got = identity_routing.identity_drops([spec], num_batches=spec.steps)
    (E, v), = got["by_experts"].items()
    logged = [r[k] for r in read_jsonl(str(out / "runs" / spec.name / "metrics.jsonl")) if r["split"] == "train"
              for k in r if k.endswith("/dropped_fraction")]
    assert len(logged) == spec.steps * len(build_run_config(spec.config).model.moe_layer_indices)
    assert v["hash"] == pytest.approx(np.mean(logged), abs=1e-6) and v["hash"] > 0
    assert 0 <= v["lower_bound"] <= v["hash"] and got["tokens"] == spec.steps * 4 * 32
    shares = [share for _, share in got["top_tokens"]]
    assert shares == sorted(shares, reverse=True) and 0 < sum(shares) <= 1
    result = json.loads((out / "analysis.json").read_text())
    assert set(result["identity_routing"]["by_experts"]) == {str(r["experts"]) for r in rows
                                                             if r["sweep"] == "num_experts" and r["experts"] > 1}
    # the per-layer drops the report tabulates are the logged second-half means, layer by layer
    base = next(r for r in rows if r["sweep"] == "num_experts" and r["experts"] > 1)
    spec = sweeps.unique_runs(sweeps.specs("num_experts", scale))[base["name"]]
    assert len(base["dropped_by_layer"]) == len(build_run_config(spec.config).model.moe_layer_indices)
    assert np.mean(base["dropped_by_layer"]) == pytest.approx(base["dropped_fraction"])


def test_train_length_pairs_the_long_runs_by_seed(smoke):
    out, _, rows = smoke
    result = json.loads((out / "analysis.json").read_text())
    long = {(r["variant"], r["seed"]): r for r in rows if r["sweep"] == "train_length"}
    (size, v), = result["train_length"].items()
    assert v["steps"] == 2 * scales.get("smoke").steps(size) == long["moe", 0]["steps"]
    last = max(v["curve"], key=int)
    want = dict(map(tuple, long["moe", 0]["eval_curve"]))[int(last)] - dict(map(tuple, long["dense", 0]["eval_curve"]))[int(last)]
    assert v["final"]["mean"] == pytest.approx(want) and v["final"]["n"] == 1
    short = {r["variant"]: r["final_eval_ce"] for r in rows if r["sweep"] == "model_size" and r["size"] == size}
    assert v["at_scale_steps"]["mean"] == pytest.approx(short["moe"] - short["dense"])


def test_rate_check_pairs_each_model_with_its_protocol_run(smoke):
    out, _, rows = smoke
    r = json.loads((out / "analysis.json").read_text())["rate_check"]
    ce = {r_["name"]: r_["final_eval_ce"] for r_ in rows}
    lr = f"{r['learning_rate']:g}"
    assert lr == f"{scales.get('smoke').train['learning_rate'] * 4:g}"
    high = {v: ce[f"xs_{m}_lr{lr}_seed0"] for v, m in (("dense", "dense"), ("G1", "E8_K1_G1"))}
    low = {v: ce[f"xs_{m}_seed0"] for v, m in (("dense", "dense"), ("G1", "E8_K1_G1"))}
    (label, c), = r["comparisons"].items()
    assert label == "G1 - dense" and c["claim"] == 1
    assert c["high"]["mean"] == pytest.approx(high["G1"] - high["dense"]) and c["high"]["n"] == 1
    assert c["protocol"]["mean"] == pytest.approx(low["G1"] - low["dense"])
    for v in ("dense", "G1"):
        assert r["variants"][v]["change"]["mean"] == pytest.approx(high[v] - low[v])

def test_first_dense_pairs_with_the_base_moe_and_dense_runs(smoke):
    out, _, rows = smoke
    (size, v), = json.loads((out / "analysis.json").read_text())["first_dense"].items()
    ce = {r["name"]: r for r in rows}
    fd, base, dense = ce[f"{size}_E8_K1_G1_FD1_seed0"], ce[f"{size}_E8_K1_G1_seed0"], ce[f"{size}_dense_seed0"]
    assert v["minus_base"]["mean"] == pytest.approx(fd["final_eval_ce"] - base["final_eval_ce"])
    assert v["minus_dense"]["mean"] == pytest.approx(fd["final_eval_ce"] - dense["final_eval_ce"])
    assert len(v["by_layer"]) == len(v["base_by_layer"]) - 1  # one MoE layer fewer
    # active: the dense model's plus one router (the base MoE has one per layer); total: one MoE layer fewer
    assert dense["params_active"] < fd["params_active"] < base["params_active"]
    assert fd["params_total"] < base["params_total"]
    assert "## The first layer dense (first_dense sweep)" in (out / "report.md").read_text()
