"""Offline language-model data: local corpora built with TFDS (array_record, no TensorFlow), packed batches.

    from moe_jax.data import DataConfig, make_lm_data
    data = make_lm_data(DataConfig(corpus="shakespeare", seq_len=256, batch_size=16, seed=0))
    batch = data.train_batch(step)   # <int32>[16, 257], a pure function of (seed, step)

TensorFlow Datasets is imported only inside `make_lm_data`, Hugging Face tokenizers only for BPE.
"""
from moe_jax.data.config import DataConfig
from moe_jax.data.lm_data import LMData
from moe_jax.data.pipeline import make_lm_data

__all__ = ["DataConfig", "LMData", "make_lm_data"]
