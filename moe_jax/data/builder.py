"""A TFDS `GeneratorBasedBuilder` that stores a local corpus as array_record files, read without TensorFlow.

Layout: `data_dir/moe_jax_text/<corpus>_val<fraction>/1.0.0/moe_jax_text-{train,validation}.array_record-*`.
Each split is the concatenation of its documents (each ending in one blank line), cut into records
of `RECORD_CHARS` characters: large records, because reading is batched (`__getitems__`) and tiny
records make a per-record pipeline ~1000x slower. Shuffling is disabled so records keep stream
order; each record also stores its position.

TFDS writes into an `incomplete.*` folder and renames it when done, so a build killed half-way
leaves no dataset; a file lock serialises builds of one config across processes, and stale
`incomplete.*` folders are removed under that lock before building again.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import os
import shutil

import numpy as np
from etils import epath

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - exercised only where TFDS is missing
    raise ImportError(
        "moe_jax.data needs tensorflow-datasets (TensorFlow itself is not needed): "
        "pip install tensorflow-datasets==4.9.10 array_record") from e

from moe_jax.data import corpora

BUILDER_NAME = "moe_jax_text"
RECORD_CHARS = 8192
DOCUMENT_END = "\n"  # appended to every document (which already ends in "\n"): one blank line between


@dataclasses.dataclass(eq=False)
class LocalTextConfig(tfds.core.BuilderConfig):
    corpus: str = "synthetic"
    val_fraction: float = 0.05


def config_name(corpus: str, val_fraction: float) -> str:
    """'shakespeare_val0p05', 'stdlib_py3p11p7_val0p05': one TFDS config per corpus content and split."""
    return f"{corpora.corpus_tag(corpus)}_val{val_fraction:g}".replace(".", "p").replace("-", "m")


class MoeJaxText(tfds.core.GeneratorBasedBuilder):
    """Local text corpora (see `corpora.py`) split by document; configs are made per (corpus, val_fraction)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Text records of 8192 characters; train/validation split by document."}

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        # TFDS's default looks the module up through `importlib_resources`, a pip package it declares
        # for Python < 3.9 only, and fails without it; this file is the answer it would find.
        return epath.Path(__file__)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=f"{self.builder_config.corpus}: documents joined by blank lines, in "
                        f"{RECORD_CHARS}-character records; validation = whole documents.",
            features=tfds.features.FeaturesDict({
                "text": tfds.features.Text(),
                "position": tfds.features.Scalar(dtype=np.int64),
            }),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing is downloaded
        documents = corpora.load_documents(self.builder_config.corpus)
        train, val = corpora.split_documents(documents, self.builder_config.val_fraction)
        return {"train": self._generate_examples(train), "validation": self._generate_examples(val)}

    def _generate_examples(self, documents):
        stream = "".join(text + DOCUMENT_END for _, text in documents)
        for position, start in enumerate(range(0, len(stream), RECORD_CHARS)):
            yield position, {"text": stream[start:start + RECORD_CHARS], "position": position}


@contextlib.contextmanager
def file_lock(path: str):
    """An exclusive `flock` on `path` (created if missing), released on exit or process death."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_local(corpus: str, val_fraction: float, data_dir: str) -> tuple[str, bool]:
    """Builds the corpus's array_record dataset once. Returns (TFDS name 'moe_jax_text/<config>', built now)."""
    name = config_name(corpus, val_fraction)
    config = LocalTextConfig(name=name, corpus=corpus, val_fraction=val_fraction)
    builder = MoeJaxText(config=config, data_dir=data_dir, file_format="array_record")
    if builder.is_prepared():
        return f"{BUILDER_NAME}/{name}", False
    config_dir = os.path.join(data_dir, BUILDER_NAME, name)
    with file_lock(os.path.join(data_dir, BUILDER_NAME, f".{name}.lock")):
        builder = MoeJaxText(config=config, data_dir=data_dir, file_format="array_record")
        if builder.is_prepared():  # another process finished it while we waited
            return f"{BUILDER_NAME}/{name}", False
        for entry in os.listdir(config_dir) if os.path.isdir(config_dir) else ():
            # `incomplete.*`: left by a killed build; a version folder without dataset_info.json: damaged.
            # Nobody else holds the lock, so both are safe to delete.
            if entry.startswith("incomplete.") or entry == str(builder.version):
                shutil.rmtree(os.path.join(config_dir, entry))
        corpora.check_available(corpus)  # the install hint, before TFDS wraps any error
        tfds.display_progress_bar(False)
        builder.download_and_prepare(download_dir=os.path.join(data_dir, "downloads"))
    return f"{BUILDER_NAME}/{name}", True


def read_split_records(source) -> list[str]:
    """The text records of one split of a `tfds.data_source`, fetched in batches, in stream order."""
    records = []
    for start in range(0, len(source), 1024):
        records += source.__getitems__(list(range(start, min(start + 1024, len(source)))))
    records.sort(key=lambda r: int(r["position"]))
    return [r["text"].decode("utf-8") for r in records]
