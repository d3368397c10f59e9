"""TPU (Mosaic) lowering of the grouped matmuls: a grid over items (metadata.py), scalar-prefetched
item metadata in the block index maps, an f32 accumulator in VMEM.

gmm   grid (n tiles, items, k tiles). Item i multiplies row tile tile_I[i] of lhs by rhs[group_I[i]]
      over the k tiles, then writes the rows [lo, hi) it owns into the output tile and leaves the
      others as they are. Items of one tile are consecutive, so the output block stays in VMEM
      between them and every row of it is written by exactly one item before it goes back to HBM.
      Items without a group (real = 0) skip the matmul and write zeros; their index maps hold the
      k block at 0 so that no new block is copied in.
tgmm  grid (k tiles, n tiles, items). Item i adds lhs_t[:, rows lo..hi) @ grad[rows lo..hi), :] to
      the accumulator of its group; the first item of a group zeroes it, the last writes it out.

Shapes here are already validated and tiled by kernel.py: m is a multiple of tm (padded there); k
and n need not be tile multiples. Partial k/n edge blocks read undefined values, so the contraction
(k in gmm, rows in tgmm) is masked on both operands before the dot, and output columns past n
are dropped by the block write. The grid's item axis has a traced length (`num_items`), so idle
items never run on hardware.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.metadata import ItemMetadata

_ITEM_FIELDS = ("tile_I", "group_I", "lo_I", "hi_I", "real_I", "first_I", "last_I")


def _masked(x, keep):
    """`where(keep, x, 0)` computed in f32 (bf16 selects are not native on every TPU generation)."""
    return jnp.where(keep, x.astype(jnp.float32), 0.0).astype(x.dtype)


def _precision(dtype):
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else jax.lax.Precision.DEFAULT


def gmm(lhs, rhs, meta: ItemMetadata, *, tiling, transpose_rhs: bool, out_dtype, interpret,
        cost_estimate: pl.CostEstimate):
    """lhs <dtype>[m, k] (m % tm == 0), rhs [E_local, k, n] ([E_local, n, k] if transpose_rhs) -> [m, n]."""
    tm, tk, tn = tiling
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    k_rem = k % tk
    precision = _precision(lhs.dtype)

    def kernel(tile_ref, group_ref, lo_ref, hi_ref, real_ref, first_ref, last_ref,
               lhs_ref, rhs_ref, out_ref, acc_ref):
        del group_ref, first_ref, last_ref
        i, kk = pl.program_id(1), pl.program_id(2)

        @pl.when(kk == 0)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(real_ref[i] == 1)
        def _accumulate():
            x, w = lhs_ref[...], rhs_ref[...]
            if k_rem:  # the last k block is partial: zero the columns past k in both operands
                valid = k - kk * tk
                x = _masked(x, jax.lax.broadcasted_iota(jnp.int32, x.shape, 1) < valid)
                w = _masked(w, jax.lax.broadcasted_iota(jnp.int32, w.shape, 1 if transpose_rhs else 0) < valid)
            dims = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))
            acc_ref[...] += jax.lax.dot_general(x, w, dims, precision=precision,
                                                preferred_element_type=jnp.float32)

        @pl.when(kk == tiles_k - 1)
        def _store():
            rows = tile_ref[i] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            owned = (rows >= lo_ref[i]) & (rows < hi_ref[i])
            out_ref[...] = jnp.where(owned, acc_ref[...], out_ref[...].astype(jnp.float32)).astype(out_dtype)

    def lhs_index(j, i, kk, tile_ref, group_ref, lo_ref, hi_ref, real_ref, *_):
        return tile_ref[i], kk * real_ref[i]

    def rhs_index(j, i, kk, tile_ref, group_ref, lo_ref, hi_ref, real_ref, *_):
        kb = kk * real_ref[i]
        return (group_ref[i], j, kb) if transpose_rhs else (group_ref[i], kb, j)

    def out_index(j, i, kk, tile_ref, *_):
        return tile_ref[i], j

    rhs_block = (None, tn, tk) if transpose_rhs else (None, tk, tn)
    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((m, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(_ITEM_FIELDS),
            grid=(tiles_n, meta.num_items, tiles_k),
            in_specs=[pl.BlockSpec((tm, tk), lhs_index), pl.BlockSpec(rhs_block, rhs_index)],
            out_specs=pl.BlockSpec((tm, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost_estimate,
        name="moe_gmm",
    )
    return call(*(getattr(meta, f) for f in _ITEM_FIELDS), lhs, rhs)


def tgmm(lhs_t, grad, meta: ItemMetadata, *, num_groups: int, tiling, out_dtype, interpret,
         cost_estimate: pl.CostEstimate):
    """lhs_t <dtype>[k, m], grad [m, n] (m % tm == 0) -> [E_local, k, n]: per group lhs_t[:, rows] @ grad[rows]."""
    tm, tk, tn = tiling
    k, m = lhs_t.shape
    n = grad.shape[1]
    tiles_k, tiles_n = pl.cdiv(k, tk), pl.cdiv(n, tn)
    precision = _precision(lhs_t.dtype)

    def kernel(tile_ref, group_ref, lo_ref, hi_ref, real_ref, first_ref, last_ref,
               x_ref, g_ref, out_ref, acc_ref):
        del group_ref
        i = pl.program_id(2)

        @pl.when(first_ref[i] == 1)
        def _zero():
            acc_ref[...] = jnp.zeros_like(acc_ref)

        @pl.when(real_ref[i] == 1)
        def _accumulate():
            row0, lo, hi = tile_ref[i] * tm, lo_ref[i], hi_ref[i]
            cols = row0 + jax.lax.broadcasted_iota(jnp.int32, (tk, tm), 1)
            rows = row0 + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)
            # Rows of other groups are real numbers, but rows of a partial k / n edge block are not:
            # mask both operands so that 0 * garbage never happens.
            x = _masked(x_ref[...], (cols >= lo) & (cols < hi))
            g = _masked(g_ref[...], (rows >= lo) & (rows < hi))
            acc_ref[...] += jax.lax.dot_general(x, g, (((1,), (0,)), ((), ())), precision=precision,
                                                preferred_element_type=jnp.float32)

        @pl.when(last_ref[i] == 1)
        def _store():
            out_ref[...] = acc_ref[...].astype(out_dtype)

    def x_index(a, b, i, tile_ref, *_):
        return a, tile_ref[i]

    def g_index(a, b, i, tile_ref, *_):
        return tile_ref[i], b

    def out_index(a, b, i, tile_ref, group_ref, *_):
        return group_ref[i], a, b

    call = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((num_groups, k, n), out_dtype),
        grid_spec=pltpu.PrefetchScalarGridSpec(
            num_scalar_prefetch=len(_ITEM_FIELDS),
            grid=(tiles_k, tiles_n, meta.num_items),
            in_specs=[pl.BlockSpec((tk, tm), x_index), pl.BlockSpec((tm, tn), g_index)],
            out_specs=pl.BlockSpec((None, tk, tn), out_index),
            scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
        ),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        cost_estimate=cost_estimate,
        name="moe_tgmm",
    )
    return call(*(getattr(meta, f) for f in _ITEM_FIELDS), lhs_t, grad)

