"""Launch choices of the paged decode kernel per shape, read from a sweep stored beside the code.

The fastest block size, split count, heads a program, warps and prefetch depend on the shape (how many
programs the grid has against the GPU's multiprocessors, how long each one's loop is) and on the GPU:
the sweep that ``python3 -m bench.decode_tune --out pallas_kernels/decode_tuning.json`` runs on a
device writes one entry per swept shape, keyed on the device's kind and the shape the kernel sees
(its own heads, after any tensor-parallel split). A shape that was not swept takes the entry of the
same device and head layout nearest in batch and context (in log scale), with its split count scaled
to keep the entry's number of programs; a device or head layout the table does not hold takes
:data:`DEFAULT`.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("decode_tuning.json")
MAX_SPLITS = 8
FILL_PROGRAMS = 264  # two programs per multiprocessor of an H100/H200 (132)


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """One launch of the kernel. ``splits`` None: enough programs to fill the GPU about twice.
    ``num_stages`` above 1 lets Triton's pipeliner keep that many blocks of K/V loads in flight."""

    pages_per_block: int = 4
    splits: int | None = None
    heads_per_program: int = 1
    num_warps: int = 4
    num_stages: int = 3
    prefetch: bool = False

    @property
    def name(self) -> str:
        s = "auto" if self.splits is None else self.splits
        return (f"ppb{self.pages_per_block}/s{s}/h{self.heads_per_program}/w{self.num_warps}/st{self.num_stages}"
                f"{'/pf' if self.prefetch else ''}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


DEFAULT = DecodeConfig()


def fill_splits(batch: int, kv_heads: int, heads_per_program: int) -> int:
    """Splits that give the grid about :data:`FILL_PROGRAMS` programs (at most :data:`MAX_SPLITS`)."""
    return min(MAX_SPLITS, max(1, math.ceil(FILL_PROGRAMS / (batch * kv_heads // heads_per_program))))


@functools.lru_cache(maxsize=4)
def load_table(path: Path = TABLE) -> tuple[dict[str, Any], ...]:
    """The stored sweep's entries (none when the file is absent)."""
    if not path.exists():
        return ()
    data = json.loads(path.read_text())
    return tuple(data["entries"])


def choose(entries: tuple[dict[str, Any], ...] | list[dict[str, Any]], device_kind: str, q_heads: int, kv_heads: int,
           head_dim: int, batch: int, context: int) -> DecodeConfig:
    """The entry's config for this device and head layout nearest in (log batch, log context)."""
    same = [e for e in entries if e["device_kind"] == device_kind and e["q_heads"] == q_heads
            and e["kv_heads"] == kv_heads and e["head_dim"] == head_dim]
    if not same:
        return DEFAULT
    dist = lambda e: math.log2(e["batch"] / batch) ** 2 + math.log2(e["context"] / context) ** 2  # noqa: E731
    best = min(same, key=dist)
    cfg = DecodeConfig(**best["config"])
    if cfg.splits is None or (best["batch"], best["context"]) == (batch, context):
        return cfg
    groups = kv_heads // cfg.heads_per_program
    programs = best["batch"] * groups * cfg.splits
    return dataclasses.replace(cfg, splits=min(MAX_SPLITS, max(1, round(programs / (batch * groups)))))


def tuned(device_kind: str, q_heads: int, kv_heads: int, head_dim: int, batch: int, context: int) -> DecodeConfig:
    """:func:`choose` over the stored table."""
    return choose(load_table(), device_kind, q_heads, kv_heads, head_dim, batch, context)
