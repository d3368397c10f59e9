"""The three scales every sweep is defined at: model sizes, data, training budget and seeds.

    smoke  seconds per run: tiny models on the in-memory 'synthetic' corpus; each sweep axis cut to its
           first and last value and one seed (the test suite runs every sweep this way).
    cpu    0.1-3.5 M-parameter (total) byte-level models on Shakespeare, 1,200 steps of 16 x 128 tokens
           (2.46 M tokens: 21 per active parameter of the headline size `s`, 0.49 epochs of the 5.0 M-token
           train split, so no text is seen twice); routing groups of one whole batch (2,048 tokens); the
           protocol of experiments/results/cpu (about 4 hours of a 2-core machine with two workers).
    pod    100M-1B-parameter (dense-equivalent) models on C4 with a 32k BPE vocabulary, ~20 tokens per
           active parameter, FSDP over every device of a TPU slice, one process per host; emitted as
           one command per run for a scheduler (`--mode=commands`), the same command on every host.

A sweep asks its scale for a model (`Scale.model(size, **moe_fields)`) and a run config
(`Scale.config(...)`); sizes, data and training fields are written here once, so the same sweep
definition runs unchanged at every scale.

Expert width at granularity 1 equals the dense FFN width (`ffn`): a top-1 MoE has the active
parameters of the dense model of its size (Switch, Fedus et al. 2022; Clark et al. 2022).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from configs import base

SCALES = ("smoke", "cpu", "pod")


@dataclasses.dataclass(frozen=True)
class Size:
    """A model size: width, depth, heads, and `ffn`, the dense FFN width = one expert's width at G = 1."""

    d_model: int
    num_layers: int
    num_heads: int
    ffn: int
    steps: Optional[int] = None  # overrides Scale.train["steps"] (pod: ~20 tokens per active parameter)


@dataclasses.dataclass(frozen=True)
class Scale:
    name: str
    sizes: dict  # label -> Size, smallest first
    headline: str  # the size of the headline comparisons (expert count, granularity seeds, ...)
    data: dict
    train: dict
    vocab_size: int
    seeds: tuple  # seeds of the headline comparisons
    granularity_sizes: tuple  # sizes with a full granularity sweep (the per-size law L(G) and the joint law)
    flops_matched_seeds: tuple  # seeds of the granularity runs at matched FLOPs
    reduced: bool = False  # smoke: every axis cut to its first and last value
    mesh: dict = dataclasses.field(default_factory=dict)  # the run config's mesh section (moe_jax.sharding)
    group_size: Optional[int] = None  # tokens per routing group of token-choice MoEs (None: one sequence)
    health: dict = dataclasses.field(default_factory=dict)  # the run config's health section (ledger, pictures)
    long_sizes: tuple = ()  # sizes the train_length sweep trains for LONG_FACTOR x their steps (dense and MoE)
    # the rate_check sweep's learning rate as a multiple of `train["learning_rate"]`: the best rate the
    # learning_rate sweep found at this scale (None: not measured yet, no rate_check runs)
    rate_check_factor: Optional[float] = None

    def axis(self, values, smoke=None) -> list:
        """A sweep axis at this scale: all values, or (smoke) `smoke` if given, else the first and the last."""
        values = list(values)
        if not self.reduced or len(values) <= 2:
            return values
        if smoke is not None:
            if len(smoke) > 2 or not set(smoke) <= set(values):
                raise ValueError(f"smoke points {smoke} must be at most 2 of the axis values {values}.")
            return list(smoke)
        return values[:1] + values[-1:]

    def steps(self, size: str) -> int:
        return self.sizes[size].steps or self.train["steps"]

    def model(self, size: str, *, dense: bool = False, **moe) -> dict:
        """The model section for `size`: a top-1 MoE with 8 experts of the dense FFN's width in every layer
        (Switch-style), or a dense model; `moe` overrides MoE fields (num_experts, granularity, ...)."""
        s = self.sizes[size]
        model = dict(
            vocab_size=self.vocab_size, d_model=s.d_model, num_layers=s.num_layers, num_heads=s.num_heads,
            d_ff=s.ffn, activation="swiglu", norm="rmsnorm", max_seq_len=self.data["seq_len"],
            use_moe=not dense, moe_d_ff=s.ffn, num_experts=8, num_experts_per_token=1, granularity=1,
            moe_every=1, router="top_k", capacity_factor=1.25, eval_capacity_factor=2.0, min_capacity=4,
            dispatch="gather", balance_loss_coef=1e-2, z_loss_coef=1e-3, group_size=self.group_size)
        if dense:
            if moe:
                raise ValueError(f"Scale.model(dense=True) takes no MoE fields, got {sorted(moe)}.")
            return model
        unknown = set(moe) - set(model) - MOE_EXTRA_FIELDS
        if unknown:
            raise ValueError(f"Scale.model: {sorted(unknown)} are not MoE fields a sweep may set here; "
                             f"known: {sorted(set(model) | MOE_EXTRA_FIELDS)}.")
        model.update(moe)
        return model

    def config(self, name: str, model: dict, *, size: str, seed: int, steps: Optional[int] = None,
               train: Optional[dict] = None):
        """A full run ConfigDict: `model`, this scale's data and training fields (`train` overrides some,
        e.g. the learning rate), `seed` for data and init."""
        steps = steps or self.steps(size)
        unknown = set(train or {}) - TRAIN_OVERRIDES
        if unknown:
            raise ValueError(f"Scale.config: {sorted(unknown)} are not training fields a sweep may set; "
                             f"known: {sorted(TRAIN_OVERRIDES)}.")
        train = dict(self.train, **(train or {}), steps=steps, seed=seed)
        evals = self.train.get("evals", 4)
        train.pop("evals", None)
        train["eval_every"] = max(1, steps // evals)
        train["checkpoint_every"] = max(1, steps // self.train.get("checkpoints", 1))
        train.pop("checkpoints", None)
        train["warmup_steps"] = min(train["warmup_steps"], steps)
        config = base.make(name, model, data=dict(self.data, seed=seed), train=train, health=dict(self.health))
        for key, value in self.mesh.items():
            setattr(config.mesh, key, value)
        return config


# MoE fields a sweep may set beyond the ones `Scale.model` fills in.
MOE_EXTRA_FIELDS = frozenset({
    "overflow", "num_shared_experts", "shared_d_ff", "priority", "grouping", "score_fn",
    "normalize_topk", "expert_backend", "use_correction_bias", "topk_order", "group_size", "first_dense_layers"})
# Training fields a sweep may set (the learning-rate sweep); the rest come from the scale.
TRAIN_OVERRIDES = frozenset({"learning_rate", "warmup_steps"})

_QUIET = dict(sample_tokens=0, progress=False, keep_checkpoints=1)

SMOKE = Scale(
    name="smoke",
    sizes={"xs": Size(d_model=32, num_layers=1, num_heads=2, ffn=64),
           "s": Size(d_model=48, num_layers=2, num_heads=2, ffn=64)},
    headline="xs",
    data=dict(corpus="synthetic", seq_len=32, batch_size=4, tokenizer="byte"),
    train=dict(steps=8, learning_rate=1e-2, warmup_steps=2, schedule="cosine", log_every=1, eval_batches=1,
               evals=2, checkpoints=1, **_QUIET),
    vocab_size=256,
    seeds=(0,),
    granularity_sizes=("xs", "s"),
    flops_matched_seeds=(0,),
    long_sizes=("xs",),
    rate_check_factor=4.0,
    reduced=True,
    # runs of 8 steps: no routing ledger or routing picture at their evaluations (tests/test_ledger.py and
    # tests/test_health.py cover those); their compile and drawing would cost more than the training
    health=dict(ledger_batches=0, pictures=False),
)

# CPU: why these numbers (experiments/results/cpu/report.md measures each):
# - 1,200 steps x 2,048 tokens = 2.46 M tokens, 21 per active parameter of `s` (Hoffmann et al.'s ~20). The
#   earlier protocol's 250 steps (~4 tokens per parameter) measured how far optimisation got, not capacity:
#   there every MoE sat within noise of dense or behind it.
# - Routing groups of the whole batch (2,048 tokens; capacity 320 slots per expert at factor 1.25 and E = 8):
#   with groups of one 128-token sequence (16 tokens per expert on average) chance fluctuations alone overflow
#   the 20 slots, and 3-4 % of tokens were still dropped after 2,000 steps.
# - Learning rate 3e-3 with 100 warm-up steps: the `learning_rate` sweep checks 1e-3 / 3e-3 / 6e-3 / 1.2e-2 /
#   2.4e-2 and 30 / 300 warm-up steps for dense and MoE at the headline size. 3e-3 is below both kinds' best
#   (6e-3 dense, 1.2e-2 MoE, ~0.04 nats better, one seed), but MoE - dense is the same there (-0.064) as at each
#   kind's best (-0.062); the protocol has not been rerun at a higher rate (~8 worker-hours). The rate_check
#   sweep trains the models of claims 1, 3 and 4 at 1.2e-2 (3 seeds): the finest ones gain the most there.
# - 16 eval batches (32,768 tokens) of fixed validation windows, the same for every run and seed.
CPU = Scale(
    name="cpu",
    sizes={"s": Size(d_model=64, num_layers=2, num_heads=2, ffn=128),
           "m": Size(d_model=96, num_layers=3, num_heads=3, ffn=192),
           "l": Size(d_model=128, num_layers=4, num_heads=4, ffn=256)},
    headline="s",
    data=dict(corpus="shakespeare", seq_len=128, batch_size=16, tokenizer="byte"),
    train=dict(steps=1200, learning_rate=3e-3, warmup_steps=100, schedule="cosine", log_every=25, eval_batches=16,
               evals=8, checkpoints=4, **_QUIET),
    vocab_size=256,
    seeds=(0, 1, 2),
    granularity_sizes=("s", "m"),  # l: dense and G = 1 only (model_size)
    flops_matched_seeds=(0, 1, 2),  # the headline granularity comparison (equal FLOPs): 3 seeds
    group_size=2048,
    long_sizes=("m",),  # claim 1's middle size at 2 x 1,200 steps: 15 tokens per active parameter, 0.98 epochs
    rate_check_factor=4.0,  # 1.2e-2: the MoE's best rate in the learning_rate sweep, tied with dense's best
)

# Pod: 256 x 1024 tokens per step (262,144); steps ~ 20 tokens per dense-equivalent parameter (Hoffmann
# et al. 2022), embeddings included: p1 162M -> 3.3B tokens, p2 401M -> 8.0B, p3 1.00B -> 20B (dense
# counts of `moe_jax.params.count_params`; tests/test_experiments.py checks the ratio).
POD = Scale(
    name="pod",
    sizes={"p1": Size(d_model=768, num_layers=12, num_heads=12, ffn=3072, steps=12_500),
           "p2": Size(d_model=1024, num_layers=20, num_heads=16, ffn=4096, steps=30_500),
           "p3": Size(d_model=1536, num_layers=24, num_heads=24, ffn=6144, steps=76_500)},
    headline="p1",
    data=dict(corpus="tfds:c4/en:3.1.0", seq_len=1024, batch_size=256, tokenizer="bpe", bpe_vocab_size=32000),
    train=dict(steps=10_000, learning_rate=1e-3, warmup_steps=1000, schedule="cosine", log_every=100,
               eval_batches=32, evals=10, checkpoints=10, **_QUIET),
    vocab_size=32000,
    seeds=(0, 1, 2),
    granularity_sizes=("p1", "p2", "p3"),
    flops_matched_seeds=(0, 1, 2),
    # Every device of the slice in one FSDP axis (weights and optimizer state sharded over d_model, the batch
    # over devices; any power-of-two slice up to 256 chips divides d_model and the batch of 256), one
    # process per host detected by JAX: the same command runs on every host.
    mesh=dict(fsdp=-1, num_processes=-1),
)

_BY_NAME = {s.name: s for s in (SMOKE, CPU, POD)}


def get(name: str) -> Scale:
    if name not in _BY_NAME:
        raise ValueError(f"--scale={name!r} is not one of {SCALES}; use --scale=smoke, cpu or pod.")
    return _BY_NAME[name]
