"""Where packed windows start in a token stream: a pure function of (seed, step) for training, fixed for eval.

A training window is `seq_len + 1` consecutive tokens (inputs and the targets shifted by one) starting
anywhere in the stream, drawn by a counter-based generator `np.random.default_rng([seed, step])`: batch
`step` needs no state from earlier steps, so a resumed run gets exactly the batches an uninterrupted
run got. Evaluation windows tile the validation stream without overlap (consecutive windows share
one token, so every validation token is a target at most once), spread evenly over the whole split.
"""
from __future__ import annotations

import numpy as np


def check_step(step) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
        raise ValueError(f"train_batch(step={step!r}): step must be an int >= 0.")
    return int(step)


def batch_rng(seed: int, step: int) -> np.random.Generator:
    """The generator of batch `step`: PCG64 seeded with the entropy pair (seed, step)."""
    return np.random.default_rng([seed, check_step(step)])


def train_starts(seed: int, step: int, num_tokens: int, seq_len: int, batch_size: int) -> np.ndarray:
    """`<int64>[batch_size]` window starts, uniform over all `num_tokens - seq_len` valid positions."""
    num_starts = num_tokens - seq_len
    if num_starts < 1:
        raise ValueError(
            f"The training split has {num_tokens} tokens, too few for one window of seq_len + 1 = "
            f"{seq_len + 1}; lower DataConfig.seq_len or use a larger corpus.")
    return batch_rng(seed, step).integers(0, num_starts, size=batch_size, dtype=np.int64)


def eval_starts(num_tokens: int, seq_len: int, num_windows: int) -> np.ndarray:
    """`<int64>[num_windows]` starts of non-overlapping windows spread evenly over the stream."""
    available = (num_tokens - 1) // seq_len  # window j covers tokens [j L, j L + L]
    if num_windows > available:
        raise ValueError(
            f"Asked for {num_windows} eval windows of seq_len + 1 = {seq_len + 1} tokens, but the "
            f"validation split ({num_tokens} tokens) holds {available}; ask for fewer eval batches, "
            "lower DataConfig.seq_len, or raise DataConfig.val_fraction.")
    return (np.arange(num_windows, dtype=np.int64) * available // num_windows) * seq_len


def gather_windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    """`<int32>[len(starts), seq_len + 1]`: `tokens[s : s + seq_len + 1]` for each start `s`."""
    return tokens[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)
