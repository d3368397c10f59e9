"""From the results table to the numbers the report prints: per-sweep means over seeds, fits, trends.

    result = analyse(rows, bootstrap_n=100)    # JSON-able dict, one entry per sweep + "self_test"

Every number comes from the rows (or, for "published", from the papers: the table or figure is
named in each key of `PUBLISHED`); a comparison that lacks the points it needs says so in "skipped"
instead of fitting fewer points than the law has coefficients.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from experiments import fit as fit_lib
from experiments.collect import aggregate, loss_at

PUBLISHED = {
    "krajewski_table1": fit_lib.KRAJEWSKI,
    "clark_table3_s_base": fit_lib.CLARK_S_BASE,
    "deepseekmoe_table1": {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808},
    "st_moe_drop_rate": {0.75: 0.106, 1.25: 0.003},
    "switch_table1": "capacity factor 1.0 / 1.25 / 2.0 change quality little; dropped tokens typically < 1 %",
    "switch_fig4": "loss falls steadily with the number of experts at equal compute (2 -> 256 experts)",
}


def _ok(rows, sweep, **where):
    return [r for r in rows if r["sweep"] == sweep and r.get("status") == "ok"
            and all(r.get(k) == v for k, v in where.items())]


def _by(rows, key, value="final_eval_ce"):
    """{axis value: {"mean", "std", "n"}} sorted by the axis value."""
    groups = aggregate(rows, by=(key,), value=value)
    return {g[key]: {k: g[k] for k in ("mean", "std", "n")} for g in sorted(groups, key=lambda g: _sort_key(g[key]))}


def _sort_key(v):
    return (0, v, "") if isinstance(v, (int, float)) else (1, 0, str(v))


def _fit_record(f: fit_lib.Fit) -> dict:
    return {"params": f.params, "intervals": f.intervals, "n_points": f.n_points, "objective": f.objective,
            "at_bound": list(f.at_bound)}


def noise_floor(rows) -> dict | None:
    """Seed spread of the base configuration (8 experts, top-1, G = 1 at the headline size; else the
    configuration with the most seeds): the scale of a real difference."""
    unique = {r["name"]: r for r in rows if r.get("status") == "ok"}  # a run shared by sweeps counts once
    groups = [g for g in aggregate(list(unique.values()), by=("name_wo_seed",)) if g["n"] > 1]
    base = [g for g in groups if g["name_wo_seed"].endswith("_E8_K1_G1")]
    return max(base or groups, key=lambda g: g["n"], default=None)


def analyse_experts(rows, bootstrap_n: int) -> dict:
    pts = _ok(rows, "num_experts")
    out = {"by_E": _by(pts, "E")}
    E = np.array(list(out["by_E"]), float)
    L = np.array([v["mean"] for v in out["by_E"].values()])
    if len(E) >= 3:
        out["spearman_E_vs_loss"] = float(stats.spearmanr(E, L)[0])
    if len(E) >= 2:
        out["loss_change_dense_to_max_E"] = float(L[-1] - L[0])
    clark_rows = pts + [r for r in _ok(rows, "model_size")]
    N = np.array([r["params_active_nonemb"] for r in clark_rows], float)
    Ex = np.array([r["experts"] for r in clark_rows], float)
    Lx = np.array([r["final_eval_ce"] for r in clark_rows], float)
    sizes = {r["size"] for r in clark_rows}  # N differs across E by the router alone: count sizes
    if len(sizes) >= 2 and len(set(Ex)) >= 2 and len(set(zip(N, Ex))) >= 4:
        f = fit_lib.fit_clark(N, Ex, Lx)
        fit_lib.bootstrap(fit_lib.fit_clark, dict(N=N, E=Ex, L=Lx), f, n=bootstrap_n)
        out["clark_fit"] = _fit_record(f)
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
    pts = _ok(rows, "model_size")
    out = {}
    for r in sorted(pts, key=lambda r: r["params_active"]):
        out.setdefault(r["size"], {})[r["variant"]] = {"final_eval_ce": r["final_eval_ce"],
                                                       "params_total": r["params_total"],
                                                       "params_active": r["params_active"]}
    for size, v in out.items():
        if "dense" in v and "moe" in v:
            v["moe_minus_dense"] = v["moe"]["final_eval_ce"] - v["dense"]["final_eval_ce"]
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


def analyse(rows, *, bootstrap_n: int = 100, self_test: bool = True) -> dict:
    rows = [dict(r, name_wo_seed=r["name"].rsplit("_seed", 1)[0]) for r in rows]
    result = {
        "missing": sorted({r["name"] for r in rows if r.get("status") != "ok"}),
        "noise_floor": noise_floor(rows),
        "num_experts": analyse_experts(rows, bootstrap_n),
        "granularity": analyse_granularity(rows, bootstrap_n),
        "model_size": analyse_model_size(rows),
        "shared_experts": analyse_shared(rows),
        "capacity": analyse_table(rows, "capacity", "capacity_factor"),
        "routers": analyse_table(rows, "routers", "variant"),
        "aux_losses": {f"balance {r['balance_loss_coef']:g}, z {r['z_loss_coef']:g}": {
            k: r.get(k) for k in ("final_eval_ce", "dropped_fraction", "load_cv", "name")}
            for r in _ok(rows, "aux_losses")},
        "published": PUBLISHED,
    }
    if self_test:
        result["self_test"] = fit_lib.self_test()
    return _jsonable(result)


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
