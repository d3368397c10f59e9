"""Gradient accumulation: which microbatches a batch splits into, and the checks that its routing allows it.

A step over M microbatches (`config.train.microbatches`) equals a step over the whole batch only if every
routing decision and every loss is the same. Routing is per group, so each routing group must lie inside
one microbatch (and, on a mesh, inside one device's share of it): then every token meets the same group,
capacity and drops. The token means (cross-entropy, z-loss, group- and sequence-scope balance losses) are
then the mean over the equal microbatches. A balance_loss_scope='batch' loss is not: its f_i counts the
whole batch, which the step counts first (moe_jax/train/step.py).

    n batch shards (data x fsdp x expert), M microbatches, b = B / (n M) sequences per shard per microbatch

    batch [B, ...] sharded over n          rows of shard j: [j B/n, (j+1) B/n)
    reshape [n, M, b, ...]                 row block (j, m): the m-th b rows of shard j
    swap    [M, n, b, ...] -> [M, n b, ...]  microbatch m: block m of every shard, still split over the n
                                            devices, so slicing a microbatch moves no data
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp

from moe_jax.moe_config import MoEConfig


def check_microbatches(moe: Optional[MoEConfig], batch: int, length: int, microbatches: int, shards: int = 1) -> None:
    """Raises ValueError (naming config.train.microbatches and the fix) unless a `[batch, length]` batch splits
    into `microbatches` equal microbatches, each split over `shards` batch shards, whose routing groups lie
    inside one shard of one microbatch."""
    M = microbatches
    if M == 1:
        return
    field = f"config.train.microbatches={M}"
    if batch % M:
        raise ValueError(f"{field} does not divide config.data.batch_size={batch}; choose a divisor of the batch "
                         "(each microbatch holds batch_size / microbatches sequences).")
    if (batch // M) % shards:
        raise ValueError(f"{field}: each microbatch of {batch // M} sequences is split over the {shards} batch "
                         "shards of the mesh (data x fsdp x expert); choose microbatches so that batch_size / "
                         f"microbatches is a multiple of {shards}.")
    if moe is None:
        return
    b = batch // (M * shards)
    where = "a microbatch" if shards == 1 else "one device's share of a microbatch"
    if moe.grouping == "tokens":
        S = moe.tokens_per_group(b, length)
        if (b * length) % S:
            raise ValueError(
                f"{field}: routing groups of config.model.group_size={S} tokens must lie inside {where}, which "
                f"holds {b} x {length} = {b * length} tokens; choose microbatches (or group_size) so that "
                "group_size divides that.")
    elif moe.group_size is None:
        raise ValueError(
            f"{field} with grouping='position' and config.model.group_size=None: the routing group is the whole "
            f"batch, which would be split across microbatches; set group_size to a divisor of the {b} sequences "
            f"of {where}.")
    elif b % moe.group_size:
        raise ValueError(
            f"{field}: config.model.group_size={moe.group_size} (grouping='position') does not divide the {b} "
            f"sequences of {where}; choose microbatches (or group_size) so that it does.")


def split_microbatches(batch: jax.Array, microbatches: int, shards: int = 1) -> jax.Array:
    """`[B, ...]` -> `[M, B / M, ...]`: microbatch m is the m-th `B / (n M)` rows of each of the n batch shards
    (n = 1: rows [m B/M, (m+1) B/M)). Shard j of every microbatch comes from shard j of the batch."""
    B, rest = batch.shape[0], batch.shape[1:]
    M, n = microbatches, shards
    if B % (M * n):
        raise ValueError(f"config.train.microbatches={M}: the batch of {B} sequences does not split into {M} "
                         f"microbatches over {n} batch shards; choose a divisor of batch_size / {n}.")
    b = B // (M * n)
    return jnp.swapaxes(batch.reshape((n, M, b) + rest), 0, 1).reshape((M, n * b) + rest)
