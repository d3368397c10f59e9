"""Group metadata: which row tile and which group each step of a grouped-matmul kernel serves.

The rows of `lhs` are sorted by group: group e owns rows [start_e, end_e), start_e = sum of the sizes
before it. With row tiles of `tm` rows, a tile can hold the end of one group and the start of the next
(it "straddles" them), a group can be empty, and rows past the sum of the sizes belong to no group.

A kernel walks a list of *items*. Item i is one (row tile, row range) pair: `tile_I[i]` is the tile,
rows [lo_I[i], hi_I[i]) of it (global row ids) are the rows the item owns, and `group_I[i]` is the
index into the kernel's rhs (the local group). Items are ordered by row, so every visit of a tile comes
in one consecutive run of items, which lets a TPU kernel keep the tile's output block resident while
several groups write their rows into it.

Two lists are built, one per kernel:
  gmm   items cover every row tile and every row exactly once. Rows that belong to no local group
        (rows past the sum of the sizes, rows of groups held by other devices) get items with
        `real_I = 0`: the kernel writes zeros there without a matmul. Empty groups get no item.
  tgmm  items cover the rows of the local groups only; an empty local group still gets one item
        with an empty row range, so its weight-gradient block is written (as zeros).
The list has a static length (an upper bound, derived below); items past `num_items` are idle:
they repeat the last real item's tile and group, own no rows (lo = hi) and have every flag 0.

Expert parallelism: the kernel's rhs holds local groups [group_offset, group_offset + E_local) of the
global `group_sizes_E`. Local group j has the global row range of group group_offset + j; a local
index past the global groups is an empty group at the end. `group_offset` may be traced
(e.g. `axis_index * E_local` inside `shard_map`).

Group sizes whose sum exceeds m are cut at m (rows past m do not exist); negative sizes are not
checked at run time (they are traced) and give undefined results.

Shape suffixes (the letters of moe_jax/types.py): `_I` per item, `_Y` per row tile, `_W` per local
group, `_E` per global group.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ItemMetadata:
    """The item list of one kernel call. All arrays <int32>[I], I static (`max_items`).

    tile_I:  row tile of the item.             group_I: local group (rhs index), in [0, E_local).
    lo_I, hi_I: global rows [lo, hi) the item owns (inside its tile; lo == hi: none).
    real_I:  1 if the item multiplies by group_I's rhs, 0 if it only writes zeros or is idle.
    first_I, last_I: 1 on the first / last item of a local group (tgmm: zero / store the accumulator).
    num_items: <int32>[] items that are not idle.
    """

    tile_I: jax.Array
    group_I: jax.Array
    lo_I: jax.Array
    hi_I: jax.Array
    real_I: jax.Array
    first_I: jax.Array
    last_I: jax.Array
    num_items: jax.Array
    tm: int = dataclasses.field(metadata=dict(static=True))  # static: part of the pytree's structure
    num_tiles: int = dataclasses.field(metadata=dict(static=True))


def local_group_bounds(group_sizes_E: jax.Array, group_offset, num_local_groups: int,
                       m: int) -> tuple[jax.Array, jax.Array]:
    """Global row range [start, end) of each local group, <int32>[E_local] each, cut at m."""
    sizes_E = group_sizes_E.astype(jnp.int32)
    num_groups = sizes_E.shape[0]
    end_E = jnp.minimum(jnp.cumsum(sizes_E), m)
    start_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), end_E[:-1]])
    global_W = jnp.asarray(group_offset, jnp.int32) + jnp.arange(num_local_groups, dtype=jnp.int32)
    inside_W = (global_W >= 0) & (global_W < num_groups)
    clipped_W = jnp.clip(global_W, 0, num_groups - 1)
    # Local indices before the first global group are empty at row 0, after the last empty at the end.
    outside_row_W = jnp.where(global_W < 0, 0, end_E[-1])
    start_W = jnp.where(inside_W, start_E[clipped_W], outside_row_W)
    end_W = jnp.where(inside_W, end_E[clipped_W], outside_row_W)
    return start_W, end_W


def _items(seg_start: jax.Array, seg_end: jax.Array, *, tm: int, num_tiles: int, max_items: int, visit_empty: bool):
    """Items of the row segments [seg_start[s], seg_end[s]), ordered by segment then tile (= by row,
    since segments are ordered and disjoint). A segment spans ceil(end / tm) - floor(start / tm) tiles.
    The seg_* arrays are <int32>[number of segments]."""
    seg_size = seg_end - seg_start
    seg_first_tile = jnp.minimum(seg_start // tm, num_tiles - 1)
    seg_span = jnp.where(seg_size > 0, -(-seg_end // tm) - seg_start // tm, 1 if visit_empty else 0)
    seg_stop = jnp.cumsum(seg_span)  # items of segment s: [seg_stop[s] - seg_span[s], seg_stop[s])
    num_items = seg_stop[-1]
    item_I = jnp.arange(max_items, dtype=jnp.int32)
    live_I = item_I < num_items
    # Idle items copy the last real item (a real item always exists: see the callers' bounds).
    item_I = jnp.minimum(item_I, num_items - 1)
    seg_I = jnp.searchsorted(seg_stop, item_I, side="right").astype(jnp.int32)
    rank_I = item_I - (seg_stop[seg_I] - seg_span[seg_I])
    tile_I = seg_first_tile[seg_I] + rank_I
    lo_I = jnp.maximum(seg_start[seg_I], tile_I * tm)
    hi_I = jnp.minimum(seg_end[seg_I], (tile_I + 1) * tm)
    lo_I = jnp.where(live_I, lo_I, 0)
    hi_I = jnp.where(live_I, jnp.maximum(hi_I, lo_I), 0)
    first_I = live_I & (rank_I == 0)
    last_I = live_I & (rank_I == seg_span[seg_I] - 1)
    return seg_I, tile_I, lo_I, hi_I, live_I, first_I, last_I, num_items


def gmm_metadata(group_sizes_E: jax.Array, *, m: int, tm: int, group_offset=0,
                 num_local_groups: int) -> ItemMetadata:
    """Items for `gmm` over `m` rows (a multiple of `tm`): every row owned by exactly one item.

    Segments: [0, start of local group 0) (no group), the E_local local groups, [end of the last
    local group, m) (no group). Non-empty segments partition the m rows, so a tile is visited once per
    non-empty segment that touches it; summing, items <= num_tiles + (non-empty segments - 1)
    <= num_tiles + E_local + 1 = max_items.
    """
    if m % tm:
        raise ValueError(f"gmm_metadata: m={m} must be a multiple of tm={tm} (pad the rows first).")
    num_tiles = m // tm
    max_items = num_tiles + num_local_groups + 1
    start_W, end_W = local_group_bounds(group_sizes_E, group_offset, num_local_groups, m)
    seg_start = jnp.concatenate([jnp.zeros((1,), jnp.int32), start_W, end_W[-1:]])
    seg_end = jnp.concatenate([start_W[:1], end_W, jnp.full((1,), m, jnp.int32)])
    seg_I, tile_I, lo_I, hi_I, live_I, first_I, last_I, num_items = _items(
        seg_start, seg_end, tm=tm, num_tiles=num_tiles, max_items=max_items, visit_empty=False)
    is_group_I = (seg_I >= 1) & (seg_I <= num_local_groups)
    return ItemMetadata(
        tile_I=tile_I, group_I=jnp.clip(seg_I - 1, 0, num_local_groups - 1), lo_I=lo_I, hi_I=hi_I,
        real_I=(live_I & is_group_I).astype(jnp.int32), first_I=first_I.astype(jnp.int32),
        last_I=last_I.astype(jnp.int32), num_items=num_items, tm=tm, num_tiles=num_tiles)


def tgmm_metadata(group_sizes_E: jax.Array, *, m: int, tm: int, group_offset=0,
                  num_local_groups: int) -> ItemMetadata:
    """Items for `tgmm` over `m` rows (a multiple of `tm`): the local groups' rows, one item per
    empty local group. Non-empty groups (a of them) span <= num_tiles + a - 1 tiles, empty ones add
    E_local - a items, so items <= num_tiles + E_local - 1 = max_items (and >= 1)."""
    if m % tm:
        raise ValueError(f"tgmm_metadata: m={m} must be a multiple of tm={tm} (pad the rows first).")
    num_tiles = m // tm
    max_items = num_tiles + num_local_groups - 1
    start_W, end_W = local_group_bounds(group_sizes_E, group_offset, num_local_groups, m)
    seg_I, tile_I, lo_I, hi_I, live_I, first_I, last_I, num_items = _items(
        start_W, end_W, tm=tm, num_tiles=num_tiles, max_items=max_items, visit_empty=True)
    return ItemMetadata(
        tile_I=tile_I, group_I=seg_I, lo_I=lo_I, hi_I=hi_I, real_I=(live_I & (hi_I > lo_I)).astype(jnp.int32),
        first_I=first_I.astype(jnp.int32), last_I=last_I.astype(jnp.int32), num_items=num_items,
        tm=tm, num_tiles=num_tiles)


def tile_group_range(group_sizes_E: jax.Array, *, m: int, tm: int, group_offset=0,
                     num_local_groups: int) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Per row tile (the GPU kernel's view): local groups [glo_Y, ghi_Y) whose rows touch the tile,
    and the local groups' row bounds start_W, end_W. A group touches tile t if it is non-empty and
    start < (t + 1) * tm and end > t * tm; empty groups inside the range are skipped by the kernel."""
    num_tiles = -(-m // tm)
    start_W, end_W = local_group_bounds(group_sizes_E, group_offset, num_local_groups, m)
    tile_lo_Y = jnp.arange(num_tiles, dtype=jnp.int32) * tm
    # Groups are ordered by row: the first touching group is the first whose end > tile start
    # (ignoring empty groups, whose end equals a neighbour's), the last the last whose start < tile end.
    glo_Y = jnp.searchsorted(end_W, tile_lo_Y, side="right").astype(jnp.int32)
    ghi_Y = jnp.searchsorted(start_W, tile_lo_Y + tm, side="left").astype(jnp.int32)
    ghi_Y = jnp.maximum(ghi_Y, glo_Y)
    return glo_Y, ghi_Y, start_W, end_W

