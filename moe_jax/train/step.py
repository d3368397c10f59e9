"""The jitted train and eval steps.

Train step: cross-entropy + the MoE layers' weighted auxiliary losses (+ with `ModelConfig.mtp_depth` = D > 0
the multi-token-prediction loss lambda / D * sum_k CE_k, moe_jax/mtp.py), AdamW update, then the
aux-loss-free bias update of every router that has a correction bias (DeepSeek-V3, Wang et al. 2024:
b_i += rate * sign(mean load - load_i), outside the gradient). A step whose loss or gradient norm is
not finite is not applied (params, optimizer state and biases stay as they were) and is counted in
`state.skipped`, so a NaN can never reach a checkpoint.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from moe_jax import losses as losses_lib
from moe_jax.train.state import TrainState, split_model


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


def make_train_step(graphdef, tx: optax.GradientTransformation, schedule, *, placement=None):
    """Returns `step(state, batch_BL1, key) -> (state, metrics)`, jitted with the state donated.

    placement: a `moe_jax.sharding.placement.Placement` for a run on a device mesh (the state keeps its
    sharding from step to step, metrics come back replicated, the MoE layers run through its plan);
    None = one device.
    """

    def train_step(state: TrainState, batch_BL1: jax.Array, key: jax.Array):
        rng = jax.random.fold_in(key, state.step)
        inputs_BL, targets_BL = batch_BL1[:, :-1], batch_BL1[:, 1:]

        def loss_fn(params):
            model = _model(graphdef, placement, params, state.rest)
            cfg = model.cfg
            logits_BLV, aux = model(inputs_BL, train=True, rng=rng, mtp=cfg.mtp_depth > 0)
            ce = cross_entropy(logits_BLV, targets_BL)
            loss = ce + aux.aux_loss
            mtp = mtp_losses(aux.mtp_logits, targets_BL)
            if mtp:  # L_MTP = lambda / D * sum_k L_MTP^k; absent (not 0 * ...) without MTP: the loss is unchanged
                loss = loss + cfg.mtp_loss_weight / len(mtp) * sum(mtp)
            return loss, (ce, aux, mtp)

        (loss, (ce, aux, mtp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        model = nnx.merge(graphdef, params, state.rest)
        layers = dict(model.moe_layers())
        for entry in aux.layers:
            layer = layers[entry["layer"]]
            bias = layer.router.correction_bias_E
            if bias is not None:
                bias[...] = losses_lib.update_correction_bias(
                    bias[...], entry["metrics"]["routed_per_expert"], layer.cfg.bias_update_rate)
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

    if placement is None:
        return jax.jit(train_step, donate_argnums=0)
    return jax.jit(train_step, donate_argnums=0, in_shardings=(placement.state, placement.batch, placement.replicated),
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
