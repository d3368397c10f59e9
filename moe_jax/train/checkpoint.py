"""orbax-checkpoint: periodic saves, keep-last-N, resume from the latest finished step.

A checkpoint holds the whole `TrainState` (params, optimizer state, router biases, step) and a JSON
record of the run's config. The step is also the data position (batch `step` is the next one read),
so a resumed run sees exactly the batches and RNG keys an uninterrupted run would have.
orbax writes each step to a temporary folder and renames it when complete, so a run killed during a
save resumes from the previous finished step. Saves are synchronous because the train step donates
the state buffers that an asynchronous save would still be reading.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int):
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict) -> None:
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        self.manager.wait_until_finished()

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def restore(self, step: int, target_state: Any, *, expect_model: Optional[dict] = None) -> Any:
        """Restores `step` onto the structure, shapes, dtypes and shardings of `target_state`.

        expect_model: the current run's model config (JSON-able); a checkpoint written by a different
        model fails here with the differing fields named, before any array is read.
        """
        if expect_model is not None:
            saved = self.read_meta(step).get("model")
            expect = _flatten(json.loads(json.dumps(expect_model)))
            if saved is not None and _flatten(saved) != expect:
                saved = _flatten(saved)
                diff = sorted(k for k in set(saved) | set(expect) if saved.get(k) != expect.get(k))
                raise ValueError(
                    f"The checkpoint at {self.directory} (step {step}) was written by a different model: "
                    f"config.model fields {diff} differ. Use a new --workdir, or restore the old config.")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
        restored = self.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))
        return restored["state"]

    def restore_fields(self, step: int, targets: dict) -> dict:
        """Restores only the named fields of the saved `TrainState` (e.g. {"params": ..., "rest": ...}),
        each onto the structure, shapes, dtypes and shardings of its target; the other fields (the
        optimizer state) are not read."""
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, targets)
        args = ocp.args.PyTreeRestore(item=abstract, restore_args=ocp.checkpoint_utils.construct_restore_args(abstract),
                                      partial_restore=True)
        return self.manager.restore(step, args=ocp.args.Composite(state=args))["state"]

    def close(self) -> None:
        self.manager.close()
