"""Diagnoses beside the protocol's judged sweeps, from the results rows: why a claim reads as it does.

    analyse_budget        MoE - dense at every evaluation, paired by seed (the token budget)
    analyse_drops         second-half drops per MoE layer, and how each layer's drops fall over training
    analyse_train_length  MoE - dense of the train_length sweep's longer runs
    analyse_rate_check    the judged comparisons again at the rate_check sweep's learning rate
    analyse_first_dense   the base MoE with its first layer dense: drops and loss beside the base MoE and dense
    explain_unmet         for each claim not met, what those measurements say about it (text from the numbers)

experiments/analysis.py calls each of them into its result and judges the claims.
"""
from __future__ import annotations

import numpy as np
from scipy import stats

from experiments.collect import finished as _ok

# DeepSeekMoE (Dai et al. 2024) Table 1, Pile loss
DEEPSEEK_TABLE1 = {"dense": 2.060, "hash": 1.932, "switch": 1.881, "gshard": 1.867, "deepseekmoe": 1.808}


def _spread(values) -> dict | None:
    """mean, sample sd (0 for one value) and n of `values` (None when empty)."""
    values = np.asarray(list(values), float)
    if not len(values):
        return None
    return {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
            "n": len(values)}


def _paired_gap(dense: dict, moe: dict) -> tuple[list, dict]:
    """dense, moe: seed -> {step: eval CE}. The seeds both have and, at every step all of them evaluated, MoE - dense
    paired seed by seed: {step: {"mean", "std" (0 for one seed), "n"}}."""
    seeds = sorted(set(dense) & set(moe))
    steps = sorted(set.intersection(*(set(dense[s]) & set(moe[s]) for s in seeds))) if seeds else []
    gap = {}
    for step in steps:
        d = np.array([moe[s][step] - dense[s][step] for s in seeds])
        gap[int(step)] = {"mean": float(d.mean()), "std": float(d.std(ddof=1)) if len(d) > 1 else 0.0, "n": len(d)}
    return seeds, gap


def _curves_by_variant(runs) -> tuple[dict, dict]:
    """Runs of a dense-vs-MoE sweep -> (dense, moe): seed -> {step: eval CE}."""
    return tuple({r["seed"]: dict(map(tuple, r["eval_curve"])) for r in runs if r["variant"] == v}
                 for v in ("dense", "moe"))


def analyse_budget(rows) -> dict:
    """The token-budget diagnosis: MoE (8 experts, top-1) minus dense eval CE at every evaluation of the runs,
    paired seed by seed at the headline size (a seed fixes the data order; eval windows are the same for all),
    and per size from the model-size sweep (the mean of the paired differences over its seeds)."""
    pts = _ok(rows, "num_experts")
    dense = {r["seed"]: dict(map(tuple, r["eval_curve"])) for r in pts if r["E"] == 1}
    moe = {r["seed"]: dict(map(tuple, r["eval_curve"])) for r in pts if r["E"] == 8}
    tokens = {r["seed"]: r["tokens_per_step"] for r in pts}
    active = next((r["params_active"] for r in pts if r["E"] == 8), None)
    seeds, gap = _paired_gap(dense, moe)
    headline = {step: dict(g, tokens=int(step * tokens[seeds[0]]),
                           tokens_per_active_param=step * tokens[seeds[0]] / active if active else None)
                for step, g in gap.items()}
    per_size, per_size_seeds = {}, {}
    sized = _ok(rows, "model_size")
    for size in sorted({r["size"] for r in sized}, key=lambda s: min(r["params_active"] for r in sized
                                                                        if r["size"] == s)):
        pairs, gap = _paired_gap(*_curves_by_variant([r for r in sized if r["size"] == size]))
        if pairs:
            per_size[size] = {step: g["mean"] for step, g in gap.items()}
            per_size_seeds[size] = pairs
    return {"headline": headline, "seeds": seeds, "per_size": per_size, "per_size_seeds": per_size_seeds}


def _layer_means(runs) -> list[float] | None:
    """Per MoE layer, the mean over `runs` of their second-half drop rates (None when a run lacks them)."""
    per = [r.get("dropped_by_layer") for r in runs]
    if not per or any(p is None for p in per) or len({len(p) for p in per}) != 1:
        return None
    return [float(v) for v in np.mean(per, axis=0)]


DROP_WINDOWS = 6  # equal parts of training over which the per-layer drop rates are averaged


def _windows_by_layer(runs, windows: int) -> list[list[float]] | None:
    """[layer][window]: the mean over `runs` and the logged steps in each of `windows` equal parts of training of
    each MoE layer's dropped fraction (None when a run lacks per-layer curves or the runs differ in layers)."""
    per_run = []
    for r in runs:
        curve = r.get("drop_curve_by_layer")
        if not curve:
            return None
        edges = np.linspace(0, r["steps"], windows + 1)
        per_run.append([[float(np.mean([d[m] for step, d in curve if lo < step <= hi] or [np.nan]))
                         for lo, hi in zip(edges[:-1], edges[1:])] for m in range(len(curve[0][1]))])
    if not per_run or len({len(p) for p in per_run}) != 1:
        return None
    return [[float(v) for v in row] for row in np.nanmean(np.array(per_run), axis=0)]


def analyse_drops(rows) -> dict:
    """Where the second-half drops happen: per MoE layer for every expert count of the expert sweep and every
    size of the model-size sweep (means over seeds), and the hash-routed runs' measured rate per expert count."""
    out = {"by_experts": {}, "by_size": {}, "hash": {}}
    moe = [r for r in _ok(rows, "num_experts") if r["E"] > 1]
    for E in sorted({r["E"] for r in moe}):
        here = [r for r in moe if r["E"] == E]
        out["by_experts"][str(E)] = {"by_layer": _layer_means(here), "mean": float(np.mean(
            [r["dropped_fraction"] for r in here])), "n": len(here)}
    sized = [r for r in _ok(rows, "model_size") if r["variant"] == "moe"]
    for size in sorted({r["size"] for r in sized}, key=lambda s: min(r["params_active"] for r in sized
                                                                      if r["size"] == s)):
        here = [r for r in sized if r["size"] == size]
        out["by_size"][size] = {"by_layer": _layer_means(here), "n": len(here), "steps": here[0]["steps"]}
    long = [r for r in _ok(rows, "train_length") if r["variant"] == "moe"]
    out["by_size_long"] = {size: {"by_layer": _layer_means([r for r in long if r["size"] == size]),
                                  "steps": next(r["steps"] for r in long if r["size"] == size),
                                  "n": sum(r["size"] == size for r in long)} for size in sorted({r["size"] for r in long})}
    # how the drops of each layer fall over training: the base configuration, every other size, the longer runs
    out["convergence"] = {}
    groups = [(f"size {moe[0]['size']}, {moe[0]['steps']} steps", [r for r in moe if r["E"] == 8])] if moe else []
    headline = moe[0]["size"] if moe else None
    groups += [(f"size {size}, {v['steps']} steps", [r for r in sized if r["size"] == size])
               for size, v in out["by_size"].items() if size != headline]
    groups += [(f"size {size}, {v['steps']} steps", [r for r in long if r["size"] == size])
               for size, v in out["by_size_long"].items()]
    for label, runs in groups:
        curve = _windows_by_layer(runs, DROP_WINDOWS)
        if curve:
            out["convergence"][label] = curve
    hashed = [r for r in _ok(rows, "routers") + _ok(rows, "shared_experts") if "_hash_" in r["name"]]
    for E in sorted({r["experts"] for r in hashed}):
        here = [r for r in hashed if r["experts"] == E]
        out["hash"][str(E)] = {"dropped_fraction": float(np.mean([r["dropped_fraction"] for r in here])),
                               "n": len({r["name"] for r in here})}
    return out


def analyse_train_length(rows) -> dict:
    """Per size of the train_length sweep: MoE - dense paired seed by seed at every evaluation of the long runs,
    beside the same pairs at the scale's steps (model-size sweep)."""
    out = {}
    long = _ok(rows, "train_length")
    short = _ok(rows, "model_size")
    for size in sorted({r["size"] for r in long}):
        dense, moe = _curves_by_variant([r for r in long if r["size"] == size])
        seeds, gap = _paired_gap(dense, moe)
        if not seeds:
            continue
        steps = list(gap)
        r0 = next(r for r in long if r["size"] == size and r["variant"] == "moe")
        curve = {step: dict(g, tokens_per_active_param=step * r0["tokens_per_step"] / r0["params_active"])
                 for step, g in gap.items()}
        ce = {(r["variant"], r["seed"]): r["final_eval_ce"] for r in short if r["size"] == size}
        base = [ce["moe", s] - ce["dense", s] for s in seeds if ("moe", s) in ce and ("dense", s) in ce]
        out[size] = {"steps": int(r0["steps"]), "seeds": seeds, "curve": curve,
                     "final": curve[steps[-1]] if steps else None,
                     "dense": float(np.mean([dense[s][steps[-1]] for s in seeds])),
                     "moe": float(np.mean([moe[s][steps[-1]] for s in seeds])),
                     "at_scale_steps": _spread(base)}
    return out


# rate_check: the comparisons the protocol judges, as (label, claim, better model, reference model)
RATE_COMPARISONS = (("G1 - dense", 1, "G1", "dense"), ("G4 - G1 (per step)", 3, "G4", "G1"),
                    ("G16 - G1 (per step)", 3, "G16", "G1"), ("G4 - G1 (equal FLOPs)", 3, "G4@flops", "G1"),
                    ("G16 - G1 (equal FLOPs)", 3, "G16@flops", "G1"), ("fine_x4 - gshard", 4, "fine_x4", "gshard"))


DEEPSEEK_ORDER = ("dense", "hash", "switch", "gshard", "fine_x4")  # fine_x4 stands for DeepSeekMoE


def deepseek_tau(means: dict, published: dict) -> float | None:
    """Kendall tau between our mean losses and DeepSeekMoE's Table 1 over DEEPSEEK_ORDER (None if one is missing)."""
    if not all(v in means for v in DEEPSEEK_ORDER):
        return None
    return float(stats.kendalltau([means[v] for v in DEEPSEEK_ORDER],
                                  [published["deepseekmoe" if v == "fine_x4" else v] for v in DEEPSEEK_ORDER])[0])


def _paired(a: dict, b: dict) -> dict | None:
    """a, b: seed -> eval CE. a - b paired seed by seed over the seeds both have (None when none)."""
    return _spread(a[s] - b[s] for s in sorted(set(a) & set(b)))


def analyse_rate_check(rows) -> dict:
    """The rate_check sweep: each variant at the higher rate beside the same configuration at the protocol's rate
    (the run of the same name without its `_lr` part, from whichever sweep trained it), and the protocol's
    comparisons (RATE_COMPARISONS) paired seed by seed at both rates."""
    runs = _ok(rows, "rate_check")
    if not runs:
        return {}
    by_name = {r["name"]: r for r in rows if r.get("status") == "ok"}
    lr = runs[0]["learning_rate"]
    high, low = {}, {}  # variant -> seed -> eval CE
    drops = {}  # (variant, rate) -> second-half dropped fractions
    for r in runs:
        high.setdefault(r["variant"], {})[r["seed"]] = r["final_eval_ce"]
        drops.setdefault((r["variant"], "high"), []).append(r.get("dropped_fraction"))
        protocol = by_name.get(r["name"].replace(f"_lr{lr:g}_", "_"))
        if protocol is not None:
            low.setdefault(r["variant"], {})[r["seed"]] = protocol["final_eval_ce"]
            drops.setdefault((r["variant"], "protocol"), []).append(protocol.get("dropped_fraction"))
    out = {"learning_rate": lr, "variants": {}, "comparisons": {}}
    for v, ce in high.items():
        out["variants"][v] = {"high": _spread(ce.values()), "protocol": _spread(low.get(v, {}).values()),
                              "change": _paired(ce, low.get(v, {})),
                              "dropped": {rate: float(np.mean(d)) for rate in ("high", "protocol")
                                          if (d := drops.get((v, rate))) and None not in d}}
    out["kendall_tau"] = {rate: deepseek_tau({v: x[rate]["mean"] for v, x in out["variants"].items() if x[rate]},
                                              DEEPSEEK_TABLE1) for rate in ("high", "protocol")}
    for label, claim, a, b in RATE_COMPARISONS:
        if a in high and b in high:
            out["comparisons"][label] = {"claim": claim, "high": _paired(high[a], high[b]),
                                         "protocol": _paired(low.get(a, {}), low.get(b, {}))}
    return out


def analyse_first_dense(rows) -> dict:
    """Per size of the first_dense sweep: its runs' second-half drops (mean over their MoE layers, and per layer)
    beside the base MoE's of the same size and seeds (the run of the same name without `_FD<n>`), and its eval CE
    minus the base MoE's and minus the dense model's, paired seed by seed."""
    by_name = {r["name"]: r for r in rows if r.get("status") == "ok"}
    out = {}
    runs = _ok(rows, "first_dense")
    for size in sorted({r["size"] for r in runs}, key=lambda s: min(r["params_active"] for r in runs
                                                                     if r["size"] == s)):
        here = [r for r in runs if r["size"] == size]
        label = f"_FD{here[0]['first_dense_layers']}_"
        base = {r["seed"]: b for r in here if (b := by_name.get(r["name"].replace(label, "_")))}
        dense = {r["seed"]: d for r in here if (d := by_name.get(f"{size}_dense_seed{r['seed']}"))}
        ce = {r["seed"]: r["final_eval_ce"] for r in here}
        out[size] = {
            "n": len(here), "steps": here[0]["steps"], "first_dense_layers": here[0]["first_dense_layers"],
            "eval_ce": _spread(ce.values()),
            "minus_base": _paired(ce, {s: b["final_eval_ce"] for s, b in base.items()}),
            "minus_dense": _paired(ce, {s: d["final_eval_ce"] for s, d in dense.items()}),
            "dropped": _spread(r["dropped_fraction"] for r in here if r.get("dropped_fraction") is not None),
            "by_layer": _layer_means(here),
            "base_dropped": _spread(b["dropped_fraction"] for b in base.values()
                                    if b.get("dropped_fraction") is not None),
            "base_by_layer": _layer_means(list(base.values())),
            "convergence": _windows_by_layer(here, DROP_WINDOWS),
            "params_total": here[0]["params_total"], "base_params_total": next(
                (b["params_total"] for b in base.values()), None),
        }
    return out


def explain_unmet(result: dict) -> dict[int, list[str]]:
    """Claim number -> sentences, for each claim `analysis.checks` found not met: the measurements of the
    diagnostic sweeps that bear on it, written from `result` (no number is typed in here)."""
    nf = result.get("noise_floor")
    unmet = {i for i, c in enumerate(result.get("checks", ()), 1) if c["pass"] is False}
    if not nf or not unmet:
        return {}
    thr = 2 * nf["std"]
    out: dict[int, list[str]] = {}
    if 1 in unmet:
        lines = out.setdefault(1, [])
        for size, v in result.get("model_size", {}).items():
            d, moe = v.get("moe_minus_dense"), v.get("moe", {})
            if d is not None and d >= -thr and moe.get("tokens_per_active_param"):
                lines.append(f"size {size} trains {moe['tokens_per_active_param']:.1f} tokens per active parameter; "
                             f"its MoE - dense {d:+.4f} is within 2 x the noise floor ({thr:.4f})")
        headline = result.get("budget", {}).get("headline", {})
        first = next((g["tokens_per_active_param"] for g in headline.values() if g["mean"] < -thr), None)
        if first:
            lines.append(f"at the headline size the MoE first leads beyond that at {first:.1f} tokens per active "
                         "parameter (budget table: its lead grows with the tokens trained)")
        for size, v in result.get("train_length", {}).items():
            if v.get("final"):
                f = v["final"]
                lines.append(f"size {size} trained {v['steps']} steps ({f['tokens_per_active_param']:.1f} tokens per "
                             f"parameter): MoE - dense {f['mean']:+.4f} (n={f['n']}), "
                             + ("beyond" if f["mean"] < -thr else "within") + " the noise")
    gains = []  # (difference, label): every granularity comparison G > 1 - G = 1 measured
    g = result.get("granularity", {})
    for size, by_g in g.get("per_step", {}).items():
        gains += [(v["mean"] - by_g["1"]["mean"], f"G = {G} per step, size {size} (n={v['n']})")
                  for G, v in by_g.items() if G != "1" and "1" in by_g]
    matched = g.get("matched_flops_runs", {})
    gains += [(v["mean"] - matched["1"]["mean"], f"G = {G} at equal FLOPs (n={v['n']})")
              for G, v in matched.items() if G != "1" and "1" in matched]
    rate = result.get("rate_check") or {}
    gains += [(c["high"]["mean"], f"{label} at learning rate {rate['learning_rate']:g} (n={c['high']['n']})")
              for label, c in rate.get("comparisons", {}).items() if c["claim"] == 3 and c.get("high")]
    if gains and unmet & {3, 6}:
        best, label = min(gains)
        text = (f"the largest gain of a finer granularity over G = 1 in any of the {len(gains)} comparisons measured "
                f"is {best:+.4f} ({label}), " + ("within" if best >= -thr else "beyond")
                + f" 2 x the noise floor ({thr:.4f}); the L(G) and joint-law exponents are fitted to differences "
                "of that size")
        for claim in sorted(unmet & {3, 6}):
            out.setdefault(claim, []).append(text)
    if 4 in unmet:
        sh = result.get("shared_experts", {}).get("by_variant", {})
        if "fine_x4" in sh and "gshard" in sh:
            diff = sh["fine_x4"]["mean"] - sh["gshard"]["mean"]
            parts = [f"fine_x4 - gshard {diff:+.4f} at the protocol's rate"]
            c = rate.get("comparisons", {}).get("fine_x4 - gshard")
            if c and c.get("high"):
                parts.append(f"{c['high']['mean']:+.4f} +- {c['high']['std']:.4f} at {rate['learning_rate']:g}")
            out.setdefault(4, []).append(", ".join(parts) + f"; the threshold is {thr:.4f}")
    if 5 in unmet:
        lines = out.setdefault(5, [])
        layers = (result.get("drops", {}).get("by_experts", {}).get("8") or {}).get("by_layer")
        if layers and len(layers) > 1:
            lines.append(f"the first MoE layer drops {layers[0]:.2%} in the second half, the others "
                         + " / ".join(f"{d:.2%}" for d in layers[1:]))
        for size, v in (result.get("first_dense") or {}).items():
            if v.get("dropped") and v.get("base_dropped"):
                lines.append(f"with the first layer dense, size {size} drops {v['dropped']['mean']:.2%} (n="
                             f"{v['dropped']['n']}) against the base MoE's {v['base_dropped']['mean']:.2%}"
                             + (f", eval CE {v['minus_base']['mean']:+.4f} against it" if v.get("minus_base") else ""))
    return {k: v for k, v in out.items() if v}
