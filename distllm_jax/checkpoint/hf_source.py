"""A Hugging Face checkpoint directory as a name -> tensor source, read one tensor at a time.

Accepts ``model.safetensors``, sharded safetensors with ``model.safetensors.index.json``, and torch
``pytorch_model*.bin`` files only through ``torch.load(weights_only=True)`` (never a full unpickle).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from distllm_jax.checkpoint.paths import confined, user_path
from distllm_jax.checkpoint.safetensors_reader import CheckpointError, SafetensorsFile

ST_INDEX = "model.safetensors.index.json"
ST_SINGLE = "model.safetensors"
BIN_INDEX = "pytorch_model.bin.index.json"
BIN_SINGLE = "pytorch_model.bin"


class _TorchBinFile:
    """Tensors of a torch pickle checkpoint, loaded with ``weights_only=True`` and mmap (lazy)."""

    def __init__(self, path: Path):
        try:
            import torch
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise CheckpointError(
                f"{path}: reading .bin checkpoints needs torch; install it or convert to safetensors"
            ) from e
        self.path = path
        try:
            self._sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as e:  # torch raises UnpicklingError for anything beyond plain tensors
            raise CheckpointError(
                f"{path}: refused: not loadable with torch.load(weights_only=True) ({e})"
            ) from e
        self.tensors = {k: (str(v.dtype), tuple(v.shape)) for k, v in self._sd.items()}

    def read(self, name: str) -> np.ndarray:
        import ml_dtypes
        import torch

        t = self._sd[name].contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().copy().view(ml_dtypes.bfloat16)
        return t.numpy().copy()


def _st_dtype_of_torch(tdtype: str) -> str:
    return {
        "torch.float32": "F32",
        "torch.float16": "F16",
        "torch.bfloat16": "BF16",
        "torch.float64": "F64",
        "torch.int64": "I64",
        "torch.int32": "I32",
        "torch.int8": "I8",
        "torch.uint8": "U8",
        "torch.bool": "BOOL",
    }.get(tdtype, tdtype)


class HFSource:
    """Tensor names, shapes and dtypes of a HF directory, and per-tensor reads."""

    def __init__(self, hf_dir: str | Path):
        self.dir = user_path(hf_dir)
        if not self.dir.is_dir():
            raise CheckpointError(f"{self.dir}: not a directory")
        self._where: dict[str, Any] = {}  # tensor name -> file object
        self._meta: dict[str, tuple[str, tuple[int, ...], Path]] = {}
        if (self.dir / ST_INDEX).exists():
            self._open_index(confined(self.dir, ST_INDEX, "index"), SafetensorsFile)
        elif (self.dir / ST_SINGLE).exists():
            self._add_st(SafetensorsFile(confined(self.dir, ST_SINGLE, "weights file")))
        elif (self.dir / BIN_INDEX).exists():
            self._open_index(confined(self.dir, BIN_INDEX, "index"), _TorchBinFile)
        elif (self.dir / BIN_SINGLE).exists():
            self._add_bin(_TorchBinFile(confined(self.dir, BIN_SINGLE, "weights file")))
        else:
            raise CheckpointError(
                f"{self.dir}: no weights found (looked for {ST_INDEX}, {ST_SINGLE}, {BIN_INDEX}, {BIN_SINGLE})"
            )

    def _add_st(self, f: SafetensorsFile) -> None:
        for name, info in f.tensors.items():
            self._where[name] = f
            self._meta[name] = (info.dtype, info.shape, f.path)

    def _add_bin(self, f: _TorchBinFile) -> None:
        for name, (dt, shape) in f.tensors.items():
            self._where[name] = f
            self._meta[name] = (_st_dtype_of_torch(dt), shape, f.path)

    def _open_index(self, index_path: Path, opener: Any) -> None:
        try:
            weight_map: dict[str, str] = json.loads(index_path.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError, RecursionError) as e:
            raise CheckpointError(f"{index_path}: malformed index ({type(e).__name__}: {e})") from e
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index_path}: malformed index (weight_map must map names to file names)")
        files: dict[str, Any] = {}
        for fname in sorted(set(weight_map.values())):
            path = confined(self.dir, fname, f"shard named in {index_path.name}")
            if not path.exists():
                first = next(n for n, f in weight_map.items() if f == fname)
                raise CheckpointError(f"{path}: shard named in {index_path.name} is missing (holds {first!r})")
            files[fname] = opener(path)
        for name, fname in weight_map.items():
            f = files[fname]
            if name not in f.tensors:
                raise CheckpointError(f"{f.path}: tensor {name!r} listed in {index_path.name} is not in this file")
        for f in files.values():
            (self._add_st if isinstance(f, SafetensorsFile) else self._add_bin)(f)

    def names(self) -> set[str]:
        return set(self._meta)

    def dtype(self, name: str) -> str:
        return self._meta[name][0]

    def shape(self, name: str) -> tuple[int, ...]:
        return self._meta[name][1]

    def file(self, name: str) -> Path:
        return self._meta[name][2]

    def files(self) -> list[Path]:
        return sorted({m[2] for m in self._meta.values()})

    def read(self, name: str) -> np.ndarray:
        return self._where[name].read(name)
