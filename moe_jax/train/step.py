"""The jitted train and eval steps.

Train step: cross-entropy + the MoE layers' weighted auxiliary losses (+ with `ModelConfig.mtp_depth` = D > 0
the multi-token-prediction loss lambda / D * sum_k CE_k, moe_jax/mtp.py), AdamW update, then the
aux-loss-free bias update of every router that has a correction bias (DeepSeek-V3, Wang et al. 2024:
b_i += rate * sign(mean load - load_i), outside the gradient). A step whose loss or gradient norm is
not finite is not applied (params, optimizer state and biases stay as they were) and is counted in
`state.skipped`, so a NaN can never reach a checkpoint.

Gradient accumulation (`microbatches=M > 1`, moe_jax/train/microbatch.py): the batch is split into M equal
microbatches, run one at a time under `lax.scan` (activation memory of one microbatch) with their gradients
summed in float32; the step applies their mean, once. Every loss is a mean over equal microbatches (so is its
gradient) except a balance_loss_scope='batch' loss, E sum_i f_i P_i with f_i the whole batch's load: a first,
forward-only scan counts each MoE layer's load over all microbatches, and every microbatch's balance loss
then uses it as f_i (`balance_load`), which makes the mean over microbatches the whole batch's loss and
gradient (f_i is a constant, P_i a token mean). The correction-bias update sees the summed load; the metrics
are those of the whole batch (`losses.combine_routing_metrics`). Router noise differs per microbatch (its key
folds in the microbatch index), so with noise on, M > 1 draws other numbers than M = 1.

Replayed routing (`replay=True`, `config.train.replay_ledger`, moe_jax/train/replay.py): the step takes one
more argument, each MoE layer's recorded experts <int32>[B, L, K] for the batch, used instead of the routers'
picks; the routers weigh them (and train through them) and compute their losses and metrics from them.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from moe_jax import losses as losses_lib
from moe_jax.sharding.mesh import batch_shards
from moe_jax.train.microbatch import check_microbatches, split_microbatches
from moe_jax.train.state import TrainState, split_model
from moe_jax.transformer import ModelAux


def cross_entropy(logits_BLV: jax.Array, targets_BL: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits_BLV.astype(jnp.float32), targets_BL).mean()


def mtp_losses(mtp_logits: tuple, targets_BL: jax.Array) -> list[jax.Array]:
    """CE of MTP depth k = 1..D: its logits <float32>[B, L - k, V] against t_{i+k+1}, i.e. `targets_BL[:, k:]`
    (DeepSeek-V3 Eq. 24, averaged over the L - k positions that have a target)."""
    return [cross_entropy(logits, targets_BL[:, k:]) for k, logits in enumerate(mtp_logits, start=1)]


def _layer_metrics(aux) -> dict:
    """Per-MoE-layer scalars and vectors, keyed `moe/<layer>/<name>`."""
    out = {}
    for entry in aux.layers:
        prefix = f"moe/{entry['layer']}/"
        for name, value in entry["losses"].items():
            out[prefix + name] = value
        for name in ("tokens_per_expert", "dropped_fraction", "router_entropy", "load_cv", "dead_experts"):
            if name in entry["metrics"]:
                out[prefix + name] = entry["metrics"][name]
    return out


def _model(graphdef, placement, *states):
    """The model to run: merged, with its MoE layers expert-parallel per `placement.plan` on a mesh."""
    model = nnx.merge(graphdef, *states)
    return model if placement is None else placement.expert_parallel(model)


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, placement=None, microbatches: int = 1,
                    batch_load: Optional[bool] = None, replay: bool = False):
    """Returns `step(state, batch_BL1, key) -> (state, metrics)`, jitted with the state donated; with
    `replay=True`, `step(state, batch_BL1, key, experts) -> (state, metrics)`.

    placement: a `moe_jax.sharding.placement.Placement` for a run on a device mesh (the state keeps its
    sharding from step to step, metrics come back replicated, the MoE layers run through its plan);
    None = one device.
    microbatches: M, `config.train.microbatches` (1: the whole batch at once).
    batch_load: with M > 1, whether a forward pass first counts the whole batch's expert load for the
    balance loss; None = exactly when it is needed (`MoEConfig.balance_needs_batch_load`). False gives the
    per-microbatch balance loss that other codebases compute (for tests and the benchmark only).
    replay: the step's 4th argument is one <int32>[B, L, K] array of expert ids per MoE layer (depth order, not
    the MTP modules'), the routing to train with (moe_jax/train/replay.py); whole batches only (M = 1).
    """
    if isinstance(microbatches, bool) or not isinstance(microbatches, int) or microbatches < 1:
        raise ValueError(f"config.train.microbatches={microbatches!r} must be an int >= 1.")
    if replay and microbatches != 1:
        raise ValueError(f"config.train.replay_ledger with config.train.microbatches={microbatches}: replayed "
                         "training runs whole batches; set microbatches=1.")
    shards = 1 if placement is None else batch_shards(dict(placement.mesh.shape))

    def train_step(state: TrainState, batch_BL1: jax.Array, key: jax.Array, experts=None):
        rng = jax.random.fold_in(key, state.step)

        if microbatches == 1:
            (loss, (ce, aux, mtp)), grads = jax.value_and_grad(objective, has_aux=True)(
                state.params, state.rest, batch_BL1, rng, None, experts)
        else:
            loss, ce, aux, mtp, grads = _accumulate(state, batch_BL1, rng)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        model = nnx.merge(graphdef, params, state.rest)
        slots = {i: (layer, period) for i, layer, period in model.moe_layer_slots()}
        for entry in aux.layers:
            layer, period = slots[entry["layer"]]
            bias = layer.router.correction_bias_E
            if bias is not None:  # a scanned layer's bias is row `period` of its stack's
                old = bias[...] if period is None else bias[...][period]
                new = losses_lib.update_correction_bias(old, entry["metrics"]["routed_per_expert"],
                                                        layer.cfg.bias_update_rate)
                bias[...] = new if period is None else bias[...].at[period].set(new)
        _, _, rest = split_model(model)

        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params), opt_state=keep(opt_state, state.opt_state),
            rest=keep(rest, state.rest), skipped=state.skipped + (~ok).astype(jnp.int32))
        metrics = {"loss": loss, "ce": ce, "aux_loss": aux.aux_loss, "grad_norm": grad_norm,
                   "learning_rate": schedule(state.step), "applied": ok.astype(jnp.float32),
                   **_layer_metrics(aux)}
        if mtp:  # mtp_loss/<k>: CE of depth k; mtp_loss: lambda / D * their sum, the part of `loss` they add
            metrics.update({f"mtp_loss/{k}": value for k, value in enumerate(mtp, start=1)},
                           mtp_loss=model.cfg.mtp_loss_weight / len(mtp) * sum(mtp))
        return new_state, metrics

    def objective(params, rest, tokens_BL1, rng, balance_load, experts=None):
        """loss, (ce, ModelAux, [CE of MTP depth k]) of one batch or microbatch: cross-entropy, the MoE layers'
        weighted aux losses and, with MTP, lambda / D * sum_k L_MTP^k (absent, not 0 * ..., without MTP).
        experts: replayed routing (see `make_train_step`), weighed by the routers."""
        model = _model(graphdef, placement, params, rest)
        cfg = model.cfg
        inputs_BL, targets_BL = tokens_BL1[:, :-1], tokens_BL1[:, 1:]
        routing = None if experts is None else tuple((e, None) for e in experts)
        logits_BLV, aux = model(inputs_BL, train=True, rng=rng, replay=routing, balance_load=balance_load,
                                mtp=cfg.mtp_depth > 0)
        ce = cross_entropy(logits_BLV, targets_BL)
        loss = ce + aux.aux_loss
        mtp = mtp_losses(aux.mtp_logits, targets_BL)
        if mtp:
            loss = loss + cfg.mtp_loss_weight / len(mtp) * sum(mtp)
        return loss, (ce, aux, mtp)

    def micro_loads(params, rest, tokens_BL1, rng):
        """{MoE layer: <float32>[n, E] load} of one microbatch: the forward pass alone (its logits unused)."""
        _, (_, aux, _) = objective(params, rest, tokens_BL1, rng, None)
        return {entry["layer"]: entry["balance_load"] for entry in aux.layers if "balance_load" in entry}

    def _accumulate(state: TrainState, batch_BL1: jax.Array, rng: jax.Array):
        """(loss, ce, ModelAux, grads) of the whole batch, from its microbatches one at a time."""
        M = microbatches
        model = nnx.merge(graphdef, state.params, state.rest)
        moe, indices = model.cfg.moe, tuple(i for i, _, _ in model.moe_layer_slots())
        check_microbatches(moe, batch_BL1.shape[0], batch_BL1.shape[1] - 1, M, shards)
        micro_MBL1 = split_microbatches(batch_BL1, M, shards)
        if placement is not None:  # microbatch m: block m of every shard, still on the device holding that shard
            micro_MBL1 = jax.lax.with_sharding_constraint(
                micro_MBL1, NamedSharding(placement.mesh, P(None, *placement.batch.spec)))
        xs = (micro_MBL1, jnp.arange(M))
        params, rest = state.params, state.rest

        load = None
        needed = moe is not None and moe.balance_needs_batch_load
        if needed and batch_load is not False:
            def count(total, x):
                tokens_BL1, m = x
                return jax.tree.map(jnp.add, total, micro_loads(params, rest, tokens_BL1, jax.random.fold_in(rng, m))), None

            shapes = jax.eval_shape(micro_loads, params, rest, micro_MBL1[0], rng)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
            load, _ = jax.lax.scan(count, zeros, xs)

        def micro_step(grad_sum, x):
            tokens_BL1, m = x
            (loss, (ce, aux, mtp)), grads = jax.value_and_grad(objective, has_aux=True)(
                params, rest, tokens_BL1, jax.random.fold_in(rng, m), load)
            grad_sum = jax.tree.map(lambda s, g: s + g.astype(jnp.float32), grad_sum, grads)
            layers = tuple({"losses": e["losses"], "metrics": e["metrics"]} for e in aux.layers)
            return grad_sum, (loss, ce, aux.aux_loss, layers, tuple(mtp))

        grad_sum = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if placement is not None:
            grad_sum = jax.lax.with_sharding_constraint(grad_sum, placement.state.params)
        grad_sum, (loss_M, ce_M, aux_M, layers_M, mtp_M) = jax.lax.scan(micro_step, grad_sum, xs)
        grads = jax.tree.map(lambda s, p: (s / M).astype(p.dtype), grad_sum, params)
        layers = tuple({"layer": i, "losses": jax.tree.map(lambda v: v.mean(axis=0), e["losses"]),
                        "metrics": losses_lib.combine_routing_metrics(e["metrics"])}
                       for i, e in zip(indices, layers_M))
        aux = ModelAux(aux_loss=aux_M.mean(), layers=layers, layer_indices=tuple(indices))
        return loss_M.mean(), ce_M.mean(), aux, [v.mean() for v in mtp_M], grads

    step_fn = train_step if replay else (lambda state, batch_BL1, key: train_step(state, batch_BL1, key))
    if placement is None:
        return jax.jit(step_fn, donate_argnums=0)
    in_shardings = (placement.state, placement.batch, placement.replicated) + ((placement.batch,) if replay else ())
    return jax.jit(step_fn, donate_argnums=0, in_shardings=in_shardings,
                   out_shardings=(placement.state, placement.replicated))


def make_eval_step(graphdef, *, placement=None):
    """Returns `eval_step(state, batch_BL1) -> {ce, aux_loss, moe/...}` (train=False: eval capacity factor).
    placement: as for `make_train_step`."""

    def eval_step(state: TrainState, batch_BL1: jax.Array):
        model = _model(graphdef, placement, state.params, state.rest)
        logits_BLV, aux = model(batch_BL1[:, :-1], train=False)
        return {"ce": cross_entropy(logits_BLV, batch_BL1[:, 1:]), **_layer_metrics(aux)}

    if placement is None:
        return jax.jit(eval_step)
    return jax.jit(eval_step, in_shardings=(placement.state, placement.batch), out_shardings=placement.replicated)
