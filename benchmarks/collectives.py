"""The collectives of the expert-parallel train step, read from its compiled HLO, against the analytic minimum.

    python -m benchmarks.collectives [--mesh expert=8] [--json PATH]

Compiles the sharded train step (forward, backward, AdamW) of a small MoE transformer on a mesh of 8
simulated CPU devices, at capacity factor 1.0 and 1.25, and parses the per-device HLO text for
all-to-all, all-gather, all-reduce, reduce-scatter and collective-permute (bytes and replica groups;
on CPU an all-to-all is one instruction over a tuple of N operands, one per peer).

Printed ratio: all-to-all bytes a device sends per step / the analytic minimum, where the minimum
per direction is the bytes of its routed token copies that must leave it,
    tokens_per_device x k x D x bytes x (n - 1) / n          (n = expert axis size),
and a train step has 4 directions per MoE layer (dispatch and combine forward, and their transposes
backward). A capacity buffer holds C x E >= S x k slots per group, so the ratio is C E / (S k): the
capacity factor, plus rounding (target <= 1.3 at capacity factor 1.0). Expert weights must never be
all-gathered (each device keeps its experts; only tokens move).

Dropless (capacity_factor=None, moe_jax/sharding/dropless.py), against the same minimum:
  padded   measured from the compiled CPU HLO: `[n, R, D]` all_to_all buffers, R = T k rows per peer (the
           worst case; ratio n) or, with dropless_buffer_factor f, R = ceil(f T k / n) (ratio ~f while the
           routing fits, the worst-case exchange when it does not; both are in the HLO, reported apart).
  ragged   `ragged_all_to_all` sends exactly the routed rows that leave the device, a data-dependent amount:
           analytically the minimum for uniform routing. Its collectives are read from the step lowered for
           TPU (XLA:CPU cannot compile it): the count of ragged all-to-alls and the bytes of the routing
           metadata (counts all-gathered, offsets exchanged by the backward pass) added to the minimum.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys

if __name__ == "__main__":  # before JAX starts: 8 simulated CPU devices
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import numpy as np
from flax import nnx

from configs import base
from moe_jax import cli
from moe_jax import sharding as sh
from moe_jax.train.distributed import init_sharded_state
from moe_jax.train.run_config import build_run_config
from moe_jax.train.state import learning_rate_schedule, make_optimizer
from moe_jax.train.step import make_train_step
from moe_jax.transformer import Transformer

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s16": 2, "u16": 2, "f32": 4, "s32": 4, "u32": 4,
               "f64": 8, "s64": 8, "u64": 8}
_INSTR = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(?P<shape>.*?)\s+(?P<op>" + "|".join(COLLECTIVES)
                    + r")(?P<start>-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_GROUPS_LIST = re.compile(r"replica_groups=\{((?:\{[\d,]*\},?)*)\}")
_GROUPS_IOTA = re.compile(r"replica_groups=\[(\d+),(\d+)\]<=")


def arrays(shape_text: str) -> list[tuple[str, tuple[int, ...]]]:
    return [(dt, tuple(int(d) for d in dims.split(",") if d)) for dt, dims in _ARRAY.findall(shape_text)]


def nbytes(dtype: str, dims: tuple[int, ...]) -> int:
    return DTYPE_BYTES[dtype] * math.prod(dims)


def group_size(line: str, num_devices: int) -> int:
    m = _GROUPS_IOTA.search(line)
    if m:
        return int(m.group(2))
    m = _GROUPS_LIST.search(line)
    if m and m.group(1):
        first = m.group(1).split("}")[0].strip("{,")
        return len([x for x in first.split(",") if x])
    return num_devices  # no groups: every device (XLA's default)


def parse_collectives(hlo: str, num_devices: int) -> list[dict]:
    """Every collective of a per-device HLO module: op, result arrays, payload bytes, replica group size.

    payload: the bytes of the result (for an async '-start', its last tuple element, the destination);
    an all-to-all over a tuple of N operands (CPU) counts all of them.
    """
    out = []
    for line in hlo.splitlines():
        m = _INSTR.match(line)
        if not m:
            continue
        result = arrays(m.group("shape"))
        if m.group("start"):
            result = result[len(result) // 2:]
        out.append({"op": m.group("op"), "arrays": result, "bytes": sum(nbytes(*a) for a in result),
                    "group": group_size(line, num_devices), "text": line.strip()[:200]})
    return out


def moved_bytes(c: dict) -> float:
    """Bytes one device sends for collective `c` (ring algorithms; a group of 1 moves nothing)."""
    g = c["group"]
    share = (g - 1) / g
    return {"all-to-all": share, "all-gather": share, "all-reduce": 2 * share,
            "reduce-scatter": g - 1, "collective-permute": 1.0}[c["op"]] * c["bytes"]


def summarise(collectives: list[dict]) -> dict:
    by_op = {}
    for c in collectives:
        entry = by_op.setdefault(c["op"], {"count": 0, "bytes": 0, "moved_bytes": 0.0, "group_sizes": set()})
        entry["count"] += 1
        entry["bytes"] += c["bytes"]
        entry["moved_bytes"] += moved_bytes(c)
        entry["group_sizes"].add(c["group"])
    return {op: dict(v, group_sizes=sorted(v["group_sizes"])) for op, v in by_op.items()}


def make_run(capacity_factor: float | None, mesh: dict, *, d_model: int, moe_d_ff: int, num_experts: int, k: int,
             num_layers: int, seq_len: int, batch_size: int):
    """capacity_factor None: dropless (blocked experts; the exchange and its bound come from `mesh`)."""
    extra = dict(expert_backend="blocked") if capacity_factor is None else {}
    model = base.tiny_model(d_model=d_model, num_layers=num_layers, num_heads=4, d_ff=4 * d_model, moe_d_ff=moe_d_ff,
                            num_experts=num_experts, num_experts_per_token=k, capacity_factor=capacity_factor,
                            min_capacity=1, max_seq_len=seq_len, dispatch="gather", **extra)
    config = base.make("collectives", model, data=dict(corpus="synthetic", seq_len=seq_len, batch_size=batch_size))
    for name, size in mesh.items():
        setattr(config.mesh, name, size)
    return build_run_config(config)


def _lowered_step(run, plan_for):
    """(lowered train step, resolved mesh sizes); plan_for(mesh) -> the ExpertParallel plan the step runs."""
    sizes = sh.check_layout(run.model, run.data.batch_size, run.data.seq_len, run.mesh, jax.device_count())
    mesh = sh.make_mesh(run.mesh)
    tx = make_optimizer(run.train)
    graphdef, state, placement = init_sharded_state(
        lambda: Transformer(run.model, rngs=nnx.Rngs(params=0)), tx, mesh, sh.ExpertParallel(mesh))
    placement = dataclasses.replace(placement, plan=plan_for(mesh))
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train), placement=placement)
    batch = placement.put_batch(np.zeros((run.data.batch_size, run.data.seq_len + 1), np.int32))
    return step.trace(state, batch, jax.random.PRNGKey(0)), sizes


def analytic_minimum(run, sizes) -> tuple[int, float]:
    """(tokens per device, all-to-all bytes a device must send per train step): its routed token copies
    that leave it, in each of the 4 directions of each MoE layer."""
    moe, n = run.model.moe, sizes["expert"]
    tokens_per_device = run.data.batch_size * run.data.seq_len // sh.batch_shards(sizes)
    layers = len(run.model.moe_layer_indices)
    bytes_per_value = np.dtype(run.model.compute_dtype).itemsize
    return tokens_per_device, 4 * layers * tokens_per_device * moe.top_k * moe.d_model * bytes_per_value * (n - 1) / n


def measure(run) -> dict:
    """Compile the sharded train step of `run` and account its collectives."""
    traced, sizes = _lowered_step(run, lambda mesh: sh.ExpertParallel(mesh))
    hlo = traced.lower().compile().as_text()
    collectives = parse_collectives(hlo, jax.device_count())

    moe, n = run.model.moe, sizes["expert"]
    tokens_per_device, minimum = analytic_minimum(run, sizes)
    layers = len(run.model.moe_layer_indices)
    a2a = [c for c in collectives if c["op"] == "all-to-all"]
    sent = sum(moved_bytes(c) for c in a2a)
    E, D, F = moe.num_routed_experts, moe.d_model, moe.expert_d_ff
    expert_shapes = {(E, D, F), (E, F, D), (E // n, D, F), (E // n, F, D)}
    weight_gathers = [c for c in collectives if c["op"] == "all-gather"
                      and any(len(dims) == 3 and dims in expert_shapes for _, dims in c["arrays"])]
    S = moe.tokens_per_group(run.data.batch_size // sh.batch_shards(sizes), run.data.seq_len)  # on one device
    return {
        "mesh": sizes, "capacity_factor": moe.capacity_factor, "capacity": moe.capacity(S, True),
        "tokens_per_device": tokens_per_device, "moe_layers": layers,
        "all_to_all_bytes_sent_per_step": sent, "analytic_minimum_bytes_per_step": minimum,
        "all_to_all_over_minimum": sent / minimum if minimum else float("nan"),
        "expected_ratio_C_E_over_S_k": moe.capacity(S, True) * E / (S * moe.top_k),
        "expert_weight_all_gathers": len(weight_gathers),
        "collectives": summarise(collectives),
    }


_STABLEHLO = re.compile(r'(?:"stablehlo\.(?P<op>all_gather|all_to_all)"|@(?P<ragged>ragged_all_to_all))\(.*'
                        r':\s*\((?P<ins>[^)]*)\)\s*->\s*(?P<out>tensor<[^>]*>)')
_TENSOR = re.compile(r"tensor<((?:\d+x)*)(\w+)>")
_STABLEHLO_GROUPS = re.compile(r"replica_groups = dense<.*?> : tensor<(\d+)x(\d+)xi64>")
_MLIR_BYTES = {"f32": 4, "bf16": 2, "f16": 2, "i32": 4, "i64": 8, "i8": 1, "i1": 1, "ui32": 4}


def _tensor_bytes(text: str) -> int:
    m = _TENSOR.search(text)
    dims = [int(d) for d in m.group(1).split("x") if d]
    return _MLIR_BYTES[m.group(2)] * math.prod(dims)


def parse_stablehlo_collectives(text: str, group: int) -> list[dict]:
    """The all-gathers, all-to-alls and ragged all-to-alls of a lowered (StableHLO) module, per device inside
    shard_map: op, payload bytes (result; a ragged all-to-all: its operand, and its output buffer apart)."""
    out = []
    for line in text.splitlines():
        m = _STABLEHLO.search(line)
        if not m:
            continue
        g = _STABLEHLO_GROUPS.search(line)
        size = int(g.group(2)) if g else group
        if m.group("ragged"):
            operand = m.group("ins").split(",")[0]
            out.append({"op": "ragged-all-to-all", "bytes": _tensor_bytes(operand), "group": size,
                        "output_buffer_bytes": _tensor_bytes(m.group("out"))})
        else:
            out.append({"op": m.group("op").replace("_", "-"), "bytes": _tensor_bytes(m.group("out")), "group": size,
                        "integer": "xi" in m.group("out") or "<i" in m.group("out")})
    return out


def measure_dropless(run, exchange: str) -> dict:
    """The dropless exchange of `run` ('padded': compiled here; 'ragged': lowered for TPU) against the minimum."""
    moe = run.model.moe
    plan_for = lambda mesh: sh.ExpertParallel(
        mesh if exchange == "padded" else mesh.abstract_mesh, dropless_exchange=exchange,
        dropless_buffer_factor=run.mesh.dropless_buffer_factor)
    traced, sizes = _lowered_step(run, plan_for)
    n = sizes["expert"]
    tokens_per_device, minimum = analytic_minimum(run, sizes)
    layers = len(run.model.moe_layer_indices)
    row_bytes = moe.d_model * np.dtype(run.model.compute_dtype).itemsize
    out = {"exchange": exchange, "mesh": sizes, "dropless_buffer_factor": run.mesh.dropless_buffer_factor,
           "tokens_per_device": tokens_per_device, "moe_layers": layers, "analytic_minimum_bytes_per_step": minimum}
    if exchange == "padded":
        collectives = parse_collectives(traced.lower().compile().as_text(), jax.device_count())
        a2a = [c for c in collectives if c["op"] == "all-to-all"]
        R = plan_for(sh.make_mesh(run.mesh)).dropless(moe.num_routed_experts).rows_per_peer(
            tokens_per_device * moe.top_k)
        worst = [c for c in a2a if c["bytes"] == n * tokens_per_device * moe.top_k * row_bytes]
        bounded = [c for c in a2a if c["bytes"] == n * R * row_bytes] if R < tokens_per_device * moe.top_k else []
        sent = sum(moved_bytes(c) for c in (bounded or worst))  # the exchange a step takes when the routing fits
        meta = sum(moved_bytes(c) for c in collectives if c["op"] == "all-gather" and c["bytes"] <= n * 4 * 1024
                   and all(dt == "s32" for dt, _ in c["arrays"]))
        out.update(rows_per_peer=R, all_to_all_count=len(a2a),
                   all_to_all_bytes_sent_per_step=sent + meta, routing_metadata_bytes=meta,
                   worst_case_bytes_per_step=sum(moved_bytes(c) for c in worst) + meta if bounded else None,
                   collectives=summarise(collectives))
    else:
        text = traced.lower(lowering_platforms=("tpu",)).as_text()
        found = parse_stablehlo_collectives(text, n)
        ragged = [c for c in found if c["op"] == "ragged-all-to-all"]
        meta = sum(moved_bytes({"op": c["op"], "bytes": c["bytes"], "group": c["group"]}) for c in found
                   if c["op"] != "ragged-all-to-all" and c.get("integer"))
        float_a2a = [c for c in found if c["op"] == "all-to-all" and not c.get("integer")]
        out.update(ragged_all_to_all_count=len(ragged), plain_float_all_to_alls=len(float_a2a),
                   ragged_operand_bytes=sorted({c["bytes"] for c in ragged}),
                   ragged_output_buffer_bytes=sorted({c["output_buffer_bytes"] for c in ragged}),
                   routing_metadata_bytes=meta,
                   # exactly the rows routed to other devices: for uniform routing, the minimum
                   all_to_all_bytes_sent_per_step=minimum + meta)
    out["all_to_all_over_minimum"] = out["all_to_all_bytes_sent_per_step"] / minimum
    if out.get("worst_case_bytes_per_step"):
        out["worst_case_over_minimum"] = out["worst_case_bytes_per_step"] / minimum
    return out


def parse_mesh(text: str) -> dict:
    out = {}
    for part in text.split(","):
        name, _, size = part.partition("=")
        out[name.strip()] = int(size)
    return out


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mesh", default="expert=8", help="mesh axis sizes, e.g. expert=8 or data=2,expert=4")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    parser.add_argument("--d_model", type=int, default=64)
    parser.add_argument("--moe_d_ff", type=int, default=128)
    parser.add_argument("--num_experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--num_layers", type=int, default=2)
    parser.add_argument("--seq_len", type=int, default=64)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--dropless_buffer_factor", type=float, default=1.25,
                        help="the bounded padded exchange's rows per peer / the balanced share")
    args = parser.parse_args(argv)
    shape = dict(d_model=args.d_model, moe_d_ff=args.moe_d_ff, num_experts=args.num_experts, k=args.k,
                 num_layers=args.num_layers, seq_len=args.seq_len, batch_size=args.batch_size)
    mesh = parse_mesh(args.mesh)
    results = [measure(make_run(cf, mesh, **shape)) for cf in (1.0, 1.25)]
    dropless = [measure_dropless(make_run(None, dict(mesh, dropless_buffer_factor=f), **shape), kind)
                for kind, f in (("padded", None), ("padded", args.dropless_buffer_factor), ("ragged", None))]
    print(f"expert-parallel train step, mesh {args.mesh}, {shape}")
    print(f"{'cf':>5} {'C':>4} {'a2a sent/step':>14} {'minimum':>12} {'ratio':>6} {'C*E/(S*k)':>9} "
          f"{'expert-weight all-gathers':>26}")
    for r in results:
        print(f"{r['capacity_factor']:>5} {r['capacity']:>4} {r['all_to_all_bytes_sent_per_step']:>14,.0f} "
              f"{r['analytic_minimum_bytes_per_step']:>12,.0f} {r['all_to_all_over_minimum']:>6.3f} "
              f"{r['expected_ratio_C_E_over_S_k']:>9.3f} {r['expert_weight_all_gathers']:>26}")
    for r in results:
        print(f"cf {r['capacity_factor']}: " + "; ".join(
            f"{op} x{v['count']} {v['bytes']:,} B payload, {v['moved_bytes']:,.0f} B sent, groups {v['group_sizes']}"
            for op, v in r["collectives"].items()))
    print("dropless (capacity_factor=None): all-to-all bytes a device sends per step / the same minimum")
    for r in dropless:
        label = r["exchange"] + (f" f={r['dropless_buffer_factor']}" if r["dropless_buffer_factor"] else "")
        how = ("measured, compiled CPU HLO" if r["exchange"] == "padded"
               else f"rows analytic; {r['ragged_all_to_all_count']} ragged_all_to_all in the TPU-lowered step")
        extra = (f"; when the routing overflows: {r['worst_case_over_minimum']:.3f}"
                 if r.get("worst_case_over_minimum") else "")
        print(f"  {label:<16} {r['all_to_all_bytes_sent_per_step']:>12,.0f} B {r['all_to_all_over_minimum']:>6.3f}x "
              f"(metadata {r['routing_metadata_bytes']:,.0f} B; {how}){extra}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results, "dropless": dropless}, f, indent=2)
    return {"results": results, "dropless": dropless}


if __name__ == "__main__":
    sys.exit(cli.run(lambda: 0 if main() else 1))
