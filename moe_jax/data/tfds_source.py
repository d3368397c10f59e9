"""Named TFDS datasets ('tfds:lm1b', 'tfds:c4/en'...) read by random access, without TensorFlow.

The dataset must already be prepared in `data_dir` in array_record format (or `DataConfig.download=True`
on a machine with network). `tfds.load` is never used: it always needs TensorFlow. With downloads
enabled an offline machine retries for ~200 s before failing, so `download=False` is the default and
a missing dataset fails at once with the command that prepares it.

Each row of batch `step` is packed from random records drawn by `np.random.default_rng([seed, step])`:
the first record is entered at a random token (long records give many different rows), the next ones
whole, each text followed by a newline, until `seq_len + 1` tokens. Records are fetched with one
`__getitems__` per round; how many per round comes from a fixed estimate (the first records of the
train split), so a batch depends on (seed, step) only. Eval batches pack the first records of the
validation split in order.
"""
from __future__ import annotations

import glob
import math
import os
from typing import Iterator, Optional

import numpy as np

from moe_jax.data import sampling
from moe_jax.data.config import DataConfig
from moe_jax.data.lm_data import LMData, check_num_batches
from moe_jax.data.tokenizer import BpeTokenizer, ByteTokenizer

TEXT_FEATURE = "text"
RECORD_SEPARATOR = "\n"
ESTIMATE_RECORDS = 256  # records that fix the tokens-per-record estimate
BPE_TRAIN_CHARS = 50_000_000  # BPE is trained on the first 50 M characters of the train split


def _not_prepared_message(cfg: DataConfig, builder) -> str:
    return (
        f"DataConfig.corpus={cfg.corpus!r}: TFDS dataset {cfg.tfds_name!r} is not prepared in "
        f"data_dir={cfg.data_dir!r} (looked for {os.fspath(builder.data_dir)}). Prepare it on a machine with "
        f"network: `tfds build {builder.name} --data_dir {cfg.data_dir} --file_format array_record` (copy "
        "the folder here if this machine is offline), or set DataConfig(download=True) to let TFDS "
        "download and prepare it now.")


def looks_prepared(cfg: DataConfig) -> bool:
    """Whether `data_dir` holds a build of `cfg.corpus` (a `dataset_info.json` under `<name>[/<config>]/<version>`):
    a cheap existence check that imports nothing, run before any data is read (`load_tfds_data` then checks
    the build itself)."""
    name, _, version = cfg.tfds_name.partition(":")
    root = os.path.join(cfg.data_dir, *name.split("/"))
    version = version or "*"
    return bool(glob.glob(os.path.join(glob.escape(root), version, "dataset_info.json"))
                or glob.glob(os.path.join(glob.escape(root), "*", version, "dataset_info.json")))


def check_prepared(cfg: DataConfig) -> None:
    """Raises FileNotFoundError with the command that prepares the dataset, unless it `looks_prepared` or
    `cfg.download` lets TFDS prepare it."""
    if cfg.download or looks_prepared(cfg):
        return
    name = cfg.tfds_name.partition(":")[0]
    raise FileNotFoundError(
        f"config.data.corpus={cfg.corpus!r}: TFDS dataset {cfg.tfds_name!r} is not prepared in "
        f"config.data.data_dir={cfg.data_dir!r} (no dataset_info.json under {os.path.join(cfg.data_dir, name)}). "
        f"Prepare it on a machine with network: `tfds build {name} --data_dir {cfg.data_dir} --file_format "
        "array_record` (copy the folder here if this machine is offline), or set config.data.download=True.")


class RecordLMData(LMData):
    """Packed batches from random records of a prepared TFDS text dataset."""

    def __init__(self, cfg: DataConfig, tokenizer, sources: dict, eval_split: str, info: dict):
        super().__init__(cfg, tokenizer)
        self.train_source = sources["train"]
        self.eval_source = sources[eval_split]
        self._info = info
        first = _texts(self.train_source, range(min(ESTIMATE_RECORDS, len(self.train_source))))
        self.tokens_per_record = max(1.0, float(np.mean([len(t) for t in tokenizer.encode_many(first)])))
        self._eval_tokens = np.zeros((0,), np.int32)
        self._eval_next_record = 0

    @property
    def _batch_tokens(self) -> int:
        return self.cfg.batch_size * (self.cfg.seq_len + 1)

    def train_batch(self, step: int, rows: Optional[slice] = None) -> np.ndarray:
        rng = sampling.batch_rng(self.cfg.seed, step)
        # Rows are drawn in order from one generator: rows past the last one asked for are never read.
        stop = self.cfg.batch_size if rows is None else range(self.cfg.batch_size)[rows].stop
        batch = np.stack([self._packed_row(rng) for _ in range(stop)])
        return batch if rows is None else batch[rows]

    def _packed_row(self, rng: np.random.Generator) -> np.ndarray:
        """`<int32>[seq_len + 1]`: random records back to back, the first entered at a random token."""
        row_len = self.cfg.seq_len + 1
        pieces, have = [], 0
        while have < row_len:
            count = math.ceil(1.25 * (row_len - have) / self.tokens_per_record)
            indices = rng.integers(0, len(self.train_source), size=count)
            for ids in self.tokenizer.encode_many(_texts(self.train_source, indices.tolist())):
                if not pieces:
                    ids = ids[rng.integers(0, len(ids)):]
                pieces.append(ids)
                have += len(ids)
        return np.concatenate(pieces)[:row_len].astype(np.int32)

    def eval_batches(self, num_batches: int) -> Iterator[np.ndarray]:
        """The first `num_batches * batch_size * (seq_len + 1)` tokens of the validation records, in order."""
        check_num_batches(num_batches, allow_none=False)
        need = int(num_batches) * self._batch_tokens
        while len(self._eval_tokens) < need:
            if self._eval_next_record >= len(self.eval_source):
                raise ValueError(
                    f"eval_batches({num_batches}): the validation split holds fewer than {need} tokens; "
                    "ask for fewer batches.")
            stop = min(self._eval_next_record + 1024, len(self.eval_source))
            ids = self.tokenizer.encode_many(_texts(self.eval_source, range(self._eval_next_record, stop)))
            self._eval_tokens = np.concatenate([self._eval_tokens, *ids]).astype(np.int32)
            self._eval_next_record = stop
        tokens = self._eval_tokens[:need].reshape(int(num_batches), self.cfg.batch_size, self.cfg.seq_len + 1)
        return iter(list(tokens))

    def describe(self) -> dict:
        return dict(self._info, tokens_per_record_estimate=self.tokens_per_record)


def _texts(source, indices) -> list[str]:
    records = source.__getitems__(list(indices))
    return [r[TEXT_FEATURE].decode("utf-8") + RECORD_SEPARATOR for r in records]


def load_tfds_data(cfg: DataConfig) -> RecordLMData:
    import tensorflow_datasets as tfds

    from moe_jax.data import builder as _  # noqa: F401  registers moe_jax_text, so its builds read by name too

    try:
        builder = tfds.builder(cfg.tfds_name, data_dir=cfg.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(
            f"DataConfig.corpus={cfg.corpus!r}: TFDS knows no dataset {cfg.tfds_name!r}; check the name "
            "(e.g. 'tfds:lm1b', 'tfds:c4/en') or use a local corpus.") from None
    if not cfg.download and not builder.is_prepared():
        raise FileNotFoundError(_not_prepared_message(cfg, builder))
    features = builder.info.features
    if TEXT_FEATURE not in features:
        raise ValueError(
            f"DataConfig.corpus={cfg.corpus!r} has features {list(features)}; the LM pipeline reads a "
            f"{TEXT_FEATURE!r} text feature. Choose a text dataset.")
    try:
        sources = tfds.data_source(cfg.tfds_name, data_dir=cfg.data_dir, download=cfg.download)
    except NotImplementedError as e:
        raise ValueError(
            f"DataConfig.corpus={cfg.corpus!r} is prepared in {os.fspath(builder.data_dir)} in a format "
            "without random access (tfrecord needs TensorFlow). Rebuild it with `tfds build "
            f"{builder.name} --data_dir {cfg.data_dir} --file_format array_record`.") from e
    eval_split = next((s for s in ("validation", "test") if s in sources), None)
    if "train" not in sources or eval_split is None:
        raise ValueError(
            f"DataConfig.corpus={cfg.corpus!r} has splits {list(sources)}; the LM pipeline needs 'train' "
            "and 'validation' (or 'test').")
    if cfg.tokenizer == "byte":
        tokenizer = ByteTokenizer()
    else:
        safe = cfg.tfds_name.replace("/", "_").replace(":", "_")
        path = os.path.join(cfg.data_dir, "moe_jax_tokens", f"tfds_{safe}", f"bpe{cfg.bpe_vocab_size}",
                            "tokenizer.json")
        if os.path.exists(path):
            tokenizer = BpeTokenizer.load(path)
        else:
            tokenizer = BpeTokenizer.train(_leading_texts(sources["train"], BPE_TRAIN_CHARS),
                                           cfg.bpe_vocab_size, path)
    info = {
        "corpus": cfg.corpus,
        "tfds_name": cfg.tfds_name,
        "path": os.fspath(builder.data_dir),
        "tokenizer": tokenizer.name,
        "tokenizer_path": getattr(tokenizer, "path", None),
        "vocab_size": int(tokenizer.vocab_size),
        "eval_split": eval_split,
        "splits": {split: {"records": len(sources[split]),
                           "bytes": int(builder.info.splits[split].num_bytes)} for split in ("train", eval_split)},
        "seq_len": cfg.seq_len,
        "batch_size": cfg.batch_size,
        "seed": cfg.seed,
    }
    return RecordLMData(cfg, tokenizer, sources, eval_split, info)


def _leading_texts(source, max_chars: int) -> Iterator[str]:
    seen, start = 0, 0
    while seen < max_chars and start < len(source):
        stop = min(start + 1024, len(source))
        for text in _texts(source, range(start, stop)):
            seen += len(text)
            yield text
        start = stop
