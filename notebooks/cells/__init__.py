"""The cell lists of the Colab notebooks, one module per notebook (built by notebooks/make_notebooks.py)."""
