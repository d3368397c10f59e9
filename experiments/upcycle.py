r"""Upcycle a dense run into an MoE run's workdir (sparse upcycling, Komatsuzaki et al. 2022).

    python -m experiments.train --config=configs/default.py --config.model.use_moe=False --workdir=/tmp/dense
    python -m experiments.upcycle --from_workdir=/tmp/dense --config=configs/default.py --workdir=/tmp/upcycled
    python -m experiments.train --config=configs/default.py --workdir=/tmp/upcycled     # trains it (resumes step 0)

    python -m experiments.upcycle --from_hf=/models/Llama-dir --config=<a config whose model matches it> --workdir=...

    python -m experiments.upcycle ... --noise_std=0.01          # each expert copy + 1 % (of std(W)) Gaussian noise
    python -m experiments.upcycle ... --config.model.granularity=4 --granular   # 4 slices per FFN, 4x the experts

Writes `--workdir`: config.json, upcycle.json (the source) and checkpoint 0 holding the target model's
parameters: attention, norms and embeddings copied from the dense run, every expert a copy (or, with
--granular, a slice) of its layer's dense FFN, routers freshly initialised; the optimizer state is fresh.
The training command with the same --config resumes from that checkpoint. The target config must match the
dense run in every non-MoE field (d_model, layers, heads, vocab, d_ff, activation, ...); a mismatch is
named with its fix before anything is built. The same can be done inside the training command by giving the
config an `upcycle` section (fields of moe_jax.upcycle.UpcycleConfig: from_workdir or from_hf, step, noise_std,
granular, seed); these flags set that section. With --from_hf (a dense llama / qwen2 directory) the config's
model must match the one its config.json describes (moe_jax.hf.model_config_from_hf) in every non-MoE field.
"""
from __future__ import annotations

from absl import flags
from ml_collections import config_flags

from moe_jax import cli

_CONFIG = config_flags.DEFINE_config_file("config", None, "The MoE run's config file, optionally :arg.",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string("workdir", None, "The new (upcycled) run's workdir; must hold no checkpoint.")
_FROM = flags.DEFINE_string("from_workdir", None, "Workdir of a trained dense run (use_moe=False).")
_FROM_HF = flags.DEFINE_string("from_hf", None, "Or: a dense Hugging Face model directory (llama, qwen2).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step of the dense run (default: the latest).")
_NOISE = flags.DEFINE_float("noise_std", None, "Noise on each expert copy, relative to each matrix's std.")
_GRANULAR = flags.DEFINE_bool("granular", None, "Split each dense FFN into the experts' width (G slices).")
_SEED = flags.DEFINE_integer("upcycle_seed", None, "Seed of the noise.")


def upcycle_section(config: dict) -> dict:
    """The config's `upcycle` section (if any) with the flags given on the command line set over it."""
    section = dict(config.get("upcycle") or {})
    for key, flag in (("from_workdir", _FROM), ("from_hf", _FROM_HF), ("step", _STEP), ("noise_std", _NOISE),
                      ("granular", _GRANULAR), ("seed", _SEED)):
        if flag.value is not None:
            section[key] = flag.value
    return section


def main(argv):
    del argv
    from absl import logging

    logging.set_verbosity(logging.WARNING)
    from moe_jax.train.run_config import build_run_config, to_dict

    if not _WORKDIR.value:
        cli.fail("--workdir is required: the new (upcycled) run's directory.")
    config = to_dict(_CONFIG.value)
    config["upcycle"] = upcycle_section(config)
    if bool(config["upcycle"].get("from_workdir")) == bool(config["upcycle"].get("from_hf")):
        cli.fail("give exactly one of --from_workdir (config.upcycle.from_workdir: the workdir of a trained dense run) "
                 "or --from_hf (config.upcycle.from_hf: a dense Hugging Face model directory, llama or qwen2).")
    run = build_run_config(config, on_this_machine=True)
    from moe_jax.train.upcycle import write_upcycled_workdir

    workdir = write_upcycled_workdir(run, _WORKDIR.value)
    print(f"[moe_jax] upcycled run written to {workdir}; train it with the same config:\n"
          f"  python -m experiments.train --config=<the same config and overrides> --workdir={workdir}")


if __name__ == "__main__":
    flags.mark_flag_as_required("config")
    cli.run_absl(main)
