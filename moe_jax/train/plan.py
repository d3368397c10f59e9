"""Memory per device of a train step on a mesh: the ahead-of-time compiled step beside an analytic count.

    sizes = parse_mesh("fsdp=4,expert=16,model=4")               # {'data': 1, 'fsdp': 4, ...}; ValueError naming --mesh
    analytic = analytic_bytes(run, sizes)                         # params / optimizer / rest per device, exact
    m = compile_memory(run, sizes)                                # the real step, lowered on abstract inputs
    plan = extrapolated_memory(run, sizes)                        # fewer layers compiled, linear in depth

`compile_memory` builds the train step exactly as `experiments.train` does on a mesh (moe_jax/train/step.py with
the `Placement` of moe_jax/train/distributed.py: state sharded by the rule table, MoE layers expert-parallel) and
compiles it with `jax.jit(...).lower(...).compile()` on `jax.ShapeDtypeStruct`s: no weight is ever materialised.
`compiled.memory_analysis()` gives, per device, the argument bytes (train state + batch + key), the output bytes
(the new state aliases the donated one) and the temporary bytes (activations kept for the backward pass, the
gradients, the all-to-all buffers and XLA's scratch). The step needs the mesh's devices to exist: the planner's
process forces `--xla_force_host_platform_device_count` to the mesh size before JAX starts (experiments/plan.py).

Depth. A big preset does not compile at full depth on a CPU in reasonable time, so `extrapolated_memory` compiles
the dense prefix + 2 and + 3 periods of the MoE placement pattern, fits bytes = a + b * periods to each
component, predicts the full depth, and checks the fit at a third depth (prefix + 4 periods, or the full depth
when that is smaller). The state's bytes are exactly linear in depth; the temporary bytes are linear as long as
XLA keeps the same schedule per layer, which the third depth checks (`check_error`).

The analytic count needs no compile: the parameter and optimizer-state shapes come from `nnx.eval_shape` of a
model with one block of each kind (blocks of one kind have identical parameters, moe_jax/params.py), and their
per-device share from the sharding rules (moe_jax/sharding/rules.py): a dimension split over mesh axes of n
devices holds 1/n of it. AdamW keeps mu and nu in the parameters' dtype and layout: 2 x the parameter bytes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Mapping, Optional

from moe_jax.sharding.config import AXES

MAX_DEVICES = 4096
GIB = 2 ** 30
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4,
                "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}


def parse_mesh(text: str, flag: str = "--mesh") -> dict[str, int]:
    """'fsdp=4,expert=16,model=4' -> every axis of `AXES` with its size (missing axes 1). Raises ValueError
    naming `flag` and the fix for an unknown axis, a size that is not a positive int, or more than
    MAX_DEVICES devices. Imports no JAX."""
    sizes = dict.fromkeys(AXES, 1)
    seen = set()
    for part in [p.strip() for p in str(text).split(",") if p.strip()]:
        name, eq, value = part.partition("=")
        name = name.strip()
        if not eq or name not in AXES:
            raise ValueError(f"{flag}={text}: {part!r} is not axis=size with an axis of {AXES}; write e.g. "
                             f"{flag}=fsdp=4,expert=16,model=4.")
        if name in seen:
            raise ValueError(f"{flag}={text}: axis {name!r} is given twice; give each axis once.")
        seen.add(name)
        try:
            size = int(value)
        except ValueError:
            size = 0
        if size < 1:
            raise ValueError(f"{flag}={text}: {name}={value.strip()!r} must be an int >= 1 (the devices on that axis).")
        sizes[name] = size
    if not seen:
        raise ValueError(f"{flag}={text!r}: no axis given; write e.g. {flag}=fsdp=4,expert=16,model=4.")
    total = math.prod(sizes.values())
    if total > MAX_DEVICES:
        raise ValueError(f"{flag}={text}: {total} devices, more than the planner simulates ({MAX_DEVICES}); "
                         "plan a slice of at most 4096 devices (the per-device bytes depend on the axis sizes, "
                         "and a data axis replicates them).")
    return sizes


def mesh_name(sizes: Mapping[str, int]) -> str:
    return ",".join(f"{a}={sizes[a]}" for a in AXES if sizes.get(a, 1) > 1) or "data=1"


def with_model(run, **changes):
    """`run` with ModelConfig fields changed (num_layers, remat, scan_layers), validated again."""
    return dataclasses.replace(run, model=dataclasses.replace(run.model, **changes))


def with_batch(run, batch_size: int):
    return dataclasses.replace(run, data=dataclasses.replace(run.data, batch_size=batch_size))


def check_mesh(run, sizes: Mapping[str, int]) -> None:
    """The model and batch of `run` fit the mesh `sizes` (moe_jax.sharding.check_layout), or ValueError naming
    --mesh, the field that does not divide, and the fix."""
    from moe_jax.sharding import ShardingConfig, check_layout

    try:
        check_layout(run.model, run.data.batch_size, run.data.seq_len, ShardingConfig(**sizes),
                     math.prod(sizes.values()))
    except ValueError as e:
        raise ValueError(f"--mesh={mesh_name(sizes)}: {e}") from None


# ----------------------------------------------------------------------------------------------- analytic


def _leaf_bytes(shape, dtype, spec, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of an array of `shape` laid out by PartitionSpec `spec` on a mesh of `sizes`."""
    import numpy as np

    n = math.prod(shape)
    for entry in spec:
        for axis in (entry if isinstance(entry, tuple) else (entry,)):
            if axis is not None:
                n //= sizes[axis]
    return n * np.dtype(dtype).itemsize


def tree_bytes(tree, sizes: Mapping[str, int]) -> int:
    """Per-device bytes of an abstract pytree placed by the rule table (moe_jax.sharding.rules)."""
    import jax
    from jax.sharding import PartitionSpec

    from moe_jax.sharding import tree_specs

    specs = jax.tree.leaves(tree_specs(tree, dict(sizes)), is_leaf=lambda x: isinstance(x, PartitionSpec))
    return sum(_leaf_bytes(leaf.shape, leaf.dtype, spec, sizes) for leaf, spec in zip(jax.tree.leaves(tree), specs))


def analytic_bytes(run, sizes: Mapping[str, int]) -> dict[str, int]:
    """Per-device bytes of the train state by category, from shapes and the sharding rules, without compiling:
    {"params", "optimizer", "rest", "batch"} (rest: non-trainable variables, e.g. correction biases; batch: the
    token batch's rows on one device).

    Blocks of one kind (dense, MoE) have identical parameters, so a model with one of each is traced and the
    blocks' bytes multiplied by their counts (the stacked layout of scan_layers holds the same bytes: its
    stacking axis is never split)."""
    from flax import nnx

    from moe_jax.params import abstract_model

    cfg = run.model
    n_moe = len(cfg.moe_layer_indices)
    n_dense = cfg.num_layers - n_moe
    proto = dataclasses.replace(cfg, num_layers=int(n_dense > 0) + int(n_moe > 0), first_dense_layers=int(n_dense > 0),
                                moe_every=1, scan_layers=False)
    model = abstract_model(proto)
    count = {False: n_dense, True: n_moe}

    def per_device(module, kind):
        return tree_bytes(nnx.state(module, kind), sizes)

    out = {}
    for name, kind in (("params", nnx.Param), ("rest", nnx.Not(nnx.Param))):
        whole = per_device(model, kind)
        blocks = [(b.is_moe, per_device(b, kind)) for b in model.blocks]
        out[name] = whole - sum(b for _, b in blocks) + sum(count[is_moe] * b for is_moe, b in blocks)
    out["optimizer"] = 2 * out["params"]  # AdamW's mu and nu, laid out as the parameters (plus a step count)
    shards = math.prod(sizes[a] for a in ("data", "fsdp", "expert"))
    out["batch"] = run.data.batch_size * (run.data.seq_len + 1) * 4 // shards  # <int32>[B, L + 1], rows split
    return out


# ----------------------------------------------------------------------------------------------- compiled


@dataclasses.dataclass(frozen=True)
class StepMemory:
    """Per-device bytes of one compiled train step (`compiled.memory_analysis()`), and its collectives."""

    layers: int
    arguments: int  # train state + batch (+ key if used; jit drops unused ones); the new state aliases the donated one
    outputs: int
    aliased: int
    temp: int  # activations kept for the backward pass, gradients, collective buffers, scratch
    all_to_all: tuple = ()  # bytes of each all-to-all's result buffer, largest first (HLO of the step)

    @property
    def peak(self) -> int:
        """What the step needs resident at once: its arguments, its outputs that do not reuse an argument's
        buffer, and its temporaries."""
        return self.arguments + self.outputs - self.aliased + self.temp


def _shape_bytes(text: str) -> int:
    """Bytes of an HLO shape string 'f32[8,16]{1,0}' or a tuple '(f32[4], bf16[2,2])'."""
    total = 0
    for dtype, dims in re.findall(r"\b([a-z]+\d*)\[([\d,]*)\]", text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return total


def all_to_all_bytes(hlo_text: str) -> list[int]:
    """Result bytes of every all-to-all (and ragged all-to-all) in a compiled module's HLO, largest first."""
    sizes = []
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+(?:ragged-)?all-to-all(?:-start)?\(", line)
        if m:
            sizes.append(_shape_bytes(m.group(1)))
    return sorted(sizes, reverse=True)


def abstract_step_inputs(run, mesh):
    """(graphdef, abstract train state, abstract batch, abstract key, Placement): ShapeDtypeStructs carrying
    their shardings, as `init_sharded` would lay the real ones out."""
    import jax
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding

    from moe_jax.sharding import ExpertParallel, batch_spec, tree_shardings
    from moe_jax.sharding.placement import Placement
    from moe_jax.train.state import init_state, make_optimizer, split_model
    from moe_jax.transformer import Transformer

    tx = make_optimizer(run.train)

    def make_model():
        return Transformer(run.model, rngs=nnx.Rngs(params=run.train.seed))

    graphdef, _, _ = split_model(nnx.eval_shape(make_model))
    shapes = jax.eval_shape(lambda: init_state(make_model(), tx)[1])
    shardings = tree_shardings(shapes, mesh)
    state = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)
    m = run.mesh
    plan = (ExpertParallel(mesh, balance_stats=m.balance_stats, dropless_exchange=m.dropless_exchange,
                           dropless_buffer_factor=m.dropless_buffer_factor) if run.model.moe is not None else None)
    placement = Placement(mesh=mesh, state=shardings, batch=NamedSharding(mesh, batch_spec(2)), plan=plan)
    batch = jax.ShapeDtypeStruct((run.data.batch_size, run.data.seq_len + 1), jnp.int32, sharding=placement.batch)
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=placement.replicated)
    return graphdef, tx, state, batch, key, placement


def compile_step(run, sizes: Mapping[str, int]):
    """The train step of `run` on the mesh `sizes`, ahead-of-time compiled on abstract inputs. Needs
    prod(sizes) devices (the planner's process simulates them on the CPU)."""
    import jax

    from moe_jax.sharding import ShardingConfig, make_mesh
    from moe_jax.train.state import learning_rate_schedule
    from moe_jax.train.step import make_train_step

    n = math.prod(sizes.values())
    if jax.device_count() < n:
        raise ValueError(f"--mesh={mesh_name(sizes)} needs {n} devices, this process has {jax.device_count()}; "
                         f"run it through python -m experiments.plan, which simulates them (XLA_FLAGS="
                         f"--xla_force_host_platform_device_count={n} before JAX starts).")
    mesh_cfg = ShardingConfig(**sizes)
    run = dataclasses.replace(run, mesh=dataclasses.replace(run.mesh, **sizes))
    mesh = make_mesh(mesh_cfg, jax.devices()[:n])
    graphdef, tx, state, batch, key, placement = abstract_step_inputs(run, mesh)
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train), placement=placement,
                           microbatches=run.train.microbatches)
    return step.lower(state, batch, key).compile()


def compile_memory(run, sizes: Mapping[str, int]) -> StepMemory:
    """`StepMemory` of the compiled train step of `run` at its depth on the mesh `sizes`."""
    compiled = compile_step(run, sizes)
    m = compiled.memory_analysis()
    return StepMemory(layers=run.model.num_layers, arguments=int(m.argument_size_in_bytes),
                      outputs=int(m.output_size_in_bytes), aliased=int(m.alias_size_in_bytes),
                      temp=int(m.temp_size_in_bytes), all_to_all=tuple(all_to_all_bytes(compiled.as_text())))


# ----------------------------------------------------------------------------------------------- depth


@dataclasses.dataclass(frozen=True)
class Plan:
    """Full-depth per-device bytes of one (mesh, remat), predicted from shallower compiles."""

    sizes: dict
    remat: str
    layers: int
    predicted: StepMemory  # at `layers`; all_to_all: the deepest compile's (per layer, they do not grow)
    measured: tuple  # the StepMemory of each compiled depth
    check_layers: Optional[int]  # the depth the linear fit was checked at (None: the full depth was compiled)
    check_error: Optional[float]  # |predicted - measured| / measured peak at check_layers
    analytic: dict
    # the full depth's peak on the line through the 2nd and 3rd depths instead (None: no third depth): the two
    # differ when the per-layer bytes are not constant, which the peak's check_error at a shallow depth hides
    alternative_peak: Optional[int] = None

    @property
    def how(self) -> str:
        d = [m.layers for m in self.measured]
        if d == [self.layers]:
            return f"compiled at full depth ({self.layers} layers)"
        how = f"linear in depth from {d[0]} and {d[1]} compiled layers to {self.layers}"
        if self.check_layers is None:
            return how + "; not checked at a third depth"
        how += f"; checked at {self.check_layers} layers: peak off by {100 * self.check_error:.1f}%"
        return how + f"; from {d[1]} and {d[2]} layers instead: peak {self.alternative_peak / GIB:.3f} GiB"


def depths(cfg) -> tuple[int, int, int]:
    """(d1, d2, d3): the dense prefix + 2, + 3 and + 4 periods of the MoE placement pattern, each capped at the
    model's depth."""
    N, P = cfg.first_dense_layers if cfg.moe is not None else 0, cfg.layer_period
    return tuple(min(N + k * P, cfg.num_layers) for k in (2, 3, 4))


def _line(a: StepMemory, b: StepMemory, layers: int) -> StepMemory:
    """The StepMemory at `layers` on the line through `a` and `b` (per field), rounded to bytes."""
    t = (layers - a.layers) / (b.layers - a.layers)
    fields = {f: round(getattr(a, f) + t * (getattr(b, f) - getattr(a, f)))
              for f in ("arguments", "outputs", "aliased", "temp")}
    return StepMemory(layers=layers, all_to_all=b.all_to_all, **fields)


def extrapolated_memory(run, sizes: Mapping[str, int], *, check: bool = True, log=lambda *_: None) -> Plan:
    """Plan of `run` (its remat, its depth) on `sizes`: the full depth compiled if it is at most the prefix +
    3 periods, else linear from prefix + 2 and + 3 periods, checked at + 4 (or the full depth if smaller)."""
    cfg = run.model
    d1, d2, d3 = depths(cfg)
    analytic = analytic_bytes(run, sizes)
    if d2 >= cfg.num_layers or d1 == d2:
        log(f"  compiling {cfg.num_layers} layers (full depth)")
        full = compile_memory(run, sizes)
        return Plan(dict(sizes), cfg.remat, cfg.num_layers, full, (full,), None, None, analytic)
    measured = []
    for d in (d1, d2):
        log(f"  compiling {d} of {cfg.num_layers} layers")
        measured.append(compile_memory(with_model(run, num_layers=d), sizes))
    predicted = _line(measured[0], measured[1], cfg.num_layers)
    check_layers = error = alternative = None
    if check and d3 > d2:
        log(f"  compiling {d3} layers (checks the linear fit)")
        third = compile_memory(with_model(run, num_layers=d3), sizes)
        measured.append(third)
        check_layers = d3
        error = abs(_line(measured[0], measured[1], d3).peak - third.peak) / third.peak
        alternative = _line(measured[1], third, cfg.num_layers).peak
    return Plan(dict(sizes), cfg.remat, cfg.num_layers, predicted, tuple(measured), check_layers, error, analytic,
                alternative)


# ----------------------------------------------------------------------------------------------- meshes


def candidate_meshes(run, num_devices: int, limit: int = 4) -> list[dict[str, int]]:
    """Up to `limit` factorizations fsdp x expert x model of `num_devices` that the model and batch divide,
    fewest analytic state bytes per device first (experts split as far as they go, then fsdp, model <= 8)."""
    out = []
    for model in (1, 2, 4, 8):
        for expert in [e for e in range(1, num_devices + 1) if num_devices % (model * e) == 0]:
            fsdp = num_devices // (model * expert)
            if fsdp * expert * model != num_devices:
                continue
            sizes = dict(data=1, fsdp=fsdp, expert=expert, model=model)
            try:
                check_mesh(run, sizes)
            except ValueError:
                continue
            out.append(sizes)
    scored = sorted(out, key=lambda s: (_state_bytes(run, s), s["model"]))
    return scored[:limit]


def _state_bytes(run, sizes) -> int:
    a = analytic_bytes(run, sizes)
    return a["params"] + a["optimizer"] + a["rest"]


def fits(plan: Plan, budget_bytes: float) -> bool:
    return plan.predicted.peak <= budget_bytes


def format_plan(plan: Plan, budget_bytes: Optional[float] = None) -> str:
    """The table of one plan: analytic beside compiled, GiB per device."""
    a, p = plan.analytic, plan.predicted
    g = lambda b: f"{b / GIB:9.3f}"  # noqa: E731
    state = p.arguments  # train state + batch + key
    lines = [f"mesh {mesh_name(plan.sizes)}, remat={plan.remat}: {plan.how}",
             f"  {'GiB per device':<42}{'analytic':>9}  {'compiled':>9}",
             f"  {'parameters':<42}{g(a['params'])}",
             f"  {'optimizer state (AdamW mu, nu)':<42}{g(a['optimizer'])}",
             f"  {'other variables (e.g. correction biases)':<42}{g(a['rest'])}",
             f"  {'arguments (state + batch)':<42}{g(a['params'] + a['optimizer'] + a['rest'] + a['batch'])}  {g(state)}",
             f"  {'activations + gradients + scratch (temp)':<42}{'':>9}  {g(p.temp)}",
             f"  {'outputs not aliasing the donated state':<42}{'':>9}  {g(p.outputs - p.aliased)}",
             f"  {'peak (arguments + outputs + temp)':<42}{'':>9}  {g(p.peak)}"]
    if len(plan.measured) > 1:
        lines.append("  compiled peaks: " + ", ".join(f"{m.layers} layers {m.peak / GIB:.3f}" for m in plan.measured))
    if p.all_to_all:
        top = ", ".join(f"{b / 2**20:.2f}" for b in p.all_to_all[:3])
        lines.append(f"  largest all-to-all buffers (MiB, {len(p.all_to_all)} in the step): {top}")
    else:
        lines.append("  no all-to-all in the step")
    if budget_bytes is not None:
        verdict = "fits" if fits(plan, budget_bytes) else "does NOT fit"
        lines.append(f"  {verdict} in {budget_bytes / GIB:g} GiB per device ({100 * p.peak / budget_bytes:.0f}%)")
    return "\n".join(lines)
