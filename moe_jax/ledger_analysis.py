"""Analyses of routing ledgers (moe_jax.ledger), in numpy: functions a notebook or a command calls.

    saturation(a, b)            per layer, the fraction of tokens whose top-k expert set is the same in both
                                (OLMoE, Muennighoff et al. 2024, Sec. 5: "router saturation" between checkpoints)
    diff(a, b)                  where two ledgers' decisions differ: per layer fractions, the first tokens
    coactivation(l, m)          <int64>[E, E] tokens routed to both experts (diagonal: to the expert)
    specialisation(l, m, V)     per expert: counts of the token ids it takes and the entropy of that distribution
    load_summary(l)             per layer: routed and served load, drops, load CV, dead experts, min score
Layers are addressed by position m in the ledger (0 .. M-1; `Ledger.position(block_index)` converts).
"""
from __future__ import annotations

import numpy as np

from moe_jax.ledger import Ledger


def _check_same_tokens(a: Ledger, b: Ledger) -> None:
    if a.tokens.shape != b.tokens.shape or not np.array_equal(a.tokens, b.tokens):
        raise ValueError("the two ledgers were recorded on different tokens: compare ledgers of the same run's "
                         "evaluation tokens (same data config and ledger batches).")
    if a.expert.shape != b.expert.shape or not np.array_equal(a.layers, b.layers):
        raise ValueError(f"the two ledgers have different MoE layers or k: {a.layers.tolist()} x k={a.k} vs "
                         f"{b.layers.tolist()} x k={b.k}.")


def topk_sets(expert_MTK: np.ndarray) -> np.ndarray:
    """The expert ids of each token sorted ascending (its top-k set, order ignored)."""
    return np.sort(expert_MTK, axis=-1)


def saturation(a: Ledger, b: Ledger) -> np.ndarray:
    """<float64>[M]: per layer, the fraction of tokens whose set of k chosen experts is the same in `a` and `b`
    (the order of the k choices and their weights ignored; drops ignored: they are capacity, not routing)."""
    _check_same_tokens(a, b)
    same_MT = np.all(topk_sets(a.expert) == topk_sets(b.expert), axis=-1)
    return same_MT.mean(axis=1)


def diff(a: Ledger, b: Ledger, *, first: int = 10) -> list[dict]:
    """Per layer, where the decisions of `b` differ from `a`'s:
        changed_choices   fraction of (token, k) choices with a different expert (order matters)
        changed_sets      fraction of tokens with a different top-k set (1 - saturation)
        changed_drops     fraction of (token, k) choices dropped in one ledger and not the other
        changed_tokens    fraction of tokens with any of the above
        weight_max_abs    the largest |weight difference| over choices with the same expert
        first_tokens      up to `first` (sequence, position) pairs of the first changed tokens, in order
    Identical ledgers give zeros and no tokens."""
    _check_same_tokens(a, b)
    N, L = a.tokens.shape
    out = []
    for m in range(a.num_layers):
        choice_TK = a.expert[m] != b.expert[m]
        set_T = np.any(topk_sets(a.expert[m]) != topk_sets(b.expert[m]), axis=-1)
        drop_TK = a.dropped[m] != b.dropped[m]
        token_T = choice_TK.any(-1) | set_T | drop_TK.any(-1)
        same = ~choice_TK
        wdiff = np.abs(a.weight[m] - b.weight[m])[same]
        changed = np.flatnonzero(token_T)[:first]
        out.append({
            "layer": int(a.layers[m]),
            "changed_choices": float(choice_TK.mean()),
            "changed_sets": float(set_T.mean()),
            "changed_drops": float(drop_TK.mean()),
            "changed_tokens": float(token_T.mean()),
            "weight_max_abs": float(wdiff.max()) if wdiff.size else 0.0,
            "first_tokens": [(int(t // L), int(t % L)) for t in changed],
        })
    return out


def coactivation(ledger: Ledger, m: int, *, served_only: bool = False) -> np.ndarray:
    """<int64>[E, E]: entry (i, j), i != j, counts the tokens that chose both experts i and j; the diagonal
    counts the tokens that chose expert i. served_only: count only choices that were not dropped."""
    E = ledger.num_experts
    onehot_TKE = ledger.expert[m][..., None] == np.arange(E)
    if served_only:
        onehot_TKE = onehot_TKE & ~ledger.dropped[m][..., None]
    chose_TE = onehot_TKE.any(axis=1).astype(np.int64)
    return chose_TE.T @ chose_TE


def specialisation(ledger: Ledger, m: int, vocab_size: int) -> dict:
    """Which token ids each expert takes in layer position m (every choice counts once, dropped or not):
        counts   <int64>[E, V]  choices of expert e made by tokens of id v
        entropy  <float64>[E]   entropy (nats) of each expert's token-id distribution (0: one id only;
                                log V: uniform; NaN: an expert no token chose)
        top      per expert, up to 5 (token id, share of the expert's choices), largest first
    """
    E = ledger.num_experts
    ids_TK = np.broadcast_to(ledger.tokens.reshape(-1, 1), ledger.expert[m].shape)
    if ids_TK.size and (ids_TK.max() >= vocab_size or ids_TK.min() < 0):
        raise ValueError(f"specialisation: token ids reach {int(ids_TK.max())}, outside vocab_size={vocab_size}.")
    counts = np.zeros((E, vocab_size), np.int64)
    np.add.at(counts, (ledger.expert[m].reshape(-1), ids_TK.reshape(-1)), 1)
    totals = counts.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = counts / totals
        entropy = -np.sum(np.where(counts > 0, p * np.log(np.where(counts > 0, p, 1.0)), 0.0), axis=1)
    entropy = np.where(totals[:, 0] > 0, entropy, np.nan)
    top = []
    for e in range(E):
        order = np.argsort(-counts[e], kind="stable")[:5]
        top.append([(int(v), float(p[e, v])) for v in order if counts[e, v] > 0])
    return {"counts": counts, "entropy": entropy, "top": top}


def load_summary(ledger: Ledger) -> list[dict]:
    """Per layer: routed [E] (choices per expert), served [E] (not dropped), share [E] (routed / all choices),
    dropped_fraction, dropped_fraction_per_k [K], load_cv (std / mean of routed), dead_experts (served 0),
    min_score (smallest raw router score of a chosen expert)."""
    E = ledger.num_experts
    out = []
    for m in range(ledger.num_layers):
        expert, dropped = ledger.expert[m].reshape(-1), ledger.dropped[m].reshape(-1)
        routed = np.bincount(expert, minlength=E)
        served = np.bincount(expert[~dropped], minlength=E)
        out.append({
            "layer": int(ledger.layers[m]),
            "routed": routed,
            "served": served,
            "share": routed / max(routed.sum(), 1),
            "dropped_fraction": float(ledger.dropped[m].mean()),
            "dropped_fraction_per_k": ledger.dropped[m].mean(axis=0),
            "load_cv": float(routed.std() / max(routed.mean(), 1e-9)),
            "dead_experts": int(np.sum(served == 0)),
            "min_score": float(ledger.score[m].min()),
        })
    return out


def format_summary(ledger: Ledger) -> str:
    lines = [f"ledger: step {ledger.step}, {ledger.num_tokens} tokens, {ledger.num_layers} MoE layers, "
             f"E={ledger.num_experts}, k={ledger.k}"]
    for s in load_summary(ledger):
        lines.append(f"layer {s['layer']}: dropped {s['dropped_fraction']:.3f}, load CV {s['load_cv']:.3f}, "
                     f"dead {s['dead_experts']}, min score {s['min_score']:.3g}; share "
                     + " ".join(f"{x:.2f}" for x in s["share"]))
    return "\n".join(lines)


def format_diff(a: Ledger, b: Ledger) -> str:
    sat = saturation(a, b)
    lines = [f"compare step {a.step} -> step {b.step} ({a.num_tokens} tokens)"]
    for s, row in zip(sat, diff(a, b)):
        lines.append(f"layer {row['layer']}: saturation {s:.3f}; changed choices {row['changed_choices']:.3f}, "
                     f"drops {row['changed_drops']:.3f}, tokens {row['changed_tokens']:.3f}, "
                     f"max |dweight| {row['weight_max_abs']:.3g}; first changed (seq, pos) {row['first_tokens'][:5]}")
    return "\n".join(lines)
