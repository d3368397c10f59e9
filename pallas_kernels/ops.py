"""`gmm` with gradients for both operands: a `jax.custom_vjp` over the raw kernels of kernel.py.

    y = gmm(x_MD, w_EDF, group_sizes_E)                       # y[rows of e] = x[rows of e] @ w[e]
    jax.grad(loss)(x_MD, w_EDF)                                # dx = gmm(dy, w^T), dw = tgmm(x^T, dy)

With `transpose_rhs=True` the rhs is `[E_local, n, k]` (y[rows of e] = x[rows] @ w[e]^T), its
gradient `tgmm(dy^T, x)`. The cotangent is cast to the operands' dtype before the backward kernels
(as in megablox), so with bf16 operands and `preferred_element_type=float32` the backward pass runs
in bf16 with f32 accumulation. Rows of no local group have zero output and zero gradient; group
sizes and the group offset get no gradient. All arguments after `group_sizes` are keyword-only;
all but `group_offset` (which may be traced) are static.

The backward kernels reuse the forward tiling: (tm, tn, tk) for dx and (tm, tk, tn) for dw. All
three tilings are checked when gmm is called, so a tiling that only the backward pass rejects
fails before anything is traced.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp

from pallas_kernels import kernel


@dataclasses.dataclass(frozen=True)
class _Static:
    tiling: Optional[tuple]
    transpose_rhs: bool
    out_dtype: Any
    lowering: str
    interpret: Any

    def kernel_kwargs(self):
        return dict(lowering=self.lowering, interpret=self.interpret)


def gmm(lhs, rhs, group_sizes, *, group_offset=None, tiling: Optional[tuple] = None, transpose_rhs: bool = False,
        preferred_element_type=None, lowering: Optional[str] = None, interpret=None):
    """Grouped matmul, differentiable in lhs and rhs.

    lhs: <f32|bf16|f16>[m, k], rows sorted by group. rhs: same dtype, [E_local, k, n] ([E_local, n, k]
    with transpose_rhs). group_sizes: <int>[E] rows per global group (E >= E_local); rows past the
    sum come back as zeros. group_offset: int or traced 0-d int, the first global group rhs holds
    (expert parallelism). tiling: (tm, tk, tn), None for the lowering's default. lowering: 'mosaic'
    (TPU) | 'triton' (GPU) | None (the default backend's). interpret: None = interpret on CPU;
    True/False or a `pltpu.InterpretParams`. Returns <preferred_element_type or lhs.dtype>[m, n].
    """
    kernel.check_operands(lhs, rhs, group_sizes, transpose_rhs=transpose_rhs, kernel="gmm")
    lowering = lowering or kernel.default_lowering()
    interpret = kernel.default_interpret() if interpret is None else interpret
    offset = kernel.check_group_offset(group_offset, rhs.shape[0], group_sizes.shape[0], kernel="gmm")
    static = _Static(tiling=None if tiling is None else tuple(tiling), transpose_rhs=transpose_rhs,
                     out_dtype=jnp.dtype(preferred_element_type or lhs.dtype), lowering=lowering,
                     interpret=interpret)
    _check_backward_tiling(lhs, rhs, static)
    return _gmm(lhs, rhs, group_sizes, offset, static)


def tgmm(lhs_t, grad, group_sizes, *, num_local_groups: Optional[int] = None, group_offset=None,
         tiling: Optional[tuple] = None, preferred_element_type=None, lowering: Optional[str] = None, interpret=None):
    """Transposed grouped matmul (gmm's weight gradient): lhs_t [k, m], grad [m, n] -> [E_local, k, n],
    out[e - offset] = lhs_t[:, rows of e] @ grad[rows of e]; zeros for empty groups. Not differentiable."""
    return kernel.tgmm(lhs_t, grad, group_sizes, num_local_groups=num_local_groups, group_offset=group_offset,
                       tiling=tiling, out_dtype=preferred_element_type, lowering=lowering, interpret=interpret)


def _check_backward_tiling(lhs, rhs, static: _Static):
    if static.tiling is None:
        return
    m, k = lhs.shape
    n = rhs.shape[1] if static.transpose_rhs else rhs.shape[2]
    common = dict(lowering=static.lowering, dtype=lhs.dtype)
    kernel.resolve_tiling(static.tiling, m=m, k=k, n=n, kernel="gmm", **common)  # checks the form first
    tm, tk, tn = static.tiling
    kernel.resolve_tiling((tm, tn, tk), m=m, k=n, n=k, kernel="gmm", **common)
    if static.transpose_rhs:
        kernel.resolve_tiling((tm, tn, tk), m=m, k=n, n=k, kernel="tgmm", **common)
    else:
        kernel.resolve_tiling((tm, tk, tn), m=m, k=k, n=n, kernel="tgmm", **common)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _gmm(lhs, rhs, group_sizes, group_offset, static: _Static):
    return kernel.gmm(lhs, rhs, group_sizes, group_offset=group_offset, tiling=static.tiling,
                      transpose_rhs=static.transpose_rhs, out_dtype=static.out_dtype, **static.kernel_kwargs())


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, static: _Static):
    return _gmm(lhs, rhs, group_sizes, group_offset, static), (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(static: _Static, res, d_out):
    lhs, rhs, group_sizes, group_offset = res
    d_out = d_out.astype(lhs.dtype)
    tm, tk, tn = static.tiling or (None, None, None)
    swapped = None if static.tiling is None else (tm, tn, tk)
    d_lhs = kernel.gmm(d_out, rhs, group_sizes, group_offset=group_offset, tiling=swapped,
                       transpose_rhs=not static.transpose_rhs, out_dtype=lhs.dtype, **static.kernel_kwargs())
    num_local = rhs.shape[0]
    if static.transpose_rhs:  # rhs[e] is [n, k]: d rhs[e] = d_out[rows]^T @ lhs[rows]
        d_rhs = kernel.tgmm(d_out.T, lhs, group_sizes, num_local_groups=num_local, group_offset=group_offset,
                            tiling=swapped, out_dtype=rhs.dtype, **static.kernel_kwargs())
    else:
        d_rhs = kernel.tgmm(lhs.T, d_out, group_sizes, num_local_groups=num_local, group_offset=group_offset,
                            tiling=static.tiling, out_dtype=rhs.dtype, **static.kernel_kwargs())
    return d_lhs, d_rhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)
