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

from moe_jax.data.config import DataConfig
from moe_jax.data.lm_data import LMData


def make_lm_data(cfg: DataConfig) -> LMData:
    """Builds (first call, cached under `cfg.data_dir`) or loads the corpus and returns its `LMData`."""
    if not isinstance(cfg, DataConfig):
        raise TypeError(f"make_lm_data takes a DataConfig, got {type(cfg).__name__}.")
    # Imported on use: stream.py imports TensorFlow Datasets (through builder.py), and `import moe_jax.data`
    # should not pay for it; both sources import this package's lm_data.py, never this file.
    if cfg.is_tfds:
        from moe_jax.data.tfds_source import load_tfds_data
        return load_tfds_data(cfg)
    from moe_jax.data.stream import load_local_data
    return load_local_data(cfg)
