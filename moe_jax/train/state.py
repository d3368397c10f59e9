"""The train state pytree, the optimizer (optax AdamW + schedule + clipping + decay mask), and init.

The model is split once into a static `graphdef` and two states (NNX "functional" style, so the
whole state is one donated, checkpointable pytree):
  params  nnx.Param variables: trained by the optimizer.
  rest    every other variable (e.g. DeepSeek-V3 router correction biases, `RouterBias`): updated by
          rules inside the train step, never by gradients.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct

from moe_jax.train.config import TrainConfig


@struct.dataclass
class TrainState:
    step: jax.Array  # <int32>[]: optimizer steps applied (also the data position: batch `step` comes next)
    params: Any  # nnx.State of nnx.Param
    opt_state: Any
    rest: Any  # nnx.State of non-Param variables
    skipped: jax.Array  # <int32>[]: steps whose update was not applied (non-finite loss or gradients)


def learning_rate_schedule(cfg: TrainConfig) -> optax.Schedule:
    peak, end = cfg.learning_rate, cfg.learning_rate * cfg.end_lr_fraction
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(
            0.0, peak, warmup_steps=cfg.warmup_steps, decay_steps=max(cfg.steps, cfg.warmup_steps + 1),
            end_value=end)
    warmup = optax.linear_schedule(0.0, peak, max(cfg.warmup_steps, 1))
    if cfg.schedule == "constant":
        return optax.join_schedules([warmup, optax.constant_schedule(peak)], [cfg.warmup_steps])
    decay_steps = max(1, int(round(cfg.decay_fraction * cfg.steps)))
    stable_steps = max(0, cfg.steps - cfg.warmup_steps - decay_steps)
    return optax.join_schedules(
        [warmup, optax.constant_schedule(peak), optax.linear_schedule(peak, end, decay_steps)],
        [cfg.warmup_steps, cfg.warmup_steps + stable_steps])


def decay_mask(params) -> Any:
    """Weight decay on matrices (ndim >= 2: projections, experts, embeddings), not on norms or biases."""
    return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(cfg: TrainConfig) -> optax.GradientTransformation:
    adamw = optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, weight_decay=cfg.weight_decay,
                        mask=decay_mask)
    if cfg.grad_clip is None:
        return adamw
    return optax.chain(optax.clip_by_global_norm(cfg.grad_clip), adamw)


def split_model(model: nnx.Module):
    """-> (graphdef, params, rest). Always the same filters, so merge(graphdef, params, rest) rebuilds it."""
    return nnx.split(model, nnx.Param, ...)


def init_state(model: nnx.Module, tx: optax.GradientTransformation):
    graphdef, params, rest = split_model(model)
    state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), rest=rest,
                       skipped=jnp.zeros((), jnp.int32))
    return graphdef, state
