"""`TrainConfig`: optimizer, schedule, loop cadence and checkpointing fields, validated on construction."""
from __future__ import annotations

import dataclasses
from typing import Optional

SCHEDULES = ("cosine", "wsd", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """The training loop's typed fields (a ConfigDict's `train` section becomes this at the boundary).

    Schedules (optax): `cosine` = linear warmup then cosine decay to `end_lr_fraction * lr`;
    `wsd` = warmup-stable-decay (Hagele et al. 2024): warmup, constant, then a linear decay over the last
    `decay_fraction` of the steps; `constant` = warmup then constant.

    microbatches: M > 1 runs each step's `[batch_size, seq_len]` batch as M microbatches of batch_size / M
    sequences, one at a time (activation memory of one microbatch), and applies one optimizer step with the
    mean of their gradients, which equals the whole batch's gradient, auxiliary losses included (see
    moe_jax/train/step.py). Routing groups must lie inside a microbatch (checked with the data section).

    replay_ledger: the path of a routing ledger .npz: train on its recorded tokens with its recorded routing
    (moe_jax/train/replay.py; checked against the model and data before anything is compiled); None = the data
    section's training batches and the routers' own choices.
    """

    steps: int = 300
    learning_rate: float = 3e-3
    warmup_steps: int = 30
    schedule: str = "cosine"
    end_lr_fraction: float = 0.1
    decay_fraction: float = 0.2  # wsd only
    weight_decay: float = 0.1  # applied to matrices only (not norms, biases, router biases)
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: Optional[float] = 1.0  # global-norm clipping; None = off
    seed: int = 0
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 4
    checkpoint_every: int = 100
    keep_checkpoints: int = 3  # >= 2 to fall back on an earlier step when the latest cannot be read
    async_checkpointing: bool = True  # write checkpoints in the background (from a copy of the state)
    sample_tokens: int = 200  # text sampled at the end of a run (0 = none)
    sample_prompt: str = "ROMEO:"
    sample_temperature: float = 0.8
    progress: bool = True  # tqdm progress bar on the console
    microbatches: int = 1  # gradient accumulation: one optimizer step over this many equal slices of the batch
    replay_ledger: Optional[str] = None  # a ledger .npz: train on its tokens with its routing (train/replay.py)

    def __post_init__(self):
        def bad(field, why):
            raise ValueError(f"config.train.{field}={getattr(self, field)!r} {why}")

        for field in ("steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, field) < 1:
                bad(field, "must be >= 1.")
        if not self.learning_rate > 0:
            bad("learning_rate", "must be > 0.")
        if not 0 <= self.warmup_steps <= self.steps:
            bad("warmup_steps", f"must be in [0, steps={self.steps}].")
        if self.schedule not in SCHEDULES:
            bad("schedule", f"is not one of {SCHEDULES}; set config.train.schedule to one of them.")
        if not 0 <= self.end_lr_fraction <= 1:
            bad("end_lr_fraction", "must be in [0, 1].")
        if not 0 < self.decay_fraction <= 1:
            bad("decay_fraction", "must be in (0, 1].")
        if self.weight_decay < 0:
            bad("weight_decay", "must be >= 0.")
        for field in ("b1", "b2"):
            if not 0 <= getattr(self, field) < 1:
                bad(field, "must be in [0, 1) (Adam's moment decay; e.g. 0.9 and 0.95).")
        if isinstance(self.microbatches, bool) or not isinstance(self.microbatches, int) or self.microbatches < 1:
            bad("microbatches", "must be an int >= 1 (1 = no gradient accumulation) that divides "
                                "config.data.batch_size.")
        if self.grad_clip is not None and not self.grad_clip > 0:
            bad("grad_clip", "must be > 0, or None to turn clipping off.")
        if self.eval_batches < 0 or self.sample_tokens < 0:
            bad("eval_batches" if self.eval_batches < 0 else "sample_tokens", "must be >= 0.")
        if not self.sample_temperature >= 0:
            bad("sample_temperature", "must be >= 0 (0 = greedy).")
        if self.replay_ledger is not None and not (isinstance(self.replay_ledger, str) and self.replay_ledger):
            bad("replay_ledger", "must be the path of a routing ledger .npz, or None.")
