"""From the results table to the numbers the report prints: per-sweep means over seeds, fits, trends.

    result = analyse(rows, bootstrap_n=100)    # JSON-able dict, one entry per sweep + "self_test"

Every number comes from the rows (or, for "published", from the papers: the table or figure is
named in each key of `PUBLISHED`); a comparison that lacks the points it needs says so in "skipped"
instead of fitting fewer points than the law has coefficients. `checks(result)` turns the numbers
into the protocol's pass / not-met verdicts. The diagnoses beside the judged sweeps (token budget, where the
drops happen, training length, the rate check) are in experiments/diagnostics.py.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from experiments import fit as fit_lib
from experiments.collect import aggregate, loss_at
from experiments.collect import finished as _ok
from experiments.diagnostics import (DEEPSEEK_TABLE1, analyse_budget, analyse_drops, analyse_first_dense,
                                     analyse_rate_check, analyse_train_length, deepseek_tau)

PUBLISHED = {
    "krajewski_table1": fit_lib.KRAJEWSKI,
    "clark_table3_s_base": fit_lib.CLARK_S_BASE,
    "deepseekmoe_table1": DEEPSEEK_TABLE1,
    "st_moe_drop_rate": {0.75: 0.106, 1.25: 0.003},
    "switch_table1": "capacity factor 1.0 / 1.25 / 2.0 change quality little; dropped tokens typically < 1 %",
    "switch_fig4": "loss falls steadily with the number of experts at equal compute (2 -> 256 experts)",
}
MIN_SEEDS = 3  # seeds a headline comparison needs before its verdict can hold


def _by(rows, key, value="final_eval_ce"):
    """{axis value: {"mean", "std", "n"}} sorted by the axis value."""
    groups = aggregate(rows, by=(key,), value=value)
    return {g[key]: {k: g[k] for k in ("mean", "std", "n")} for g in sorted(groups, key=lambda g: _sort_key(g[key]))}


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _fit_record(f: fit_lib.Fit) -> dict:
    return {"params": f.params, "intervals": f.intervals, "n_points": f.n_points, "objective": f.objective,
            "at_bound": list(f.at_bound)}


def _seed_groups(rows) -> list[dict]:
    """Mean, sd and n of eval CE per configuration (name without the seed) with more than one seed finished."""
    unique = {r["name"]: r for r in rows if r.get("status") == "ok"}  # a run shared by sweeps counts once
    return [g for g in aggregate(list(unique.values()), by=("name_wo_seed",)) if g["n"] > 1]


def noise_floor(rows) -> dict | None:
    """Seed spread of the base configuration (8 experts, top-1, G = 1 at the headline size; else the
    configuration with the most seeds): the scale of a real difference."""
    groups = _seed_groups(rows)
    base = [g for g in groups if g["name_wo_seed"].endswith("_E8_K1_G1")]
    return max(base or groups, key=lambda g: g["n"], default=None)


def pooled_noise(rows) -> dict | None:
    """The seed sd pooled over every configuration with more than one seed (each run once): sqrt(sum (n - 1) s^2 /
    sum (n - 1)), with its degrees of freedom; a check on the base configuration's estimate from its few seeds."""
    groups = _seed_groups(rows)
    df = sum(g["n"] - 1 for g in groups)
    if not df:
        return None
    return {"std": float(np.sqrt(sum((g["n"] - 1) * g["std"] ** 2 for g in groups) / df)), "df": df,
            "configurations": len(groups)}


def analyse_experts(rows, bootstrap_n: int) -> dict:
    pts = _ok(rows, "num_experts")
    out = {"by_E": _by(pts, "E"), "size": pts[0]["size"] if pts else None}
    E = np.array(list(out["by_E"]), float)
    L = np.array([v["mean"] for v in out["by_E"].values()])
    if len(E) >= 3:
        out["spearman_E_vs_loss"] = float(stats.spearmanr(E, L)[0])
    if len(E) >= 2:
        out["loss_change_dense_to_max_E"] = float(L[-1] - L[0])
    clark_rows = list({r["name"]: r for r in pts + _ok(rows, "model_size")}.values())  # a shared run once
    N = np.array([r["params_active_nonemb"] for r in clark_rows], float)
    Ex = np.array([r["experts"] for r in clark_rows], float)
    Lx = np.array([r["final_eval_ce"] for r in clark_rows], float)
    sizes = {r["size"] for r in clark_rows}  # N differs across E by the router alone: count sizes
    if len(sizes) >= 2 and len(set(Ex)) >= 2 and len(set(zip(N, Ex))) >= 4:
        f = fit_lib.fit_clark(N, Ex, Lx)
        fit_lib.bootstrap(fit_lib.fit_clark, dict(N=N, E=Ex, L=Lx), f, n=bootstrap_n)
        out["clark_fit"] = _fit_record(f)
        # b is the slope in log10 E at N = 1 parameter, far outside the data: with E varied at one size it trades
        # off against c. The slope at the headline size (b + c log10 N_s) is what the runs determine: the same fit
        # with N in units of N_s gives it as its b, with its own bootstrap interval.
        N_s = float(np.median([r["params_active_nonemb"] for r in pts])) if pts else float(np.median(N))
        g = fit_lib.fit_clark(N / N_s, Ex, Lx)
        fit_lib.bootstrap(fit_lib.fit_clark, dict(N=N / N_s, E=Ex, L=Lx), g, n=bootstrap_n)
        out["clark_slope_at_headline"] = {"N": N_s, "slope": g.params["b"], "interval": g.intervals.get("b")}
        out["clark_points"] = [{"N": float(a), "E": float(b), "L": float(c), "size": r["size"]}
                               for a, b, c, r in zip(N, Ex, Lx, clark_rows)]
    else:
        out["skipped"] = "Clark fit needs >= 2 sizes, >= 2 expert counts and >= 4 distinct (N, E) points"
    return out


def analyse_granularity(rows, bootstrap_n: int) -> dict:
    steps_rows = _ok(rows, "granularity", budget="steps")
    out = {"per_step": {}, "fits": {}, "step_seconds": {}, "skipped": []}
    for size in sorted({r["size"] for r in steps_rows}, key=lambda s: min(r["params_total"] for r in steps_rows
                                                                        if r["size"] == s)):
        pts = [r for r in steps_rows if r["size"] == size]
        out["per_step"][size] = _by(pts, "G")
        # Median over seeds: one run slowed by a busy machine must not move the ratio.
        out["step_seconds"][size] = {G: float(np.median([r["step_seconds"] for r in pts if r["G"] == G]))
                                     for G in sorted({r["G"] for r in pts})}
        G = np.array([r["G"] for r in pts], float)
        L = np.array([r["final_eval_ce"] for r in pts], float)
        if len(set(G)) >= 4:
            f = fit_lib.fit_granularity(G, L)
            fit_lib.bootstrap(fit_lib.fit_granularity, dict(G=G, L=L), f, n=bootstrap_n)
            out["fits"][size] = _fit_record(f)
        else:
            out["skipped"].append(f"L(G) fit for size {size}: needs >= 4 values of G, has {len(set(G))}")
    flops_rows = _ok(rows, "granularity", budget="flops")
    out["matched_flops_runs"] = _by(flops_rows, "G")
    headline = flops_rows[0]["size"] if flops_rows else None
    if headline:
        out["headline_size"] = headline
        out["matched_interpolated"] = _interpolated([r for r in steps_rows if r["size"] == headline])
    moe_sizes = [r for r in _ok(rows, "model_size", variant="moe")]  # G = 1 at sizes without a G sweep
    joint_rows = {}
    for r in steps_rows + moe_sizes:
        joint_rows.setdefault(r["name"], r)
    out["joint"] = _joint(list(joint_rows.values()), bootstrap_n)
    return out


def _interpolated(pts) -> dict:
    """Per-step runs compared on their train curves at the smallest total of each quantity (FLOPs with the
    router, measured steady-state seconds): every run reaches that point."""
    out = {}
    for label, per_step_key in (("useful_flops", "flops_useful_per_step"), ("seconds", "step_seconds")):
        usable = [r for r in pts if r.get(per_step_key)]
        if not usable:
            continue
        budget = min(r[per_step_key] * r["steps"] for r in usable)
        vals = [dict(r, at_budget=loss_at(r, r[per_step_key], budget)) for r in usable]
        out[label] = {"budget": budget, "by_G": _by(vals, "G", value="at_budget")}
    return out


def _joint(steps_rows, bootstrap_n: int) -> dict:
    N, D, G, L = [], [], [], []
    for r in steps_rows:
        for step, ce in r["eval_curve"]:
            N.append(r["params_total_nonemb"])
            D.append(step * r["tokens_per_step"])
            G.append(r["granularity"])
            L.append(ce)
    N, D, G, L = (np.asarray(v, float) for v in (N, D, G, L))
    sizes = {r["size"] for r in steps_rows}  # N differs across G by the router alone: count sizes
    if min(len(sizes), len(set(D)), len(set(G))) < 2 or len(L) <= 7:
        return {"skipped": "joint fit needs >= 2 sizes, >= 2 token counts, >= 2 granularities and more points "
                           "than its 7 coefficients"}
    f = fit_lib.fit_joint(N, D, G, L)
    fit_lib.bootstrap(fit_lib.fit_joint, dict(N=N, D=D, G=G, L=L), f, n=bootstrap_n)
    pred = f.predict(N=N, D=D, G=G)
    return {**_fit_record(f), "rms_log_residual": float(np.sqrt(np.mean((np.log(pred) - np.log(L)) ** 2))),
            "points": [[float(a), float(b), float(c), float(d), float(e)] for a, b, c, d, e in zip(N, D, G, L, pred)],
            "note": "granularity runs (equal steps) and the model-size sweep's MoE runs (G = 1); N = total "
                    "non-embedding parameters, D = tokens at each evaluation of a cosine-schedule run (intermediate "
                    "points are not annealed, unlike Krajewski et al.'s separate runs per D)"}


def analyse_model_size(rows) -> dict:
    """Per size: dense and MoE eval CE over the seeds (mean, sd, n) and MoE - dense paired seed by seed (a seed
    fixes the data order and the evaluation windows are the same for every run)."""
    pts = _ok(rows, "model_size")
    out = {}
    for size in sorted({r["size"] for r in pts}, key=lambda s: min(r["params_active"] for r in pts if r["size"] == s)):
        here = [r for r in pts if r["size"] == size]
        v = out.setdefault(size, {})
        for variant, g in _by(here, "variant").items():
            r0 = next(r for r in here if r["variant"] == variant)
            v[variant] = {"final_eval_ce": g["mean"], "std": g["std"], "n": g["n"],
                          "params_total": r0["params_total"], "params_active": r0["params_active"],
                          "tokens_per_active_param": r0["tokens"] / r0["params_active"]}
        ce = {(r["variant"], r["seed"]): r["final_eval_ce"] for r in here}
        paired = [ce[("moe", s)] - ce[("dense", s)] for s in sorted({r["seed"] for r in here})
                  if ("moe", s) in ce and ("dense", s) in ce]
        if paired:
            v["moe_minus_dense"] = float(np.mean(paired))
            v["moe_minus_dense_std"] = float(np.std(paired, ddof=1)) if len(paired) > 1 else 0.0
            v["n_paired"] = len(paired)
    return out


def analyse_shared(rows) -> dict:
    by = _by(_ok(rows, "shared_experts"), "variant")
    out = {"by_variant": by}
    if by:
        out["ordering_worst_to_best"] = sorted(by, key=lambda v: -by[v]["mean"])
    names = {"dense": "dense", "gshard": "gshard", "fine_x4": "deepseekmoe"}
    if all(k in by for k in names):
        pub = PUBLISHED["deepseekmoe_table1"]
        out["ratio_gshard_to_deepseekmoe_over_dense_to_gshard"] = {
            "ours": (by["gshard"]["mean"] - by["fine_x4"]["mean"]) / (by["dense"]["mean"] - by["gshard"]["mean"]),
            "published": (pub["gshard"] - pub["deepseekmoe"]) / (pub["dense"] - pub["gshard"])}
    return out


def analyse_table(rows, sweep, key) -> dict:
    out = {}
    for r in sorted(_ok(rows, sweep), key=lambda r: _sort_key(r.get(key))):
        out[str(r.get(key))] = {k: r.get(k) for k in ("final_eval_ce", "dropped_fraction", "eval_dropped_fraction",
                                                        "load_cv", "effective_cf", "capacity", "name")}
    return out


def _first_half_drops(row) -> float | None:
    values = [d for step, d in row.get("drop_curve") or () if step <= row["steps"] / 2]
    return float(np.mean(values)) if values else None


def analyse_capacity(rows) -> list[dict]:
    """One entry per capacity run (capacity factor, routing group size), drops in both halves of training."""
    out = []
    for r in sorted(_ok(rows, "capacity"), key=lambda r: (-(r.get("group_size") or 0), r["capacity_factor"])):
        out.append({**{k: r.get(k) for k in ("capacity_factor", "group_size", "final_eval_ce", "dropped_fraction",
                                             "eval_dropped_fraction", "load_cv", "effective_cf", "capacity", "name")},
                    "dropped_first_half": _first_half_drops(r)})
    return out


def analyse_learning_rate(rows) -> dict:
    """The learning-rate / warm-up check at the headline size: runs per model kind, and each kind's best."""
    runs = {}
    for r in sorted(_ok(rows, "learning_rate"), key=lambda r: (r["variant"], r["learning_rate"], r["warmup_steps"])):
        runs.setdefault(r["variant"], []).append(
            {k: r.get(k) for k in ("learning_rate", "warmup_steps", "final_eval_ce", "name")})
    scale_point = {}
    for v, pts in runs.items():  # the scale's own rate and warm-up: the one point of each kind not named lr / warmup
        own = [p for p in pts if "_lr" not in p["name"] and "_warmup" not in p["name"]]
        if own:
            scale_point[v] = own[0]
    return {"runs": runs, "best": {v: min(pts, key=lambda p: p["final_eval_ce"]) for v, pts in runs.items()},
            "protocol": scale_point}


def analyse(rows, *, bootstrap_n: int = 100, self_test: bool = True) -> dict:
    rows = [dict(r, name_wo_seed=r["name"].rsplit("_seed", 1)[0]) for r in rows]
    result = {
        "missing": sorted({r["name"] for r in rows if r.get("status") != "ok"}),
        "noise_floor": noise_floor(rows),
        "learning_rate": analyse_learning_rate(rows),
        "budget": analyse_budget(rows),
        "num_experts": analyse_experts(rows, bootstrap_n),
        "granularity": analyse_granularity(rows, bootstrap_n),
        "model_size": analyse_model_size(rows),
        "shared_experts": analyse_shared(rows),
        "capacity": analyse_capacity(rows),
        "drops": analyse_drops(rows),
        "train_length": analyse_train_length(rows),
        "rate_check": analyse_rate_check(rows),
        "first_dense": analyse_first_dense(rows),
        "routers": analyse_table(rows, "routers", "variant"),
        "aux_losses": {f"balance {r['balance_loss_coef']:g}, z {r['z_loss_coef']:g}": {
            k: r.get(k) for k in ("final_eval_ce", "dropped_fraction", "load_cv", "name")}
            for r in _ok(rows, "aux_losses")},
        "published": PUBLISHED,
    }
    if self_test:
        result["self_test"] = fit_lib.self_test()
    result["noise_floor_pooled"] = pooled_noise(rows)
    result = _jsonable(result)
    result["checks"] = checks(result)
    pooled, nf = result["noise_floor_pooled"], result["noise_floor"]
    if pooled and nf:  # the same checks against the pooled sd: do the verdicts hinge on the noise estimate?
        again = checks({**result, "noise_floor": {**nf, "std": pooled["std"]}})
        pooled["verdicts_that_change"] = [i for i, (a, b) in enumerate(zip(result["checks"], again), 1)
                                          if a["pass"] != b["pass"]]
    return result


def _check(claim: str, passed, detail: str) -> dict:
    """passed: True / False, or None when the runs it needs are missing."""
    return {"claim": claim, "pass": passed, "detail": detail}


def _beyond(diff: float, noise: float) -> bool:
    return diff < -2 * noise


def _at_rate(result: dict, claim: int) -> str:
    """The rate_check sweep's comparisons of `claim` as a detail suffix ('' when it has none)."""
    r = result.get("rate_check") or {}
    parts = [f"{label} {c['high']['mean']:+.4f} (n={c['high']['n']})"
             for label, c in r.get("comparisons", {}).items() if c["claim"] == claim and c.get("high")]
    if claim == 4 and (r.get("kendall_tau") or {}).get("high") is not None:
        parts.insert(0, f"Kendall tau {r['kendall_tau']['high']:+.2f}")
    return f"; at learning rate {r['learning_rate']:g} (not part of the verdict): {', '.join(parts)}" if parts else ""


def checks(result: dict) -> list[dict]:
    """The protocol's claims, each judged from the analysed table: a loss difference counts when it exceeds twice
    the noise floor (the seed sd of the base configuration), a fitted sign when its 90 % interval excludes 0."""
    nf = result.get("noise_floor")
    noise = nf["std"] if nf else None
    out = []

    # 1. An 8-expert top-1 MoE beats the dense model of equal active parameters at every size.
    by_E = result["num_experts"]["by_E"]
    sizes = {}
    if "1" in by_E and "8" in by_E:
        sizes[result["num_experts"].get("size") or "headline"] = (by_E["8"]["mean"] - by_E["1"]["mean"],
                                                            min(by_E["8"]["n"], by_E["1"]["n"]))
    for size, v in result["model_size"].items():
        if "moe_minus_dense" in v and size not in sizes:
            sizes[size] = (v["moe_minus_dense"], v.get("n_paired", 1))
    if noise is None or not sizes:
        out.append(_check("MoE (8 experts, top-1) beats dense at each size", None, "runs missing"))
    else:
        parts = [f"{s}: {d:+.4f} (n={n})" for s, (d, n) in sizes.items()]
        longer = [f"{s} at {v['steps']} steps {v['final']['mean']:+.4f} (n={v['final']['n']})"
                  for s, v in result.get("train_length", {}).items() if v.get("final")]
        out.append(_check("MoE (8 experts, top-1) beats dense at each size",
                          all(_beyond(d, noise) and n >= MIN_SEEDS for d, n in sizes.values()),
                          f"MoE - dense {', '.join(parts)}; threshold -2 x {noise:.4f}, >= {MIN_SEEDS} seeds"
                          + (f"; trained longer (not part of the verdict): {', '.join(longer)}" if longer else "")
                          + _at_rate(result, 1)))

    # 2. Loss falls with the number of experts: Spearman <= -0.8 over >= 5 counts, Clark b < 0 (interval).
    r = result["num_experts"]
    rho, clark = r.get("spearman_E_vs_loss"), r.get("clark_fit")
    if rho is None or len(by_E) < 5 or clark is None:
        out.append(_check("loss falls with the number of experts", None,
                          f"needs >= 5 expert counts and the Clark fit (have {len(by_E)} counts)"))
    else:
        b_hi = (clark.get("intervals", {}).get("b") or [None, None])[1]
        ok = rho <= -0.8 and b_hi is not None and b_hi < 0
        slope = r.get("clark_slope_at_headline")
        at_s = "" if not slope or not slope.get("interval") else (
            f"; slope in log10 E at the headline size (b + c log10 N) {slope['slope']:+.4f} "
            f"[{slope['interval'][0]:+.4f}, {slope['interval'][1]:+.4f}]")
        out.append(_check("loss falls with the number of experts", ok,
                          f"Spearman {rho:+.2f} over {len(by_E)} counts (<= -0.8 wanted); Clark b "
                          f"{clark['params']['b']:+.4f}, 90 % interval upper end {b_hi if b_hi is None else f'{b_hi:+.4f}'}"
                          f" (< 0 wanted){at_s}"))

    # 3. Granularity at equal FLOPs: the best G > 1 beats G = 1; gamma of the headline L(G) fit determined.
    g = result["granularity"]
    matched = g.get("matched_flops_runs", {})
    fit = g.get("fits", {}).get(g.get("headline_size") or next(iter(g.get("fits", {})), ""), None)
    if noise is None or "1" not in matched or len(matched) < 2 or fit is None:
        out.append(_check("finer experts (best G > 1) beat G = 1 at equal FLOPs; gamma determined", None,
                          "runs missing"))
    else:
        best = min((G for G in matched if G != "1"), key=lambda G: matched[G]["mean"])
        diff = matched[best]["mean"] - matched["1"]["mean"]
        # determined: no coefficient of the L(G) fit on a bound (h at its bound makes gamma a limit, not an exponent)
        bound = list(fit.get("at_bound", ()))
        gamma_ok = not bound and "gamma" in fit.get("intervals", {})
        out.append(_check("finer experts (best G > 1) beat G = 1 at equal FLOPs; gamma determined",
                          _beyond(diff, noise) and gamma_ok and min(matched[best]["n"], matched["1"]["n"]) >= MIN_SEEDS,
                          f"best G = {best}: {diff:+.4f} (n={matched[best]['n']}; threshold -2 x {noise:.4f}); "
                          f"gamma {fit['params']['gamma']:.3g}" + (f"; at a bound: {', '.join(bound)}" if bound
                                                                     else " with every coefficient inside its bounds")
                          + _at_rate(result, 3)))

    # 4. DeepSeekMoE's ordering (Kendall tau >= 0.6) and fine-grained + shared beats GShard.
    sh = result["shared_experts"]["by_variant"]
    pub = result["published"]["deepseekmoe_table1"]
    tau = deepseek_tau({v: x["mean"] for v, x in sh.items()}, pub)
    if noise is None or tau is None:
        out.append(_check("DeepSeekMoE's ordering; fine-grained + shared beats GShard", None, "runs missing"))
    else:
        diff = sh["fine_x4"]["mean"] - sh["gshard"]["mean"]
        out.append(_check("DeepSeekMoE's ordering; fine-grained + shared beats GShard",
                          tau >= 0.6 and _beyond(diff, noise),
                          f"Kendall tau {tau:+.2f} (>= 0.6 wanted); fine_x4 - gshard {diff:+.4f} "
                          f"(threshold -2 x {noise:.4f})" + _at_rate(result, 4)))

    # 5. Drops at capacity factor 1.25 (second half) <= 2 %; no balance loss: more drops and a worse load CV.
    cap = [c for c in result["capacity"] if c["capacity_factor"] == 1.25]
    cap = max(cap, key=lambda c: c.get("group_size") or 0, default=None)  # the scale's own grouping
    aux = result["aux_losses"]
    base, nobal = aux.get("balance 0.01, z 0.001"), aux.get("balance 0, z 0.001")
    if cap is None or cap.get("dropped_fraction") is None or base is None or nobal is None:
        out.append(_check("drops at capacity factor 1.25 <= 2 %; no balance loss drops more", None, "runs missing"))
    else:
        ok = (cap["dropped_fraction"] <= 0.02 and nobal["dropped_fraction"] > base["dropped_fraction"]
              and nobal["load_cv"] > base["load_cv"])
        layers = (result.get("drops", {}).get("by_experts", {}).get("8") or {}).get("by_layer")
        where = (f" (per MoE layer, first to last, over the base config's seeds: "
                 f"{' / '.join(f'{v:.2%}' for v in layers)})" if layers else "")
        for size, v in result.get("drops", {}).get("by_size_long", {}).items():
            if v["by_layer"]:
                where += (f"; size {size} trained {v['steps']} steps (not part of the verdict): "
                          f"{np.mean(v['by_layer']):.2%}, per layer {' / '.join(f'{d:.2%}' for d in v['by_layer'])}")
        rate = result.get("rate_check") or {}
        g1 = rate.get("variants", {}).get("G1") or {}
        if "high" in g1.get("dropped", {}):
            high, protocol = g1["dropped"]["high"], g1["dropped"].get("protocol", float("nan"))
            where += (f"; at learning rate {rate['learning_rate']:g} (not part of the verdict): {high:.2%} over "
                      f"{g1['high']['n']} seeds, against {protocol:.2%} at the protocol's rate")
        for size, v in (result.get("first_dense") or {}).items():
            if v.get("dropped") and v.get("base_dropped"):
                where += (f"; first layer dense, size {size} (not part of the verdict): {v['dropped']['mean']:.2%} "
                          f"(n={v['dropped']['n']}) against {v['base_dropped']['mean']:.2%}")
        out.append(_check("drops at capacity factor 1.25 <= 2 %; no balance loss drops more", ok,
                          f"cf 1.25: {cap['dropped_fraction']:.2%} dropped in the second half{where}; without the balance "
                          f"loss {nobal['dropped_fraction']:.2%} (load CV {nobal['load_cv']:.3f}) vs "
                          f"{base['dropped_fraction']:.2%} ({base['load_cv']:.3f})"))

    # 6. The joint law's coefficients are determined (none at a bound of the fit).
    j = g.get("joint", {})
    if "params" not in j:
        out.append(_check("joint law L(N, D, G): every coefficient determined", None, j.get("skipped", "missing")))
    else:
        at = list(j.get("at_bound", ()))
        out.append(_check("joint law L(N, D, G): every coefficient determined", not at,
                          "none at a bound" if not at else f"at a bound: {', '.join(at)}"))
    return out


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.floating, float)):
        return None if math.isnan(float(x)) else float(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.bool_):
        return bool(x)
    return x
