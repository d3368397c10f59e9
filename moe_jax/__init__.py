"""moe_jax: Mixture-of-Experts layers in JAX / Flax NNX, correct to the last routing decision."""
from moe_jax.moe_config import MoEConfig
from moe_jax.moe_layer import MoEAux, MoELayer
from moe_jax.routing import Routing, SoftRouting

__all__ = ["MoEConfig", "MoELayer", "MoEAux", "Routing", "SoftRouting"]
