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
"""
from __future__ import annotations

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


def make_run(capacity_factor: float, mesh: dict, *, d_model: int, moe_d_ff: int, num_experts: int, k: int,
             num_layers: int, seq_len: int, batch_size: int):
    model = base.tiny_model(d_model=d_model, num_layers=num_layers, num_heads=4, d_ff=4 * d_model, moe_d_ff=moe_d_ff,
                            num_experts=num_experts, num_experts_per_token=k, capacity_factor=capacity_factor,
                            min_capacity=1, max_seq_len=seq_len, dispatch="gather")
    config = base.make("collectives", model, data=dict(corpus="synthetic", seq_len=seq_len, batch_size=batch_size))
    for name, size in mesh.items():
        setattr(config.mesh, name, size)
    return build_run_config(config)


def measure(run) -> dict:
    """Compile the sharded train step of `run` and account its collectives."""
    sizes = sh.check_layout(run.model, run.data.batch_size, run.data.seq_len, run.mesh, jax.device_count())
    mesh = sh.make_mesh(run.mesh)
    tx = make_optimizer(run.train)
    graphdef, state, placement = init_sharded_state(
        lambda: Transformer(run.model, rngs=nnx.Rngs(params=0)), tx, mesh, sh.ExpertParallel(mesh))
    step = make_train_step(graphdef, tx, learning_rate_schedule(run.train), placement=placement)
    batch = placement.put_batch(np.zeros((run.data.batch_size, run.data.seq_len + 1), np.int32))
    hlo = step.lower(state, batch, jax.random.PRNGKey(0)).compile().as_text()
    collectives = parse_collectives(hlo, jax.device_count())

    moe, n = run.model.moe, sizes["expert"]
    tokens_per_device = run.data.batch_size * run.data.seq_len // sh.batch_shards(sizes)
    layers = len(run.model.moe_layer_indices)
    bytes_per_value = np.dtype(run.model.compute_dtype).itemsize
    minimum_per_direction = tokens_per_device * moe.top_k * moe.d_model * bytes_per_value * (n - 1) / n
    minimum = 4 * layers * minimum_per_direction
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
    args = parser.parse_args(argv)
    shape = dict(d_model=args.d_model, moe_d_ff=args.moe_d_ff, num_experts=args.num_experts, k=args.k,
                 num_layers=args.num_layers, seq_len=args.seq_len, batch_size=args.batch_size)
    results = [measure(make_run(cf, parse_mesh(args.mesh), **shape)) for cf in (1.0, 1.25)]
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
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "results": results}, f, indent=2)
    return {"results": results}


if __name__ == "__main__":
    sys.exit(cli.run(lambda: 0 if main() else 1))
