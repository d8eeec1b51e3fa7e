"""A bounded-memory safetensors reader.

Why not ``safetensors.safe_open``: it memory-maps the whole file, and every page a conversion touches
stays resident (and counted in RSS) until the file is closed, so peak memory grows with the checkpoint.
The format is a u64 header length, a JSON header and raw little-endian data; reading one tensor with
``pread`` into a fresh buffer keeps peak memory at the size of that tensor, and lets every error name
the file and the tensor (truncation is detected from the header before any data is read).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

_MAX_HEADER = 100 * 1024 * 1024


class CheckpointError(ValueError):
    """A checkpoint the converter cannot use; the message names the file and, where known, the tensor."""


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    name: str
    dtype: str  # safetensors dtype tag, e.g. "BF16"
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


class SafetensorsFile:
    """Header of one ``.safetensors`` file plus per-tensor reads."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tensors: dict[str, TensorInfo] = {}
        self.metadata: dict[str, str] = {}
        self._parse_header()

    def _parse_header(self) -> None:
        p = self.path
        try:
            size = p.stat().st_size
        except FileNotFoundError as e:
            raise CheckpointError(f"{p}: file not found") from e
        if size < 8:
            raise CheckpointError(f"{p}: truncated safetensors file ({size} bytes, header length missing)")
        with open(p, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > _MAX_HEADER:
                raise CheckpointError(f"{p}: not a safetensors file (header length {n} is implausible)")
            if 8 + n > size:
                raise CheckpointError(
                    f"{p}: truncated safetensors file (header needs {8 + n} bytes, file has {size})"
                )
            raw = f.read(n)
        try:
            header = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{p}: corrupt safetensors header ({e})") from e
        except RecursionError as e:  # nesting deeper than the interpreter's stack, never a real header
            raise CheckpointError(f"{p}: corrupt safetensors header (nested too deeply)") from e
        if not isinstance(header, dict):
            raise CheckpointError(f"{p}: corrupt safetensors header (a JSON object expected, got {type(header).__name__})")
        base = 8 + n
        self.metadata = header.pop("__metadata__", None) or {}
        for name, h in header.items():
            try:
                dtype, shape, (b, e) = h["dtype"], tuple(int(x) for x in h["shape"]), h["data_offsets"]
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{p}: tensor {name!r}: malformed header entry {h!r}") from exc
            if dtype not in DTYPES:
                raise CheckpointError(f"{p}: tensor {name!r}: unknown safetensors dtype {dtype!r}")
            if e - b != math.prod(shape) * DTYPES[dtype].itemsize:
                raise CheckpointError(
                    f"{p}: tensor {name!r}: data size {e - b} bytes does not match shape {shape} of {dtype}"
                )
            if base + e > size:
                raise CheckpointError(
                    f"{p}: truncated safetensors file: tensor {name!r} needs bytes up to {base + e}, "
                    f"file has {size}"
                )
            self.tensors[name] = TensorInfo(p, name, dtype, shape, base + b, base + e)

    def read(self, name: str) -> np.ndarray:
        """Read one tensor into a fresh, writable array (no mmap: memory is freed with the array)."""
        info = self.tensors[name]
        buf = bytearray(info.nbytes)
        view = memoryview(buf)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            done = 0
            while done < info.nbytes:
                got = os.preadv(fd, [view[done:]], info.start + done)
                if got <= 0:
                    raise CheckpointError(
                        f"{self.path}: truncated safetensors file: tensor {name!r} ends early "
                        f"({done} of {info.nbytes} bytes)"
                    )
                done += got
        finally:
            os.close(fd)
        return np.frombuffer(buf, dtype=DTYPES[info.dtype]).reshape(info.shape)
