"""Tokenizers: UTF-8 bytes (vocab 256, no file) and byte-level BPE trained locally (Hugging Face `tokenizers`).

Both map `str -> <int32>[tokens]` and back. The BPE model is GPT-2's byte-level scheme (Radford et al. 2019):
the 256 byte symbols are the initial alphabet, so every string encodes and `decode(encode(s)) == s`.
`tokenizers` is optional and imported only when `DataConfig.tokenizer='bpe'`.
"""
from __future__ import annotations

import os
from typing import Iterable, Sequence

import numpy as np

BPE_PIP = "pip install tokenizers==0.23.3"


class ByteTokenizer:
    """Token = one UTF-8 byte. `decode` replaces bytes that do not form valid UTF-8 (a window cut mid-character)."""

    name = "byte"
    vocab_size = 256
    stream_dtype = np.uint8

    def encode(self, text: str) -> np.ndarray:
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() > 255):
            raise ValueError(f"Byte tokens must lie in [0, 255]; got values in [{ids.min()}, {ids.max()}].")
        return ids.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _hf_tokenizers():
    try:
        import tokenizers
    except ImportError:
        raise ModuleNotFoundError(
            f"DataConfig.tokenizer='bpe' needs Hugging Face tokenizers: `{BPE_PIP}`, "
            "or set tokenizer='byte'.") from None
    return tokenizers


class BpeTokenizer:
    """Byte-level BPE, trained on the training split and saved as `tokenizer.json`."""

    name = "bpe"

    def __init__(self, hf_tokenizer, path: str):
        self._tok = hf_tokenizer
        self.path = path
        self.vocab_size = hf_tokenizer.get_vocab_size()
        self.stream_dtype = np.uint16 if self.vocab_size <= 2**16 else np.int32

    @classmethod
    def load(cls, path: str) -> "BpeTokenizer":
        return cls(_hf_tokenizers().Tokenizer.from_file(path), path)

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int, path: str) -> "BpeTokenizer":
        """Trains on `texts` (strings of any length) and writes `path` atomically."""
        tk = _hf_tokenizers()
        tok = tk.Tokenizer(tk.models.BPE())
        tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = tk.decoders.ByteLevel()
        trainer = tk.trainers.BpeTrainer(
            vocab_size=vocab_size, initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
        tok.train_from_iterator(texts, trainer)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.tmp{os.getpid()}"
        tok.save(tmp)
        os.replace(tmp, path)
        return cls(tok, path)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text).ids, dtype=np.int32)

    def encode_many(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, dtype=np.int32) for e in self._tok.encode_batch(list(texts))]

    def decode(self, ids) -> str:
        ids = np.asarray(ids)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(
                f"BPE tokens must lie in [0, {self.vocab_size - 1}]; got values in [{ids.min()}, {ids.max()}].")
        return self._tok.decode(ids.astype(np.int64).tolist())
