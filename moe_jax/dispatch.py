"""Moving tokens into expert buffers and back: one interface, three implementations.

    buffer_EXD = dispatcher.dispatch(x_GSD, routing)       # X = rows per expert
    y_GSD      = dispatcher.combine(out_EXD, routing)

EinsumDispatcher (Switch/GShard): one-hot `dispatch_GSEC` and weighted `combine_GSEC` tensors,
    `buffer_EGCD = einsum('gsec,gsd->egcd')`. Costs 2 * G * S * E * C * D flops per direction;
    relative to the experts' 2 * (2 or 3) * D * F flops per slot that is about S / (2F) or
    S / (3F) extra per direction for (non-)gated experts: cheap for small groups, dominant for large.
GatherDispatcher: index gathers into an expert-major `[E, G * C, D]` buffer. Its gradients are
    gathers too (the routing keeps both the slot -> token and token -> slot maps), so neither
    direction scatters; no flops beyond the experts and one weighted sum over K.
SortedDispatcher (dropless): choices stably sorted by expert, each expert's rows padded to a
    multiple of a block size; `[rows, D]` plus per-expert group sizes, for grouped matmuls.

Both capacity paths give identical outputs and gradients where nothing is dropped.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from flax import struct

from moe_jax.routing import Routing, SoftRouting
from moe_jax.types import Array


# ---- gathers whose transposes are gathers (valid because the maps are injective) ----
#
# An index equal to the number of rows (T for tokens, M for buffer rows, T * K for choices) means
# "none": the gather clamps it and masks the row to 0 inside the same fusion, so no padded copy of
# an operand is ever made. The backward passes read the inverse maps, so neither direction scatters.
# Sums over the K choices are unrolled into K gathered terms: XLA:CPU then emits one elementwise
# loop fusion, where a reduce over the K axis becomes a separate (YNNPACK) reduction over a
# materialised `[T, K, D]` tensor, about twice as slow.

def _rows(a: Array, idx: Array) -> Array:
    """a[idx] along axis 0 (a: `[n, d]` rows), 0 where idx == n (the "none" index); any shape of idx."""
    n = a.shape[0]
    picked = a.at[jnp.minimum(idx, n - 1)].get(mode="promise_in_bounds")
    return jnp.where((idx < n)[..., None], picked, jnp.zeros((), a.dtype))


def _sum_over_choices(a: Array, idx_TK: Array, weight_TK: Optional[Array] = None) -> Array:
    """sum_k w[t, k] * a[idx[t, k]] (a: `[n, D]` rows; w = 1 if None), accumulated in float32: `[T, D]`."""
    total = None
    for k in range(idx_TK.shape[1]):
        term = _rows(a, idx_TK[:, k]).astype(jnp.float32)
        if weight_TK is not None:
            term = term * weight_TK[:, k, None].astype(jnp.float32)
        total = term if total is None else total + term
    return total.astype(a.dtype)


@jax.custom_vjp
def dispatch_rows(x_TD: Array, row_token_M: Array, token_slot_TK: Array) -> Array:
    """buffer[m] = x[row_token[m]] (0 where row_token[m] == T): `[M, D]`.

    token_slot_TK lists, for each token, the K rows that read it (M where none): the inverse map,
    so the gradient dx[t] = sum_k dbuffer[token_slot[t, k]] is a gather, not a scatter-add.
    """
    return _rows(x_TD, row_token_M)


def _dispatch_rows_fwd(x_TD, row_token_M, token_slot_TK):
    return _rows(x_TD, row_token_M), token_slot_TK


def _dispatch_rows_bwd(token_slot_TK, g_MD):
    return _sum_over_choices(g_MD, token_slot_TK), None, None


dispatch_rows.defvjp(_dispatch_rows_fwd, _dispatch_rows_bwd)


@jax.custom_vjp
def combine_rows(out_MD: Array, weight_TK: Array, token_slot_TK: Array, row_choice_M: Array) -> Array:
    """y[t] = sum_k weight[t, k] * out[token_slot[t, k]] (terms with token_slot == M are 0): `[T, D]`.

    row_choice_M is the inverse map, t * K + k for the choice row m serves (T * K where none), so
    both gradients are gathers over the M rows: dout[m] = weight[t, k] * dy[t] and, from the same
    gathered dy rows, <dy[t], out[m]>, which is dweight[t, k] once gathered back by token_slot.
    """
    return _sum_over_choices(out_MD, token_slot_TK, weight_TK)


def _combine_rows_fwd(out_MD, weight_TK, token_slot_TK, row_choice_M):
    y_TD = _sum_over_choices(out_MD, token_slot_TK, weight_TK)
    return y_TD, (out_MD, weight_TK, token_slot_TK, row_choice_M)


def _combine_rows_bwd(res, g_TD):
    out_MD, weight_TK, token_slot_TK, row_choice_M = res
    T, K = weight_TK.shape
    f32 = jnp.float32
    g_MD = _rows(g_TD, jnp.where(row_choice_M < T * K, row_choice_M // K, T)).astype(f32)
    weight_M1 = _rows(weight_TK.reshape(T * K, 1), row_choice_M).astype(f32)
    g_out_MD = (g_MD * weight_M1).astype(out_MD.dtype)
    g_weight_M1 = jnp.sum(g_MD * out_MD.astype(f32), axis=-1, keepdims=True)
    g_weight_TK = _rows(g_weight_M1, token_slot_TK)[..., 0].astype(weight_TK.dtype)
    return g_out_MD, g_weight_TK, None, None


combine_rows.defvjp(_combine_rows_fwd, _combine_rows_bwd)


# ---- capacity paths ----

def _global_maps(routing: Routing):
    """Maps of the expert-major `[E, G, C]` buffer in global token numbering (t = g * S + s)."""
    G, S, K = routing.slot_GSK.shape
    E, C = routing.num_experts, routing.capacity
    M, T = E * G * C, G * S
    g_G11 = jnp.arange(G, dtype=jnp.int32)[:, None, None]
    dropped = routing.slot_GSK >= E * C
    e_GSK, c_GSK = routing.slot_GSK // C, routing.slot_GSK % C
    token_slot_TK = jnp.where(dropped, M, e_GSK * (G * C) + g_G11 * C + c_GSK).reshape(T, K)
    src_EGC = jnp.swapaxes(routing.src_GEC, 0, 1)
    empty = src_EGC >= S * K
    g_1G1 = jnp.arange(G, dtype=jnp.int32)[None, :, None]
    row_token_M = jnp.where(empty, T, g_1G1 * S + src_EGC // K).reshape(M)
    row_choice_M = jnp.where(empty, T * K, g_1G1 * S * K + src_EGC).reshape(M)
    return token_slot_TK, row_token_M, row_choice_M


class GatherDispatcher:
    """Index dispatch into an expert-major `[E, G * C, D]` buffer; gathers both ways."""

    def dispatch(self, x_GSD: Array, routing: Routing) -> Array:
        G, S, D = x_GSD.shape
        E, C = routing.num_experts, routing.capacity
        token_slot_TK, row_token_M, _ = _global_maps(routing)
        buffer_MD = dispatch_rows(x_GSD.reshape(G * S, D), row_token_M, token_slot_TK)
        return buffer_MD.reshape(E, G * C, D)

    def combine(self, out_EXD: Array, routing: Routing) -> Array:
        G, S, K = routing.slot_GSK.shape
        E, X, D = out_EXD.shape
        token_slot_TK, _, row_choice_M = _global_maps(routing)
        y_TD = combine_rows(out_EXD.reshape(E * X, D), routing.weight_GSK.reshape(G * S, K), token_slot_TK,
                            row_choice_M)
        return y_TD.reshape(G, S, D)


class EinsumDispatcher:
    """Switch/GShard one-hot einsum dispatch; also the only path for Soft MoE's dense routing."""

    def dispatch(self, x_GSD: Array, routing: Routing | SoftRouting) -> Array:
        G, S, D = x_GSD.shape
        dispatch_GSEC = routing.dispatch_tensor(x_GSD.dtype)
        buffer_EGCD = jnp.einsum("gsec,gsd->egcd", dispatch_GSEC, x_GSD)
        E, _, C, _ = buffer_EGCD.shape
        return buffer_EGCD.reshape(E, G * C, D)

    def combine(self, out_EXD: Array, routing: Routing | SoftRouting) -> Array:
        E, X, D = out_EXD.shape
        combine_GSEC = routing.combine_tensor(out_EXD.dtype)
        G, C = combine_GSEC.shape[0], combine_GSEC.shape[-1]
        y = jnp.einsum("gsec,egcd->gsd", combine_GSEC, out_EXD.reshape(E, G, C, D),
                       preferred_element_type=jnp.float32)
        return y.astype(out_EXD.dtype)


def make_dispatcher(kind: str):
    if kind == "gather":
        return GatherDispatcher()
    if kind == "einsum":
        return EinsumDispatcher()
    raise ValueError(f"dispatch={kind!r} is not 'gather' or 'einsum'.")


# ---- dropless: sorted by expert ----

@struct.dataclass
class SortedRouting:
    """Dropless routing: every choice served, rows sorted by expert and padded per expert.

    token_slot_TK: <int32>[T, K] row of choice k of token t in the sorted buffer.
    row_token_M / row_choice_M: <int32>[M] token (T = padding) and t * K + k (T * K = padding) of each row.
    group_sizes_E: <int32>[E] rows of each expert, padding included (multiples of `block_size`).
    counts_E: <int32>[E] choices routed to each expert (its rows before padding).
    weight_TK, expert_TK: the router's weights and choices.
    M = round_up(T * K + E * (block_size - 1), block_size) is static: the worst case of padding.
    """

    token_slot_TK: Array
    row_token_M: Array
    row_choice_M: Array
    group_sizes_E: Array
    counts_E: Array
    weight_TK: Array
    expert_TK: Array
    num_experts: int = struct.field(pytree_node=False)
    block_size: int = struct.field(pytree_node=False)


def sort_choices(expert_TK: Array, weight_TK: Array, num_experts: int, block_size: int = 1) -> SortedRouting:
    """Sorts the T * K choices by expert (stable: token order within an expert), padding each
    expert's rows to a multiple of `block_size` so a block of rows never straddles two experts."""
    T, K = expert_TK.shape
    E, b = num_experts, block_size
    num_choices = T * K
    M = -(-(num_choices + E * (b - 1)) // b) * b
    # Flat arrays over the T * K choices: choice t * K + k (`expert`, `token_slot`), or the choices in
    # sorted order (`order`: the choice at each sorted position, and `sorted_expert`, `rank`, `row`).
    expert = expert_TK.reshape(num_choices).astype(jnp.int32)
    order = jnp.argsort(expert, stable=True).astype(jnp.int32)
    counts_E = jnp.bincount(expert, length=E).astype(jnp.int32)
    padded_E = -(-counts_E // b) * b
    start_E = jnp.cumsum(padded_E) - padded_E
    unpadded_start_E = jnp.cumsum(counts_E) - counts_E
    sorted_expert = expert[order]
    rank = jnp.arange(num_choices, dtype=jnp.int32) - unpadded_start_E[sorted_expert]  # within its expert
    row = start_E[sorted_expert] + rank
    token_slot = jnp.zeros((num_choices,), jnp.int32).at[order].set(row)
    row_choice_M = jnp.full((M + 1,), num_choices, jnp.int32).at[row].set(order)[:M]
    row_token_M = jnp.where(row_choice_M < num_choices, row_choice_M // K, T)
    # The padding left over at the end belongs to the last expert, so group sizes sum to M.
    group_sizes_E = padded_E.at[E - 1].add(M - padded_E.sum())
    return SortedRouting(
        token_slot_TK=token_slot.reshape(T, K), row_token_M=row_token_M, row_choice_M=row_choice_M,
        group_sizes_E=group_sizes_E, counts_E=counts_E, weight_TK=weight_TK, expert_TK=expert_TK.astype(jnp.int32),
        num_experts=E, block_size=b)


class SortedDispatcher:
    """Dropless dispatch: `[M, D]` rows sorted by expert, for grouped matmul backends."""

    def dispatch(self, x_TD: Array, routing: SortedRouting) -> Array:
        return dispatch_rows(x_TD, routing.row_token_M, routing.token_slot_TK)

    def combine(self, out_MD: Array, routing: SortedRouting) -> Array:
        return combine_rows(out_MD, routing.weight_TK, routing.token_slot_TK, routing.row_choice_M)
