"""Plain-jnp oracles for the grouped matmuls: one masked dense dot per local group.

Deliberately simple and independent of metadata.py: row i belongs to global group e if
cumsum(sizes)[e - 1] <= i < cumsum(sizes)[e], and the result is the sum over local groups of
where(row in group, lhs @ rhs[local], 0). Costs E_local dense matmuls (tests only). Accumulates in
float32 at Precision.HIGHEST and casts at the end, like the kernels. Differentiable with jax.grad.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

_HI = jax.lax.Precision.HIGHEST


def row_group(group_sizes, m: int):
    """<int32>[m] global group of each row; len(group_sizes) for rows past the sum."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    return jnp.searchsorted(ends, jnp.arange(m, dtype=jnp.int32), side="right").astype(jnp.int32)


def gmm_reference(lhs, rhs, group_sizes, *, group_offset=0, transpose_rhs: bool = False, out_dtype=None):
    """lhs [m, k], rhs [E_local, k, n] ([E_local, n, k] if transpose_rhs) -> [m, n]."""
    out_dtype = out_dtype or lhs.dtype
    m = lhs.shape[0]
    group_M = row_group(group_sizes, m)
    x = lhs.astype(jnp.float32)
    out = 0.0
    for j in range(rhs.shape[0]):
        w = rhs[j].astype(jnp.float32)
        w = w.T if transpose_rhs else w
        mine = (group_M == group_offset + j)[:, None]
        out = out + jnp.where(mine, jnp.dot(x, w, precision=_HI), 0.0)
    return jnp.broadcast_to(out, (m, rhs.shape[1] if transpose_rhs else rhs.shape[2])).astype(out_dtype)


def tgmm_reference(lhs_t, grad, group_sizes, *, num_local_groups=None, group_offset=0, out_dtype=None):
    """lhs_t [k, m], grad [m, n] -> [E_local, k, n]."""
    out_dtype = out_dtype or lhs_t.dtype
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    group_M = row_group(group_sizes, lhs_t.shape[1])
    x, g = lhs_t.astype(jnp.float32), grad.astype(jnp.float32)
    blocks = []
    for j in range(num_local):
        mine = group_M == group_offset + j
        blocks.append(jnp.dot(jnp.where(mine[None, :], x, 0.0), jnp.where(mine[:, None], g, 0.0), precision=_HI))
    return jnp.stack(blocks).astype(out_dtype)
