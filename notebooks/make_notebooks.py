"""Writes the Colab notebooks of this folder from the cell lists in notebooks/cells/, without outputs.

    python notebooks/make_notebooks.py          # rewrites notebooks/*.ipynb
    python notebooks/make_notebooks.py --check  # exit 1 if a committed notebook differs from its source

Edit the cells in notebooks/cells/ (one module per notebook), not in the .ipynb files
(tests/test_notebooks.py checks that they agree and runs each notebook top to bottom). The notebooks
only import moe_jax (and, for the scaling laws, the repository's `experiments` analysis code); no
model code lives in them.
"""
from __future__ import annotations

import argparse
import os
import sys

import nbformat

HERE = os.path.dirname(os.path.abspath(__file__))

if __package__:  # imported as notebooks.make_notebooks
    from .cells.quickstart import QUICKSTART
    from .cells.scaling_laws import SCALING
    from .cells.train_tiny_lm import TRAIN
else:  # run as a file: this folder is sys.path[0]
    from cells.quickstart import QUICKSTART
    from cells.scaling_laws import SCALING
    from cells.train_tiny_lm import TRAIN

NOTEBOOKS = {"quickstart": QUICKSTART, "train_tiny_lm": TRAIN, "scaling_laws": SCALING}


def build(cells) -> nbformat.NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = cells
    nb.metadata = {
        "kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"},
        "language_info": {"name": "python"},
        "colab": {"provenance": []},
    }
    for i, cell in enumerate(nb.cells):
        cell["id"] = f"cell-{i}"
    nbformat.validate(nb)
    return nb


def render(name: str) -> str:
    return nbformat.writes(build(NOTEBOOKS[name])) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare instead of writing")
    args = parser.parse_args(argv)
    stale = []
    for name in NOTEBOOKS:
        path = os.path.join(HERE, f"{name}.ipynb")
        text = render(name)
        if args.check:
            if not os.path.exists(path) or open(path, encoding="utf-8").read() != text:
                stale.append(path)
        else:
            with open(path, "w", encoding="utf-8") as f:
                f.write(text)
            print("wrote", path)
    if stale:
        print("out of date (run python notebooks/make_notebooks.py):", *stale, sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
