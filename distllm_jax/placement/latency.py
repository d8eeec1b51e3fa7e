"""The latency model in DistServe's form, per model and tensor-parallel degree.

Prefill of a batch of prompts with lengths L_i, on a pipeline of ``pp`` stages:
    ms = (a + b·ΣL_i + c·ΣL_i²) / pp            (GEMMs grow with ΣL, attention with ΣL²)
A decode step over a batch of ``n`` sequences with contexts ctx_i:
    ms = (a' + b'·Σ(ctx_i + 1) + c'·n) / pp      (KV reads grow with context, weights with batch rows)
with one decode fit below a batch-size threshold and another at or above it, as DistServe fits them.
Pipelining adds its hops: a request crosses ``pp`` stages, so its prefill latency is the stage time
times pp (the steady-state throughput is one stage time per batch); DistServe's simulator also adds
``2 + 0.0001·Σctx`` ms of per-step scheduling overhead on the first stage, kept here as ``overhead``.

Coefficients are fitted by least squares from profiles (:func:`fit`), or read from a profile JSON.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

PROFILES = Path(__file__).parent / "profiles"


@dataclasses.dataclass(frozen=True)
class Fit:
    prefill: tuple[float, float, float]
    decode_small: tuple[float, float, float]
    decode_large: tuple[float, float, float]
    threshold: int = 95
    overhead: tuple[float, float] = (0.0, 0.0)  # ms per step + ms per context token (first stage)
    # ms per pipeline stage added to every prefill stage (DistServe's simulator: pp_const = 1 ms x pp)
    prefill_hop_ms: float = 0.0

    def prefill_ms(self, lengths: Sequence[int], pp: int = 1) -> float:
        """One stage's time for a prefill batch (a request sees ``pp`` of these)."""
        a, b, c = self.prefill
        s1 = float(sum(lengths))
        s2 = float(sum(n * n for n in lengths))
        return (a + b * s1 + c * s2) / pp + self.prefill_hop_ms * pp + self.overhead[0] + self.overhead[1] * s1

    def decode_ms(self, batch: int, total_ctx: int, pp: int = 1) -> float:
        """One stage's time for a decode step over ``batch`` sequences with Σ(ctx+1) = ``total_ctx``."""
        a, b, c = self.decode_small if batch < self.threshold else self.decode_large
        return (a + b * total_ctx + c * batch) / pp + self.overhead[0] + self.overhead[1] * total_ctx

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fit":
        return cls(tuple(d["prefill"]), tuple(d["decode_small"]), tuple(d["decode_large"]),
                   int(d.get("threshold", 95)), tuple(d.get("overhead", (0.0, 0.0))), float(d.get("prefill_hop_ms", 0.0)))


@dataclasses.dataclass
class Profile:
    """Fits by tensor degree for one model on one kind of device, plus what the simulator needs."""

    model: str
    device: str
    fits: dict[int, Fit]
    params_bytes: float  # all weights
    kv_bytes_per_token: float  # K and V of one token, all layers
    gpu_memory_bytes: float
    num_layers: int
    source: str = ""
    # KV tokens an instance held as measured by a real system's memory profiler, by "tp{T}pp{P}", at
    # kv_measured_utilisation of GPU memory (what a weights-only estimate misses: activations, the
    # allocator, the real capacity of an "80 GB" card)
    kv_tokens_measured: dict[str, int] = dataclasses.field(default_factory=dict)
    kv_measured_utilisation: float | None = None

    def fit(self, tp: int) -> Fit:
        if tp not in self.fits:
            raise KeyError(f"{self.model} on {self.device}: no fit for tensor degree {tp} (have {sorted(self.fits)})")
        return self.fits[tp]

    def fits_memory(self, tp: int, pp: int, weights_share: float = 0.85) -> bool:
        """One device's share of the weights leaves at least 15% of its memory for the KV cache."""
        return self.params_bytes / (tp * pp) <= weights_share * self.gpu_memory_bytes

    def kv_token_capacity(self, tp: int, pp: int, utilisation: float = 0.9) -> int:
        """Tokens of KV one instance can hold (every device of it: tp·pp devices): the measured count
        where the profile has one at this utilisation, else what the weights leave of that share."""
        measured = self.kv_tokens_measured.get(f"tp{tp}pp{pp}")
        if measured is not None and self.kv_measured_utilisation == utilisation:
            return measured
        free = utilisation * self.gpu_memory_bytes * tp * pp - self.params_bytes
        return max(0, int(free / self.kv_bytes_per_token))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["fits"] = {str(k): v.to_dict() for k, v in self.fits.items()}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Profile":
        d = dict(d)
        d["fits"] = {int(k): Fit.from_dict(v) for k, v in d["fits"].items()}
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def load_profile(name_or_path: str) -> Profile:
    """A shipped profile by name (``a100-opt-13b``) or a JSON file written by ``distllm profile``."""
    p = Path(name_or_path)
    if not p.exists():
        p = PROFILES / f"{name_or_path}.json"
    if not p.exists():
        shipped = sorted(x.stem for x in PROFILES.glob("*.json"))
        raise FileNotFoundError(f"no profile {name_or_path!r}: a JSON path or one of {shipped}")
    return Profile.from_dict(json.loads(p.read_text()))


def fit_prefill(samples: Sequence[tuple[Sequence[int], float]]) -> tuple[tuple[float, float, float], float]:
    """Least squares for (a, b, c) from (prompt lengths, ms); returns the fit and its mean relative error."""
    X = np.array([[1.0, sum(ls), sum(n * n for n in ls)] for ls, _ in samples])
    y = np.array([ms for _, ms in samples])
    return _lstsq(X, y)


def fit_decode(samples: Sequence[tuple[int, int, float]]) -> tuple[tuple[float, float, float], float]:
    """Least squares for (a', b', c') from (batch, Σ(ctx+1), ms)."""
    X = np.array([[1.0, ctx, n] for n, ctx, _ in samples])
    y = np.array([ms for _, _, ms in samples])
    return _lstsq(X, y)


def fit_decode_split(samples: Sequence[tuple[int, int, float]]) -> tuple[Fit, float]:
    """The decode fit in two pieces, below and at or above a batch-size threshold, as DistServe fits
    it: a step's cost per row falls as the batch grows (weights read once for more rows, then compute
    takes over), which one line over all batch sizes misses at both ends. The threshold is the grid's
    batch size that fits best, each piece keeping two batch sizes or more; one piece if none does
    better. A grid that leaves out the long contexts at large batches (the pool cannot hold them)
    gives a large-batch piece whose context is a fixed multiple of its batch: its context term would
    be anything, so it takes the other piece's (the cost of reading a token's KV, which the batch
    does not change) and fits the rest. Each piece keeps a point more than the terms it fits.
    Returns a Fit with this decode model (and a placeholder prefill) and its mean relative error."""
    one, err = fit_decode(samples)
    best = (err, one, one, 10**9)
    sizes = sorted({n for n, _, _ in samples})
    for t in sizes[2:-1]:
        lo = [x for x in samples if x[0] < t]
        hi = [x for x in samples if x[0] >= t]
        pieces = _fit_pieces(lo, hi)
        if pieces is None:
            continue
        (small, e_lo), (large, e_hi) = pieces
        e = (e_lo * len(lo) + e_hi * len(hi)) / len(samples)
        if e < best[0]:
            best = (e, small, large, t)
    e, small, large, t = best
    return Fit((0.0, 0.0, 0.0), small, large, threshold=t), e


def _determined(samples: Sequence[tuple[int, int, float]]) -> bool:
    """Whether (batch, Σ(ctx+1)) samples fix a decode line's three terms, with one point more."""
    X = np.array([[1.0, ctx, n] for n, ctx, _ in samples])
    return len(samples) > 3 and np.linalg.matrix_rank(X) == 3


def _fit_pieces(lo, hi):
    """Both pieces' fits and errors, one piece taking the other's context term when its own points
    cannot fix it (None when neither can, or the borrowing piece has no point to spare)."""
    d_lo, d_hi = _determined(lo), _determined(hi)
    if d_lo and d_hi:
        return fit_decode(lo), fit_decode(hi)
    if not (d_lo or d_hi):
        return None
    full, part = (lo, hi) if d_lo else (hi, lo)
    if len(part) < 3 or len({n for n, _, _ in part}) < 2:
        return None
    whole = fit_decode(full)
    b = whole[0][1]
    # the rest of each step's time, over (1, batch); its relative error taken against the whole time
    ms = np.array([ms for _, _, ms in part])
    known = b * np.array([ctx for _, ctx, _ in part], dtype=float)
    X = np.array([[1.0, n] for n, _, _ in part])
    w = 1.0 / np.maximum(ms, 1e-6)
    (a, c), *_ = np.linalg.lstsq(X * w[:, None], (ms - known) * w, rcond=None)
    err = float(np.mean(np.abs(X @ np.array([a, c]) + known - ms) / np.maximum(ms, 1e-6)))
    borrowed = ((float(a), b, float(c)), err)
    return (whole, borrowed) if d_lo else (borrowed, whole)


def _lstsq(X: np.ndarray, y: np.ndarray) -> tuple[tuple[float, float, float], float]:
    # weight by 1/y so short steps count as much as long ones (relative error is what matters)
    w = 1.0 / np.maximum(y, 1e-6)
    coef, *_ = np.linalg.lstsq(X * w[:, None], y * w, rcond=None)
    err = float(np.mean(np.abs(X @ coef - y) / np.maximum(y, 1e-6)))
    return (float(coef[0]), float(coef[1]), float(coef[2])), err
