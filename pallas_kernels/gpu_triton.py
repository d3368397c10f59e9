"""GPU (Triton) lowering of the grouped matmuls. GPU programs run concurrently, so unlike the TPU
kernel nothing relies on an output block staying resident between grid steps: every program
computes its whole output tile itself.

gmm   grid (m tiles, n tiles). Program (t, j) loops over the local groups whose rows touch row tile
      t (metadata.tile_group_range), runs a k loop for each non-empty one, and keeps that group's
      rows of the result: out = where(row in group, acc_group, out). Rows of no local group stay 0.
tgmm  grid (E_local, k tiles, n tiles). Program (g, a, b) loops over the row tiles of group g and
      accumulates lhs_t[a-tile, rows] @ grad[rows, b-tile] with the rows outside the group masked
      to 0 in both operands; an empty group runs no iteration and stores zeros.

Operands are whole arrays in GPU memory (no block specs); tiles are read with masked loads, so m, k
and n need no padding: rows >= m, k columns >= k and n columns >= n load as 0 and are not stored.
Tile sizes are powers of two >= 16 (Triton's `tl.dot` needs both; kernel.py checks it).
float32 operands use IEEE fp32 dots (Precision.HIGHEST), not TF32: exactness over speed.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def gmm(lhs, rhs, glo_Y, ghi_Y, start_W, end_W, *, tiling, transpose_rhs: bool, out_dtype, interpret,
        cost_estimate: pl.CostEstimate, num_warps: int, num_stages: int):
    """lhs <dtype>[m, k], rhs [E_local, k, n] ([E_local, n, k] if transpose_rhs) -> [m, n]."""
    tm, tk, tn = tiling
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_m, tiles_k, tiles_n = pl.cdiv(m, tm), pl.cdiv(k, tk), pl.cdiv(n, tn)
    precision = _precision(lhs.dtype)

    def kernel(glo_ref, ghi_ref, start_ref, end_ref, lhs_ref, rhs_ref, out_ref):
        t, j = pl.program_id(0), pl.program_id(1)
        rows = t * tm + jnp.arange(tm, dtype=jnp.int32)
        cols = j * tn + jnp.arange(tn, dtype=jnp.int32)
        row_ok, col_ok = rows < m, cols < n

        def group_body(g, out):
            start, end = start_ref[g], end_ref[g]

            def k_body(kk, acc):
                ks = kk * tk + jnp.arange(tk, dtype=jnp.int32)
                k_ok = ks < k
                x = plgpu.load(lhs_ref.at[pl.ds(t * tm, tm), pl.ds(kk * tk, tk)],
                               mask=row_ok[:, None] & k_ok[None, :], other=0.0)
                if transpose_rhs:
                    w = plgpu.load(rhs_ref.at[g, pl.ds(j * tn, tn), pl.ds(kk * tk, tk)],
                                   mask=col_ok[:, None] & k_ok[None, :], other=0.0)
                    dims = (((1,), (1,)), ((), ()))
                else:
                    w = plgpu.load(rhs_ref.at[g, pl.ds(kk * tk, tk), pl.ds(j * tn, tn)],
                                   mask=k_ok[:, None] & col_ok[None, :], other=0.0)
                    dims = (((1,), (0,)), ((), ()))
                return acc + jax.lax.dot_general(x, w, dims, precision=precision,
                                                 preferred_element_type=jnp.float32)

            k_steps = jnp.where(end > start, tiles_k, 0)  # empty groups inside the range: no work
            acc = jax.lax.fori_loop(0, k_steps, k_body, jnp.zeros((tm, tn), jnp.float32))
            in_group = (rows >= start) & (rows < end)
            return jnp.where(in_group[:, None], acc, out)

        out = jax.lax.fori_loop(glo_ref[t], ghi_ref[t], group_body, jnp.zeros((tm, tn), jnp.float32))
        plgpu.store(out_ref.at[pl.ds(t * tm, tm), pl.ds(j * tn, tn)], out.astype(out_ref.dtype),
                    mask=row_ok[:, None] & col_ok[None, :])

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid=(tiles_m, tiles_n),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        cost_estimate=cost_estimate,
        name="moe_gmm",
    )(glo_Y, ghi_Y, start_W, end_W, lhs, rhs)


def tgmm(lhs_t, grad, start_W, end_W, *, num_groups: int, tiling, out_dtype, interpret,
         cost_estimate: pl.CostEstimate, num_warps: int, num_stages: int):
    """lhs_t <dtype>[k, m], grad [m, n] -> [E_local, k, n]: per group lhs_t[:, rows] @ grad[rows]."""
    tm, tk, tn = tiling
    k, m = lhs_t.shape
    n = grad.shape[1]
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    precision = _precision(lhs_t.dtype)

    def kernel(start_ref, end_ref, x_ref, g_ref, out_ref):
        g, a, b = pl.program_id(0), pl.program_id(1), pl.program_id(2)
        start, end = start_ref[g], end_ref[g]
        ks = a * tk + jnp.arange(tk, dtype=jnp.int32)
        cols = b * tn + jnp.arange(tn, dtype=jnp.int32)
        k_ok, col_ok = ks < k, cols < n

        def m_body(mt, acc):
            rows = mt * tm + jnp.arange(tm, dtype=jnp.int32)
            mine = (rows >= start) & (rows < end)  # end <= m, so this also drops rows past m
            x = plgpu.load(x_ref.at[pl.ds(a * tk, tk), pl.ds(mt * tm, tm)],
                           mask=k_ok[:, None] & mine[None, :], other=0.0)
            y = plgpu.load(g_ref.at[pl.ds(mt * tm, tm), pl.ds(b * tn, tn)],
                           mask=mine[:, None] & col_ok[None, :], other=0.0)
            return acc + jax.lax.dot_general(x, y, (((1,), (0,)), ((), ())), precision=precision,
                                             preferred_element_type=jnp.float32)

        first_tile = start // tm
        stop_tile = jnp.where(end > start, (end + tm - 1) // tm, first_tile)
        acc = jax.lax.fori_loop(first_tile, stop_tile, m_body, jnp.zeros((tk, tn), jnp.float32))
        plgpu.store(out_ref.at[g, pl.ds(a * tk, tk), pl.ds(b * tn, tn)], acc.astype(out_ref.dtype),
                    mask=k_ok[:, None] & col_ok[None, :])

    return pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid=(num_groups, tiles_k, tiles_n),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        cost_estimate=cost_estimate,
        name="moe_tgmm",
    )(start_W, end_W, lhs_t, grad)
