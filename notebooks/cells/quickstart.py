"""The cells of notebooks/quickstart.ipynb."""
from __future__ import annotations

from .common import badge, code, install_cell, md

QUICKSTART = [
    md(f"""
# moe_jax quickstart: route a batch through a Mixture-of-Experts layer

{badge("quickstart")}

Build an MoE layer, route one batch with several routers (Switch top-1, Mixtral top-2, DeepSeek-V3
group-limited sigmoid, expert choice, hash, Soft MoE), look at the dispatch and combine tensors a router produces,
and plot each expert's load and the choices dropped when experts have a fixed capacity. Runs in
seconds on a CPU.
"""),
    code(install_cell(clone=False)),
    code("""
import dataclasses

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from moe_jax import MoEConfig, MoELayer
from moe_jax.capacity import assign_capacity
from moe_jax.moe_layer import group_tokens

print("JAX", jax.__version__, "on", jax.default_backend())
"""),
    md("""
## One MoE layer

`MoEConfig` holds the layer's fields (validated: a bad value fails with the field's name). The layer
maps `x[B, L, D]` to `y[B, L, D]` and returns its auxiliary losses and routing metrics; it never adds
the losses to anything itself. NNX modules are pytrees, so `jax.jit` takes the layer as an argument.
"""),
    code("""
B, L, D = 4, 32, 32
cfg = MoEConfig(d_model=D, d_ff=64, num_experts=8, num_experts_per_token=2, capacity_factor=1.0,
                eval_capacity_factor=1.0)
layer = MoELayer(cfg, rngs=nnx.Rngs(params=0))

# Tokens that share a direction, so the router prefers some experts (as trained routers often do).
key_x, key_ids, key_dir = jax.random.split(jax.random.PRNGKey(0), 3)
x_BLD = jax.random.normal(key_x, (B, L, D)) + 0.3 * jax.random.normal(key_dir, (D,))
token_ids_BL = jax.random.randint(key_ids, (B, L), 0, 256)

y_BLD, aux = jax.jit(lambda layer, x: layer(x, train=False))(layer, x_BLD)
print("y", y_BLD.shape, y_BLD.dtype)
print("losses", {k: round(float(v), 4) for k, v in aux.losses.items()})
print("tokens per expert", np.asarray(aux.metrics["tokens_per_expert"]))
print("dropped fraction", float(aux.metrics["dropped_fraction"]))
"""),
    md("""
## Several routers on the same batch

Tokens are routed within groups (here one sequence of S = 32 tokens per group). Every capacity-based
router ends in the same slot form, a `Routing`: which token fills each of the `E x C` expert buffer
slots of a group, and the weight that combines that slot's output back into the token.
"""),
    code("""
ROUTERS = {
    "Switch top-1": dict(router="top_k", num_experts_per_token=1),
    "Mixtral top-2": dict(router="top_k", num_experts_per_token=2),
    # sigmoid scores, top-2 within the best 2 of 4 expert groups, weights renormalised (DeepSeek-V3)
    "DeepSeek-V3 top-2": dict(router="top_k", num_experts_per_token=2, score_fn="sigmoid",
                              normalize_topk=True, n_expert_groups=4, topk_groups=2),
    "expert choice": dict(router="expert_choice", num_experts_per_token=2),
    "hash": dict(router="hash", num_experts_per_token=1),
}


@jax.jit
def route(router, x_GSD, token_ids_GS):
    return router.route(router.logits(x_GSD), train=False, token_ids_GS=token_ids_GS).routing


results = {}
for name, fields in ROUTERS.items():
    c = MoEConfig(d_model=D, d_ff=64, num_experts=8, capacity_factor=1.0, eval_capacity_factor=1.0, **fields)
    router = MoELayer(c, rngs=nnx.Rngs(params=0)).router
    routing = route(router, group_tokens(x_BLD, c), group_tokens(token_ids_BL, c))
    results[name] = dict(routing=routing, load=np.asarray(routing.tokens_per_expert_E()),
                         dropped=float(routing.dropped_GSK.mean()),
                         unserved=float(routing.unserved_GS().mean()))
    print(f"{name:17s} C = {routing.capacity:2d} slots/expert/group   dropped choices "
          f"{results[name]['dropped']:6.1%}   tokens no expert serves {results[name]['unserved']:6.1%}")
"""),
    code("""
fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 2.8), sharey=True)
for ax, (name, r) in zip(axes, results.items()):
    ax.bar(np.arange(len(r["load"])), r["load"], color="tab:blue")
    ax.axhline(r["routing"].capacity * r["routing"].num_groups, color="tab:red", ls="--", lw=1,
               label="capacity")
    ax.set_title(f"{name}\\ndropped {r['dropped']:.1%}", fontsize=9)
    ax.set_xlabel("expert")
axes[0].set_ylabel("assignments served")
axes[0].legend(fontsize=8)
fig.tight_layout()
"""),
    md("""
## Dispatch and combine tensors

Switch/GShard write routing as two tensors `[G, S, E, C]`: `dispatch` (one-hot: token s sits in slot c
of expert e) and `combine` (the weight of that slot's output in token s). Below, group 0 of the
Mixtral-style top-2 router: a row per token, a column per slot (`e * C + c`; white lines separate
experts). Soft MoE (Puigcerver et al. 2023) replaces the one-hot rows by dense softmax weights.
"""),
    code("""
routing = results["Mixtral top-2"]["routing"]
dispatch_SEC = np.asarray(routing.dispatch_tensor()[0])
combine_SEC = np.asarray(routing.combine_tensor()[0])
S, E, C = dispatch_SEC.shape
soft_cfg = MoEConfig(d_model=D, d_ff=64, num_experts=8, router="soft", dispatch="einsum", soft_slots_per_expert=1)
soft_routing = route(MoELayer(soft_cfg, rngs=nnx.Rngs(params=0)).router, group_tokens(x_BLD, soft_cfg), None)
soft_dispatch = np.asarray(soft_routing.dispatch_tensor()[0]).reshape(S, -1)

fig, axes = plt.subplots(1, 3, figsize=(14, 4))
for ax, (title, m) in zip(axes, [("top-2 dispatch (one-hot)", dispatch_SEC.reshape(S, E * C)),
                                 ("top-2 combine weights", combine_SEC.reshape(S, E * C)),
                                 ("Soft MoE dispatch weights", soft_dispatch)]):
    im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_title(title)
    ax.set_xlabel("expert slot")
    fig.colorbar(im, ax=ax)
axes[0].set_ylabel("token of group 0")
for ax in axes[:2]:
    for e in range(1, E):
        ax.axvline(e * C - 0.5, color="white", lw=0.5)
fig.tight_layout()
print("choices placed per token (<= k = 2):", np.unique(dispatch_SEC.sum(axis=(1, 2))))
K = routing.k
print("slot form, expert 0 of group 0 (token of each slot; S =", S, "marks an empty slot):",
      np.asarray(routing.src_GEC[0, 0]) // K)
"""),
    md("""
## Capacity factor vs dropped choices

Capacity per expert per group is `C = ceil(capacity_factor * S * k / E)` (at least `min_capacity`);
a choice that finds its expert full is dropped and the token keeps only its residual (and its other
choice). ST-MoE reports 10.6 % of tokens dropped at capacity factor 0.75 and 0.3 % at 1.25 for
trained, balanced routers; this untrained router on skewed tokens drops more. The choices are made
once; only the capacity assignment (`moe_jax.capacity.assign_capacity`) is redone per factor.
"""),
    code("""
x_GSD = group_tokens(x_BLD, cfg)
expert_GSK, weight_GSK, _ = layer.router.choices(layer.router.logits(x_GSD), None)
factors = [0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0]
dropped = []
for cf in factors:
    C = dataclasses.replace(cfg, eval_capacity_factor=cf).capacity(x_GSD.shape[1], train=False)
    r = jax.jit(assign_capacity, static_argnames=("num_experts", "capacity"))(
        expert_GSK, weight_GSK, num_experts=cfg.num_experts, capacity=C)
    dropped.append(float(r.dropped_GSK.mean()))
plt.figure(figsize=(4.5, 3))
plt.plot(factors, dropped, "o-")
plt.xlabel("capacity factor")
plt.ylabel("dropped fraction of choices")
plt.grid(alpha=0.3)
print({f: round(d, 3) for f, d in zip(factors, dropped)})
"""),
]
