"""The public interface of the input pipeline: `make_lm_data(DataConfig) -> LMData`.

    data = make_lm_data(DataConfig(corpus="shakespeare", seq_len=256, batch_size=16))
    data.vocab_size                      # 256 for bytes; the trained BPE vocabulary otherwise
    batch = data.train_batch(step)       # <int32>[batch_size, seq_len + 1], a pure function of (seed, step)
    for batch in data.eval_batches(8):   # fixed validation batches, the same on every call
        ...
    data.encode("text"), data.decode(ids), data.describe()

Local corpora ('shakespeare', 'stdlib', 'synthetic') are built once into array_record files under
`data_dir` by a TFDS builder and held in memory as one token stream per split (`stream.py`);
'tfds:<name>' datasets are read record by record from a prepared TFDS dataset (`tfds_source.py`).
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


def make_lm_data(cfg: DataConfig) -> LMData:
    """Builds (first call, cached under `cfg.data_dir`) or loads the corpus and returns its `LMData`."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"make_lm_data takes a DataConfig, got {type(cfg).__name__}.")
    if cfg.is_tfds:
        from moe_jax.data.tfds_source import load_tfds_data
        return load_tfds_data(cfg)
    from moe_jax.data.stream import load_local_data
    return load_local_data(cfg)
