"""Forward+backward time of the MoE layer's dispatch paths, as ratios to a dense FFN of equal active parameters.

    python -m benchmarks.moe_layer                      # E=8, k=2, T=8192, D=512, F=1024, SwiGLU, float32
    python -m benchmarks.moe_layer --json out.json      # also write every figure
    python -m benchmarks.moe_layer --quick              # a small shape, for smoke tests

Every candidate is jit-compiled once; then all are timed interleaved, in rounds of
`dense, c1, dense, c2, ..., dense` (the candidates' order rotates between rounds) after a warm-up
round. A candidate's ratio in one round is its time over the mean of the two dense runs around
it; the table gives the median over the rounds. Load from other processes changes slowly next to
one step, so these bracketed ratios are steadier than ratios of whole-run medians (also in the
JSON, with every raw time). `cpu/dense` is the same ratio of process CPU time (all threads): less
sensitive to how much of the machine other processes take, more to idle spinning.

The step differentiates `0.5 * sum(y ** 2)` with respect to all parameters and the input: with
`sum(y)` XLA deletes a dense FFN's output matmul and the comparison is skewed.

Candidates:
  dense            `FeedForward` with hidden width k * F: the same active parameters, no routing.
  dense_blocked    that FFN through the blocked loops (one expert): what the loops gain without routing.
  gather / einsum  capacity paths (index gathers / Switch-GShard one-hot einsums) for every capacity
                   factor and group size; `dropped` is the fraction of choices that found no room.
                   Their experts run as batched einsums over E (expert_backend='einsum'), and for
  gather_blocked   the gather path also through the blocked loops (expert_backend='blocked').
  dropless_blocked tokens sorted by expert, each expert padded to a block multiple, no capacity.
  hf_mixtral       Hugging Face transformers' `MixtralSparseMoeBlock` (eager experts, torch threads 2)
  torch_dense      and a torch SwiGLU FFN of hidden width k * F; only where torch and transformers import.

FLOPs, each divided by the useful FLOPs (router and k expert FFNs per token, forward+backward):
  xla   XLA's `cost_analysis()` of the compiled step: every matmul and elementwise op it executes.
        XLA counts a loop body once, so it undercounts the `blocked` paths (their loops).
  own   `moe_jax.flops.layer_train_flops`, the layer's own accounting from its config; for the
        dropless path, the rows its experts really held (each rounded up to a block) this step.
The einsum path's one-hot dispatch and combine add 5 * cf * S / (9F) of the useful FLOPs
(forward 2 * cf * S / (3F)): linear in the group size S.
"""
from __future__ import annotations

import dataclasses
import json
import re
import statistics
import sys
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from benchmarks.timing import Timings, time_interleaved
from moe_jax import cli
from moe_jax.moe_config import MoEConfig
from moe_jax.experts import Experts, FeedForward
from moe_jax.flops import dense_train_flops, ffn_flops_per_token, layer_train_flops
from moe_jax.moe_layer import MoELayer, group_tokens

TORCH_PATHS = ("hf_mixtral", "torch_dense")


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    length: int
    d_model: int
    d_ff: int
    num_experts: int
    k: int
    group_sizes: tuple[int, ...]
    capacity_factors: tuple[float, ...]
    block_size: int
    repeats: int

    @property
    def tokens(self) -> int:
        return self.batch * self.length


FULL = Shape(batch=8, length=1024, d_model=512, d_ff=1024, num_experts=8, k=2, group_sizes=(512, 4096),
             capacity_factors=(1.0, 1.25), block_size=64, repeats=9)
QUICK = Shape(batch=2, length=64, d_model=32, d_ff=64, num_experts=4, k=2, group_sizes=(64,),
              capacity_factors=(1.0,), block_size=32, repeats=2)


@dataclasses.dataclass
class Candidate:
    name: str
    run: Callable[[], None]  # one forward+backward step, blocking until it is done
    info: dict


# ---- JAX candidates ----

def _flops(stage) -> float:
    cost = stage.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost["flops"])


def _jax_candidate(name: str, module: nnx.Module, apply: Callable, x, info: dict) -> Candidate:
    """Compiles the forward+backward step of `apply(module, x) -> y` once and records XLA's FLOPs of
    the compiled step and of the (lowered, uncompiled) forward."""
    graphdef, params = nnx.split(module)

    def forward(params, x):
        return apply(nnx.merge(graphdef, params), x)

    def loss(params, x):
        return 0.5 * jnp.sum(jnp.square(forward(params, x)))

    step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(params, x).compile()
    info = dict(info, xla_train_flops=_flops(step), xla_forward_flops=_flops(jax.jit(forward).lower(params, x)))
    return Candidate(name, lambda: jax.block_until_ready(step(params, x)), info)


def _moe_config(shape: Shape, **fields) -> MoEConfig:
    return MoEConfig(d_model=shape.d_model, d_ff=shape.d_ff, num_experts=shape.num_experts,
                     num_experts_per_token=shape.k, activation="swiglu", **fields)


def _routing_facts(layer: MoELayer, x_BLD) -> dict:
    """Dropped fraction (capacity paths) or rows held per expert (dropless), from the router alone."""
    cfg = layer.cfg

    def facts(x_BLD):
        x_GSD = group_tokens(x_BLD, cfg)
        logits_GSE = layer.router.logits(x_GSD)
        if cfg.capacity_factor is None:
            expert_GSK = layer.router.choices(logits_GSE, None)[0]
            return jnp.bincount(expert_GSK.reshape(-1), length=cfg.num_routed_experts)
        routing = layer.router.route(logits_GSE, train=True).routing
        return routing.dropped_GSK.mean()

    value = np.asarray(jax.jit(facts)(x_BLD))
    if cfg.capacity_factor is not None:
        return {"dropped_fraction": float(value)}
    b = cfg.dropless_block_size if cfg.expert_backend == "blocked" else 1
    return {"dropped_fraction": 0.0, "rows_per_expert": value.tolist(),
            "rows_executed": int(sum(-(-int(n) // b) * b for n in value))}


def _moe_candidate(name: str, shape: Shape, x_BLD, cfg: MoEConfig, group_size: int, info: dict) -> Candidate:
    layer = MoELayer(cfg, rngs=nnx.Rngs(0))
    own = layer_train_flops(cfg, num_tokens=shape.tokens, group_size=group_size)
    info = dict(info, **_routing_facts(layer, x_BLD), own_train_flops=own["executed_flops"],
                useful_train_flops=own["useful_flops"], own_forward_flops=own["forward_executed_flops"],
                useful_forward_flops=own["forward_useful_flops"])
    if "rows_executed" in info:  # dropless: from the config's static bound to the rows this batch ran
        b = info["block_size"]
        static_rows = -(-(shape.tokens * cfg.top_k + cfg.num_routed_experts * (b - 1)) // b) * b
        row_train = 3 * ffn_flops_per_token(cfg.d_model, cfg.expert_d_ff, cfg.gated)
        info["own_train_flops_static_bound"] = info["own_train_flops"]
        info["own_train_flops"] -= row_train * (static_rows - info["rows_executed"])
    return _jax_candidate(name, layer, lambda m, x: m(x, train=True)[0], x_BLD, info)


def jax_candidates(shape: Shape, x_BLD, only: Optional[re.Pattern], ragged_dot: bool) -> list[Candidate]:
    """The dense reference first, then the MoE paths (those `only` matches, if given)."""
    T, D = shape.tokens, shape.d_model
    wanted = lambda name: only is None or only.search(name)
    dense = FeedForward(D, shape.k * shape.d_ff, activation="swiglu", rngs=nnx.Rngs(0))
    dense_flops = dense_train_flops(D, shape.k * shape.d_ff, num_tokens=T, gated=True)
    dense_info = dict(own_train_flops=dense_flops, useful_train_flops=dense_flops)
    out = [_jax_candidate("dense", dense, lambda m, x: m(x.reshape(T, D)), x_BLD, dict(dense_info, path="dense"))]
    if wanted("dense_blocked"):  # the same FFN through the blocked loops: what they gain without routing
        dense_blocked = Experts(1, D, shape.k * shape.d_ff, activation="swiglu", capacity_backend="blocked",
                                rngs=nnx.Rngs(0))
        out.append(_jax_candidate("dense_blocked", dense_blocked, lambda m, x: m(x.reshape(1, T, D))[0], x_BLD,
                                  dict(dense_info, path="dense_blocked")))
    for cf in shape.capacity_factors:
        for S in shape.group_sizes:
            for dispatch, backend in (("gather", "einsum"), ("gather", "blocked"), ("einsum", "einsum")):
                path = dispatch if backend == "einsum" else f"{dispatch}_{backend}"
                name = f"{path}_cf{cf:g}_S{S}"
                if wanted(name):
                    cfg = _moe_config(shape, capacity_factor=cf, eval_capacity_factor=cf, group_size=S,
                                      dispatch=dispatch, expert_backend=backend)
                    out.append(_moe_candidate(name, shape, x_BLD, cfg, S, dict(
                        path=path, capacity_factor=cf, group_size=S, capacity=cfg.capacity(S, True))))
    for backend in ("blocked", "ragged_dot") if ragged_dot else ("blocked",):
        name = f"dropless_{backend}"
        if wanted(name):
            block = shape.block_size if backend == "blocked" else 1
            cfg = _moe_config(shape, capacity_factor=None, eval_capacity_factor=None, expert_backend=backend,
                              dropless_block_size=block)
            out.append(_moe_candidate(name, shape, x_BLD, cfg, T, dict(path=name, block_size=block)))
    return out


# ---- torch candidates (Hugging Face's Mixtral block and a dense SwiGLU FFN) ----

def torch_candidates(shape: Shape, x_np: np.ndarray) -> list[Candidate]:
    """Empty where torch or transformers does not import (the table then says so)."""
    try:
        import torch
        import transformers
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return []
    torch.set_num_threads(2)
    torch.manual_seed(0)
    D, F, E, K = shape.d_model, shape.d_ff, shape.num_experts, shape.k
    hf_cfg = MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E, num_experts_per_tok=K,
                           hidden_act="silu", router_jitter_noise=0.0, experts_implementation="eager")
    block = MixtralSparseMoeBlock(hf_cfg).float().train()
    with torch.no_grad():  # fan-in scaled normals, like ours; the block's parameters start uninitialised
        block.gate.weight.normal_(0.0, D ** -0.5)
        block.experts.gate_up_proj.normal_(0.0, D ** -0.5)
        block.experts.down_proj.normal_(0.0, F ** -0.5)

    class DenseSwiGLU(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up = torch.nn.Linear(D, 2 * K * F, bias=False)
            self.down = torch.nn.Linear(K * F, D, bias=False)

        def forward(self, x):
            gate, up = self.gate_up(x).chunk(2, dim=-1)
            return self.down(torch.nn.functional.silu(gate) * up)

    dense = DenseSwiGLU().float()
    x = torch.tensor(x_np, dtype=torch.float32, requires_grad=True)

    def step(module):
        def run():
            module.zero_grad(set_to_none=True)
            x.grad = None
            y = module(x)
            (0.5 * y.square().sum()).backward()
        return run

    versions = dict(torch=torch.__version__, transformers=transformers.__version__, threads=torch.get_num_threads())
    return [Candidate("hf_mixtral", step(block), dict(path="hf_mixtral", **versions)),
            Candidate("torch_dense", step(dense), dict(path="torch_dense", **versions))]


# ---- timing and report ----

def summarize(shape: Shape, reference: Candidate, candidates: list[Candidate], timings: Timings) -> dict:
    """Rows per candidate from `timings` (timed with `reference`, the dense layer, around every other run)."""
    med = statistics.median
    rows = {}
    for c in [reference] + candidates:
        times, cpu_times = timings.wall[c.name], timings.cpu[c.name]
        row = dict(c.info, median_s=med(times), min_s=min(times), times_s=times,
                   cpu_median_s=med(cpu_times), cpu_times_s=cpu_times)
        if c is reference:
            row.update(time_vs_dense=1.0, cpu_time_vs_dense=1.0, time_vs_dense_of_medians=1.0)
        else:
            ratios, cpu_ratios = timings.ratios[c.name], timings.cpu_ratios[c.name]
            row.update(time_vs_dense=med(ratios), cpu_time_vs_dense=med(cpu_ratios),
                       time_vs_dense_of_medians=med(times) / timings.median(reference.name),
                       ratios=ratios, cpu_ratios=cpu_ratios)
        if "useful_train_flops" in row:
            useful = row["useful_train_flops"]
            row["xla_executed_over_useful"] = row["xla_train_flops"] / useful
            row["own_executed_over_useful"] = row["own_train_flops"] / useful
            row["own_over_xla"] = row["own_train_flops"] / row["xla_train_flops"]
            if "own_forward_flops" in row:
                row["own_over_xla_forward"] = row["own_forward_flops"] / row["xla_forward_flops"]
        rows[c.name] = row
    hf = {}
    if "hf_mixtral" in rows:
        rel = lambda name: rows[name]["time_vs_dense"]
        hf["hf_over_torch_dense"] = rel("hf_mixtral") / rel("torch_dense")
        hf["torch_dense_over_jax_dense"] = rel("torch_dense")
        for name, row in rows.items():
            if name not in TORCH_PATHS:
                hf[f"hf_over_{name}"] = rel("hf_mixtral") / row["time_vs_dense"]
    einsum_overhead = {f"cf{cf:g}_S{S}": 5 * cf * S / (9 * shape.d_ff)
                       for cf in shape.capacity_factors for S in shape.group_sizes}
    return dict(shape=dataclasses.asdict(shape), jax=jax.__version__, backend=jax.default_backend(),
                rows=rows, hf=hf, einsum_overhead_formula="5 * cf * S / (9 * F) (forward: 2 * cf * S / (3 * F))",
                einsum_overhead_predicted=einsum_overhead)


def _cell(value, spec: str) -> str:
    width = int(re.match(r"\d+", spec).group())
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(summary: dict) -> None:
    s = summary["shape"]
    print(f"\nMoE layer forward+backward: T={s['batch'] * s['length']} D={s['d_model']} F={s['d_ff']} "
          f"E={s['num_experts']} k={s['k']}, SwiGLU, float32, {summary['backend']}, jax {summary['jax']}; "
          f"median of {s['repeats']} rounds of ratios to the dense runs around each step")
    head = (f"{'candidate':27s} {'t/dense':>8s} {'cpu/dense':>9s} {'xla ex/use':>10s} {'own ex/use':>10s} "
            f"{'own/xla':>8s} {'dropped':>8s}")
    print(head)
    print("-" * len(head))
    for name, r in summary["rows"].items():
        if r["path"] in TORCH_PATHS:
            continue
        own_xla = None if "blocked" in r["path"] else r["own_over_xla"]
        print(f"{name:27s} {r['time_vs_dense']:8.3f} {r['cpu_time_vs_dense']:9.3f} "
              f"{r['xla_executed_over_useful']:10.3f} {r['own_executed_over_useful']:10.3f} "
              f"{_cell(own_xla, '8.3f')} {_cell(r.get('dropped_fraction'), '8.4f')}")
    print("einsum dispatch+combine add 5*cf*S/(9F) of the useful FLOPs: "
          + ", ".join(f"{k} {v:.3f}" for k, v in summary["einsum_overhead_predicted"].items()))
    print("XLA counts a loop body once: xla ex/use of the *blocked paths undercounts (own/xla not shown); "
          "dropless own ex/use counts the rows it ran.")
    hf = summary["hf"]
    if not hf:
        print("Hugging Face comparison not run (needs torch==2.13.0 and transformers==5.23.0; --no-torch skips it).")
        return
    print(f"Hugging Face MixtralSparseMoeBlock (eager, torch threads 2): {hf['hf_over_torch_dense']:.3f}x a torch "
          f"dense SwiGLU FFN of hidden k*F; that torch FFN takes {hf['torch_dense_over_jax_dense']:.3f}x the JAX one.")
    print("HF block time / ours: " + ", ".join(
        f"{key[len('hf_over_'):]} {v:.2f}" for key, v in hf.items()
        if key.startswith("hf_over_") and key != "hf_over_torch_dense"))


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write every figure to this path")
    parser.add_argument("--quick", action="store_true", help="a small shape (smoke test)")
    parser.add_argument("--repeats", type=int, help=f"timed rounds (default {FULL.repeats}, quick {QUICK.repeats})")
    parser.add_argument("--block-size", type=int,
                        help=f"dropless block size (default {FULL.block_size}, quick {QUICK.block_size})")
    parser.add_argument("--only", help="regex: time only the MoE candidates it matches (dense always runs)")
    parser.add_argument("--no-torch", action="store_true", help="skip the Hugging Face / torch candidates")
    parser.add_argument("--ragged-dot", action="store_true",
                        help="also time the dropless ragged_dot backend (every group dense on CPU: slow)")
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    if args.repeats is not None:
        if args.repeats < 1:
            parser.error(f"--repeats={args.repeats} must be >= 1")
        shape = dataclasses.replace(shape, repeats=args.repeats)
    if args.block_size is not None:
        if args.block_size < 1:
            parser.error(f"--block-size={args.block_size} must be >= 1")
        shape = dataclasses.replace(shape, block_size=args.block_size)
    only = re.compile(args.only) if args.only else None
    x_np = np.asarray(jax.random.normal(jax.random.PRNGKey(0), (shape.batch, shape.length, shape.d_model)))
    candidates = jax_candidates(shape, jnp.asarray(x_np), only, args.ragged_dot)
    if not args.no_torch and (only is None or only.search("hf_mixtral")):
        candidates += torch_candidates(shape, x_np)
    timings = time_interleaved({c.name: c.run for c in candidates}, shape.repeats, reference=candidates[0].name)
    summary = summarize(shape, candidates[0], candidates[1:], timings)
    print_table(summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1)
    return summary


if __name__ == "__main__":
    sys.exit(cli.run(lambda: main(sys.argv[1:]) and 0))
