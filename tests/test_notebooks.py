"""The Colab notebooks: committed without outputs, in sync with notebooks/make_notebooks.py, Colab badge and
install cell present, and each runs top to bottom headless (nbclient, small settings) without an error."""
import os
import subprocess
import sys

import nbformat
import pytest
from nbclient import NotebookClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = os.path.join(ROOT, "notebooks")
NAMES = ("quickstart", "train_tiny_lm", "scaling_laws")


def read(name):
    return nbformat.read(os.path.join(NOTEBOOKS, f"{name}.ipynb"), as_version=4)


def test_notebooks_match_their_generator():
    out = subprocess.run([sys.executable, os.path.join(NOTEBOOKS, "make_notebooks.py"), "--check"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs_with_badge_and_install_cell(name):
    nb = read(name)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{name}: clear the outputs"
    url = f"https://colab.research.google.com/github/moe-jax/moe_jax/blob/main/notebooks/{name}.ipynb"
    assert url in nb.cells[0].source
    first_code = next(c for c in nb.cells if c.cell_type == "code")
    assert '"google.colab" in sys.modules' in first_code.source and "pip" in first_code.source
    # No model code in a notebook: no class definitions, no nnx.Module subclasses.
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert "class " not in cell.source and "nnx.Module" not in cell.source, name


@pytest.mark.parametrize("name", NAMES)
def test_runs_top_to_bottom(name, tmp_path, monkeypatch):
    # The kernel inherits this environment: small settings, the checkout importable, no inline figures.
    monkeypatch.setenv("MOE_JAX_NOTEBOOK_TEST", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = read(name)
    client = NotebookClient(nb, timeout=240, kernel_name="python3",
                            resources={"metadata": {"path": NOTEBOOKS}})
    client.execute()  # raises CellExecutionError naming the cell on the first error
    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "small settings" in text
    if name == "train_tiny_lm":
        assert "int8" in text and "int4" in text and "eval ce" in text
        # the routing pictures: three evaluations' ledgers (steps 10, 20, 30), the last one saturated against itself
        assert "router saturation vs the final ledger" in text and "token specialisation" in text
        assert "step   30: 1.00 1.00" in text
    if name == "scaling_laws":
        assert "finished runs" in text
