r"""Routing ledgers from the command line: record one from a checkpoint, summarise one, compare two, draw them.

    python -m experiments.ledger record --workdir=runs/default [--step=300] [--batches=1] [--out=PATH]
    python -m experiments.ledger summary runs/default/ledgers/step_00000300.npz [--vocab=256]
    python -m experiments.ledger compare A.npz B.npz
    python -m experiments.ledger plot --workdir=runs/default        # routing.png from metrics + last ledger

`record` restores the checkpoint (default: the latest) and records the ledger on the run's first `--batches`
evaluation batches (the tokens the training loop's ledgers use), written to <workdir>/ledgers/step_<step>.npz
unless --out is given. `compare` prints per layer the router saturation (tokens whose top-k set is the same)
and where the decisions differ (moe_jax.ledger_analysis.diff). The files are numpy .npz (np.load opens them).
"""
from __future__ import annotations

import argparse
import os
import sys

from moe_jax import cli
from moe_jax import ledger as ledger_lib
from moe_jax import ledger_analysis as la


def record(args) -> int:
    from moe_jax.data import make_lm_data
    from moe_jax.train.restore import load_run

    loaded = load_run(args.workdir, args.step)
    why_not = ledger_lib.check_recordable(loaded.run.model)
    if why_not:
        raise ValueError(f"{args.workdir}: no ledger to record: {why_not}.")
    data = make_lm_data(loaded.run.data)
    ledger = ledger_lib.record(loaded.model, data.eval_batches(args.batches), step=loaded.step)
    out = args.out or ledger_lib.ledger_path(loaded.workdir, loaded.step)
    size = ledger.save(out)
    print(f"wrote {out} ({size:,} bytes)")
    print(la.format_summary(ledger))
    return 0


def summary(args) -> int:
    ledger = ledger_lib.Ledger.load(args.ledger)
    print(la.format_summary(ledger))
    if args.vocab:
        for m in range(ledger.num_layers):
            spec = la.specialisation(ledger, m, args.vocab)
            print(f"layer {int(ledger.layers[m])} token-id entropy per expert (nats): "
                  + " ".join(f"{h:.2f}" for h in spec["entropy"]))
    return 0


def compare(args) -> int:
    a, b = ledger_lib.Ledger.load(args.a), ledger_lib.Ledger.load(args.b)
    print(la.format_diff(a, b))
    return 0


def plot(args) -> int:
    from moe_jax.train.metrics import read_jsonl
    from moe_jax.train.routing_plots import plot_routing

    workdir = os.path.abspath(os.path.expanduser(args.workdir))
    metrics = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(metrics):
        raise FileNotFoundError(f"{metrics} does not exist: --workdir must be a training run's directory.")
    ledgers = ledger_lib.list_ledgers(workdir)
    ledger = ledger_lib.Ledger.load(ledgers[-1][1]) if ledgers else None
    out = args.out or os.path.join(workdir, "routing.png")
    plot_routing(read_jsonl(metrics), out, ledger)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    parser = cli.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("record", help="record a ledger from a checkpoint")
    p.add_argument("--workdir", required=True)
    p.add_argument("--step", type=int, default=None)
    p.add_argument("--batches", type=int, default=1)
    p.add_argument("--out", default=None)
    p = sub.add_parser("summary", help="per-layer load, drops, min score (and token specialisation)")
    p.add_argument("ledger")
    p.add_argument("--vocab", type=int, default=0, help="vocabulary size: also print token-id entropy per expert")
    p = sub.add_parser("compare", help="saturation and differences between two ledgers of the same tokens")
    p.add_argument("a")
    p.add_argument("b")
    p = sub.add_parser("plot", help="routing.png of a workdir")
    p.add_argument("--workdir", required=True)
    p.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    return {"record": record, "summary": summary, "compare": compare, "plot": plot}[args.command](args)


if __name__ == "__main__":
    sys.exit(cli.run(main))
