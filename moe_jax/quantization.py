"""Weight-only int8 / int4 quantization of the routed experts, for inference.

    qmodel = quantize_experts(model, bits=8)           # a copy: `model` keeps its float weights
    logits_BLV, aux = qmodel(tokens_BL)                # called exactly like the float model
    expert_weight_bytes(model), expert_weight_bytes(qmodel)

What is quantized: the routed experts of every `MoELayer` (`experts.w_in_EDF`, `w_gate_EDF`,
`w_out_EFD`), which hold most of an MoE model's parameters but each serve only the tokens routed to
them. Each matrix `[E, in, out]` gets one scale per (expert, output channel), `scale [E, 1, out]`, symmetric
absmax: scale = max_i |w[e, i, o]| / (qmax + 1/2) and q = clip(round(w / scale)), so every weight is
reconstructed within scale / 2 (qmax = 127 for int8, 7 for int4; the +1/2 lets the extreme bucket
be used fully). The expert FFN dequantizes `q * scale` right before its matmuls, inside the jitted
call, in every expert backend (einsum, ragged_dot, blocked, pallas), because `QuantizedExperts`
hands its dequantized weights to the same computation (`ExpertFFN`) that `Experts` hands its own.
On the CPU this is extra work (benchmarks/quantization.py: the eval forward takes ~1.1x (int8) and
~1.2x (int4) the float time); the saving is memory: weights are stored and moved as int8 / int4.

What is kept in higher precision, as MoE inference work recommends (Frantar & Alistarh 2023,
"QMoE"; Kim et al. 2023, "Mixture of Quantized Experts"; DeepSeek-V3's FP8 recipe keeps the gate in
high precision): the router `w_DE` (float32: routing is a discrete top-k whose ties quantization
noise would flip; Switch keeps the router in float32 for the same reason), the shared experts
(every token passes through them), attention, embeddings, norms and expert biases.

Library: the quantize / dequantize numerics are qwix's (Google's JAX quantization library,
`qwix.quantize(w, qtype, channelwise_axes=(0, 2))`, `qwix.dequantize`); int4 values are `jnp.int4`
arrays. qwix's model-level post-training quantization (`qwix.quantize_model` with a `PtqProvider`)
does not fit this code base, checked with qwix 0.1.8 on flax 0.12.8:
  * it finds weights by intercepting `jnp.einsum` / `lax.dot_general` calls and replaces the
    `nnx.Param` with a `WithAux` wrapper on the first call; `Experts` reads its weights as
    `param[...].astype(dtype)`, which that wrapper does not support once it holds a `QArray`, so the
    second call of the quantized model fails (`ValueError: Unsupported type: QArray`);
  * the dropless backends never call those functions on a Param: with `expert_backend='blocked'`
    (matmuls on per-expert slices inside `fori_loop` / `custom_vjp`) the experts silently stay
    float32; with `'ragged_dot'` quantize_model raises flax's TraceContextError; `pallas` calls a
    kernel. Quantizing at the one point where every backend reads its weights covers them all.
Byte counts take int4 as 4 bits (packed two per byte, the layout XLA's TPU and GPU backends use; not
checked on this CPU-only machine); numpy and the CPU runtime count an int4 element as one byte
(`x.nbytes`), so in host RAM here int4 weights take as much room as int8.
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import qwix
from flax import nnx

from moe_jax.experts import Experts
from moe_jax.moe_layer import MoELayer
from moe_jax.types import Array

QTYPES = {8: jnp.int8, 4: jnp.int4}
WEIGHT_NAMES = ("w_in_EDF", "w_gate_EDF", "w_out_EFD")
BIAS_NAMES = ("b_in_EF", "b_out_ED")


class QuantizedWeight(nnx.Variable):
    """A frozen quantized matrix: `qwix.QArray(qvalue <int8|int4>[E, in, out], scale <float32>[E, 1, out])`.

    Not an `nnx.Param`: `nnx.split(model, nnx.Param, ...)` puts it in the rest, so an optimizer built
    on the params never sees it.
    """


def check_bits(bits: Any) -> int:
    """The bit width as an int; a clear error for anything but 8 or 4 (before any array is touched)."""
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or int(bits) not in QTYPES:
        raise ValueError(f"quantization bits={bits!r} is not supported: use bits=8 (int8) or bits=4 (int4). "
                         "Router and shared experts always stay in float.")
    return int(bits)


def quantize_weight(w: Array, bits: int) -> qwix.QArray:
    """<float>[E, in, out] -> QArray: per-(expert, output channel) symmetric absmax, scales float32."""
    bits = check_bits(bits)
    if w.ndim != 3:
        raise ValueError(f"quantize_weight: expected an expert weight [E, in, out], got shape {w.shape}.")
    return qwix.quantize(jnp.asarray(w, jnp.float32), QTYPES[bits], channelwise_axes=(0, 2))


def dequantize_weight(q: qwix.QArray, dtype=jnp.float32) -> Array:
    """QArray -> <dtype>[E, in, out]: qvalue * scale."""
    return qwix.dequantize(q).astype(dtype)


class QuantizedExperts(nnx.Module):
    """Routed experts whose matrices are stored quantized (`QuantizedWeight`) and dequantized in the call.

    Built from a float `Experts`, whose computation (`ExpertFFN`: activation, dtype, backends) it uses
    as is; biases (if any) stay float `nnx.Param`s. Same interface as `Experts` (`__call__`, `grouped`);
    only the weights it hands the computation differ.
    """

    def __init__(self, experts: Experts, bits: int):
        bits = check_bits(bits)
        if isinstance(experts, QuantizedExperts):
            raise ValueError("QuantizedExperts: these experts are already quantized "
                             f"({experts.bits}-bit); quantize the float model instead.")
        if not isinstance(experts, Experts):
            raise TypeError(f"QuantizedExperts: expected an Experts module, got {type(experts).__name__}.")
        self.ffn = experts.ffn
        self.bits = bits
        for name in WEIGHT_NAMES:
            p = getattr(experts, name)
            setattr(self, name, nnx.data(None if p is None else QuantizedWeight(quantize_weight(p[...], bits))))
        for name in BIAS_NAMES:
            p = getattr(experts, name)
            setattr(self, name, nnx.data(None if p is None else nnx.Param(p[...])))

    def _weights(self) -> tuple:
        deq = lambda v: None if v is None else dequantize_weight(v.get_value(), self.ffn.dtype)
        cast = lambda p: None if p is None else p[...].astype(self.ffn.dtype)
        return (deq(self.w_in_EDF), deq(self.w_gate_EDF), deq(self.w_out_EFD),
                cast(self.b_in_EF), cast(self.b_out_ED))

    def __call__(self, x_EXD: Array) -> Array:
        """Capacity buffers `[E, X, D]` -> `[E, X, D]`."""
        return self.ffn.capacity(x_EXD, self._weights())

    def grouped(self, x_MD: Array, group_sizes_E: Array, *, backend: str, block_size: int,
                counts_E: Array | None = None) -> Array:
        """Rows sorted by expert `[M, D]` -> `[M, D]`; see `ExpertFFN.grouped`."""
        return self.ffn.grouped(x_MD, self._weights(), group_sizes_E, backend=backend, block_size=block_size,
                                counts_E=counts_E)

    def dequantized(self, *, rngs: nnx.Rngs | None = None) -> Experts:
        """A float `Experts` holding the dequantized weights (what this module computes with)."""
        w_in, w_gate, w_out, b_in, b_out = self._weights()
        E, D, F = w_in.shape
        ffn = self.ffn
        out = Experts(E, D, F, activation=ffn.activation, use_bias=b_in is not None, dtype=ffn.dtype,
                      param_dtype=w_in.dtype, capacity_backend=ffn.capacity_backend,
                      rngs=rngs or nnx.Rngs(params=0))
        for name, value in zip(WEIGHT_NAMES + BIAS_NAMES, (w_in, w_gate, w_out, b_in, b_out)):
            if value is not None:
                getattr(out, name)[...] = value
        return out


def moe_layers(model: nnx.Module) -> list[MoELayer]:
    """Every MoELayer in `model` (the model itself if it is one), in graph order."""
    return [m for _, m in nnx.iter_modules(model) if isinstance(m, MoELayer)]


def quantize_experts(model: nnx.Module, bits: int = 8) -> nnx.Module:
    """A copy of `model` with the routed experts of every MoELayer quantized to `bits` (8 or 4).

    Works on a `Transformer` or a bare `MoELayer`. The router, shared experts and all non-MoE
    weights are the same arrays as in `model`.
    """
    bits = check_bits(bits)
    if getattr(getattr(model, "cfg", None), "scan_layers", False):
        raise ValueError("quantize_experts: the model has ModelConfig.scan_layers=True (experts stacked over "
                         "layers); quantize the unrolled model: build it with scan_layers=False and load its state "
                         "with moe_jax.layer_stack.unstack_layers.")
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"quantize_experts: {type(model).__name__} has no MoELayer to quantize; build the "
                         "model with MoE layers (config.model.use_moe=True).")
    already = [layer.experts.bits for layer in layers if isinstance(layer.experts, QuantizedExperts)]
    if already:
        raise ValueError(f"quantize_experts: the experts are already quantized ({already[0]}-bit); "
                         "quantize the float model instead.")
    model = nnx.clone(model)
    for layer in moe_layers(model):
        layer.experts = QuantizedExperts(layer.experts, bits)
    return model


def dtype_bits(dtype) -> int:
    """Storage bits of one element: 4 for int4 / uint4 (packed), else the itemsize in bits."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jnp.iinfo(dtype).bits
    if jnp.issubdtype(dtype, jnp.floating):
        return jnp.finfo(dtype).bits
    return dtype.itemsize * 8


def array_bytes(x) -> int:
    """Bytes of `x` stored packed (int4: two values per byte)."""
    return math.ceil(math.prod(x.shape) * dtype_bits(x.dtype) / 8)


def expert_weight_bytes(model: nnx.Module) -> dict:
    """Bytes of the routed experts' matrices over all MoE layers: {"values", "scales", "total"}.

    values: the weights themselves (float, or int8 / packed int4); scales: their float32 scales (0
    for float experts). Biases, router and shared experts are not counted (they are never quantized).
    """
    values = scales = 0
    for layer in moe_layers(model):
        for name in WEIGHT_NAMES:
            var = getattr(layer.experts, name)
            if var is None:
                continue
            if isinstance(var, QuantizedWeight):
                q = var.get_value()
                values += array_bytes(q.qvalue)
                scales += array_bytes(q.scale)
            else:
                values += array_bytes(var[...])
    return {"values": values, "scales": scales, "total": values + scales}


def model_bytes(model: nnx.Module) -> int:
    """Bytes of every array in the model's state (int4 packed)."""
    return sum(array_bytes(x) for x in jax.tree.leaves(nnx.state(model)))
