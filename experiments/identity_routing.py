"""What routing by token identity costs in dropped tokens on the scale's own training batches.

A router whose choice depends on the token id alone sends every occurrence of a token to one expert.
With byte tokens the frequencies are far from uniform (on the plays a space is 15 % of all bytes,
against 1 / E of the tokens per expert that capacity factor 1 allows), so such a router overflows
whatever it learns. Two figures per expert count of the expert sweep, over training batches drawn
exactly as the runs draw them (same groups, same capacity C):

  lower_bound  sum over token ids of max(0, n_id - C) / S per group: the fewest tokens any identity
               router must drop (an expert holding id t holds at least its n_t occurrences)
  hash         the drops of the hash router (`moe_jax.routing.hash_choices`), an identity router: a
               prediction of the hash runs' measured drop rate from the data alone

A learned router sees more than the id (the attention output added to the residual), least so in the
first MoE layer, whose input is the token embedding plus one attention block.

    identity_drops(specs, num_batches=100) -> {"top_tokens": [[text, share], ...], "by_experts": {E: {...}}}

How close a trained router is to an identity router, from a routing ledger (moe_jax.ledger, written at each
evaluation; top-1 routers):

    ledger_identity(ledger, capacity=C, group=S) -> per MoE layer {majority, top_token_to_one_expert,
                                                                  largest_load, dropped_at_capacity}
  majority                  share of tokens routed to the expert their token id goes to most often (1 for
                            an identity router)
  top_token_to_one_expert   share of the most frequent token's occurrences that go to its most chosen expert
  largest_load              the busiest expert's share of the tokens (capacity allows C / S)
  busiest_top_tokens        [[token id, share of the busiest expert's tokens], ...], its 3 most frequent ids
  dropped_at_capacity       the drops these choices make at capacity C per group of S tokens
"""
from __future__ import annotations

import os

import numpy as np

from experiments.spec import RunSpec, workdir_of
from moe_jax.data.pipeline import make_lm_data
from moe_jax.ledger import Ledger, ledger_path
from moe_jax.routing import hash_choices
from moe_jax.train.run_config import build_run_config


def _overflow(counts_GX: np.ndarray, capacity: int, group: int) -> float:
    """Mean over groups of sum_x max(0, count - C) / S."""
    return float(np.maximum(counts_GX - capacity, 0).sum(axis=1).mean() / group)


def identity_drops(specs: list[RunSpec], *, num_batches: int = 100, top: int = 5) -> dict:
    """specs: token-choice MoE runs (one per expert count) sharing data and batch shape; returns the token
    shares and, per expert count, the capacity, the identity lower bound and the hash router's drop rate."""
    runs = [build_run_config(s.config) for s in specs]
    runs = [r for r in runs if r.model.moe is not None and r.model.moe.capacity_factor is not None]
    if not runs:
        return {}
    data = make_lm_data(runs[0].data)
    steps = runs[0].train.steps
    picked = np.unique(np.linspace(0, steps - 1, min(num_batches, steps)).astype(int))
    tokens = np.stack([data.train_batch(int(step))[:, :-1].reshape(-1) for step in picked])  # inputs of each step
    ids, counts = np.unique(tokens, return_counts=True)
    order = np.argsort(-counts)[:top]
    out = {"batches": len(picked), "tokens": int(tokens.size),
           "top_tokens": [[data.decode(np.array([ids[i]])), float(counts[i] / tokens.size)] for i in order],
           "by_experts": {}}
    vocab = int(max(ids.max() + 1, data.vocab_size))
    for run in runs:
        moe = run.model.moe
        S = moe.tokens_per_group(run.data.batch_size, run.data.seq_len)
        if tokens.shape[1] % S:
            continue
        E, C = moe.num_routed_experts, moe.capacity(S, True)
        groups = tokens.reshape(-1, S)
        per_id = np.stack([np.bincount(g, minlength=vocab) for g in groups])
        expert_GS = np.asarray(hash_choices(groups, E, 1)[0])[..., 0]
        per_expert = np.stack([np.bincount(g, minlength=E) for g in expert_GS])
        out["by_experts"][str(E)] = {"group": S, "capacity": C, "capacity_share": C / S,
                                     "lower_bound": _overflow(per_id, C, S), "hash": _overflow(per_expert, C, S)}
    return out


def ledger_identity(ledger: Ledger, *, capacity: int, group: int) -> list[dict]:
    """Per MoE layer of a top-1 ledger: how much of its routing the token id explains, and its load and drops."""
    if ledger.k != 1:
        raise ValueError(f"ledger_identity reads top-1 ledgers; this one has k={ledger.k}.")
    if ledger.num_tokens % group:
        raise ValueError(f"ledger of {ledger.num_tokens} tokens does not split into groups of {group}.")
    tokens = ledger.tokens.reshape(-1)
    top = np.bincount(tokens).argmax()
    out = []
    for m in range(ledger.num_layers):
        expert = ledger.expert[m][:, 0]
        counts = np.zeros((ledger.num_experts, int(tokens.max()) + 1), np.int64)
        np.add.at(counts, (expert, tokens), 1)
        per_group = np.stack([np.bincount(g, minlength=ledger.num_experts) for g in expert.reshape(-1, group)])
        busiest = counts.sum(axis=1).argmax()
        top_ids = np.argsort(-counts[busiest], kind="stable")[:3]
        out.append({"layer": int(ledger.layers[m]),
                    "busiest_top_tokens": [[int(t), float(counts[busiest, t] / counts[busiest].sum())]
                                           for t in top_ids if counts[busiest, t]],
                    "majority": float(counts.max(axis=0).sum() / tokens.size),
                    "top_token_to_one_expert": float(counts[:, top].max() / counts[:, top].sum()),
                    "largest_load": float(counts.sum(axis=1).max() / tokens.size),
                    "dropped_at_capacity": _overflow(per_group, capacity, group)})
    return out


def final_ledgers(specs: list[RunSpec], out: str) -> dict:
    """run name -> {"step", "capacity", "group", "layers": ledger_identity(...)} for every top-1 token-choice run of
    `specs` whose workdir holds the ledger of its last step (the results keep that one ledger per run)."""
    found = {}
    for spec in specs:
        path = ledger_path(workdir_of(out, spec.name), spec.steps)
        if spec.name in found or not os.path.exists(path):
            continue
        run = build_run_config(spec.config)
        moe = run.model.moe
        if moe is None or moe.top_k != 1 or moe.router != "top_k" or moe.capacity_factor is None:
            continue
        S = moe.tokens_per_group(run.data.batch_size, run.data.seq_len)
        C = moe.capacity(S, True)
        found[spec.name] = {"step": spec.steps, "capacity": C, "group": S,
                            "layers": ledger_identity(Ledger.load(path), capacity=C, group=S)}
    return found
