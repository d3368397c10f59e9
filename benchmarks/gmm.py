"""The Pallas grouped matmul against `jax.lax.ragged_dot` and a dense batched matmul, on the current backend.

    python -m benchmarks.gmm                     # m=8192 rows (T*k), k=512, n=1024, E=8, bfloat16 (float32 on CPU)
    python -m benchmarks.gmm --json out.json     # also write every figure
    python -m benchmarks.gmm --quick             # a small shape, for smoke tests (seconds)

Candidates, each forward only (`fwd`) and forward+backward of 0.5 * sum(y ** 2) in both operands (`train`):
  pallas      pallas_kernels.gmm (Mosaic on TPU, Triton on GPU, the Mosaic kernel interpreted on CPU).
  ragged_dot  jax.lax.ragged_dot with the same group sizes (XLA's grouped matmul).
  dense       einsum('exd,edf->exf') over E equal groups of X = m / E rows: the same useful flops with no
              raggedness, the speed a perfectly balanced router could reach. It is the denominator.
Group sizes are drawn once (multinomial over E experts with Dirichlet(2) probabilities), so groups
are ragged and tiles straddle groups. All candidates are timed interleaved (the order rotates every
round); a figure is the median over rounds, and ratios divide medians from the same run.
The Pallas output is compared with ragged_dot's (max abs difference, printed); dense groups rows
differently, so it has no such check.

On CPU the Pallas kernel runs in interpret mode, which emulates the kernel grid step by step: its
time there says nothing about the kernel's speed on an accelerator, only that it runs and agrees.
"""
from __future__ import annotations

import dataclasses
import json
import sys
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import time_interleaved
from moe_jax import cli
from pallas_kernels import default_interpret, default_lowering, gmm


@dataclasses.dataclass(frozen=True)
class Shape:
    m: int
    k: int
    n: int
    groups: int
    repeats: int


FULL = Shape(m=8192, k=512, n=1024, groups=8, repeats=7)
QUICK = Shape(m=512, k=128, n=256, groups=4, repeats=3)


def group_sizes(shape: Shape, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.multinomial(shape.m, rng.dirichlet(2.0 * np.ones(shape.groups))).astype(np.int32)


def candidates(shape: Shape, dtype, tiling) -> dict[str, dict[str, Callable]]:
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((shape.m, shape.k)) / np.sqrt(shape.k), dtype)
    w = jnp.asarray(rng.standard_normal((shape.groups, shape.k, shape.n)), dtype)
    gs = jnp.asarray(group_sizes(shape))
    x_dense = x.reshape(shape.groups, shape.m // shape.groups, shape.k)
    fns = {
        "pallas": (lambda x, w: gmm(x, w, gs, tiling=tiling), (x, w)),
        "ragged_dot": (lambda x, w: jax.lax.ragged_dot(x, w, gs), (x, w)),
        "dense": (lambda x, w: jnp.einsum("exd,edf->exf", x, w).reshape(shape.m, shape.n), (x_dense, w)),
    }
    out = {}
    for name, (f, args) in fns.items():
        loss = lambda x, w, f=f: 0.5 * jnp.sum(f(x, w).astype(jnp.float32) ** 2)
        fwd = jax.jit(f)
        train = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        out[name] = {"fwd": (lambda fwd=fwd, args=args: jax.block_until_ready(fwd(*args))),
                     "train": (lambda train=train, args=args: jax.block_until_ready(train(*args))),
                     "check": (lambda fwd=fwd, args=args: fwd(*args))}
    return out


def main(argv=None) -> dict:
    parser = cli.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="write the figures to this path")
    parser.add_argument("--quick", action="store_true", help="small shape (smoke test)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                        help="default: bfloat16 on accelerators, float32 on CPU")
    parser.add_argument("--tiling", type=int, nargs=3, default=None, metavar=("TM", "TK", "TN"))
    args = parser.parse_args(argv)
    shape = QUICK if args.quick else FULL
    interpret = default_interpret()
    dtype = jnp.dtype(args.dtype or ("float32" if interpret else "bfloat16"))
    backend = jax.default_backend()
    if interpret:
        bar = "!" * 96
        print(f"{bar}\n!! Backend {backend!r}: the Pallas kernel runs in INTERPRET mode. Its time below measures "
              f"nothing\n!! about kernel speed; this run checks that it runs and agrees with ragged_dot. "
              f"Run on a TPU or GPU\n!! for a speed comparison.\n{bar}", flush=True)
    sizes = group_sizes(shape)
    print(f"backend {backend}, lowering {default_lowering()}, interpret {interpret}, dtype {dtype.name}, "
          f"m={shape.m} k={shape.k} n={shape.n} E={shape.groups}, group sizes {sizes.tolist()}")
    cands = candidates(shape, dtype, tuple(args.tiling) if args.tiling else None)
    ref = np.asarray(cands["ragged_dot"]["check"](), np.float32)
    result = {"backend": backend, "lowering": default_lowering(), "interpret": interpret, "dtype": dtype.name,
              "shape": dataclasses.asdict(shape), "group_sizes": sizes.tolist(),
              "median_s": {}, "ratio_to_dense": {}}
    got = np.asarray(cands["pallas"]["check"](), np.float32)
    result["max_abs_diff_vs_ragged_dot"] = float(np.abs(got - ref).max())
    result["max_abs_ragged_dot"] = float(np.abs(ref).max())
    for mode in ("fwd", "train"):
        timings = time_interleaved({name: c[mode] for name, c in cands.items()}, shape.repeats)
        med = {name: timings.median(name) for name in cands}
        result["median_s"][mode] = med
        result["ratio_to_dense"][mode] = {name: med[name] / med["dense"] for name in med}
    print(f"\n{'candidate':<12}{'fwd / dense':>14}{'train / dense':>16}")
    for name in cands:
        print(f"{name:<12}{result['ratio_to_dense']['fwd'][name]:>14.2f}{result['ratio_to_dense']['train'][name]:>16.2f}")
    print(f"max |pallas - ragged_dot| = {result['max_abs_diff_vs_ragged_dot']:.3g} "
          f"(max |ragged_dot| = {result['max_abs_ragged_dot']:.3g})")
    print(f"pallas / ragged_dot: fwd {result['median_s']['fwd']['pallas'] / result['median_s']['fwd']['ragged_dot']:.2f}, "
          f"train {result['median_s']['train']['pallas'] / result['median_s']['train']['ragged_dot']:.2f}")
    if interpret:
        print("(interpret mode: the pallas ratios above are emulation cost, not kernel speed)")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    sys.exit(cli.run(lambda: 0 if main() else 1))
