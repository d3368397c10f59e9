"""Peak resident memory of importing a Hugging Face checkpoint, as a multiple of the checkpoint's size.

    python -m benchmarks.convert_memory [--layers 4] [--json benchmarks/results/convert_memory_cpu.json]

Writes a random Mixtral-shaped float32 checkpoint (d_model 1024, 8 experts of width 2048, vocab 32000; 4 layers
are 1.11 GB) with the `safetensors` package, one shard per layer plus one for the embeddings and an index, into a
temporary directory. Then runs, each in a fresh subprocess whose own parent reads its peak RSS from
`resource.getrusage(RUSAGE_CHILDREN).ru_maxrss`:

    baseline  python importing jax and moe_jax.hf (the interpreter's floor, no weights)
    load_hf   `moe_jax.hf.load_hf(dir)`: the model in memory, nothing written
    convert   `python -m experiments.convert --from_hf=dir --workdir=tmp`: load_hf, then the orbax checkpoint of
              step 0 (parameters only: no optimizer state is written) and its restore, a few tensors at a time,
              for the bit-exact comparison

and prints peak / checkpoint bytes and (peak - baseline) / checkpoint bytes for each, with the sampled peaks of
the anonymous and the file-backed part of the RSS (the shards are memory-mapped: their pages count in the RSS
while mapped, though the kernel can drop them). The checkpoint and the
workdir are deleted afterwards (a temporary directory; --dir to put it elsewhere).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = dict(vocab_size=32000, hidden_size=1024, intermediate_size=2048, num_attention_heads=8,
             num_key_value_heads=2, num_local_experts=8, num_experts_per_tok=2)

# The child's parent: runs the command, then reports the peak RSS of its children (kB on Linux) and the wall time.
# It also samples the child's /proc status every 20 ms for the peak of its anonymous memory (RssAnon: what the
# process allocated) apart from file-backed pages (RssFile: the memory-mapped shards, which the kernel can drop).
_MEASURE = """
import json, resource, subprocess, sys, time
t = time.perf_counter()
child = subprocess.Popen(json.loads(sys.argv[1]), cwd=sys.argv[3])
peak_anon = peak_file = 0
while child.poll() is None:
    try:
        status = dict(line.split(":", 1) for line in open(f"/proc/{child.pid}/status"))
        peak_anon = max(peak_anon, int(status["RssAnon"].split()[0]))
        peak_file = max(peak_file, int(status["RssFile"].split()[0]))
    except (OSError, KeyError, ValueError):
        pass
    time.sleep(0.02)
with open(sys.argv[2], "w") as f:
    json.dump({"rc": child.returncode, "maxrss_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss,
               "peak_anon_kb": peak_anon, "peak_file_kb": peak_file, "seconds": time.perf_counter() - t}, f)
"""


def write_checkpoint(directory: str, layers: int, seed: int = 0) -> int:
    """A random Mixtral checkpoint of `layers` layers in `directory`; returns the tensor bytes written."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    D, F, E, V = SHAPE["hidden_size"], SHAPE["intermediate_size"], SHAPE["num_local_experts"], SHAPE["vocab_size"]
    Q = D // SHAPE["num_attention_heads"]
    N = SHAPE["num_key_value_heads"]

    def w(*shape):
        return (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(np.float32)

    shards = [{"model.embed_tokens.weight": w(V, D), "lm_head.weight": w(V, D),
               "model.norm.weight": np.ones(D, np.float32)}]
    for i in range(layers):
        p = f"model.layers.{i}."
        shard = {p + "self_attn.q_proj.weight": w(D, D), p + "self_attn.k_proj.weight": w(N * Q, D),
                 p + "self_attn.v_proj.weight": w(N * Q, D), p + "self_attn.o_proj.weight": w(D, D),
                 p + "input_layernorm.weight": np.ones(D, np.float32),
                 p + "post_attention_layernorm.weight": np.ones(D, np.float32),
                 p + "block_sparse_moe.gate.weight": w(E, D)}
        shards.append(shard)
    weight_map, total = {}, 0
    n = len(shards)
    for j, shard in enumerate(shards):
        name = f"model-{j + 1:05d}-of-{n:05d}.safetensors"
        if j > 0:  # the experts, made one shard at a time so this process holds one layer at most
            p = f"model.layers.{j - 1}.block_sparse_moe.experts."
            for e in range(E):
                shard.update({p + f"{e}.w1.weight": w(F, D), p + f"{e}.w3.weight": w(F, D),
                              p + f"{e}.w2.weight": w(D, F)})
        save_file(shard, os.path.join(directory, name), metadata={"format": "pt"})
        for key, value in shard.items():
            weight_map[key] = name
            total += value.nbytes
        shards[j] = None
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    config = dict(SHAPE, model_type="mixtral", architectures=["MixtralForCausalLM"], num_hidden_layers=layers,
                  hidden_act="silu", rms_norm_eps=1e-5, max_position_embeddings=4096, sliding_window=None,
                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                  router_aux_loss_coef=0.001, dtype="float32")
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return total


def peak_rss(cmd: list, scratch: str) -> dict:
    """{'rc', 'maxrss_kb', 'seconds'} of `cmd` run by a fresh parent (so RUSAGE_CHILDREN counts it alone)."""
    out = os.path.join(scratch, "measure.json")
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    subprocess.run([sys.executable, "-c", _MEASURE, json.dumps(cmd), out, ROOT], check=True, env=env)
    with open(out) as f:
        result = json.load(f)
    if result["rc"] != 0:
        raise RuntimeError(f"{cmd} exited with {result['rc']}")
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--json", default=None)
    parser.add_argument("--dir", default=None, help="where the temporary checkpoint and workdir go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        ckpt = os.path.join(tmp, "hf")
        os.makedirs(ckpt)
        t = time.perf_counter()
        size = write_checkpoint(ckpt, args.layers)
        print(f"wrote {size / 1e9:.3f} GB ({args.layers} layers) in {time.perf_counter() - t:.0f} s", flush=True)
        py = sys.executable
        cases = {
            "baseline": [py, "-c", "import jax.numpy as jnp, moe_jax.hf; jnp.zeros(1).block_until_ready()"],
            "load_hf": [py, "-c", f"from moe_jax.hf import load_hf; load_hf({ckpt!r}, log=lambda s: None)"],
            "convert": [py, "-m", "experiments.convert", f"--from_hf={ckpt}", f"--workdir={os.path.join(tmp, 'wd')}"],
        }
        rows = {}
        for name, cmd in cases.items():
            r = peak_rss(cmd, tmp)
            rows[name] = dict(peak_rss_bytes=r["maxrss_kb"] * 1024, seconds=round(r["seconds"], 1),
                              peak_over_checkpoint=round(r["maxrss_kb"] * 1024 / size, 3),
                              sampled_peak_anon_over_checkpoint=round(r["peak_anon_kb"] * 1024 / size, 3),
                              sampled_peak_file_over_checkpoint=round(r["peak_file_kb"] * 1024 / size, 3))
            print(f"{name:9s} peak RSS {r['maxrss_kb'] / 1e6:6.2f} GB = {rows[name]['peak_over_checkpoint']:.2f} x "
                  f"checkpoint (sampled peaks: anonymous {rows[name]['sampled_peak_anon_over_checkpoint']:.2f} x, "
                  f"file-backed {rows[name]['sampled_peak_file_over_checkpoint']:.2f} x; {r['seconds']:.0f} s)",
                  flush=True)
    base = rows["baseline"]["peak_rss_bytes"]
    for name in ("load_hf", "convert"):
        rows[name]["above_baseline_over_checkpoint"] = round((rows[name]["peak_rss_bytes"] - base) / size, 3)
        print(f"{name:9s} (peak - baseline) / checkpoint = {rows[name]['above_baseline_over_checkpoint']:.2f}")
    summary = {"checkpoint_bytes": size, "layers": args.layers, "shape": SHAPE, "dtype": "float32",
               "shards": args.layers + 1, "rows": rows}
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary


if __name__ == "__main__":
    main()
