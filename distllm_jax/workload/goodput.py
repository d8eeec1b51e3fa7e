"""Goodput: the highest request rate at which a target share of requests meets the SLO, found by
bisection over rates (for the simulator's placement search and for serving benchmarks alike)."""

from __future__ import annotations

from typing import Callable


def goodput(attain_at: Callable[[float], float], lo: float, hi: float, target: float = 0.9,
            tol: float = 0.05, max_iters: int = 12) -> tuple[float, list[tuple[float, float]]]:
    """Highest rate whose attainment is >= target, by bisection between ``lo`` and ``hi`` (assumes
    attainment falls with rate). Returns (rate, [(rate, attainment) tried]); 0 if even ``lo`` fails."""
    tried: list[tuple[float, float]] = []

    def ok(rate: float) -> bool:
        a = attain_at(rate)
        tried.append((rate, a))
        return a >= target

    if not ok(lo):
        return 0.0, tried
    if ok(hi):
        return hi, tried
    for _ in range(max_iters):
        if hi - lo <= tol * lo:
            break
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo, tried
