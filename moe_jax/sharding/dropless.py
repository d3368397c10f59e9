"""Dropless expert parallelism: every routed choice reaches the device holding its expert, however
skewed the routing. Runs inside the expert-parallel `shard_map` (expert_parallel.py).

n = mesh 'expert' size, E_l = E / n experts per device, T tokens and K choices per device, b the
dropless block size (1 unless expert_backend='blocked'):

    device i of the expert axis
      sort its T*K choices by expert (stable)  -> rows [T*K, D] sorted by expert; counts_E
      all_gather(counts_E over 'expert')       -> counts_NE [n, E]: every device knows every transfer
      exchange (ragged | padded)               -> rows [M_r, D]: the rows of its E_l experts from every
                                                  peer, expert-major, source-major within an expert,
                                                  each expert's rows padded to a multiple of b
      experts: grouped matmul over E_l groups  -> out [M_r, D]          (+ psum over 'model')
      the reverse exchange                     -> out [T*K, D] in its own sorted order
      combine (weighted sum over K)            -> y [T, D]

Because the counts are gathered first, a sender knows where its rows land on each receiver, so rows
arrive already sorted by expert and no local permutation follows the exchange. M_r is static: the worst
case, every peer's choices all going to this device's experts (n * T * K rows plus block padding).

Exchanges (`ExpertParallel.dropless_exchange`):
  ragged  `jax.lax.ragged_all_to_all`: one slice per (destination, expert), exactly the routed rows
          (GPU/TPU; XLA:CPU does not implement it). Its receive buffer is M_r rows, or n * R with
          `dropless_buffer_factor` (below), with the same worst-case fallback.
  padded  `jax.lax.all_to_all` of a `[n, R, D]` buffer per device, block j holding the rows for device j's
          experts; R = T * K (the worst case: all of a device's choices to one peer) unless
          `dropless_buffer_factor` f bounds it to ceil(f * T * K / n), in which case a step whose routing
          overflows R on any device takes the worst-case exchange instead (`lax.cond` on the gathered
          counts: the same branch on every device), so nothing is ever dropped.
Both deliver the same rows to the same places, and the expert and combine arithmetic is the
single-device dropless layer's, row by row; the gathers are `dispatch.dispatch_rows` (gathers both ways).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax import dispatch as dispatch_lib
from moe_jax.experts import varying_like
from moe_jax.types import Array

EXCHANGES = ("auto", "ragged", "padded")


def _exclusive_cumsum(a: Array, axis: int) -> Array:
    return jnp.cumsum(a, axis=axis) - a


def _round_up(a, b: int):
    return -(-a // b) * b


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where every transfer goes, from the gathered counts (identical on every device but for `me`).

    counts_SDL: <int32>[n, n, E_l] choices device s routes to local expert l of device d.
    send_offsets_E / send_sizes_E: this device's slices of its sorted rows, one per global expert.
    land_E: where each of those slices lands on its destination (offset in that device's `[M_r]` rows).
    recv_offsets_SL / recv_sizes_SL: where the slices from each source land here, and their sizes.
    group_sizes_L: this device's rows per local expert, block-padded; the last expert takes the leftover
    rows so that they sum to M_r. held_L: rows each local expert really holds.
    """

    counts_SDL: Array
    send_offsets_E: Array
    send_sizes_E: Array
    land_E: Array
    recv_offsets_SL: Array
    recv_sizes_SL: Array
    source_offsets_SL: Array  # on each source, where the slice it sent here starts in its sorted rows
    group_sizes_L: Array
    held_L: Array


def layout(counts_NE: Array, me: Array, block: int, rows_out: int) -> Layout:
    """counts_NE <int32>[n, E]: choices of each device of the expert axis per expert; me: this device's index."""
    n, E = counts_NE.shape
    El = E // n
    counts_SDL = counts_NE.reshape(n, n, El)
    total_DL = counts_SDL.sum(0)
    padded_DL = _round_up(total_DL, block)
    land_SDL = _exclusive_cumsum(padded_DL, 1)[None] + _exclusive_cumsum(counts_SDL, 0)
    offsets_NE = _exclusive_cumsum(counts_NE, 1)  # each device's slice starts in its own sorted rows
    take = lambda a, i, axis: jax.lax.dynamic_index_in_dim(a, i, axis, keepdims=False)
    group_sizes_L = take(padded_DL, me, 0)
    group_sizes_L = group_sizes_L.at[El - 1].add(rows_out - group_sizes_L.sum())
    return Layout(
        counts_SDL=counts_SDL, send_offsets_E=take(offsets_NE, me, 0), send_sizes_E=take(counts_NE, me, 0),
        land_E=take(land_SDL, me, 0).reshape(E), recv_offsets_SL=take(land_SDL, me, 1),
        recv_sizes_SL=take(counts_SDL, me, 1), source_offsets_SL=take(offsets_NE.reshape(n, n, El), me, 1),
        group_sizes_L=group_sizes_L, held_L=take(total_DL, me, 0))


def rows_out(n: int, rows_per_peer: int, experts_per_device: int, block: int) -> int:
    """M_r: the worst case of rows a device receives (every peer's rows), plus under a block per expert."""
    return _round_up(n * rows_per_peer + experts_per_device * (block - 1), block)


@dataclasses.dataclass(frozen=True)
class DroplessExchange:
    """The dropless exchange over mesh axis `axis` (size n) for E experts, E / n per device.

    kind: 'ragged' or 'padded' (resolved; see the module docstring). buffer_factor: R, the rows per peer
    the buffers are sized for, as a multiple of the balanced share T * K / n (None: T * K, the worst case);
    the padded exchange's send buffers, the ragged exchange's receive buffer (n * R rows). A step whose
    routing needs more on any device takes the worst-case exchange (`lax.cond`, one branch everywhere).
    """

    kind: str
    num_experts: int
    axis_size: int
    axis: str = "expert"
    buffer_factor: Optional[float] = None
    tensor_axis: Optional[str] = None  # 'model' when experts' hidden width is split: psum their outputs
    sync_axes: tuple[str, ...] = ()  # the other axes splitting the batch: the bounded exchange's branch agrees

    def rows_per_peer(self, num_choices: int) -> int:
        """R for a device with `num_choices` = T * K choices."""
        if self.buffer_factor is None:
            return num_choices
        return max(1, min(num_choices, math.ceil(self.buffer_factor * num_choices / self.axis_size)))

    def __call__(self, experts, backend: str, block: int, x_TD: Array, expert_TK: Array,
                 weight_TK: Array) -> Array:
        """Inside the shard_map: this device's tokens `[T, D]` and choices -> the weighted outputs `[T, D]`."""
        T, K = expert_TK.shape
        n, E = self.axis_size, self.num_experts
        sorted_routing = dispatch_lib.sort_choices(expert_TK, weight_TK, E, 1)  # [T*K] rows, no padding
        counts_NE = jax.lax.all_gather(sorted_routing.counts_E, self.axis, axis=0, tiled=False)
        me = jax.lax.axis_index(self.axis)

        def run(rows_MD, lay):
            out_MD = experts.grouped(rows_MD, lay.group_sizes_L, backend=backend, block_size=block,
                                     counts_E=lay.held_L)
            if self.tensor_axis is not None:  # each model shard computed a partial sum over its slice of F
                out_MD = jax.lax.psum(out_MD, self.tensor_axis)
            return out_MD

        R = self.rows_per_peer(T * K)
        El = E // n

        def exchange(rows_per_peer, x_TD):
            if self.kind == "padded":
                return _padded(x_TD, sorted_routing, counts_NE, me, n, rows_per_peer, block, self.axis, run)
            M_r = rows_out(n, rows_per_peer, El, block)
            out_MD = _ragged(x_TD, sorted_routing, layout(counts_NE, me, block, M_r), M_r, self.axis, run)
            return dispatch_lib.SortedDispatcher().combine(out_MD, sorted_routing)

        if R == T * K:
            return exchange(R, x_TD)
        counts_SDL = counts_NE.reshape(n, n, El)
        if self.kind == "padded":  # the most rows one device sends to one peer
            need = jnp.max(counts_SDL.sum(-1))
            room = R
        else:  # the most rows one device receives, block padding included
            need = jnp.max(_round_up(counts_SDL.sum(0), block).sum(-1))
            room = rows_out(n, R, El, block)
        if self.sync_axes:  # one branch on every device, whatever its data shard
            need = jax.lax.pmax(need, self.sync_axes)
        return jax.lax.cond(need <= room, functools.partial(exchange, R), functools.partial(exchange, T * K), x_TD)


def _ragged(x_TD, sorted_routing, lay: Layout, M_r: int, axis: str, run) -> Array:
    """Sorted rows out to the experts' devices and back with `ragged_all_to_all`: `[T*K, D]` sorted outputs."""
    rows_MD = dispatch_lib.SortedDispatcher().dispatch(x_TD, sorted_routing)
    M, D = rows_MD.shape
    # The result takes its type from `output`: zeros marked varying like the rows sent, as the result is.
    recv_MD = jax.lax.ragged_all_to_all(
        rows_MD, varying_like(jnp.zeros((M_r, D), rows_MD.dtype), rows_MD), lay.send_offsets_E, lay.send_sizes_E, lay.land_E,
        lay.recv_sizes_SL.reshape(-1), axis_name=axis)
    out_MD = run(recv_MD, lay)
    return jax.lax.ragged_all_to_all(
        out_MD, varying_like(jnp.zeros((M, D), out_MD.dtype), out_MD), lay.recv_offsets_SL.reshape(-1), lay.recv_sizes_SL.reshape(-1),
        lay.source_offsets_SL.reshape(-1), lay.send_sizes_E, axis_name=axis)


def _padded(x_TD, sorted_routing, counts_NE, me, n: int, R: int, block: int, axis: str, run) -> Array:
    """The same exchange through `all_to_all` of `[n, R, D]` buffers (R rows per peer); `[T, D]` outputs."""
    T, K = sorted_routing.weight_TK.shape
    E = counts_NE.shape[1]
    El = E // n
    M, none_buffer = T * K, n * R
    M_r = rows_out(n, R, El, block)
    lay = layout(counts_NE, me, block, M_r)

    # Sender: sorted row m (expert e, destination e // E_l) -> buffer row (e // E_l) * R + its rank among
    # the rows for that destination. The rows of a destination are contiguous in sorted order.
    m_M = jnp.arange(M, dtype=jnp.int32)
    expert_M = sorted_routing.expert_TK.reshape(M)[jnp.minimum(sorted_routing.row_choice_M, M - 1)]
    dest_M = expert_M // El
    dest_start_N = lay.send_offsets_E.reshape(n, El)[:, 0]
    rank_M = m_M - dest_start_N[dest_M]
    buffer_row_M = jnp.where(rank_M < R, dest_M * R + rank_M, none_buffer)  # never >= R in the branch taken
    token_slot_TK = buffer_row_M[sorted_routing.token_slot_TK]
    row_choice_B = jnp.full((none_buffer,), M, jnp.int32).at[buffer_row_M].set(sorted_routing.row_choice_M,
                                                                              mode="drop")
    row_token_B = jnp.where(row_choice_B < M, row_choice_B // K, T)
    send_BD = dispatch_lib.dispatch_rows(x_TD, row_token_B, token_slot_TK)
    D = send_BD.shape[-1]
    recv_NRD = jax.lax.all_to_all(send_BD.reshape(n, R, D), axis, 0, 0, tiled=True)  # [source, R, D]

    # Receiver: row p of source s's block belongs to local expert l (its slices are in expert order) and
    # lands at recv_offsets[s, l] + (p - its start in that block).
    inner_end_SL = jnp.cumsum(lay.recv_sizes_SL, axis=1)
    p_R = jnp.arange(R, dtype=jnp.int32)
    local_SR = jax.vmap(lambda ends: jnp.searchsorted(ends, p_R, side="right"))(inner_end_SL).astype(jnp.int32)
    valid_SR = p_R[None] < inner_end_SL[:, -1:]
    local_SR = jnp.minimum(local_SR, El - 1)
    inner_start_SR = jnp.take_along_axis(inner_end_SL - lay.recv_sizes_SL, local_SR, axis=1)
    land_SR = jnp.take_along_axis(lay.recv_offsets_SL, local_SR, axis=1) + p_R[None] - inner_start_SR
    dest_row_B = jnp.where(valid_SR, land_SR, M_r).reshape(none_buffer)
    src_row_Mr = jnp.full((M_r,), none_buffer, jnp.int32).at[dest_row_B].set(
        jnp.arange(none_buffer, dtype=jnp.int32), mode="drop")
    rows_MrD = dispatch_lib.dispatch_rows(recv_NRD.reshape(none_buffer, D), src_row_Mr, dest_row_B[:, None])
    out_MrD = run(rows_MrD, lay)
    back_BD = dispatch_lib.dispatch_rows(out_MrD, dest_row_B, src_row_Mr[:, None])
    mine_NRD = jax.lax.all_to_all(back_BD.reshape(n, R, D), axis, 0, 0, tiled=True)  # [destination, R, D]
    return dispatch_lib.combine_rows(mine_NRD.reshape(none_buffer, D), sorted_routing.weight_TK, token_slot_TK,
                                     row_choice_B)
