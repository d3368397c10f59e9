r"""Evaluate and sample from a trained run.

    python -m experiments.sample --workdir=runs/default --prompt="ROMEO:" --tokens=300 --temperature=0.8
    python -m experiments.sample --workdir=runs/default --eval_batches=16      # eval loss only

Restores the latest checkpoint (or --step) of a workdir written by `experiments.train`. A missing workdir
or checkpoint fails with one line (exit code 2; --debug shows the traceback).
"""
from __future__ import annotations

import math

from absl import flags

from moe_jax import cli

_WORKDIR = flags.DEFINE_string("workdir", None, "A workdir written by experiments.train.", required=True)
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).")
_PROMPT = flags.DEFINE_string("prompt", "ROMEO:", "Text to continue.")
_TOKENS = flags.DEFINE_integer("tokens", 300, "Tokens to sample (0: none).")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.8, "0 = greedy.")
_SEED = flags.DEFINE_integer("seed", 0, "Sampling seed.")
_EVAL = flags.DEFINE_integer("eval_batches", 0, "Validation batches to evaluate (0: none).")


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    import jax
    import jax.numpy as jnp
    import numpy as np

    from moe_jax.data import make_lm_data
    from moe_jax.sampling import generate
    from moe_jax.train.restore import load_run
    from moe_jax.train.step import cross_entropy

    loaded = load_run(_WORKDIR.value, _STEP.value)
    data = make_lm_data(loaded.run.data)
    print(f"{loaded.run.name}: checkpoint step {loaded.step} from {loaded.workdir}")
    if _EVAL.value:
        model = loaded.model
        eval_fn = jax.jit(lambda b: cross_entropy(model(b[:, :-1], train=False)[0], b[:, 1:]))
        ces = [float(eval_fn(jnp.asarray(b))) for b in data.eval_batches(_EVAL.value)]
        ce = float(np.mean(ces))
        print(f"eval ce {ce:.4f} nats/token, {ce / math.log(2):.3f} bits/token, ppl {math.exp(ce):.2f}")
    if _TOKENS.value:
        prompt = jnp.asarray(data.encode(_PROMPT.value))[None, :]
        ids = generate(loaded.model, prompt, max_new_tokens=_TOKENS.value, temperature=_TEMPERATURE.value,
                       rng=jax.random.PRNGKey(_SEED.value))
        print(data.decode(np.asarray(ids)[0]))


if __name__ == "__main__":
    cli.run_absl(main)
