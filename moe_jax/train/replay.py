"""Training on a routing ledger (`config.train.replay_ledger`): fine-tuning on recorded traffic with its routing.

    ledger = load_replay_ledger(run)                       # validated against the run, before anything compiles
    batch_BL1, experts = replay_batch(ledger, step, run.data.batch_size)
    state, metrics = train_step(state, batch_BL1, key, experts)   # make_train_step(..., replay=True)

A ledger (moe_jax.ledger) holds N fixed evaluation sequences and every MoE layer's token choices on them. A
run with `replay_ledger` set trains on exactly that traffic: step s takes the ledger's sequences
[(s mod n) B, (s mod n + 1) B), n = N / B (B = config.data.batch_size), as its batch (inputs and targets, the
recorded eval batch rebuilt with `next_token`), and every MoE layer of the model (not the MTP modules, which
route themselves) uses the recorded experts instead of its router's picks. The router still weighs the
recorded experts itself (`replay_choices(weights=False)`), so it trains through them, and it still computes
its balance and z losses, its metrics and the correction-bias update from those choices. Capacity is the
training capacity factor's: a choice the eval capacity kept may drop here, and the other way round. With the
model's own ledger of the current parameters and nothing dropped, a step equals the normal step on that
batch. Evaluation, the ledgers written at evaluations and the alarms are those of a normal run.
"""
from __future__ import annotations

import numpy as np

from moe_jax import ledger as ledger_lib

FIELD = "config.train.replay_ledger"


def load_replay_ledger(run) -> ledger_lib.Ledger:
    """The ledger of `run.train.replay_ledger`, checked against the run's model and data (ValueError naming
    the field and what to change)."""
    path = run.train.replay_ledger
    try:
        ledger = ledger_lib.Ledger.load(path)
    except FileNotFoundError:
        raise ValueError(f"{FIELD}={path!r} does not exist: give the path of a routing ledger .npz (written to "
                         f"<workdir>/{ledger_lib.LEDGER_DIR}/step_<step>.npz at each evaluation, or by `python -m "
                         "experiments.ledger record --workdir=...`), or set it to None.") from None
    except ValueError as e:
        raise ValueError(f"{FIELD}={path!r}: {e} Give a ledger .npz written by moe_jax.") from None
    check_replay_ledger(run, ledger, path)
    return ledger


def check_replay_ledger(run, ledger: ledger_lib.Ledger, path: str = "") -> None:
    model, data, train = run.model, run.data, run.train
    where = f"{FIELD}={path!r}"
    why_not = ledger_lib.check_recordable(model)
    if why_not:
        raise ValueError(f"{where}: this model cannot replay a routing ledger ({why_not}); replay needs "
                         "token-choice routers (router='top_k' or 'hash'). Set it to None.")
    moe = model.moe
    layers = list(model.moe_layer_indices)
    problems = []
    if ledger.layers.tolist() != layers:
        problems.append(f"its MoE layers are {ledger.layers.tolist()}, the model's {layers}")
    if ledger.num_experts != moe.num_routed_experts:
        problems.append(f"it routes to {ledger.num_experts} experts, the model to {moe.num_routed_experts}")
    if ledger.k != moe.top_k:
        problems.append(f"it records k={ledger.k} choices per token, the model makes {moe.top_k}")
    if problems:
        raise ValueError(f"{where} was recorded with another model: {'; '.join(problems)}. Record a ledger with "
                         "this model config (`python -m experiments.ledger record --workdir=<a run of it>`).")
    N, L = ledger.tokens.shape
    if L != data.seq_len:
        raise ValueError(f"{where} holds sequences of {L} tokens, but config.data.seq_len={data.seq_len}: set "
                         f"config.data.seq_len={L} or record the ledger on this run's data.")
    if N % data.batch_size:
        raise ValueError(f"{where} holds {N} sequences, which config.data.batch_size={data.batch_size} does not "
                         f"divide: set batch_size to a divisor of {N} (e.g. {ledger.batch_size}, the batch it was "
                         "recorded with) or record more ledger batches.")
    if ledger.next_token is None:
        raise ValueError(f"{where} has no next_token (it was written before ledgers recorded it), so its batches "
                         "cannot be rebuilt: record it again (`python -m experiments.ledger record`).")
    if max(int(ledger.tokens.max(initial=0)), int(ledger.next_token.max(initial=0))) >= model.vocab_size:
        raise ValueError(f"{where} holds token ids >= config.model.vocab_size={model.vocab_size}: record it with "
                         "this run's tokenizer and vocabulary.")
    if train.microbatches != 1:
        raise ValueError(f"{where} with config.train.microbatches={train.microbatches}: replayed training runs "
                         "whole batches; set microbatches=1.")


def replay_batch(ledger: ledger_lib.Ledger, step: int, batch_size: int) -> tuple[np.ndarray, tuple]:
    """(batch <int32>[B, L + 1], per MoE layer the recorded experts <int32>[B, L, K]) of training step `step`:
    the ledger's sequences [(step mod n) B, (step mod n + 1) B), n = N / B."""
    n = ledger.tokens.shape[0] // batch_size
    start = (step % n) * batch_size
    rows = slice(start, start + batch_size)
    N, L = ledger.tokens.shape
    M, _, K = ledger.expert.shape
    expert_MNLK = ledger.expert.reshape(M, N, L, K)
    return ledger_lib.ledger_batch(ledger, rows), tuple(expert_MNLK[m, rows].astype(np.int32) for m in range(M))
