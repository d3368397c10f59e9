"""Pallas grouped-matmul kernels for the routed experts (dropless MoE, MegaBlocks-style).

    from pallas_kernels import gmm
    y_MF = gmm(x_MD, w_EDF, group_sizes_E)          # rows sorted by expert; differentiable in x and w

Files: metadata.py (which tile serves which group), tpu_mosaic.py / gpu_triton.py (the pallas_calls),
kernel.py (checks, tiling, cost estimate, lowering switch), ops.py (custom_vjp), reference.py (jnp oracle).
The MoE layer reaches these only through `MoEConfig.expert_backend='pallas'` (moe_jax/experts.py).
"""
from pallas_kernels.kernel import LOWERINGS, default_interpret, default_lowering
from pallas_kernels.ops import gmm, tgmm
from pallas_kernels.reference import gmm_reference, tgmm_reference

__all__ = ["LOWERINGS", "default_interpret", "default_lowering", "gmm", "tgmm", "gmm_reference", "tgmm_reference"]
