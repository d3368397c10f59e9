"""The raw grouped-matmul kernels: argument checks, tiling, cost estimate, and the lowering switch.

    out  = gmm(lhs[m, k], rhs[E_local, k, n], group_sizes[E])     out[rows of group e] = lhs[rows] @ rhs[e - offset]
    d_w  = tgmm(lhs_t[k, m], grad[m, n], group_sizes[E])          d_w[e - offset] = lhs_t[:, rows of e] @ grad[rows of e]

Rows are sorted by group (megablox / MegaBlocks layout, Gale et al. 2023, "MegaBlocks: Efficient
Sparse Training with Mixture-of-Experts"). Rows of no local group (past the sum of the sizes, or of a
group outside [group_offset, group_offset + E_local)) come back as zeros from gmm and add nothing
to tgmm. Empty groups are allowed; tgmm returns zeros for them.

Lowerings (`lowering=`): "mosaic" (TPU, tpu_mosaic.py) and "triton" (GPU, gpu_triton.py). Both run
under `interpret=True` on any backend, which is how the CPU tests check them. Tile sizes are checked
against the lowering's hardware rules even when interpreting, so interpret mode runs the kernel
hardware would run:
  mosaic  tk, tn: a multiple of 128 or the whole dimension (a tile larger than the dimension is cut to
          it); tm: a multiple of 8 (16 for 16-bit dtypes) in gmm, of 128 in tgmm (it is the lane
          dimension of the lhs_t block), or >= m (one tile). m is padded to a multiple of tm.
  triton  tm, tk, tn: powers of two >= 16 (cut to the next power of two >= the dimension). No padding.
This file never differentiates; ops.py ties gmm and tgmm together with a custom_vjp.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import gpu_triton, metadata, tpu_mosaic

LOWERINGS = ("mosaic", "triton")
SUPPORTED_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)

# Defaults per lowering. TPU: bf16 blocks of 256x512 / 512x512 with double buffering and an f32
# accumulator need ~3 MiB of VMEM (f32 inputs ~5 MiB), inside every generation's default scoped
# limit. GPU: a classic Triton GEMM tile. Interpret mode: large tiles, because an interpreted grid
# step costs far more than the matmul inside it (on a CPU, an interpreted grouped matmul of m=4096,
# k=n=1024 took 38 s with 128^3 tiles and 0.3 s with 512x1024x1024 tiles).
DEFAULT_TILING = {"mosaic": (256, 512, 512), "triton": (128, 32, 128)}
INTERPRET_TILING = (512, 1024, 1024)
TRITON_NUM_WARPS, TRITON_NUM_STAGES = 4, 3


def default_lowering() -> str:
    """The lowering for the default backend: mosaic on TPU, triton on GPU, mosaic (interpreted) on CPU."""
    return "triton" if jax.default_backend() in ("gpu", "cuda", "rocm") else "mosaic"


def default_interpret() -> bool:
    """Interpret unless the default backend is a TPU or a GPU (Pallas compiles for nothing else)."""
    return jax.default_backend() not in ("tpu", "gpu", "cuda", "rocm")


def _round_up(x: int, to: int) -> int:
    return -(-x // to) * to


def _is_pow2(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


def resolve_tiling(tiling, *, lowering: str, m: int, k: int, n: int, dtype, kernel: str) -> tuple[int, int, int]:
    """(tm, tk, tn) as the kernel will use them: cut to the problem and checked against the lowering's
    rules (see the module docstring). `k` is the contraction width of gmm / the output rows of tgmm.
    Raises ValueError naming `tiling` and the fix."""
    if lowering not in LOWERINGS:
        raise ValueError(f"lowering={lowering!r} is not one of {LOWERINGS}; pass lowering='mosaic' (TPU) "
                         "or 'triton' (GPU), or None for the default backend's.")
    if (not isinstance(tiling, (tuple, list)) or len(tiling) != 3
            or not all(isinstance(t, int) and not isinstance(t, bool) and t > 0 for t in tiling)):
        raise ValueError(f"{kernel}: tiling={tiling!r} must be three positive ints (tm, tk, tn).")
    tm, tk, tn = tiling
    if lowering == "triton":
        for name, t in zip(("tm", "tk", "tn"), tiling):
            if not (_is_pow2(t) and t >= 16):
                raise ValueError(f"{kernel}: tiling {name}={t} must be a power of two >= 16 for lowering='triton' "
                                 "(Triton block shapes); e.g. tiling=(128, 32, 128).")
        cut = lambda t, dim: min(t, max(16, _next_pow2(dim)))
        return cut(tm, m), cut(tk, k), cut(tn, n)
    sublane = 16 if jnp.dtype(dtype).itemsize == 2 else 8
    row_align = 128 if kernel == "tgmm" else sublane
    if tm >= m:
        tm = _round_up(max(m, 1), sublane)  # one row tile: the padded m is the whole dimension
    elif tm % row_align:
        raise ValueError(
            f"{kernel}: tiling tm={tm} must be a multiple of {row_align} for lowering='mosaic' "
            f"({'the lane dimension of the lhs_t block' if kernel == 'tgmm' else 'TPU sublanes'}), "
            f"or >= m={m}; e.g. tm=256.")
    out = [tm]
    for name, t, dim in (("tk", tk, k), ("tn", tn, n)):
        t = min(t, dim)
        if t != dim and t % 128:
            raise ValueError(f"{kernel}: tiling {name}={t} must be a multiple of 128 (TPU lanes) or "
                             f">= the dimension ({dim}) for lowering='mosaic'; e.g. {name}=512.")
        out.append(t)
    return tuple(out)


def check_operands(lhs, rhs, group_sizes, *, transpose_rhs: bool = False, kernel: str = "gmm"):
    """Shape and dtype checks shared by gmm and its gradient, before anything is traced into a kernel."""
    if lhs.ndim != 2:
        raise ValueError(f"{kernel}: lhs must be [m, k], got shape {lhs.shape}.")
    if rhs.ndim != 3:
        raise ValueError(f"{kernel}: rhs must be [num_local_groups, k, n], got shape {rhs.shape}.")
    for name, a in (("lhs", lhs), ("rhs", rhs)):
        if a.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"{kernel}: {name} dtype {a.dtype} is not one of float32, bfloat16, float16; cast it.")
    if lhs.dtype != rhs.dtype:
        raise ValueError(f"{kernel}: lhs dtype {lhs.dtype} != rhs dtype {rhs.dtype}; cast both to one dtype.")
    k_rhs = rhs.shape[2] if transpose_rhs else rhs.shape[1]
    if lhs.shape[1] != k_rhs:
        raise ValueError(f"{kernel}: lhs has k={lhs.shape[1]} columns but rhs {rhs.shape} has k={k_rhs}"
                         f"{' (transpose_rhs=True: rhs is [groups, n, k])' if transpose_rhs else ''}.")
    check_group_sizes(group_sizes, rhs.shape[0], kernel=kernel)


def check_group_sizes(group_sizes, num_local_groups: int, *, kernel: str):
    if group_sizes.ndim != 1 or not jnp.issubdtype(group_sizes.dtype, jnp.integer):
        raise ValueError(f"{kernel}: group_sizes must be a 1-D integer array, got {group_sizes.dtype}{group_sizes.shape}.")
    if num_local_groups > group_sizes.shape[0]:
        raise ValueError(
            f"{kernel}: rhs holds {num_local_groups} groups but group_sizes has only {group_sizes.shape[0]}; "
            "group_sizes lists every (global) group, rhs the local ones [group_offset, group_offset + n_local).")
    if num_local_groups < 1:
        raise ValueError(f"{kernel}: rhs must hold at least one group.")


def check_group_offset(group_offset, num_local_groups: int, num_groups: int, *, kernel: str):
    """A static offset is range-checked here; a traced one cannot be, and local groups past the global
    ones are then treated as empty (metadata.local_group_bounds)."""
    if group_offset is None:
        return jnp.zeros((), jnp.int32)
    if isinstance(group_offset, int):
        if not 0 <= group_offset <= num_groups - num_local_groups:
            raise ValueError(f"{kernel}: group_offset={group_offset} must be in [0, {num_groups - num_local_groups}] "
                             f"({num_groups} groups in group_sizes, {num_local_groups} in rhs).")
        return jnp.asarray(group_offset, jnp.int32)
    group_offset = jnp.asarray(group_offset)
    if group_offset.shape != () or not jnp.issubdtype(group_offset.dtype, jnp.integer):
        raise ValueError(f"{kernel}: group_offset must be an int or a 0-d integer array, got "
                         f"{group_offset.dtype}{group_offset.shape}.")
    return group_offset.astype(jnp.int32)


def cost_estimate(*, kernel: str, m: int, k: int, n: int, num_groups: int, tiling, itemsize: int,
                  out_itemsize: int) -> pl.CostEstimate:
    """Useful flops (2 m k n: rows past the sum are unknown statically, straddled tiles' repeated work
    is not useful) and the HBM traffic of the tiling: gmm re-reads lhs once per n tile and a [k, tn]
    rhs slab per (item, n tile), at most (m tiles + groups) items; tgmm re-reads lhs_t once per n
    tile and grad once per k tile."""
    tm, tk, tn = tiling
    tiles_m, tiles_k, tiles_n = -(-m // tm), -(-k // tk), -(-n // tn)
    if kernel == "gmm":
        read = m * k * tiles_n + (tiles_m + num_groups) * k * tn * tiles_n
        written = m * n * out_itemsize
    else:
        read = k * m * tiles_n + m * n * tiles_k
        written = num_groups * k * n * out_itemsize
    return pl.CostEstimate(flops=2 * m * k * n, transcendentals=0, bytes_accessed=read * itemsize + written)


def gmm(lhs, rhs, group_sizes, *, group_offset=None, tiling=None, transpose_rhs: bool = False,
        out_dtype=None, lowering: str | None = None, interpret: bool | None = None):
    """lhs <f32|bf16|f16>[m, k], rhs [E_local, k, n] (or [E_local, n, k] with transpose_rhs),
    group_sizes <int>[E] -> <out_dtype>[m, n] (out_dtype defaults to lhs.dtype; f32 accumulation)."""
    check_operands(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, kernel="gmm")
    lowering = lowering or default_lowering()
    interpret = default_interpret() if interpret is None else interpret
    num_local = rhs.shape[0]
    offset = check_group_offset(group_offset, num_local, group_sizes.shape[0], kernel="gmm")
    m, k = lhs.shape
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    out_dtype = jnp.dtype(out_dtype or lhs.dtype)
    tiling = resolve_tiling(tiling or (INTERPRET_TILING if interpret else DEFAULT_TILING[lowering]),
                            lowering=lowering, m=m, k=k, n=n, dtype=lhs.dtype, kernel="gmm")
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((m, n), out_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    cost = cost_estimate(kernel="gmm", m=m, k=k, n=n, num_groups=num_local, tiling=tiling,
                         itemsize=lhs.dtype.itemsize, out_itemsize=out_dtype.itemsize)
    tm = tiling[0]
    if lowering == "triton":
        glo_Y, ghi_Y, start_W, end_W = metadata.tile_group_range(
            group_sizes, m=m, tm=tm, group_offset=offset, num_local_groups=num_local)
        return gpu_triton.gmm(lhs, rhs, glo_Y, ghi_Y, start_W, end_W, tiling=tiling, transpose_rhs=transpose_rhs,
                              out_dtype=out_dtype, interpret=interpret, cost_estimate=cost,
                              num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES)
    m_pad = _round_up(m, tm)
    lhs_p = jnp.pad(lhs, ((0, m_pad - m), (0, 0))) if m_pad != m else lhs
    meta = metadata.gmm_metadata(group_sizes, m=m_pad, tm=tm, group_offset=offset, num_local_groups=num_local)
    out = tpu_mosaic.gmm(lhs_p, rhs, meta, tiling=tiling, transpose_rhs=transpose_rhs, out_dtype=out_dtype,
                         interpret=interpret, cost_estimate=cost)
    return out[:m] if m_pad != m else out


def tgmm(lhs_t, grad, group_sizes, *, num_local_groups: int | None = None, group_offset=None, tiling=None,
         out_dtype=None, lowering: str | None = None, interpret: bool | None = None):
    """lhs_t <f32|bf16|f16>[k, m], grad [m, n], group_sizes <int>[E] -> <out_dtype>[E_local, k, n]:
    out[e - offset] = lhs_t[:, rows of e] @ grad[rows of e]. E_local defaults to E."""
    if lhs_t.ndim != 2 or grad.ndim != 2 or lhs_t.shape[1] != grad.shape[0]:
        raise ValueError(f"tgmm: lhs_t must be [k, m] and grad [m, n], got {lhs_t.shape} and {grad.shape}.")
    for name, a in (("lhs_t", lhs_t), ("grad", grad)):
        if a.dtype not in SUPPORTED_DTYPES:
            raise ValueError(f"tgmm: {name} dtype {a.dtype} is not one of float32, bfloat16, float16; cast it.")
    if lhs_t.dtype != grad.dtype:
        raise ValueError(f"tgmm: lhs_t dtype {lhs_t.dtype} != grad dtype {grad.dtype}; cast both to one dtype.")
    num_local = group_sizes.shape[0] if num_local_groups is None else num_local_groups
    check_group_sizes(group_sizes, num_local, kernel="tgmm")
    lowering = lowering or default_lowering()
    interpret = default_interpret() if interpret is None else interpret
    offset = check_group_offset(group_offset, num_local, group_sizes.shape[0], kernel="tgmm")
    k, m = lhs_t.shape
    n = grad.shape[1]
    out_dtype = jnp.dtype(out_dtype or lhs_t.dtype)
    tiling = resolve_tiling(tiling or (INTERPRET_TILING if interpret else DEFAULT_TILING[lowering]),
                            lowering=lowering, m=m, k=k, n=n, dtype=lhs_t.dtype, kernel="tgmm")
    if m == 0 or k == 0 or n == 0:
        return jnp.zeros((num_local, k, n), out_dtype)
    group_sizes = group_sizes.astype(jnp.int32)
    cost = cost_estimate(kernel="tgmm", m=m, k=k, n=n, num_groups=num_local, tiling=tiling,
                         itemsize=lhs_t.dtype.itemsize, out_itemsize=out_dtype.itemsize)
    tm = tiling[0]
    if lowering == "triton":
        start_W, end_W = metadata.local_group_bounds(group_sizes, offset, num_local, m)
        return gpu_triton.tgmm(lhs_t, grad, start_W, end_W, num_groups=num_local, tiling=tiling,
                               out_dtype=out_dtype, interpret=interpret, cost_estimate=cost,
                               num_warps=TRITON_NUM_WARPS, num_stages=TRITON_NUM_STAGES)
    m_pad = _round_up(m, tm)
    if m_pad != m:
        lhs_t = jnp.pad(lhs_t, ((0, 0), (0, m_pad - m)))
        grad = jnp.pad(grad, ((0, m_pad - m), (0, 0)))
    meta = metadata.tgmm_metadata(group_sizes, m=m_pad, tm=tm, group_offset=offset, num_local_groups=num_local)
    return tpu_mosaic.tgmm(lhs_t, grad, meta, num_groups=num_local, tiling=tiling, out_dtype=out_dtype,
                           interpret=interpret, cost_estimate=cost)
