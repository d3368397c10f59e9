"""Logical axis names and the two tables that place every array on the mesh.

    PARAM_AXES            parameter path  -> logical axis of each dimension
    LOGICAL_AXIS_RULES    logical axis    -> mesh axes (config.py draws the mesh)

Model code never names a mesh axis: a parameter's place follows from its path (the same path in the
params, in AdamW's mu and nu, and in a checkpoint), so the modules carry no sharding annotations and
the optimizer state is laid out like the parameters it mirrors. A parameter no entry matches (norm
scales, router weights and biases) is replicated. A dimension of size 1 is never split (the dense
`FeedForward` is an `Experts` of one expert, whose paths match the expert rules).
"""
from __future__ import annotations

import math
import re
from typing import Optional, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from moe_jax.sharding.config import BATCH_AXES

LOGICAL_AXIS_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch", BATCH_AXES),  # sequences: each device routes its own tokens
    ("expert", ("expert",)),  # routed experts: E / expert per device
    ("embed", ("fsdp",)),  # d_model axis of weights: FSDP / ZeRO-3
    ("mlp", ("model",)),  # hidden width of FFNs and experts: tensor parallel (Megatron)
    ("heads", ("model",)),
    ("kv_heads", ("model",)),
    ("vocab", ("model",)),
)

# Inside the expert-parallel shard_map only the routed experts stay split (over experts and, with
# tensor parallelism, their hidden width); every other weight of the MoE layer is used whole.
EXPERT_PARALLEL_RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("expert", ("expert",)),
    ("mlp", ("model",)),
)

PARAM_AXES: tuple[tuple[str, tuple[Optional[str], ...]], ...] = (
    (r"experts/(w_in|w_gate)_EDF", ("expert", "embed", "mlp")),
    (r"experts/w_out_EFD", ("expert", "mlp", "embed")),
    (r"experts/b_in_EF", ("expert", "mlp")),
    (r"experts/b_out_ED", ("expert", "embed")),
    (r"attn/w_q_DHQ", ("embed", "heads", None)),
    (r"attn/w_[kv]_DN[QU]", ("embed", "kv_heads", None)),
    (r"attn/w_o_HUD", ("heads", None, "embed")),
    (r"attn/w_q_AHQ", (None, "heads", None)),  # MLA (A = the query latent, or d_model)
    (r"attn/w_u[kv]_ZH[OU]", (None, "heads", None)),  # MLA up-projections from the KV latent
    (r"attn/w_(dq_DA|dkv_DZ|kr_DP)", ("embed", None)),  # MLA down-projections
    (r"embed_VD", ("vocab", "embed")),
    (r"unembed_DV", ("embed", "vocab")),
    (r"shared_gate_D1", ("embed", None)),
)

_COMPILED = tuple((re.compile(r"(^|/)" + pattern + r"$"), axes) for pattern, axes in PARAM_AXES)
# The scanned layers' variables (ModelConfig.scan_layers, moe_jax/layer_stack.py) are stacked over the periods on a
# leading axis, never split: each period's slice is laid out as its unrolled layer's.
_STACKED = re.compile(r"(^|/)scan/\d+/")


def path_str(path) -> str:
    """A pytree key path as 'params/blocks/0/ffn/experts/w_in_EDF' (NNX's trailing '/value' dropped)."""
    s = jax.tree_util.keystr(path, simple=True, separator="/")
    return s[: -len("/value")] if s.endswith("/value") else s


def logical_axes(path: str, ndim: int) -> tuple[Optional[str], ...]:
    """The logical axis of each dimension of the array at `path` (all None: replicated)."""
    for pattern, axes in _COMPILED:
        if pattern.search(path):
            if _STACKED.search(path):
                axes = (None,) + axes
            if len(axes) != ndim:
                raise ValueError(f"sharding.rules.PARAM_AXES gives {path} {len(axes)} axes {axes}, but it has "
                                 f"{ndim}; update the entry to the parameter's shape.")
            return axes
    return (None,) * ndim


def partition_spec(path: str, shape: Sequence[int], mesh_shape: dict[str, int],
                   rules=LOGICAL_AXIS_RULES) -> P:
    """The PartitionSpec of the array at `path`; raises naming the array if a mesh axis does not divide it."""
    table = dict(rules)
    spec = []
    for dim, name in zip(shape, logical_axes(path, len(shape))):
        axes = tuple(a for a in table.get(name, ()) if mesh_shape.get(a, 1) > 1) if dim > 1 else ()
        size = math.prod(mesh_shape[a] for a in axes)
        if dim % size:
            raise ValueError(
                f"{path}: its {name!r} dimension of size {dim} does not divide over mesh axes {axes} of "
                f"{size} devices; change config.mesh ({', '.join(f'{a}={mesh_shape[a]}' for a in axes)}) "
                "or the model size.")
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    while spec and spec[-1] is None:
        spec.pop()
    return P(*spec)


def tree_specs(tree, mesh_shape: dict[str, int], rules=LOGICAL_AXIS_RULES):
    """PartitionSpecs for every array leaf of `tree` (shapes from arrays or ShapeDtypeStructs)."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: partition_spec(path_str(path), leaf.shape, mesh_shape, rules), tree)


def tree_shardings(tree, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """NamedShardings on `mesh` for every array leaf of `tree` (a train state, its abstract shape, ...)."""
    return jax.tree.map(lambda spec: NamedSharding(mesh, spec), tree_specs(tree, dict(mesh.shape), rules))


def batch_spec(ndim: int = 2) -> P:
    """Sequences over data x fsdp x expert, everything else whole: `[B, ...]`."""
    return P(BATCH_AXES, *([None] * (ndim - 1)))
