"""Expert FFNs over the E axis, and the dense FFN used for shared experts and dense baselines.

Experts never see routing: they take a buffer of rows per expert and return one of the same shape.
Backends:
  einsum      `[E, X, D]` capacity buffers, one batched matmul per weight (`'exd,edf->exf'`).
  ragged_dot  `[M, D]` rows sorted by expert + group sizes: `jax.lax.ragged_dot` (exact, and the form
              accelerators run well; on CPU XLA computes every group densely, so it is a reference).
  blocked     `[M, D]` sorted rows whose expert segments are padded to multiples of a block size:
              each block multiplies by its expert's weights (weights gathered per block). A dropless
              path that runs on the CPU at matmul speed, paying for the weight gather per block.
  pallas      the `ragged_dot` form through `pallas_kernels.gmm`, a Pallas grouped-matmul kernel
              (Mosaic on TPU, Triton on GPU, interpreted on CPU: correct there, not fast).
"""
from __future__ import annotations

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


class Experts(nnx.Module):
    """E independent FFNs: w_in_EDF (and w_gate_EDF for gated activations), w_out_EFD, optional biases."""

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, activation: str = "swiglu",
                 use_bias: bool = False, init_scale: float = 1.0, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        E, D, F = num_experts, d_model, d_ff
        init = _init(init_scale)
        self.activation = activation
        self.gated = activation in ("swiglu", "geglu")
        self.dtype = dtype
        self.w_in_EDF = nnx.Param(init(rngs.params(), (E, D, F), param_dtype))
        self.w_gate_EDF = nnx.data(nnx.Param(init(rngs.params(), (E, D, F), param_dtype)) if self.gated else None)
        self.w_out_EFD = nnx.Param(init(rngs.params(), (E, F, D), param_dtype))
        self.b_in_EF = nnx.data(nnx.Param(jnp.zeros((E, F), param_dtype)) if use_bias else None)
        self.b_out_ED = nnx.data(nnx.Param(jnp.zeros((E, D), param_dtype)) if use_bias else None)

    def _weights(self):
        cast = lambda p: None if p is None else p[...].astype(self.dtype)
        return (cast(self.w_in_EDF), cast(self.w_gate_EDF), cast(self.w_out_EFD),
                cast(self.b_in_EF), cast(self.b_out_ED))

    def __call__(self, x_EXD: Array) -> Array:
        """Capacity buffers `[E, X, D]` -> `[E, X, D]` (the einsum backend)."""
        w_in, w_gate, w_out, b_in, b_out = self._weights()
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

    def grouped(self, x_MD: Array, group_sizes_E: Array, *, backend: str, block_size: int) -> Array:
        """Rows sorted by expert `[M, D]` with `group_sizes_E` (summing to M) -> `[M, D]`."""
        w_in, w_gate, w_out, b_in, b_out = self._weights()
        act = activation_fn(self.activation)
        x_MD = x_MD.astype(self.dtype)
        M = x_MD.shape[0]
        E = w_in.shape[0]
        if backend == "ragged_dot":
            matmul = lambda a, w: jax.lax.ragged_dot(a, w, group_sizes_E)
        elif backend == "pallas":
            from pallas_kernels import gmm  # imported here: Pallas loads only for the backend that uses it

            matmul = lambda a, w: gmm(a, w, group_sizes_E)
        elif backend == "blocked":
            if M % block_size:
                raise ValueError(f"blocked experts: {M} rows are not a multiple of block_size={block_size}.")
            block_start_N = jnp.arange(0, M, block_size)
            block_expert_N = jnp.clip(
                jnp.searchsorted(jnp.cumsum(group_sizes_E), block_start_N, side="right"), 0, E - 1)

            def matmul(a, w):
                a_NBI = a.reshape(M // block_size, block_size, a.shape[-1])
                return jnp.einsum("nbi,nio->nbo", a_NBI, w[block_expert_N]).reshape(M, w.shape[-1])
        else:
            raise ValueError(f"expert_backend={backend!r} is not 'ragged_dot', 'pallas' or 'blocked'.")
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


class FeedForward(nnx.Module):
    """A dense FFN (shared experts, dense layers, dense-equivalent baselines): w_in_DF, w_gate_DF, w_out_FD."""

    def __init__(self, d_model: int, d_ff: int, *, activation: str = "swiglu", use_bias: bool = False,
                 init_scale: float = 1.0, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.experts = Experts(1, d_model, d_ff, activation=activation, use_bias=use_bias,
                               init_scale=init_scale, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x_TD: Array) -> Array:
        return self.experts(x_TD[None])[0]
