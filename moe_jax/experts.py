"""Expert FFNs over the E axis, and the dense FFN used for shared experts and dense baselines.

Experts never see routing: they take a buffer of rows per expert and return one of the same shape.
Backends:
  einsum      `[E, X, D]` capacity buffers, one batched matmul per weight (`'exd,edf->exf'`).
              Capacity buffers can also run through `blocked` (`Experts(capacity_backend='blocked')`).
  ragged_dot  `[M, D]` rows sorted by expert + group sizes: `jax.lax.ragged_dot` (exact, and the form
              accelerators run well; on CPU XLA computes every group densely, so it is a reference).
  blocked     `[M, D]` sorted rows whose expert segments are padded to multiples of a block size
              (dropless; the block-sparse layout of Gale et al. 2023, MegaBlocks): a loop over experts
              and, inside, over the rows each expert really holds (`counts_E`, rounded up to a block)
              in steps of up to 512 rows (`block_ladder`), each step running the whole FFN with the
              expert's weights (sliced once per expert; w_in and w_gate side by side, one matmul).
              Work is proportional to the rows routed plus under one block per expert, never to the
              static worst-case buffer, and a step's hidden activations stay in cache. The backward
              (custom_vjp) is a second pair of loops accumulating each expert's weight gradients.
              On CPU the fastest backend, for capacity buffers too (benchmarks/moe_layer.py).
  pallas      the `ragged_dot` form through `pallas_kernels.gmm`, a Pallas grouped-matmul kernel
              (Mosaic on TPU, Triton on GPU, interpreted on CPU: correct there, not fast).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from moe_jax.types import Array


def activation_fn(name: str):
    return {
        "relu": jax.nn.relu,
        "gelu": lambda x: jax.nn.gelu(x, approximate=False),
        "silu": jax.nn.silu,
        "swiglu": jax.nn.silu,
        "geglu": lambda x: jax.nn.gelu(x, approximate=False),
    }[name]


def _init(scale: float):
    """Fan-in scaled truncated normal (Switch Transformer: scale 0.1 for a stable router/experts)."""
    return nnx.initializers.variance_scaling(scale, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1,
                                              batch_axis=(0,))


# ---- the blocked dropless FFN: loops over experts and their blocks, custom_vjp ----

_STEP_ROWS = 512  # rows per matmul step where an expert has them: fewer steps, fewer gradient accumulations


def block_ladder(block: int, num_rows: int) -> tuple[int, ...]:
    """Step sizes, largest first: block * 2^L (the largest such <= max(block, min(512, num_rows))),
    halving down to block.

    An expert holding `rows` (a multiple of `block`) runs rows // big steps of the largest size, then
    at most one step of each smaller size: the binary digits of its remainder. Padding stays under
    one `block` per expert while most rows run in large, efficient matmuls.
    """
    sizes = [block]
    while sizes[-1] * 2 <= min(_STEP_ROWS, num_rows):
        sizes.append(sizes[-1] * 2)
    return tuple(reversed(sizes))


def _steps(rows: Array, start: Array, ladder: tuple[int, ...]):
    """(size, first row, number of steps) of each rung of the ladder, for one expert's rows."""
    big = ladder[0]
    out = [(big, start, rows // big)]
    for size in ladder[1:]:
        out.append((size, start + (rows // (2 * size)) * (2 * size), (rows // size) % 2))
    return out


def _activated(activation: str, d_ff: int, hg: Array) -> Array:
    """act(g) * h from the concatenated pre-activations hg = [h | g] `[m, 2F]` (gated), or act(h) from
    hg = h `[m, F]`."""
    act = activation_fn(activation)
    if hg.shape[-1] == 2 * d_ff:
        return act(hg[:, d_ff:]) * hg[:, :d_ff]
    return act(hg)


def _expert_weights(p: dict, e: Array) -> dict:
    """Expert e's weights, sliced once per expert (never per block), with w_in and w_gate side by
    side as w_cat `[D, 2F]` (gated; else w_in, `[D, F]`) so that one matmul computes both pre-activations."""
    take = lambda w: None if w is None else jax.lax.dynamic_index_in_dim(w, e, 0, keepdims=False)
    w_in, w_gate, b_in = take(p["w_in"]), take(p["w_gate"]), take(p["b_in"])
    gated = w_gate is not None
    if b_in is not None and gated:
        b_in = jnp.concatenate([b_in, jnp.zeros_like(b_in)])
    return {"w_cat": jnp.concatenate([w_in, w_gate], axis=-1) if gated else w_in, "w_out": take(p["w_out"]),
            "b_cat": b_in, "b_out": take(p["b_out"])}


def _put_expert_grads(dp: dict, dw: dict, e: Array) -> dict:
    """Writes expert e's gradients (in `_expert_weights`' layout) into the `[E, ...]` gradients dp."""
    F = dw["w_out"].shape[0]
    put = lambda acc, g: None if acc is None else jax.lax.dynamic_update_index_in_dim(acc, g.astype(acc.dtype), e, 0)
    gated = dp["w_gate"] is not None
    return {"w_in": put(dp["w_in"], dw["w_cat"][:, :F]),
            "w_gate": put(dp["w_gate"], dw["w_cat"][:, F:]) if gated else None,
            "w_out": put(dp["w_out"], dw["w_out"]),
            "b_in": None if dp["b_in"] is None else put(dp["b_in"], dw["b_cat"][:F]),
            "b_out": None if dp["b_out"] is None else put(dp["b_out"], dw["b_out"])}


def _varying_axes(a) -> frozenset:
    """The manual mesh axes `a` varies over inside `jax.shard_map` (empty outside; jax 0.10 keeps them in
    the aval's `mat.varying`, earlier versions in `vma`)."""
    aval = jax.typeof(a)
    mat = getattr(aval, "mat", None)
    return frozenset(mat.varying if mat is not None else getattr(aval, "vma", ()))


def varying_like(tree, *like):
    """`tree` (loop carries made of zeros) marked as varying over every mesh axis any of `like` varies over.

    Inside `jax.shard_map` the loops' outputs vary over the axes their inputs (sharded rows, sharded
    expert weights) vary over, and a loop carry must keep its type; outside there are none, and this is
    the identity."""
    axes = frozenset().union(*(_varying_axes(leaf) for leaf in jax.tree.leaves(like)))
    if not axes:
        return tree

    def cast(a):
        missing = tuple(sorted(axes - _varying_axes(a)))
        return jax.lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _blocked_forward(activation, block, x_MD, p, start_E, rows_E):
    """y_MD and the pre-activations hg_rows `[M, 2F]` ([h | g] side by side; `[M, F]` without a gate) of
    the rows processed; 0 elsewhere."""
    M, D = x_MD.shape
    E, F, _ = p["w_out"].shape
    hg_width = 2 * F if p["w_gate"] is not None else F
    dtype = x_MD.dtype

    def expert(e, carry):
        w = _expert_weights(p, e)

        def step(size, base, j, carry):
            y_MD, hg_rows = carry
            r = base + j * size
            x_mD = jax.lax.dynamic_slice_in_dim(x_MD, r, size)
            hg = x_mD @ w["w_cat"]
            if w["b_cat"] is not None:
                hg = hg + w["b_cat"]
            y_mD = _activated(activation, F, hg) @ w["w_out"]
            if w["b_out"] is not None:
                y_mD = y_mD + w["b_out"]
            y_MD = jax.lax.dynamic_update_slice_in_dim(y_MD, y_mD.astype(dtype), r, 0)
            hg_rows = jax.lax.dynamic_update_slice_in_dim(hg_rows, hg.astype(dtype), r, 0)
            return y_MD, hg_rows

        for size, base, n in _steps(rows_E[e], start_E[e], block_ladder(block, M)):
            carry = jax.lax.fori_loop(0, n, functools.partial(step, size, base), carry)
        return carry

    init = varying_like((jnp.zeros((M, D), dtype), jnp.zeros((M, hg_width), dtype)), x_MD, p, start_E, rows_E)
    return jax.lax.fori_loop(0, E, expert, init)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def blocked_ffn(activation: str, block: int, x_MD: Array, p: dict, start_E: Array, rows_E: Array) -> Array:
    """Dropless expert FFN over rows sorted by expert: `<dtype>[M, D] -> [M, D]`.

    p: {"w_in": [E, D, F], "w_gate": [E, D, F] or None, "w_out": [E, F, D], "b_in": [E, F] or None,
    "b_out": [E, D] or None}. Expert e owns rows [start_E[e], start_E[e] + rows_E[e]), rows_E a
    multiple of `block`; rows of no expert come back 0.
    """
    return _blocked_forward(activation, block, x_MD, p, start_E, rows_E)[0]


def _blocked_ffn_fwd(activation, block, x_MD, p, start_E, rows_E):
    y_MD, hg_rows = _blocked_forward(activation, block, x_MD, p, start_E, rows_E)
    return y_MD, (x_MD, p, start_E, rows_E, hg_rows)


def _blocked_ffn_bwd(activation, block, res, dy_MD):
    x_MD, p, start_E, rows_E, hg_rows = res
    M = x_MD.shape[0]
    F = p["w_out"].shape[1]
    f32 = jnp.float32
    wgrad = lambda a, b: jnp.matmul(a.T, b, preferred_element_type=f32)  # [m, in]^T [m, out] -> [in, out]

    def expert(e, carry):
        dx_MD, dp = carry
        w = _expert_weights(p, e)

        def step(size, base, j, carry):
            dx_MD, dw = carry
            r = base + j * size
            rows = lambda a: jax.lax.dynamic_slice_in_dim(a, r, size)
            x_mD, dy_mD, hg = rows(x_MD), rows(dy_MD), rows(hg_rows)
            a_mF, activated_vjp = jax.vjp(functools.partial(_activated, activation, F), hg)
            (dhg,) = activated_vjp(dy_mD @ w["w_out"].T)
            dx_mD = (dhg @ w["w_cat"].T).astype(dx_MD.dtype)
            dx_MD = jax.lax.dynamic_update_slice_in_dim(dx_MD, dx_mD, r, 0)
            new = {"w_cat": wgrad(x_mD, dhg), "w_out": wgrad(a_mF, dy_mD),
                   "b_cat": None if w["b_cat"] is None else dhg.astype(f32).sum(0),
                   "b_out": None if w["b_out"] is None else dy_mD.astype(f32).sum(0)}
            return dx_MD, jax.tree.map(jnp.add, dw, new)

        carry = (dx_MD, varying_like(jax.tree.map(lambda v: jnp.zeros(v.shape, f32), w), x_MD, dy_MD, p, rows_E))
        for size, base, n in _steps(rows_E[e], start_E[e], block_ladder(block, M)):
            carry = jax.lax.fori_loop(0, n, functools.partial(step, size, base), carry)
        dx_MD, dw = carry
        return dx_MD, _put_expert_grads(dp, dw, e)

    init = varying_like((jnp.zeros_like(x_MD), jax.tree.map(jnp.zeros_like, p)), x_MD, dy_MD, p, start_E, rows_E,
                    hg_rows)
    dx_MD, dp = jax.lax.fori_loop(0, p["w_out"].shape[0], expert, init)
    return dx_MD, _sum_over_extra_axes(dp, p), None, None


def _sum_over_extra_axes(grads, params):
    """Inside `jax.shard_map`: a weight gradient summed over the mesh axes it varies over and its weight does
    not (the batch shards that share one copy of the weight), as JAX's own transposes do; else the identity."""
    def reduce(g, w):
        extra = tuple(sorted(_varying_axes(g) - _varying_axes(w)))
        return jax.lax.psum(g, extra) if extra else g

    return jax.tree.map(reduce, grads, params)


blocked_ffn.defvjp(_blocked_ffn_fwd, _blocked_ffn_bwd)


@dataclasses.dataclass(frozen=True)
class ExpertFFN:
    """How E expert FFNs compute, given their weights: what `Experts` and `QuantizedExperts` share.

    Weights come as `(w_in_EDF, w_gate_EDF or None, w_out_EFD, b_in_EF or None, b_out_ED or None)`,
    already in the compute `dtype`. capacity_backend: how capacity buffers run: 'einsum' (batched
    matmuls over E, the form accelerators want) or 'blocked' (the dropless path's loops over experts
    and row blocks: on CPU a few percent faster, the block's hidden activations staying in cache).
    """

    activation: str = "swiglu"
    dtype: Any = jnp.float32
    capacity_backend: str = "einsum"

    def __post_init__(self):
        if self.capacity_backend not in ("einsum", "blocked"):
            raise ValueError(f"Experts: capacity_backend={self.capacity_backend!r} is not 'einsum' or 'blocked' "
                             "(MoEConfig.expert_backend picks it).")

    @property
    def gated(self) -> bool:
        return self.activation in ("swiglu", "geglu")

    def capacity(self, x_EXD: Array, weights: tuple) -> Array:
        """Capacity buffers `[E, X, D]` -> `[E, X, D]` (through `capacity_backend`)."""
        w_in, w_gate, w_out, b_in, b_out = weights
        if self.capacity_backend == "blocked":
            E, X, D = x_EXD.shape
            p = {"w_in": w_in, "w_gate": w_gate, "w_out": w_out, "b_in": b_in, "b_out": b_out}
            block = min(X & -X, _STEP_ROWS)  # the largest power of two dividing X: whole steps, no padding
            start_E = jnp.arange(E, dtype=jnp.int32) * X
            y_MD = blocked_ffn(self.activation, block, x_EXD.reshape(E * X, D).astype(self.dtype), p, start_E,
                               jnp.full((E,), X, jnp.int32))
            return y_MD.reshape(E, X, D)
        act = activation_fn(self.activation)
        x_EXD = x_EXD.astype(self.dtype)
        h_EXF = jnp.einsum("exd,edf->exf", x_EXD, w_in)
        if b_in is not None:
            h_EXF = h_EXF + b_in[:, None, :]
        if self.gated:
            h_EXF = act(jnp.einsum("exd,edf->exf", x_EXD, w_gate)) * h_EXF
        else:
            h_EXF = act(h_EXF)
        y_EXD = jnp.einsum("exf,efd->exd", h_EXF, w_out)
        if b_out is not None:
            y_EXD = y_EXD + b_out[:, None, :]
        return y_EXD

    def grouped(self, x_MD: Array, weights: tuple, group_sizes_E: Array, *, backend: str, block_size: int,
                counts_E: Optional[Array] = None) -> Array:
        """Rows sorted by expert `[M, D]` with `group_sizes_E` (summing to M) -> `[M, D]`.

        blocked: group sizes must be multiples of `block_size`; `counts_E` (rows each expert really
        holds, before padding) lets it skip the padding blocks, else every block of every group runs.
        """
        M = x_MD.shape[0]
        if backend == "blocked":
            if M % block_size:
                raise ValueError(f"blocked experts: {M} rows are not a multiple of block_size={block_size}; "
                                 "pad the rows (dispatch.sort_choices does) or change dropless_block_size.")
            w_in, w_gate, w_out, b_in, b_out = weights
            p = {"w_in": w_in, "w_gate": w_gate, "w_out": w_out, "b_in": b_in, "b_out": b_out}
            group_sizes_E = group_sizes_E.astype(jnp.int32)
            start_E = jnp.cumsum(group_sizes_E) - group_sizes_E
            held_E = group_sizes_E if counts_E is None else counts_E.astype(jnp.int32)
            rows_E = -(-held_E // block_size) * block_size
            return blocked_ffn(self.activation, block_size, x_MD.astype(self.dtype), p, start_E, rows_E)
        if backend not in ("ragged_dot", "pallas"):
            raise ValueError(f"expert_backend={backend!r} is not 'ragged_dot', 'pallas' or 'blocked'.")
        w_in, w_gate, w_out, b_in, b_out = weights
        act = activation_fn(self.activation)
        x_MD = x_MD.astype(self.dtype)
        E = w_in.shape[0]
        matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes_E)
        if backend == "pallas":
            from pallas_kernels import gmm  # imported here: Pallas loads only for the backend that uses it

            matmul = lambda a, w: gmm(a, w, group_sizes_E)
        row_expert_M = None
        if b_in is not None:
            row_expert_M = jnp.repeat(jnp.arange(E), group_sizes_E, total_repeat_length=M)
        h_MF = matmul(x_MD, w_in)
        if b_in is not None:
            h_MF = h_MF + b_in[row_expert_M]
        h_MF = act(matmul(x_MD, w_gate)) * h_MF if self.gated else act(h_MF)
        y_MD = matmul(h_MF, w_out)
        if b_out is not None:
            y_MD = y_MD + b_out[row_expert_M]
        return y_MD


class Experts(nnx.Module):
    """E independent FFNs: w_in_EDF (and w_gate_EDF for gated activations), w_out_EFD, optional biases,
    computed by `self.ffn` (an `ExpertFFN`; capacity_backend: see there)."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str = "swiglu",
                 use_bias: bool = False, init_scale: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, capacity_backend: str = "einsum", rngs: nnx.Rngs):
        self.ffn = ExpertFFN(activation=activation, dtype=dtype, capacity_backend=capacity_backend)
        E, D, F = num_experts, d_model, d_ff
        init = _init(init_scale)
        self.w_in_EDF = nnx.Param(init(rngs.params(), (E, D, F), param_dtype))
        self.w_gate_EDF = nnx.data(nnx.Param(init(rngs.params(), (E, D, F), param_dtype)) if self.ffn.gated else None)
        self.w_out_EFD = nnx.Param(init(rngs.params(), (E, F, D), param_dtype))
        self.b_in_EF = nnx.data(nnx.Param(jnp.zeros((E, F), param_dtype)) if use_bias else None)
        self.b_out_ED = nnx.data(nnx.Param(jnp.zeros((E, D), param_dtype)) if use_bias else None)

    def _weights(self) -> tuple:
        cast = lambda p: None if p is None else p[...].astype(self.ffn.dtype)
        return (cast(self.w_in_EDF), cast(self.w_gate_EDF), cast(self.w_out_EFD),
                cast(self.b_in_EF), cast(self.b_out_ED))

    def __call__(self, x_EXD: Array) -> Array:
        """Capacity buffers `[E, X, D]` -> `[E, X, D]`."""
        return self.ffn.capacity(x_EXD, self._weights())

    def grouped(self, x_MD: Array, group_sizes_E: Array, *, backend: str, block_size: int,
                counts_E: Optional[Array] = None) -> Array:
        """Rows sorted by expert `[M, D]` -> `[M, D]`; see `ExpertFFN.grouped`."""
        return self.ffn.grouped(x_MD, self._weights(), group_sizes_E, backend=backend, block_size=block_size,
                                counts_E=counts_E)


class FeedForward(nnx.Module):
    """A dense FFN (shared experts, dense layers, dense-equivalent baselines): w_in_DF, w_gate_DF, w_out_FD."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "swiglu", use_bias: bool = False,
                 init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.experts = Experts(1, d_model, d_ff, activation=activation, use_bias=use_bias,
                               init_scale=init_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_TD: Array) -> Array:
        return self.experts(x_TD[None])[0]
