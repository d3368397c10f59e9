"""Local corpora as in-memory token streams: build (once) -> read array_record -> tokenize -> sample windows.

A 5 MB corpus is 5 M byte tokens (5 MB as uint8), so each split is held whole and a batch is one
fancy-index gather. BPE token streams are cached next to their tokenizer under
`data_dir/moe_jax_tokens/<config>/bpe<vocab>/`, so only the first run pays for training and encoding.
"""
from __future__ import annotations

import os
import time
from typing import Iterator, Optional

import numpy as np

from moe_jax.data import builder, sampling
from moe_jax.data.config import DataConfig
from moe_jax.data.lm_data import LMData, check_num_batches
from moe_jax.data.tokenizer import BpeTokenizer, ByteTokenizer

SPLITS = ("train", "validation")


class StreamLMData(LMData):
    """Windows of `seq_len + 1` tokens sampled from the train stream; eval windows tile the validation stream."""

    def __init__(self, cfg: DataConfig, tokenizer, tokens: dict, info: dict):
        super().__init__(cfg, tokenizer)
        self.tokens = tokens  # split -> <uint8 | uint16 | int32>[tokens of the split]
        self._info = info
        for split in SPLITS:
            if len(tokens[split]) < cfg.seq_len + 1:
                raise ValueError(
                    f"The {split} split of corpus={cfg.corpus!r} has {len(tokens[split])} tokens, fewer than "
                    f"seq_len + 1 = {cfg.seq_len + 1}; lower DataConfig.seq_len"
                    + (" or raise DataConfig.val_fraction." if split == "validation" else "."))

    def train_batch(self, step: int, rows: Optional[slice] = None) -> np.ndarray:
        train = self.tokens["train"]
        starts = sampling.train_starts(self.cfg.seed, step, len(train), self.cfg.seq_len, self.cfg.batch_size)
        return sampling.gather_windows(train, starts if rows is None else starts[rows], self.cfg.seq_len)

    def num_eval_batches(self) -> int:
        """How many full eval batches the validation split holds."""
        return (len(self.tokens["validation"]) - 1) // self.cfg.seq_len // self.cfg.batch_size

    def eval_batches(self, num_batches: Optional[int] = None) -> Iterator[np.ndarray]:
        """`num_batches` fixed batches (None: every full batch of the validation split)."""
        check_num_batches(num_batches, allow_none=True)
        if num_batches is None:
            num_batches = self.num_eval_batches()
        val, batch_size, seq_len = self.tokens["validation"], self.cfg.batch_size, self.cfg.seq_len
        starts = sampling.eval_starts(len(val), seq_len, int(num_batches) * batch_size)
        return (sampling.gather_windows(val, starts[i:i + batch_size], seq_len)
                for i in range(0, len(starts), batch_size))

    def describe(self) -> dict:
        info = dict(self._info)
        for split in SPLITS:
            info["splits"][split]["tokens"] = int(len(self.tokens[split]))
        return info


def _bpe_tokens(cfg: DataConfig, name: str, records: dict) -> tuple[BpeTokenizer, dict]:
    """Trains (or loads) the BPE tokenizer on the train records and encodes both splits, cached on disk."""
    folder = os.path.join(cfg.data_dir, "moe_jax_tokens", name.split("/")[-1], f"bpe{cfg.bpe_vocab_size}")
    tok_path = os.path.join(folder, "tokenizer.json")
    paths = {split: os.path.join(folder, f"{split}.npy") for split in SPLITS}
    with builder.file_lock(os.path.join(folder, ".lock")):
        if os.path.exists(tok_path):
            tok = BpeTokenizer.load(tok_path)
        else:
            tok = BpeTokenizer.train(records["train"], cfg.bpe_vocab_size, tok_path)
        tokens = {}
        for split, path in paths.items():
            if not os.path.exists(path):
                ids = np.concatenate(tok.encode_many(records[split])).astype(tok.stream_dtype)
                tmp = f"{path}.tmp{os.getpid()}.npy"
                np.save(tmp, ids)
                os.replace(tmp, path)
            tokens[split] = np.load(path)
    return tok, tokens


def load_local_data(cfg: DataConfig) -> StreamLMData:
    """Builds the corpus's TFDS dataset if `data_dir` has no finished build, reads it, tokenizes it."""
    import tensorflow_datasets as tfds

    t0 = time.perf_counter()
    name, built_now = builder.prepare_local(cfg.corpus, cfg.val_fraction, cfg.data_dir)
    sources = tfds.data_source(name, data_dir=cfg.data_dir, download=False)
    records = {split: builder.read_split_records(sources[split]) for split in SPLITS}
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
        tokens = {split: np.frombuffer("".join(recs).encode("utf-8"), dtype=np.uint8)
                  for split, recs in records.items()}
    else:
        tokenizer, tokens = _bpe_tokens(cfg, name, records)
    info = {
        "corpus": cfg.corpus,
        "tfds_name": name,
        "path": os.fspath(sources["train"].dataset_info.data_dir),
        "built_now": built_now,
        "tokenizer": tokenizer.name,
        "tokenizer_path": getattr(tokenizer, "path", None),
        "vocab_size": int(tokenizer.vocab_size),
        "splits": {split: {"records": len(records[split]),
                           "bytes": sum(len(r.encode("utf-8")) for r in records[split])} for split in SPLITS},
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
        "load_seconds": round(time.perf_counter() - t0, 3),
    }
    return StreamLMData(cfg, tokenizer, tokens, info)
