"""orbax-checkpoint: periodic saves, keep-last-N, resume from the latest readable step.

A checkpoint holds the whole `TrainState` (params, optimizer state, router biases, step) and a JSON
record (`meta`: the run's model config, and the training loop's own bookkeeping). The step is also the
data position (batch `step` is the next one read), so a resumed run sees exactly the batches and RNG keys
an uninterrupted run would have.

Atomicity: orbax writes each step to a temporary folder and renames it when complete, so a run killed
during a save resumes from the previous finished step (the temporary folder is removed on the next start).
A finished step that cannot be read back (a truncated or missing file) is moved to
`<workdir>/corrupt_checkpoints/` with a warning naming it, and the run resumes from the step before, which
exists only if `keep` (config.train.keep_checkpoints) is >= 2; when no step is readable, restoring fails
rather than silently starting over.

A checkpoint may leave the optimizer state out (`save(..., fresh_optimizer=True)`, marked in its meta):
restoring it gives the target's own optimizer state, i.e. the fresh one the loop initialised. A step-0
checkpoint of imported weights (experiments.convert --from_hf) so holds the parameters once, not beside two
parameter-sized trees of zeros (AdamW's mu and nu).

Asynchronous saves (`async_save=True`): the train step donates the state's buffers, which the next step
overwrites while a background save could still be reading them. So the state is first copied on its devices
(an extra state's worth of device memory while a save is in flight), and orbax writes the copy in a
background thread while training continues; `wait()` (and `close()`) block until it is on disk.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Callable, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

_MISSING = object()
FRESH_OPTIMIZER = "fresh_optimizer"  # meta key: the checkpoint holds no optimizer state


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


LAYOUT_FREE = ("remat",)  # model fields that change no parameter: a checkpoint restores across them


def model_differences(saved: dict, current: dict) -> list[str]:
    """Fields of the saved model record whose value differs from the current one. A field absent from the
    saved record is not compared: the library added it later, and its default keeps the old behaviour, so
    checkpoints written before it stay loadable; a record without `scan_layers` is of the unrolled layout. Fields
    that change no parameter (`LAYOUT_FREE`: remat) are not compared."""
    saved, current = _flatten(saved), _flatten(json.loads(json.dumps(current)))
    for record in (saved, current):  # records from before the field: the unrolled layout
        record.setdefault("scan_layers", False)
    return sorted(k for k in saved if current.get(k, _MISSING) != saved[k] and k not in LAYOUT_FREE)


def _all_hosts(ok: bool) -> bool:
    """True on every host iff `ok` on every host (one process: `ok`)."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils

    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok))))


class Checkpoints:
    def __init__(self, workdir: str, *, keep: int, async_save: bool = False, log: Callable[[str], Any] = print,
                 save_concurrent_gb: Optional[float] = None):
        """save_concurrent_gb: the most bytes (in GB) orbax has in flight to the disk during a save (None: orbax's
        default of 96 GB). Orbax buffers what it writes: with the default a save of incompressible float
        weights briefly holds another copy of them (a 1.07 GB tree: +0.91 GB peak RSS; with 0.2 GB: +0.22 GB)."""
        self.directory = os.path.join(os.path.abspath(os.path.expanduser(workdir)), "checkpoints")
        self.async_save = async_save
        self.log = log
        self._pending = None  # the step of an asynchronous save not yet known to be on disk
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        handlers = None
        if save_concurrent_gb is not None:
            handlers = {"state": ocp.StandardCheckpointHandler(save_concurrent_gb=save_concurrent_gb),
                        "meta": ocp.JsonCheckpointHandler()}
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

    def latest_step(self) -> Optional[int]:
        return self.manager.latest_step()

    def save(self, step: int, state: Any, meta: dict, *, fresh_optimizer: bool = False) -> None:
        """Saves `state` as `step` (once: a step already saved is left as it is). Asynchronous saves return
        once the state is copied; the step counts as saved (`latest_step`) when it is on disk.

        fresh_optimizer: `state` is a `TrainState` whose optimizer state is not written (it may be None);
        restoring the step gives the restore target's optimizer state."""
        if step in self.manager.all_steps() or step == self._pending:
            return
        if fresh_optimizer:
            state = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name != "opt_state"}
            meta = dict(meta, **{FRESH_OPTIMIZER: True})
        if self.async_save:  # a copy the next (donating) train step cannot overwrite
            state = jax.device_put(state, jax.tree.map(lambda x: x.sharding, state), may_alias=False)  # new buffers
            self._pending = step
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)))
        if not self.async_save:
            self.wait()

    def wait(self) -> None:
        """Blocks until every save started is on disk."""
        self.manager.wait_until_finished()
        self._pending = None

    def read_meta(self, step: int) -> dict:
        restored = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return restored["meta"]

    def check_model(self, step: int, expect_model: dict, meta: Optional[dict] = None) -> None:
        """Raises ValueError naming the fields if checkpoint `step` was written by a different model."""
        saved = (self.read_meta(step) if meta is None else meta).get("model")
        diff = [] if saved is None else model_differences(saved, expect_model)
        if diff == ["scan_layers"]:
            scanned = bool(expect_model.get("scan_layers", False))
            raise ValueError(
                f"The checkpoint at {self.directory} (step {step}) was written with config.model.scan_layers="
                f"{not scanned}, this run has {scanned}: the layer "
                "parameters are laid out per layer in one and stacked in the other. Run with the checkpoint's "
                "scan_layers, or convert the restored state with moe_jax.layer_stack.convert_train_state.")
        if diff:
            raise ValueError(
                f"The checkpoint at {self.directory} (step {step}) was written by a different model: "
                f"config.model fields {diff} differ. Use a new --workdir, or restore the old config.")

    def restore(self, step: int, target_state: Any, *, expect_model: Optional[dict] = None,
                meta: Optional[dict] = None) -> Any:
        """Restores `step` onto the structure, shapes, dtypes and shardings of `target_state`.

        expect_model: the current run's model config (JSON-able); a checkpoint written by a different
        model fails here with the differing fields named, before any array is read. A checkpoint saved with
        `fresh_optimizer` keeps `target_state.opt_state`. meta: the step's meta if already read.
        """
        meta = self.read_meta(step) if meta is None else meta
        if expect_model is not None:
            self.check_model(step, expect_model, meta)
        if meta.get(FRESH_OPTIMIZER):
            fields = {f.name: getattr(target_state, f.name) for f in dataclasses.fields(target_state)
                      if f.name != "opt_state"}
            return target_state.replace(**self.restore_fields(step, fields))
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
        # Its own checkpointer on the step's folder: a manager that restored "state" through PyTreeRestore
        # could not save it with StandardSave afterwards (orbax binds one handler per item name).
        checkpointer = ocp.Checkpointer(ocp.PyTreeCheckpointHandler())
        try:
            return checkpointer.restore(os.path.join(self.directory, str(step), "state"), args=args)
        finally:
            checkpointer.close()

    def restore_latest(self, target_state: Any, *, expect_model: Optional[dict] = None):
        """-> (step, state, meta) of the latest readable checkpoint, or None when there is none.

        A step that cannot be read (truncated, a file missing) is moved aside with a warning and the one
        before it tried. A checkpoint of another model raises (see `restore`); so does a directory whose
        every step is unreadable, naming them."""
        failures = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            meta, state, error = None, None, None
            try:
                meta = self.read_meta(step)
            except Exception as e:  # noqa: BLE001  (any read failure: the files are not a checkpoint)
                error = e
            if _all_hosts(meta is not None):
                if expect_model is not None:
                    self.check_model(step, expect_model, meta)  # a real mismatch, not damage: never skipped
                try:
                    state = self.restore(step, target_state, meta=meta)
                except Exception as e:  # noqa: BLE001
                    error = e
            if _all_hosts(state is not None):
                return step, state, meta
            error = error or RuntimeError("unreadable on another host")
            first = str(error).splitlines()[0][:300] if str(error) else ""
            failures.append(f"step {step} ({type(error).__name__}: {first})")
            self._move_aside(step, f"{type(error).__name__}: {first}")
        if failures:
            raise ValueError(
                f"No readable checkpoint in {self.directory}: {'; '.join(failures)}. They were moved to "
                f"{self._aside_root()}. Delete that folder to start over (config.train.keep_checkpoints >= 2 "
                "keeps an earlier step to fall back on).")
        return None

    def _aside_root(self) -> str:
        return os.path.join(os.path.dirname(self.directory), "corrupt_checkpoints")

    def _move_aside(self, step: int, why: str) -> None:
        source = os.path.join(self.directory, str(step))
        target = os.path.join(self._aside_root(), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
        n = 1
        while os.path.exists(target):
            target, n = os.path.join(self._aside_root(), f"{step}-{time.strftime('%Y%m%d-%H%M%S')}-{n}"), n + 1
        if jax.process_index() == 0:
            os.makedirs(self._aside_root(), exist_ok=True)
            os.rename(source, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"moe_jax_checkpoint_aside_{step}")
        self.manager.reload()
        self.log(f"[moe_jax] WARNING: checkpoint {source} is unreadable ({why}); moved to {target}; trying the "
                 "step before it (config.train.keep_checkpoints >= 2 keeps one).")

    def close(self) -> None:
        self.wait()
        self.manager.close()
