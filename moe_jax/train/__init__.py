"""Training: typed config, train state and step, orbax checkpoints, metrics, the loop."""
from moe_jax.train.config import TrainConfig

__all__ = ["TrainConfig"]
