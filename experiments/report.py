"""The generated report: results table, fits, plots and report.md for a set of sweeps.

    write_all(specs, out, scale=scale, command="python -m experiments.runner ...") -> path of report.md

Files in `out`: results.csv, results.json (rows with curves), analysis.json (every number the report
prints), the PNGs of experiments/plots.py, report.md. The report puts our values beside the
published ones and compares unit-free quantities only (signs, exponents, orderings, ratios of loss
differences, drop rates): absolute losses depend on the data, the tokenizer and the scale.

Verdicts follow fixed rules, stated in the report: a difference counts when it exceeds twice the
seed standard deviation of the base configuration ("noise floor"); a fitted sign counts when the
bootstrap 90 % interval excludes zero.
"""
from __future__ import annotations

import json
import math
import os
import platform
import time

import numpy as np
from scipy import stats

from experiments import analysis as analysis_lib
from experiments import identity_routing, plots
from experiments.collect import collect, write_table
from experiments.diagnostics import explain_unmet


def _f(x, digits=4) -> str:
    if x is None:
        return "-"
    if isinstance(x, float) and (abs(x) >= 1e5 or (x != 0 and abs(x) < 1e-3)):
        return f"{x:.3g}"
    return f"{x:.{digits}f}" if isinstance(x, float) else str(x)


def _ms(v: dict) -> str:
    return f"{v['mean']:.4f} +- {v['std']:.4f} (n={v['n']})"


def _ci(fit: dict, key: str) -> str:
    lo_hi = fit.get("intervals", {}).get(key)
    text = f"{fit['params'][key]:.4g} [{lo_hi[0]:.4g}, {lo_hi[1]:.4g}]" if lo_hi else f"{fit['params'][key]:.4g}"
    return text + (" (at the fit's bound: not determined by the data)" if key in fit.get("at_bound", ()) else "")


def _sign_verdict(fit: dict, key: str, want: int) -> str:
    lo_hi = fit.get("intervals", {}).get(key)
    value = fit["params"][key]
    if lo_hi is None:
        return "sign agrees (no interval)" if np.sign(value) == want else "sign differs (no interval)"
    if (lo_hi[0] > 0 and want > 0) or (lo_hi[1] < 0 and want < 0):
        return "reproduced (90 % interval has the published sign)"
    if (lo_hi[0] > 0 and want < 0) or (lo_hi[1] < 0 and want > 0):
        return "NOT reproduced (90 % interval has the opposite sign)"
    return "inconclusive (90 % interval contains 0)"


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in row) + " |" for row in rows]
    return out


def _noise(result) -> float | None:
    nf = result.get("noise_floor")
    return None if nf is None else nf["std"]


def _diff_verdict(diff: float, noise: float | None, want_negative: bool = True) -> str:
    if noise is None:
        return "no seed spread to judge against"
    if abs(diff) <= 2 * noise:
        return f"within noise (|{diff:+.4f}| <= 2 x {noise:.4f})"
    agrees = (diff < 0) == want_negative
    return f"{'reproduced' if agrees else 'NOT reproduced'} ({diff:+.4f} vs noise sd {noise:.4f})"


def _beyond_noise(diff: float, noise: float | None) -> str:
    """A difference no paper predicts a sign for: within or beyond twice the noise floor."""
    if noise is None:
        return "no seed spread to judge against"
    return f"{'within' if abs(diff) <= 2 * noise else 'beyond'} noise ({diff:+.4f}, 2 x {noise:.4f})"


def section_experts(result, rows) -> list[str]:
    r = result["num_experts"]
    if not r["by_E"]:
        return []
    info = {}
    for row in rows:
        if row["sweep"] == "num_experts" and row.get("status") == "ok":
            info.setdefault(str(row["E"]), row)
    lines = ["## Number of experts at equal active parameters (Switch Fig. 4; Clark et al. 2022)", ""]
    lines += _table(["E", "eval CE mean +- sd", "total params", "active params", "useful FLOPs/step",
                     "train drop rate"],
                    [[E, _ms(v), info[E]["params_total"], info[E]["params_active"], info[E]["flops_useful_per_step"],
                      info[E].get("dropped_fraction")] for E, v in r["by_E"].items()])
    lines.append("")
    if "loss_change_dense_to_max_E" in r:
        diff = r["loss_change_dense_to_max_E"]
        lines.append(f"- Published (Switch Fig. 4): {result['published']['switch_fig4']}. Ours: largest E minus "
                     f"dense = {diff:+.4f} nats; {_diff_verdict(diff, _noise(result))}.")
    if "spearman_E_vs_loss" in r:
        lines.append(f"- Rank correlation of E and mean loss (Spearman): {r['spearman_E_vs_loss']:+.2f} "
                     "(-1 = loss falls with every doubling).")
    if "clark_fit" in r:
        f = r["clark_fit"]
        pub = result["published"]["clark_table3_s_base"]
        lines += ["", f"Clark et al.'s law log10 L = a log10 N + b log10 E + c log10 N log10 E + d, fitted on "
                      f"{f['n_points']} runs (N = active non-embedding parameters; expert and model-size sweeps; "
                      "bootstrap 90 % intervals):", ""]
        lines += _table(["coefficient", "ours", "Clark Table 3 (S-BASE)", "verdict"],
                        [["a", _ci(f, "a"), "-", "-"],
                         ["b", _ci(f, "b"), f"{pub['b']}", _sign_verdict(f, "b", -1)],
                         ["c", _ci(f, "c"), f"{pub['c']}", _sign_verdict(f, "c", +1)],
                         ["d", _ci(f, "d"), "-", "-"]])
        lines.append("")
        lines.append("Clark's b, c come from log10 L with L in their units; only the signs (b < 0: experts help; "
                     "c > 0: less so as N grows) and orders of magnitude are comparable.")
        slope = r.get("clark_slope_at_headline")
        if slope and slope.get("interval"):
            pub_slope = pub["b"] + pub["c"] * math.log10(slope["N"])
            lines.append(f"b is the slope in log10 E extrapolated to N = 1 parameter; with E varied at one size it "
                         f"trades off against c. The slope the runs determine, at the headline size (N = "
                         f"{slope['N']:.3g}): b + c log10 N = {slope['slope']:+.4f} (90 % interval "
                         f"[{slope['interval'][0]:+.4f}, {slope['interval'][1]:+.4f}]); Clark's S-BASE "
                         f"coefficients give {pub_slope:+.4f} there.")
    elif "skipped" in r:
        lines.append(f"- Clark fit skipped: {r['skipped']}.")
    return lines + [""]


def section_granularity(result) -> list[str]:
    r = result["granularity"]
    if not r["per_step"]:
        return []
    pub = result["published"]["krajewski_table1"]
    lines = ["## Granularity at fixed total and active parameters (Krajewski et al. 2024)", "",
             "Per step (every G trains the same tokens):", ""]
    for size, by_G in r["per_step"].items():
        times = r["step_seconds"].get(size, {})
        t1 = times.get(next(iter(times), None))
        lines += [f"Size {size}:", ""]
        lines += _table(["G", "eval CE mean +- sd", "step time / G=1"],
                        [[G, _ms(v), (times.get(G) / t1) if (t1 and times.get(G)) else None] for G, v in by_G.items()])
        lines.append("")
    if r["fits"]:
        lines += ["Fitted L(G) = h + g G^-gamma per size (Huber on log L, L-BFGS-B from a grid; bootstrap 90 %):", ""]
        lines += _table(["size", "h", "g", "gamma", "g sign vs Krajewski (g = 2.1 > 0)"],
                        [[s, _ci(f, "h"), _ci(f, "g"), _ci(f, "gamma"), _sign_verdict(f, "g", +1)]
                         for s, f in r["fits"].items()])
        lines += ["", f"Krajewski et al.'s gamma = {pub['gamma']} (joint law, Table 1).", ""]
    for note in r["skipped"]:
        lines.append(f"- skipped: {note}")
    if r["matched_flops_runs"]:
        lines += ["", f"At matched training FLOPs (size {r.get('headline_size')}; router FLOPs counted: each G > 1 "
                      "trains fewer steps so that its total useful FLOPs equal G = 1's):", ""]
        interp = r.get("matched_interpolated", {})
        fl = interp.get("useful_flops", {}).get("by_G", {})
        sec = interp.get("seconds", {}).get("by_G", {})
        lines += _table(["G", "eval CE, FLOP-matched runs", "train CE of per-step runs at equal FLOPs",
                         "train CE of per-step runs at equal seconds"],
                        [[G, _ms(v), _ms(fl[G]) if G in fl else "-", _ms(sec[G]) if G in sec else "-"]
                         for G, v in r["matched_flops_runs"].items()])
        if "seconds" in interp:
            lines += ["", f"Equal seconds = {interp['seconds']['budget']:.3g} s of steady-state training (the "
                          "shortest run's total; median step time x steps, compilation and evaluation excluded; "
                          "times carry whatever else the machine ran meanwhile: compare them only within one "
                          "quiet sweep)."]
        by = r["matched_flops_runs"]
        keys = list(by)
        if len(keys) >= 2:
            diff = by[keys[-1]]["mean"] - by[keys[0]]["mean"]
            lines.append(f"- Largest G minus G = 1 at matched FLOPs: {diff:+.4f} nats; "
                         f"{_diff_verdict(diff, _noise(result))} (Krajewski: finer is better at matched compute "
                         "until routing cost dominates).")
    j = r["joint"]
    lines += ["", "### Joint law L(N, D, G) = c + (g / G^gamma + a) N^-alpha + b D^-beta", ""]
    if "params" in j:
        lines += [f"{j['n_points']} points; {j['note']}. RMS log residual {j['rms_log_residual']:.4f}.", ""]
        lines += _table(["coefficient", "ours [bootstrap 90 %]", "Krajewski Table 1"],
                        [[k, _ci(j, k), f"{pub[k]}"] for k in ("a", "alpha", "b", "beta", "g", "gamma", "c")])
        lines += ["", "a, b, c and g carry the units of the loss, the tokenizer and the parameter count; alpha, beta, "
                      "gamma are the comparable quantities, and only roughly at ~1e5 parameters vs their 1e8-1e9."]
    else:
        lines.append(f"- skipped: {j['skipped']}")
    st = result.get("self_test")
    if st:
        lines += ["", f"Fit self-test (points generated from known coefficients, 0.3 % noise): "
                      f"{'PASS' if st['ok'] else 'FAIL'}; joint law recovered alpha {st['joint']['fit']['alpha']:.3f} "
                      f"(true {st['joint']['true']['alpha']}), beta {st['joint']['fit']['beta']:.3f} "
                      f"({st['joint']['true']['beta']}), gamma {st['joint']['fit']['gamma']:.3f} "
                      f"({st['joint']['true']['gamma']}); granularity gamma {st['granularity']['fit']['gamma']:.3f} "
                      f"({st['granularity']['true']['gamma']}); Clark b {st['clark']['fit']['b']:.4f} "
                      f"({st['clark']['true']['b']}), c {st['clark']['fit']['c']:.4f} ({st['clark']['true']['c']})."]
    return lines + [""]


def section_model_size(result) -> list[str]:
    r = result["model_size"]
    if not r:
        return []
    lines = ["## Model size: dense vs MoE (8 experts, top-1) per size", ""]
    lines += _table(["size", "dense CE", "MoE CE", "MoE - dense (paired)", "seeds", "dense params",
                     "MoE total / active"],
                    [[s, _mean_sd(v.get("dense")), _mean_sd(v.get("moe")),
                      f"{v['moe_minus_dense']:+.4f} +- {v['moe_minus_dense_std']:.4f}" if "moe_minus_dense" in v
                      else "-", v.get("n_paired", 0), v.get("dense", {}).get("params_total"),
                      f"{v['moe']['params_total']} / {v['moe']['params_active']}" if "moe" in v else "-"]
                     for s, v in r.items()])
    return lines + ["", "Mean +- sd over seeds; MoE - dense paired seed by seed (same data order and evaluation "
                        "windows). Compare the differences with the noise floor above.", ""]


def _mean_sd(v) -> str:
    return "-" if not v else f"{v['final_eval_ce']:.4f} +- {v['std']:.4f}"


def section_shared(result) -> list[str]:
    r = result["shared_experts"]
    if not r["by_variant"]:
        return []
    pub = result["published"]["deepseekmoe_table1"]
    lines = ["## Shared and fine-grained experts (DeepSeekMoE, Dai et al. 2024)", ""]
    lines += _table(["variant", "eval CE mean +- sd", "DeepSeekMoE Table 1 (Pile loss)"],
                    [[v, _ms(m), _f(pub.get("deepseekmoe" if v == "fine_x4" else v))]
                     for v, m in r["by_variant"].items()])
    lines.append("")
    order = r.get("ordering_worst_to_best", [])
    lines.append(f"- Ours, worst to best: {' > '.join(order)}.")
    lines.append("- Published, worst to best: dense > hash > switch > gshard > deepseekmoe (fine_x4 here).")
    common = [v for v in ("dense", "hash", "switch", "gshard", "fine_x4") if v in r["by_variant"]]
    if len(common) >= 3:
        ours = [r["by_variant"][v]["mean"] for v in common]
        theirs = [pub["deepseekmoe" if v == "fine_x4" else v] for v in common]
        tau = stats.kendalltau(ours, theirs)[0]
        lines.append(f"- Kendall tau between our and the published ordering over {', '.join(common)}: {tau:+.2f} "
                     "(1 = same order).")
    ratio = r.get("ratio_gshard_to_deepseekmoe_over_dense_to_gshard")
    if ratio:
        lines.append(f"- (GShard - DeepSeekMoE) / (dense - GShard): ours {ratio['ours']:+.2f}, published "
                     f"{ratio['published']:+.2f} (unit-free: how much fine-grained + shared adds over top-2, relative "
                     "to what top-2 adds over dense).")
    return lines + [""]


def section_capacity(result) -> list[str]:
    r = result["capacity"]
    if not r:
        return []
    pub = {float(k): v for k, v in result["published"]["st_moe_drop_rate"].items()}
    lines = ["## Capacity factor and dropped tokens (Switch Table 1; ST-MoE)", ""]
    lines += _table(["train cf", "group S", "eval CE", "dropped (train, 1st half)", "dropped (train, 2nd half)",
                     "dropped (eval, cf 2.0)", "capacity C", "ST-MoE dropped"],
                    [[v["capacity_factor"], v.get("group_size") or "sequence", v["final_eval_ce"],
                      v.get("dropped_first_half"), v["dropped_fraction"], v["eval_dropped_fraction"], v["capacity"],
                      _f(pub.get(float(v["capacity_factor"])))] for v in r])
    main = [v for v in r if v.get("group_size") == max(w.get("group_size") or 0 for w in r)] or r
    ce = [v["final_eval_ce"] for v in main]
    lines += ["", f"- Published (Switch Table 1): {result['published']['switch_table1']}. Ours: eval CE spans "
                  f"{max(ce) - min(ce):.4f} nats across capacity factors "
                  f"(noise floor sd {_f(_noise(result))}; one seed per factor)."]
    return lines + [""]


def section_checks(result) -> list[str]:
    """The protocol's claims with their verdicts, computed from the table by `analysis.checks`."""
    verdict = {True: "**holds**", False: "**not met**", None: "not yet measured"}
    lines = ["## What the protocol checks", "",
             "Each line is computed from the results table (experiments/analysis.py `checks`): a loss difference "
             "counts when it exceeds twice the noise floor, a fitted sign when its 90 % interval excludes 0.", ""]
    for i, c in enumerate(result.get("checks", ()), 1):
        lines.append(f"{i}. {c['claim']}: {verdict[c['pass']]} ({c['detail']}).")
    return lines + [""]


def section_unmet(result) -> list[str]:
    """For each claim not met, the measurements beside it (diagnostics.explain_unmet, written from the numbers)."""
    why = explain_unmet(result)
    if not why:
        return []
    lines = ["## The claims not met, and what the measurements beside them say", ""]
    for claim, sentences in sorted(why.items()):
        lines.append(f"- Claim {claim}: " + "; ".join(sentences) + ".")
    return lines + [""]


def section_learning_rate(result) -> list[str]:
    r = result.get("learning_rate", {})
    if not r.get("runs"):
        return []
    lines = ["## Learning rate and warm-up (headline size, one seed)", ""]
    lines += _table(["model", "learning rate", "warm-up steps", "eval CE", "run"],
                    [[v, p["learning_rate"], p["warmup_steps"], p["final_eval_ce"], p["name"]]
                     for v, pts in r["runs"].items() for p in pts])
    lines.append("")
    for v, p in r["best"].items():
        lines.append(f"- Best for {v}: learning rate {p['learning_rate']:g}, {p['warmup_steps']} warm-up steps "
                     f"({p['final_eval_ce']:.4f}).")
    best, protocol = r["best"], r.get("protocol", {})
    if {"dense", "moe"} <= set(best) and {"dense", "moe"} <= set(protocol):
        top = max(p["learning_rate"] for pts in r["runs"].values() for p in pts)
        edge = [v for v in ("dense", "moe") if best[v]["learning_rate"] == top]
        lines.append(f"- MoE - dense: {best['moe']['final_eval_ce'] - best['dense']['final_eval_ce']:+.4f} with each at "
                     f"its best point, {protocol['moe']['final_eval_ce'] - protocol['dense']['final_eval_ce']:+.4f} at "
                     "the protocol's rate and warm-up (one seed each)."
                     + (f" The best rate of {' and '.join(edge)} is the largest tried: the optimum may lie higher."
                        if edge else ""))
    return lines + [""]


def section_budget(result) -> list[str]:
    r = result.get("budget", {})
    if not r.get("headline") and not r.get("per_size"):
        return []
    noise = _noise(result)
    lines = ["## Why the earlier 250-step protocol showed the opposite: the token budget", "",
             "MoE (8 experts, top-1) minus dense eval CE at each evaluation of the same runs, seed by seed "
             f"(seeds {r.get('seeds')}); negative = the MoE is ahead. The earlier protocol stopped at step 250 "
             "(~4 tokens per parameter).", ""]
    if r.get("headline"):
        lines += _table(["step", "tokens", "tokens per active parameter", "MoE - dense, mean +- sd"],
                        [[step, v["tokens"], v["tokens_per_active_param"], f"{v['mean']:+.4f} +- {v['std']:.4f} "
                          f"(n={v['n']})"] for step, v in r["headline"].items()])
        lines.append("")
        beyond = [int(step) for step, v in r["headline"].items() if noise is not None and v["mean"] < -2 * noise]
        lines.append(f"- First evaluation where the MoE leads by more than twice the noise floor: "
                     f"{f'step {beyond[0]}' if beyond else 'none'}.")
    for size, curve in r.get("per_size", {}).items():
        seeds = r.get("per_size_seeds", {}).get(size, [])
        lines.append(f"- Size {size} (mean over seeds {seeds}): "
                     + ", ".join(f"step {s} {d:+.4f}" for s, d in curve.items()) + ".")
    return lines + [""]


def section_train_length(result) -> list[str]:
    r = result.get("train_length", {})
    if not r:
        return []
    noise = _noise(result)
    lines = ["## Training length at a larger size (train_length sweep)", "",
             "The same dense and MoE (8 experts, top-1) models trained for more steps, cosine schedule to the longer "
             "end; MoE - dense eval CE paired seed by seed at each evaluation (negative = the MoE is ahead).", ""]
    for size, v in r.items():
        lines += [f"Size {size}, {v['steps']} steps, seeds {v['seeds']}:", ""]
        lines += _table(["step", "tokens per active parameter", "MoE - dense, mean +- sd"],
                        [[step, c["tokens_per_active_param"], f"{c['mean']:+.4f} +- {c['std']:.4f} (n={c['n']})"]
                         for step, c in v["curve"].items()])
        lines.append("")
        at = v.get("at_scale_steps")
        final = v.get("final")
        if final and at:
            lines.append(f"- Size {size}: MoE - dense {final['mean']:+.4f} +- {final['std']:.4f} after {v['steps']} "
                         f"steps (dense {v['dense']:.4f}, MoE {v['moe']:.4f}) against {at['mean']:+.4f} +- "
                         f"{at['std']:.4f} after the protocol's steps (model-size sweep, same seeds); "
                         + _diff_verdict(final["mean"], noise) + ".")
    return lines + [""]


def _spread(v: dict | None, sign: str = "+") -> str:
    """{"mean", "std", "n"} as 'mean +- sd (n=..)'; sign '+' prints the mean's sign (differences)."""
    return "-" if not v else f"{v['mean']:{sign}.4f} +- {v['std']:.4f} (n={v['n']})"


def section_rate_check(result) -> list[str]:
    r = result.get("rate_check") or {}
    if not r.get("variants"):
        return []
    noise, lr = _noise(result), r["learning_rate"]
    lines = [f"## The judged comparisons at learning rate {lr:g} (rate_check sweep)", "",
             f"The models of claims 1, 3 and 4 at the headline size trained again at {lr:g} (the learning_rate sweep's "
             "best rate), every seed; beside each, the same configuration at the protocol's rate. G4@flops and "
             "G16@flops train fewer steps, so that they spend the training FLOPs of G = 1 (router counted), as the "
             "granularity sweep's FLOP-matched runs. Differences are paired seed by seed. The verdicts above stay on "
             "the protocol's rate.", ""]
    pct = lambda x: "-" if x is None else f"{x:.2%}"
    lines += _table(["model", f"eval CE at {lr:g}", "eval CE at the protocol's rate", "change",
                     f"dropped (2nd half) at {lr:g} / protocol's rate"],
                    [[v, _spread(x["high"], ""), _spread(x["protocol"], ""), _spread(x["change"]),
                      f"{pct(x['dropped'].get('high'))} / {pct(x['dropped'].get('protocol'))}"]
                     for v, x in r["variants"].items()])
    lines += [""]
    lines += _table(["comparison (claim)", f"at {lr:g}", "at the protocol's rate", f"at {lr:g}: verdict"],
                    [[f"{label} ({c['claim']})", _spread(c["high"]), _spread(c["protocol"]),
                      _diff_verdict(c["high"]["mean"], noise) if c.get("high") else "-"]
                     for label, c in r["comparisons"].items()])
    tau = r.get("kendall_tau") or {}
    if tau.get("high") is not None:
        lines += ["", f"- Kendall tau against DeepSeekMoE's ordering (dense, hash, switch, gshard, fine_x4) at {lr:g}: "
                      f"{tau['high']:+.2f}; at the protocol's rate, the same runs' seeds: "
                      + (f"{tau['protocol']:+.2f}." if tau.get("protocol") is not None else "-.")]
    return lines + [""]


def section_first_dense(result) -> list[str]:
    r = result.get("first_dense") or {}
    if not r:
        return []
    noise = _noise(result)
    pct = lambda v: "-" if not v else f"{v['mean']:.2%} +- {v['std']:.2%}"
    layers = lambda v: "-" if not v else " / ".join(f"{d:.2%}" for d in v)
    lines = ["## The first layer dense (first_dense sweep)", "",
             "The base MoE (8 experts, top-1) with its first layer dense, as DeepSeekMoE and DeepSeek-V2/V3 build "
             "theirs: the active parameters of the base MoE less one router, one MoE layer fewer. Dropped fraction in "
             "the second half of training at capacity factor 1.25 (mean over MoE layers, then over seeds; per MoE "
             "layer, first to last) beside the base MoE of the same seeds; eval CE differences paired seed by seed. "
             "Claim 5 stays judged on the base configuration.", ""]
    lines += _table(["size", "steps", "eval CE", "minus base MoE", "minus dense", "dropped (2nd half)",
                     "per MoE layer", "base MoE dropped", "base MoE per layer"],
                    [[size, v["steps"], _spread(v["eval_ce"], ""), _spread(v["minus_base"]),
                      _spread(v["minus_dense"]), pct(v["dropped"]), layers(v["by_layer"]), pct(v["base_dropped"]),
                      layers(v["base_by_layer"])] for size, v in r.items()])
    lines.append("")
    for size, v in r.items():
        if v.get("minus_dense"):
            lines.append(f"- Size {size}, first layer dense minus dense: "
                         + _diff_verdict(v["minus_dense"]["mean"], noise) + "; minus the base MoE: "
                         + (_beyond_noise(v["minus_base"]["mean"], noise) if v.get("minus_base") else "-") + ".")
    return lines + [""]


def section_drops(result) -> list[str]:
    r = result.get("drops", {})
    ident = result.get("identity_routing") or {}
    if not r.get("by_experts") and not ident:
        return []
    lines = ["## Where the drops happen: per MoE layer, over training, and what byte tokens cost", "",
             "Dropped fraction in the second half of training at capacity factor 1.25 per MoE layer (first to last), "
             "mean over seeds:", ""]
    def row(label, v, mean=None):
        layers = v["by_layer"]
        mean = mean if mean is not None else np.mean(layers) if layers else None
        return [label, v["n"], " / ".join(f"{d:.4f}" for d in layers) if layers else "-",
                "-" if mean is None else f"{mean:.4f}"]

    rows = [row(f"E = {E}", v, v["mean"]) for E, v in r.get("by_experts", {}).items()]
    rows += [row(f"size {s}, E = 8", v) for s, v in r.get("by_size", {}).items()]
    rows += [row(f"size {s}, E = 8, {v['steps']} steps", v) for s, v in r.get("by_size_long", {}).items()]
    lines += _table(["runs", "n", "dropped per layer", "mean over layers"], rows)
    if r.get("convergence"):
        k = len(next(iter(r["convergence"].values()))[0])
        lines += ["", f"How each layer's drops fall over training (mean dropped fraction in each of {k} equal parts of "
                      "the run, over seeds):", ""]
        lines += _table(["runs", "MoE layer"] + [f"part {i + 1}" for i in range(k)],
                        [[label, m] + [f"{d:.4f}" for d in layer] for label, curve in r["convergence"].items()
                         for m, layer in enumerate(curve)])
    if ident.get("by_experts"):
        top = ", ".join(f"{t!r} {share:.1%}" for t, share in ident["top_tokens"])
        lines += ["", f"Routing by token identity on the protocol's own training batches ({ident['batches']} batches, "
                      f"{ident['tokens']} tokens; experiments/identity_routing.py). Most frequent tokens: {top}.", ""]
        lines += _table(["E", "capacity C / group S", "fewest drops of any identity router", "hash router, predicted",
                         "hash router, measured (train, 2nd half)"],
                        [[E, f"{v['capacity']} / {v['group']} = {v['capacity_share']:.4f}", v["lower_bound"], v["hash"],
                          _f(r.get("hash", {}).get(E, {}).get("dropped_fraction"))]
                         for E, v in ident["by_experts"].items()])
        lines += ["", "- The hash router routes by the token id alone; its drop rate follows from the token frequencies "
                      "and the capacity (predicted vs measured above). Subword vocabularies (the papers') have no token "
                      "near 1 / E of the text; bytes do."]
    ledgers = result.get("ledgers") or {}
    if ledgers:
        lines += ["", "From the routing ledger of each run's last evaluation (one validation batch; experiments/"
                      "identity_routing.py `ledger_identity`): the share of tokens sent to their token id's most chosen "
                      "expert (1 = routing by identity), the share of the most frequent token sent to one expert, the "
                      "busiest expert's share of the tokens (capacity allows C / S), and the drops these choices make "
                      "at the training capacity:", ""]
        lines += _table(["run", "MoE layer", "majority", "top token to one expert", "largest load",
                         "its tokens", "dropped at C"],
                        [[name, l["layer"], l["majority"], l["top_token_to_one_expert"],
                          f"{l['largest_load']:.4f} (C / S {v['capacity'] / v['group']:.4f})",
                          ", ".join((repr(chr(t)) if t < 256 else str(t)).replace("|", "\\|") + f" {p:.0%}"
                                    for t, p in l["busiest_top_tokens"]), l["dropped_at_capacity"]]
                         for name, v in ledgers.items() for l in v["layers"]])
        lines.append("")
    layered = [v["by_layer"] for v in list(r.get("by_experts", {}).values()) + list(r.get("by_size", {}).values())
               + list(r.get("by_size_long", {}).values())
               if v["by_layer"] and len(v["by_layer"]) > 1 and max(v["by_layer"]) > 0]
    if layered:
        first = sum(b[0] == max(b) for b in layered)
        lines.append(f"- The first MoE layer drops the most in {first} of the {len(layered)} rows with drops above; the "
                     f"last layer drops {np.mean([b[-1] for b in layered]):.2%} on average over those rows, the first "
                     f"{np.mean([b[0] for b in layered]):.2%}.")
    conv = r.get("convergence") or {}
    slow = [label for label, curve in conv.items() if len(curve) > 1
            and all(curve[0][w] >= max(layer[w] for layer in curve[1:]) for w in range(1, len(curve[0])))]
    if conv:
        lines.append(f"- After the first part of training the first layer drops the most of its layers in every later "
                     f"part in {len(slow)} of the {len(conv)} groups of runs of the table over training"
                     + (": its balance settles last (DeepSeekMoE 16B keeps its first layer dense because there the load "
                        "balance converges more slowly)" if len(slow) == len(conv) else "")
                     + ". A second-half average counts the settling of every layer"
                     + "".join(f"; size {size}: {np.mean(r['by_size'][size]['by_layer']):.2%} over "
                               f"{r['by_size'][size]['steps']} steps, {np.mean(v['by_layer']):.2%} over {v['steps']}"
                               for size, v in r.get("by_size_long", {}).items()
                               if v["by_layer"] and (r.get("by_size", {}).get(size) or {}).get("by_layer"))
                     + ".")
    return lines + [""]


def section_simple(result, key, title, note) -> list[str]:
    r = result[key]
    if not r:
        return []
    lines = [f"## {title}", ""]
    lines += _table(["setting", "eval CE", "dropped (train)", "load CV", "run"],
                    [[k, v["final_eval_ce"], v.get("dropped_fraction"), v.get("load_cv"), v["name"]]
                     for k, v in r.items()])
    return lines + ["", note, ""]


def render(result: dict, rows: list[dict], *, scale, command: str, plot_paths: dict, seconds: float | None) -> str:
    ok = sum(r.get("status") == "ok" for r in rows)
    unique_ok = len({r["name"] for r in rows if r.get("status") == "ok"})
    lines = [f"# MoE sweeps at scale `{scale.name}`", "",
             f"Produced by `{command}` on {time.strftime('%Y-%m-%d %H:%M')} ({platform.machine()}, "
             f"{os.cpu_count()} CPU cores, Python {platform.python_version()}).",
             f"{unique_ok} runs finished ({ok} table rows: a run two sweeps share appears in both); "
             f"{len(result['missing'])} missing." + (f" Training time, summed over runs: {seconds / 60:.1f} min."
                                                      if seconds else ""), "",
             f"Data: {scale.data['corpus']}, {scale.data['tokenizer']} tokens, sequences of {scale.data['seq_len']}, "
             f"batch {scale.data['batch_size']}. Absolute losses are cross-entropies on this corpus with this "
             "tokenizer and are not comparable with the papers' (other data, tokenizers and scales 1000x larger): "
             "the comparisons below use signs, exponents, orderings, ratios of loss differences and drop rates.",
             ""]
    nf = result.get("noise_floor")
    if nf:
        lines += [f"Noise floor: the base configuration `{nf['name_wo_seed']}` has a seed standard deviation of "
                  f"{nf['std']:.4f} nats (n={nf['n']}, mean {nf['mean']:.4f}). A difference counts when it exceeds "
                  "twice this; a fitted sign counts when its bootstrap 90 % interval excludes zero."]
        pooled = result.get("noise_floor_pooled")
        if pooled:
            changed = pooled.get("verdicts_that_change", [])
            lines += [f"Pooled over the {pooled['configurations']} configurations with more than one seed, the seed "
                      f"standard deviation is {pooled['std']:.4f} (df {pooled['df']}); judged against it instead, "
                      + (f"the verdicts of claims {', '.join(map(str, changed))} change." if changed
                         else "no verdict changes.")]
        lines += [""]
    lines += section_checks(result) + section_unmet(result) + section_learning_rate(result) + section_budget(result)
    lines += section_train_length(result) + section_rate_check(result)
    lines += section_experts(result, rows) + section_granularity(result) + section_model_size(result)
    lines += section_shared(result) + section_capacity(result) + section_drops(result)
    lines += section_first_dense(result)
    lines += section_simple(result, "routers", "Router strategies",
                            "Expert choice groups the tokens at one position across the batch (causal); its "
                            "capacity per group is in the results table (capacity, effective_cf). topk_softmax is "
                            "top-1 followed by a softmax over the one chosen logit: its combine weight is always 1, so "
                            "the router gets no gradient from the language-model loss (moe_jax warns about it).")
    lines += section_simple(result, "aux_losses", "Auxiliary-loss and z-loss coefficients",
                            "load CV: coefficient of variation over experts of the router's choices before capacity "
                            "(0 = perfectly balanced), mean over layers and the second half of training.")
    lines += ["## Figures", ""] + [f"![{k}]({os.path.basename(p)})" for k, p in plot_paths.items()] + [""]
    if result["missing"]:
        lines += ["## Missing or incomplete runs", ""] + [f"- {n}" for n in result["missing"]] + [""]
    return "\n".join(lines)


def write_all(specs, out: str, *, scale, command: str, bootstrap_n: int | None = None) -> str:
    rows = collect(specs, out)
    write_table(rows, out)
    n = bootstrap_n if bootstrap_n is not None else (10 if scale.reduced else 100)
    result = analysis_lib.analyse(rows, bootstrap_n=n)
    result["identity_routing"] = identity_routing.identity_drops(
        [s for s in specs if s.sweep == "num_experts" and s.axes.get("seed") == scale.seeds[0]])
    result["ledgers"] = identity_routing.final_ledgers(specs, out)
    with open(os.path.join(out, "analysis.json"), "w") as f:
        json.dump(result, f, indent=1)
    plot_paths = plots.plot_all(rows, result, out)
    seconds = {r["name"]: r.get("wall_seconds") for r in rows if r.get("wall_seconds")}
    text = render(result, rows, scale=scale, command=command, plot_paths=plot_paths,
                  seconds=sum(seconds.values()) if seconds else None)
    path = os.path.join(out, "report.md")
    with open(path, "w") as f:
        f.write(text)
    return path
