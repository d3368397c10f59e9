"""`LMData`: what every source of packed language-model batches provides (the pipeline's return type).

Subclasses: `stream.StreamLMData` (local corpora held as token streams) and `tfds_source.RecordLMData`
(named TFDS datasets read by record); `pipeline.make_lm_data` picks one.
"""
from __future__ import annotations

import abc
from typing import Iterator, Optional

import numpy as np

from moe_jax.data.config import DataConfig


class LMData(abc.ABC):
    """Packed language-model batches from one corpus and tokenizer."""

    def __init__(self, cfg: DataConfig, tokenizer):
        self.cfg = cfg
        self.tokenizer = tokenizer

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.vocab_size)

    def encode(self, text: str) -> np.ndarray:
        """`<int32>[N]` token ids of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}.")
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        """The text of token ids (any int array); invalid UTF-8 from a cut window decodes as U+FFFD."""
        return self.tokenizer.decode(ids)

    @abc.abstractmethod
    def train_batch(self, step: int, rows: Optional[slice] = None) -> np.ndarray:
        """`<int32>[batch_size, seq_len + 1]` for training step `step`; depends only on (seed, step).
        rows: only these rows, equal to `train_batch(step)[rows]` (one host's share of a multi-host batch)."""

    @abc.abstractmethod
    def eval_batches(self, num_batches: Optional[int]) -> Iterator[np.ndarray]:
        """`num_batches` fixed `<int32>[batch_size, seq_len + 1]` validation batches."""

    @abc.abstractmethod
    def describe(self) -> dict:
        """Corpus name, bytes/tokens per split, tokenizer, and where the data lives."""


def check_num_batches(num_batches, *, allow_none: bool) -> None:
    if num_batches is None and allow_none:
        return
    if isinstance(num_batches, bool) or not isinstance(num_batches, (int, np.integer)) or num_batches < 1:
        extra = " (or None for the whole validation split)" if allow_none else ""
        raise ValueError(f"eval_batches(num_batches={num_batches!r}): give an int >= 1{extra}.")
