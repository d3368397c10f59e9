"""Scanned layers and rematerialisation: where each layer's variables live, and the two layouts' conversion.

With `ModelConfig.scan_layers=True` the `Transformer` compiles one period of P = `cfg.layer_period` layers
(`moe_every`: the dense and MoE layers of one repetition of the placement pattern) and runs it under
`jax.lax.scan` over parameters stacked on a leading axis, instead of tracing every layer. With
N = `first_dense_layers`, n = `cfg.scan_periods` and R = num_layers - N - n P:

    unrolled (scan_layers=False)   blocks[i]                     layer i, every layer
    scanned  (scan_layers=True)    prefix[i]                     layer i < N (the dense prefix), unrolled
                                   scan[p], variables at [j]     layer N + j P + p, j < n
                                   suffix[r]                     layer N + n P + r, r < R, unrolled

The scanned model is initialised as the unrolled one (its blocks are built in the same order, from the same
rng stream, then stacked), so one seed gives the same parameters, logits and gradients in both layouts
(tests/test_layer_stack.py). `stack_layers` / `unstack_layers` convert a state between them: a model's
`nnx.state`, the train state's params and rest, the optimizer's moments (`convert_train_state`).

Rematerialisation (`ModelConfig.remat`, `checkpointed`): each unrolled block, and each scanned period, runs
under `jax.checkpoint`, which keeps of its activations for the backward pass only what the policy saves and
recomputes the rest:
    none       no checkpoint: every activation the backward pass needs is kept
    full       nothing saved: the block's forward is recomputed in the backward pass (its input is kept)
    save_dots  every matmul output kept (`dots_saveable`: projections, attention scores and values, the router,
               the expert and dense FFN einsums); the elementwise ops (norms, activations, softmax) recomputed
    offload    the same matmul outputs, moved to host memory (`pinned_host`) and back for the backward pass
On XLA:CPU 'offload' compiles and runs, but its moves to host memory lower to nothing (the lowered program names no
host memory space; jax 0.10.2): it keeps the same matmul outputs as 'save_dots', in the same memory. It can only
save device memory on accelerators (GPU, TPU), where it was not tried here.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import Offloadable, Recompute

from moe_jax.model_config import ModelConfig


def remat_policy(name: str):
    """The `jax.checkpoint` policy of `ModelConfig.remat` (None: save nothing); 'none' has none."""
    policies = jax.checkpoint_policies
    if name == "full":
        return None
    if name == "save_dots":
        return policies.dots_saveable
    if name == "offload":
        return _offload_dots
    raise ValueError(f"ModelConfig.remat={name!r} has no checkpoint policy; use one of 'full', 'save_dots', 'offload'.")


def _offload_dots(prim, *_, **__):
    """`dots_saveable`, but to host memory: every matmul output moved to `pinned_host`, the rest recomputed."""
    if prim is jax.extend.core.primitives.dot_general_p:
        return Offloadable(src="device", dst="pinned_host")
    return Recompute


def checkpointed(fn: Callable, remat: str, *, prevent_cse: bool = True) -> Callable:
    """`fn` under `jax.checkpoint` with `remat`'s policy, or `fn` itself for remat='none'. prevent_cse=False
    for a scan body (the scan already keeps XLA from merging the recomputation with the forward pass)."""
    if remat == "none":
        return fn
    return jax.checkpoint(fn, policy=remat_policy(remat), prevent_cse=prevent_cse)


def layer_places(cfg: ModelConfig) -> list[tuple[str, int, int | None]]:
    """Where layer i of the scanned layout lives, for i = 0 .. num_layers - 1: ('prefix', i, None),
    ('scan', p, j) (block p of the stack, index j of its stacked variables) or ('suffix', r, None)."""
    N, P, n = cfg.first_dense_layers, cfg.layer_period, cfg.scan_periods
    places = [("prefix", i, None) for i in range(N)]
    places += [("scan", p, j) for j in range(n) for p in range(P)]
    return places + [("suffix", r, None) for r in range(cfg.num_layers - N - n * P)]


def _raw(mapping: Mapping) -> Mapping:
    """The mapping itself: `nnx.State` wraps the plain dicts it holds in States when they are read."""
    return mapping.raw_mapping if isinstance(mapping, nnx.State) else mapping


def _stack(trees: list):
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_layers(state: Mapping, cfg: ModelConfig) -> Mapping:
    """A model state (or any mapping laid out like one: params, rest, an optimizer moment) of the unrolled
    layout -> the scanned layout of `cfg` (its `blocks` entry becomes `prefix`, `scan`, `suffix`)."""
    if "blocks" not in state:
        raise ValueError("stack_layers: the state has no 'blocks' entry; it is not of the unrolled layout "
                         "(ModelConfig.scan_layers=False). A scanned state converts back with unstack_layers.")
    items = {k: v for k, v in _raw(state).items() if k != "blocks"}
    blocks = _raw(state)["blocks"]
    if any(not 0 <= int(i) < cfg.num_layers for i in blocks):
        raise ValueError(f"stack_layers: the state has blocks {sorted(blocks)}, the config {cfg.num_layers} layers.")
    parts = {"prefix": {}, "scan": {}, "suffix": {}}
    for i, (where, k, j) in enumerate(layer_places(cfg)):
        if i not in blocks:  # a filtered state (e.g. `rest`) holds only the layers that have such variables
            continue
        if j is None:
            parts[where][k] = blocks[i]
        else:
            parts[where].setdefault(k, []).append(blocks[i])
    parts["scan"] = {p: _stack(periods) for p, periods in parts["scan"].items()}
    for name, part in parts.items():
        if part:  # an empty nnx.List has no state entry
            items[name] = part
    return nnx.State(items) if isinstance(state, nnx.State) else items


def unstack_layers(state: Mapping, cfg: ModelConfig) -> Mapping:
    """The inverse of `stack_layers`: a state of the scanned layout -> the unrolled one (`blocks`)."""
    if "blocks" in state or "scan" not in state and cfg.scan_periods:
        raise ValueError("unstack_layers: the state is not of the scanned layout (ModelConfig.scan_layers=True: "
                         "'prefix', 'scan', 'suffix' entries). An unrolled state converts with stack_layers.")
    names = ("prefix", "scan", "suffix")
    raw = _raw(state)
    items = {k: v for k, v in raw.items() if k not in names}
    blocks = {}
    for i, (where, k, j) in enumerate(layer_places(cfg)):
        if where not in raw or k not in raw[where]:  # a filtered state: not every layer has such variables
            continue
        part = raw[where][k]
        blocks[i] = part if j is None else jax.tree.map(lambda x, j=j: x[j], part)
    if blocks:
        items["blocks"] = blocks
    return nnx.State(items) if isinstance(state, nnx.State) else items


def convert_train_state(train_state: Any, cfg: ModelConfig, *, scanned: bool) -> Any:
    """A `TrainState` (or any pytree holding model-shaped `nnx.State`s: params, rest, AdamW's mu and nu) in
    the scanned layout (scanned=True) or the unrolled one, from the other."""
    convert = stack_layers if scanned else unstack_layers
    is_model_state = lambda x: isinstance(x, nnx.State) and ("blocks" in x or "scan" in x or "prefix" in x)
    return jax.tree.map(lambda x: convert(x, cfg) if is_model_state(x) else x, train_state, is_leaf=is_model_state)


def slice_module(module: nnx.Module, j) -> nnx.Module:
    """A copy of a stacked module (`Transformer.scan[p]` or a part of it) holding index j of its variables."""
    graphdef, state = nnx.split(module)
    return nnx.merge(graphdef, jax.tree.map(lambda x: x[j], state))
