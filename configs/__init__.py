"""ml_collections config files: `get_config(arg)` in each; see base.py for the sections."""
