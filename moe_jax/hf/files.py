"""The files of a Hugging Face model directory: config.json and safetensors weights, read lazily and written.

    reader = CheckpointReader(directory)   # opens the headers only: names, shapes, dtypes, which shard
    reader.shape("model.embed_tokens.weight"), reader.get("model.embed_tokens.weight")  # numpy, on demand
    write_checkpoint(directory, config_dict, tensors)   # config.json + model.safetensors (or shards + index)

Reading goes through the `safetensors` package's numpy API (`safe_open(..., framework="np")`), which maps
the file and copies only the tensor asked for, so converting holds one model's parameters plus one tensor,
never a second copy of the checkpoint. float8 tensors (DeepSeek-V3's released weights), which that API
cannot return as numpy, are read from the file's own header offsets through a memory map and dequantised
with their `<name>_scale_inv` companion (per 128 x 128 block: w = w_fp8 * scale_inv[i // 128, j // 128]).
"""
from __future__ import annotations

import json
import math
import os
import struct
from typing import Mapping, Optional

import numpy as np

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
FP8_DTYPES = {"F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
SCALE_SUFFIX = "_scale_inv"


def _safetensors():
    try:
        import safetensors  # noqa: F401
        from safetensors import safe_open
        from safetensors.numpy import save_file
    except ImportError:
        raise ModuleNotFoundError("Reading/writing Hugging Face checkpoints needs the safetensors package: "
                                  "`pip install safetensors` (moe_jax's install_requires lists it).") from None
    return safe_open, save_file


def read_config(directory: str) -> dict:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: a Hugging Face model directory holds config.json next to "
                                "its *.safetensors weights (save one with `model.save_pretrained(DIR)`).")
    with open(path) as f:
        return json.load(f)


def _header(path: str) -> tuple[dict, int]:
    """The safetensors header {name: {dtype, shape, data_offsets}} and where the data starts."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


class CheckpointReader:
    """Tensor names -> (shard file, shape, dtype) from the headers; `get` reads one tensor (numpy)."""

    def __init__(self, directory: str):
        self.directory = directory
        index_path, single = os.path.join(directory, INDEX), os.path.join(directory, SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{index_path} has no 'weight_map' {{tensor name: shard file}}; it is not a "
                                 "safetensors index (re-save the model with save_pretrained).")
            files = sorted(set(weight_map.values()))
            missing = [f for f in files if not os.path.isfile(os.path.join(directory, f))]
            if missing:
                raise FileNotFoundError(f"{index_path} names shard(s) {missing} that are not in {directory}: "
                                        "download every shard the index lists.")
        elif os.path.isfile(single):
            files = [SINGLE]
        else:
            found = sorted(f for f in os.listdir(directory) if f.endswith((".safetensors", ".bin", ".pt")))
            raise FileNotFoundError(f"{directory} has neither {SINGLE} nor {INDEX} (found {found or 'no weights'}); "
                                    "only safetensors checkpoints are read (convert *.bin with save_pretrained("
                                    "safe_serialization=True)).")
        self._where: dict[str, tuple[str, dict, int]] = {}
        for name in files:
            path = os.path.join(directory, name)
            header, start = _header(path)
            for tensor, info in header.items():
                self._where[tensor] = (path, info, start)
        self._handles: dict[str, object] = {}
        self._left: dict[str, int] = {}  # file -> announced tensors not yet read (see `plan`)

    def names(self) -> list[str]:
        return sorted(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def file_of(self, name: str) -> str:
        return self._where[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._where[name][1]["shape"])

    def dtype(self, name: str) -> str:
        return self._where[name][1]["dtype"]

    def _require(self, name: str) -> None:
        if name not in self._where:
            raise ValueError(f"Tensor {name!r} is not in the checkpoint at {self.directory} (its safetensors files "
                           "and index do not list it); the checkpoint is incomplete or of another layout.")

    def plan(self, names) -> None:
        """Announces the tensors about to be read, each once. A file's memory map is closed as soon as its last
        announced tensor has been read, so the mapped pages of the shards already read leave the process
        instead of adding up to the checkpoint's size."""
        self._left = {}
        for name in names:
            self._require(name)
            for n in (name, name + SCALE_SUFFIX) if self.dtype(name) in FP8_DTYPES else (name,):
                if n in self._where:
                    self._left[self.file_of(n)] = self._left.get(self.file_of(n), 0) + 1

    def _read(self, path: str) -> None:
        if path in self._left:
            self._left[path] -= 1
            if self._left[path] <= 0:
                del self._left[path]
                self._release(path)

    def _release(self, path: str) -> None:
        handle = self._handles.pop(path, None)
        if handle is not None:
            handle.__exit__(None, None, None)  # unmaps the file (safe_open has no close())

    def _handle(self, path: str):
        if path not in self._handles:
            safe_open, _ = _safetensors()
            self._handles[path] = safe_open(path, framework="np")
        return self._handles[path]

    def _raw_fp8(self, name: str) -> np.ndarray:
        import ml_dtypes

        path, info, start = self._where[name]
        begin, end = info["data_offsets"]
        dtype = np.dtype(getattr(ml_dtypes, FP8_DTYPES[info["dtype"]]))
        data = np.memmap(path, dtype=np.uint8, mode="r", offset=start + begin, shape=(end - begin,))
        return np.asarray(data).view(dtype).reshape(info["shape"])

    def get(self, name: str) -> np.ndarray:
        """One tensor as numpy; float8 weights come back dequantised to float32 (see `dequantize_fp8`)."""
        self._require(name)
        if self.dtype(name) in FP8_DTYPES:
            scale = name + SCALE_SUFFIX  # "...down_proj.weight" -> "...down_proj.weight_scale_inv"
            if scale not in self._where:
                raise ValueError(f"{self.file_of(name)}: {name} is {self.dtype(name)} but {scale} (its per-block "
                                 "inverse scales) is missing; float8 weights cannot be read without them.")
            out = dequantize_fp8(self._raw_fp8(name), self.get(scale), name=name)
        else:
            out = self._handle(self.file_of(name)).get_tensor(name)
        self._read(self.file_of(name))
        return out

    def close(self) -> None:
        for path in list(self._handles):
            self._release(path)


def dequantize_fp8(w_fp8: np.ndarray, scale_inv: np.ndarray, *, name: str = "weight") -> np.ndarray:
    """DeepSeek-V3's block-wise float8: `w[i, j] = w_fp8[i, j] * scale_inv[i // b0, j // b1]` with the block
    `(b0, b1) = (ceil(rows / scale rows), ceil(cols / scale cols))` (128 x 128 in the released weights; a
    partial last block keeps its scale). Returns float32."""
    if w_fp8.ndim != 2 or scale_inv.ndim != 2:
        raise ValueError(f"{name}: float8 dequantisation expects a 2-D weight and 2-D scales, got {w_fp8.shape} "
                         f"and {scale_inv.shape}.")
    rows, cols = w_fp8.shape
    b0, b1 = math.ceil(rows / scale_inv.shape[0]), math.ceil(cols / scale_inv.shape[1])
    if math.ceil(rows / b0) != scale_inv.shape[0] or math.ceil(cols / b1) != scale_inv.shape[1]:
        raise ValueError(f"{name}: scales {scale_inv.shape} do not tile the weight {w_fp8.shape} in equal blocks.")
    scale = np.repeat(np.repeat(scale_inv.astype(np.float32), b0, axis=0), b1, axis=1)[:rows, :cols]
    return w_fp8.astype(np.float32) * scale


def write_checkpoint(directory: str, config: Mapping, tensors: Mapping[str, np.ndarray], *,
                     max_shard_bytes: Optional[int] = None) -> list[str]:
    """config.json plus the tensors as model.safetensors, or as shards of at most `max_shard_bytes` each (a
    tensor never split) with model.safetensors.index.json. Returns the weight files written."""
    _, save_file = _safetensors()
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(dict(config), f, indent=2, sort_keys=True)
    names = list(tensors)
    groups: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].nbytes
        if max_shard_bytes is not None and groups[-1] and size + nbytes > max_shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(name)
        size += nbytes
    meta = {"format": "pt"}  # what transformers' from_pretrained expects in the header
    if len(groups) == 1:
        save_file({n: np.ascontiguousarray(tensors[n]) for n in names}, os.path.join(directory, SINGLE), metadata=meta)
        return [SINGLE]
    files, weight_map = [], {}
    for i, group in enumerate(groups):
        fname = f"model-{i + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file({n: np.ascontiguousarray(tensors[n]) for n in group}, os.path.join(directory, fname), metadata=meta)
        files.append(fname)
        weight_map.update({n: fname for n in group})
    total = sum(t.nbytes for t in tensors.values())
    with open(os.path.join(directory, INDEX), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return files
