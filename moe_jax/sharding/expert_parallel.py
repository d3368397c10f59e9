"""Expert parallelism: the MoE layer under `jax.shard_map`, capacity buffers through `all_to_all`.

    plan = ExpertParallel(mesh)
    model = apply_expert_parallel(model, plan)   # each MoE FFN swapped for ExpertParallelMoE(layer, plan)

The wrapper holds the `MoELayer` and the plan (static: part of the wrapper's graphdef); it runs the
layer's public `forward` on each device and its `aux` on the gathered results, so the layer itself
knows nothing of meshes. The train and eval steps swap the wrappers in on a fresh merge of the model
(`Placement.expert_parallel`); the train state and the graphdef the loop holds are the plain model's.

GShard (Lepikhin et al. 2020) / Switch layout. With n = mesh 'expert' size and X = G_local * C slots per
expert on one device (G_local groups of its own tokens, C = capacity):

    device i of the expert axis          tokens [B/shards, L, D]     all E experts' weights? no: E/n of them
      route its own tokens, dispatch  -> buffer [E, X, D]           expert-major: block j = experts of device j
      all_to_all(split E, concat X)   -> buffer [E/n, n*X, D]       its experts, the slots of every peer
      experts (its E/n FFNs)          -> out    [E/n, n*X, D]       (+ psum over 'model': tensor-parallel F)
      all_to_all(split X, concat E)   -> out    [E, X, D]           every expert's output for its own slots
      combine                         -> y      [B/shards, L, D]

Both capacity dispatch paths (one-hot einsum and index gather) produce and consume the same `[E, X, D]`
buffer, so the exchange is the same for both, and so are its gradients (the transpose of an all_to_all
is the inverse all_to_all). Every device computes the same capacity C from the same group size, so the
buffers always agree in shape. Routing, capacity and combine are local to a device: the only
communication of the layer is the two all_to_alls per direction (plus, for training, the gradient
all-reduce of the replicated router weights).

Losses and metrics are computed outside the shard_map from the per-token routing results, laid out
[B, L, ...] and sharded like the batch: XLA reduces them over the global batch, so the balance loss,
z-loss, load metrics and the aux-loss-free bias update equal the single-device values
(`balance_stats='shard'` averages a per-shard batch-scope balance loss instead). Router noise
(`jitter_eps`, `logit_noise_std`) is drawn on each shard from the key folded with the shard's index:
the same distribution as on one device, other numbers.

Dropless routing (capacity_factor=None) has no fixed buffer: with mesh.expert > 1 each device sorts its
choices by expert and exchanges exactly the routed rows (`dropless_exchange='ragged'`,
`ragged_all_to_all`, GPU/TPU) or worst-case-sized `all_to_all` buffers ('padded', any backend, the
default on CPU), with the single-device layer's numerics (moe_jax/sharding/dropless.py draws the layout).
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Optional

import jax
from flax import nnx
from jax.sharding import AbstractMesh, Mesh, PartitionSpec as P

from moe_jax.moe_layer import MoELayer, RoutingStats, group_tokens, ungroup_tokens
from moe_jax.sharding.config import BALANCE_STATS, BATCH_AXES, DROPLESS_EXCHANGES
from moe_jax.sharding.dropless import DroplessExchange
from moe_jax.sharding.mesh import batch_shards, check_moe_layout
from moe_jax.sharding.rules import EXPERT_PARALLEL_RULES, partition_spec, path_str

_PER_TOKEN = ("logits_GSE", "expert_GSK", "dropped_GSK", "unserved_GS", "weight_GSK")  # weight_GSK: the ledger's


def _inner_spec(path, leaf, mesh_shape: dict) -> P:
    """In the shard_map: routed expert weights stay split over 'expert' (and 'model'), the rest whole."""
    name = path_str(path)
    if not name.startswith("experts/"):
        return P()
    return partition_spec(name, leaf.shape, mesh_shape, EXPERT_PARALLEL_RULES)


@dataclasses.dataclass(frozen=True)
class ExpertParallel:
    """How an `MoELayer` runs on `mesh`: tokens split over data x fsdp x expert, experts over 'expert'.

    Static and hashable: an attribute of the `ExpertParallelMoE` wrappers (part of their graphdef).
    """

    mesh: Mesh  # or an AbstractMesh, to lower for a platform this machine does not have
    balance_stats: str = "global"
    dropless_exchange: str = "auto"
    dropless_buffer_factor: Optional[float] = None

    def __post_init__(self):
        if self.balance_stats not in BALANCE_STATS:
            raise ValueError(f"config.mesh.balance_stats={self.balance_stats!r}: set it to one of {BALANCE_STATS}.")
        if self.dropless_exchange not in DROPLESS_EXCHANGES:
            raise ValueError(f"config.mesh.dropless_exchange={self.dropless_exchange!r}: set it to one of "
                             f"{DROPLESS_EXCHANGES}.")
        if self.dropless_exchange == "ragged" and self.platform == "cpu":
            raise ValueError(
                "config.mesh.dropless_exchange='ragged': XLA:CPU does not implement ragged_all_to_all; set it to "
                "'padded' (or 'auto', which picks 'padded' on CPU and 'ragged' on GPU/TPU).")

    @property
    def platform(self) -> Optional[str]:
        """The mesh's devices' platform ('cpu', 'gpu', 'tpu'); None for an AbstractMesh (lowered for any)."""
        if isinstance(self.mesh, AbstractMesh):
            return None
        return self.mesh.devices.flat[0].platform

    @property
    def exchange_kind(self) -> str:
        """The dropless exchange this plan runs: 'ragged' or 'padded' ('auto': padded on CPU, else ragged; an
        AbstractMesh goes by JAX's default backend)."""
        if self.dropless_exchange != "auto":
            return self.dropless_exchange
        return "padded" if (self.platform or jax.default_backend()) == "cpu" else "ragged"

    def dropless(self, num_experts: int) -> Optional[DroplessExchange]:
        """The dropless exchange over 'expert' (None when the axis has one device: the layer's local path)."""
        ep, tp = self.mesh_shape.get("expert", 1), self.mesh_shape.get("model", 1)
        if ep == 1:
            return None
        return DroplessExchange(kind=self.exchange_kind, num_experts=num_experts, axis_size=ep, axis="expert",
                                buffer_factor=self.dropless_buffer_factor,
                                tensor_axis="model" if tp > 1 else None,
                                sync_axes=tuple(a for a in self.batch_axes if a != "expert"))

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.shape)

    @property
    def batch_axes(self) -> tuple[str, ...]:
        """The batch axes that really split it (size-1 axes left out: no degenerate collectives over them)."""
        return tuple(a for a in BATCH_AXES if self.mesh_shape.get(a, 1) > 1)

    def run_experts(self, experts: nnx.Module, buffer_EXD: jax.Array) -> jax.Array:
        """Inside the shard_map: this device's `[E, X, D]` buffer through the experts that own each row."""
        ep, tp = self.mesh_shape.get("expert", 1), self.mesh_shape.get("model", 1)
        if ep > 1:  # [E, X, D] -> [E/n, n*X, D]: rows of expert e go to the device holding e
            buffer_EXD = jax.lax.all_to_all(buffer_EXD, "expert", 0, 1, tiled=True)
        out_EXD = experts(buffer_EXD)
        if tp > 1:  # each model shard computed a partial sum over its slice of the hidden width
            out_EXD = jax.lax.psum(out_EXD, "model")
        if ep > 1:  # [E/n, n*X, D] -> [E, X, D]: results back to the devices whose tokens they are
            out_EXD = jax.lax.all_to_all(out_EXD, "expert", 1, 0, tiled=True)
        return out_EXD


class ExpertParallelMoE(nnx.Module):
    """An `MoELayer` run through `plan`; called exactly like the layer: `(y_BLD, MoEAux)`."""

    def __init__(self, layer: MoELayer, plan: ExpertParallel):
        self.layer = layer
        self.plan = plan

    def __call__(self, x_BLD: jax.Array, *, train: bool = False, rng=None, token_ids_BL=None, replay=None,
                 balance_load=None, token_mask_BL=None):
        """replay: (expert_BLK, weight_BLK or None), as `MoELayer.forward` takes it; sharded like the tokens, so
        each device replays the choices of its own tokens."""
        layer, plan = self.layer, self.plan
        cfg = layer.cfg
        if token_mask_BL is not None:
            raise ValueError("ExpertParallelMoE: a token mask (padding) is not supported on the expert-parallel "
                             "path; run the model without an expert-parallel plan, or pass token_mask=None.")
        B, L, _ = x_BLD.shape
        mesh_shape = plan.mesh_shape
        check_moe_layout(cfg, B, L, mesh_shape)
        graphdef, state = nnx.split(layer)
        state_specs = jax.tree_util.tree_map_with_path(
            functools.partial(_inner_spec, mesh_shape=mesh_shape), state)
        batch_axes = plan.batch_axes
        tokens = P(batch_axes or None)
        with_rng, with_ids = rng is not None, token_ids_BL is not None
        with_replay, with_weights = replay is not None, replay is not None and replay[1] is not None
        exchange = plan.dropless(cfg.num_routed_experts) if cfg.capacity_factor_for(train) is None else None

        def body(state, x_BLD, *extra):
            extra = list(extra)
            rng = extra.pop(0) if with_rng else None
            ids_BL = extra.pop(0) if with_ids else None
            local_replay = None
            if with_replay:
                local_replay = (extra.pop(0), extra.pop(0) if with_weights else None)
            if rng is not None and batch_axes:  # independent router noise per shard (one device: one array)
                rng = jax.random.fold_in(rng, jax.lax.axis_index(batch_axes))
            local = nnx.merge(graphdef, state)
            run_dropless = None
            if exchange is not None:
                block = cfg.dropless_block_size if cfg.expert_backend == "blocked" else 1
                run_dropless = functools.partial(exchange, local.experts, cfg.expert_backend, block)
            y_BLD, stats = local.forward(x_BLD, train=train, rng=rng, token_ids_BL=ids_BL, replay=local_replay,
                                         run_experts=functools.partial(plan.run_experts, local.experts),
                                         run_dropless=run_dropless)
            b = x_BLD.shape[0]
            per_token = {k: ungroup_tokens(getattr(stats, k), cfg, b, L) for k in _PER_TOKEN
                         if getattr(stats, k) is not None}
            served_E = jax.lax.psum(stats.served_E, batch_axes) if batch_axes else stats.served_E
            return y_BLD, per_token, served_E

        args, in_specs = [state, x_BLD], [state_specs, tokens]
        if with_rng:
            args.append(rng)
            in_specs.append(P())
        if with_ids:
            args.append(token_ids_BL)
            in_specs.append(tokens)
        if with_replay:
            args.extend(replay[:2] if with_weights else replay[:1])
            in_specs.extend([tokens] * (2 if with_weights else 1))
        has_choices = cfg.router not in ("soft", "expert_choice")  # they have no token choices (expert_GSK None)
        out_specs = (tokens, {k: tokens for k in _PER_TOKEN if k not in ("expert_GSK", "weight_GSK") or has_choices},
                     P())
        y_BLD, per_token, served_E = jax.shard_map(
            body, mesh=plan.mesh, in_specs=tuple(in_specs), out_specs=out_specs)(*args)

        grouped = {k: group_tokens(v, cfg) for k, v in per_token.items()}
        stats = RoutingStats(served_E=served_E, expert_GSK=grouped.pop("expert_GSK", None),
                             weight_GSK=grouped.pop("weight_GSK", None), **grouped)
        shards = batch_shards(mesh_shape) if plan.balance_stats == "shard" else 1
        return y_BLD, layer.aux(stats, B, L, train, balance_shards=shards, balance_load=balance_load)


def _swap(ffn, plan: ExpertParallel | None):
    layer = ffn.layer if isinstance(ffn, ExpertParallelMoE) else ffn
    return layer if plan is None else ExpertParallelMoE(layer, plan)


def apply_expert_parallel(model: nnx.Module, plan: ExpertParallel | None) -> nnx.Module:
    """Swaps an `ExpertParallelMoE(layer, plan)` in for every `MoELayer` of `model` (in place; None: the plain
    layers back) and returns `model`, or the wrapper when `model` is itself an MoE layer."""
    if isinstance(model, (MoELayer, ExpertParallelMoE)):
        return _swap(model, plan)
    for _, module in list(nnx.iter_modules(model)):
        if isinstance(module, ExpertParallelMoE):
            continue
        for name, child in list(vars(module).items()):
            if isinstance(child, (MoELayer, ExpertParallelMoE)):
                setattr(module, name, _swap(child, plan))
    return model
