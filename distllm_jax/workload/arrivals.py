"""Request arrival times: Poisson at a rate, or gamma-distributed gaps with a burstiness factor
(shape = burstiness, mean gap 1/rate: 1 is Poisson, below 1 burstier, above 1 smoother), seeded."""

from __future__ import annotations

import numpy as np


def arrival_times(n: int, rate: float, burstiness: float = 1.0, seed: int = 0) -> np.ndarray:
    """Offsets in seconds from the start of the run, the first at 0; ``rate=inf`` sends all at once."""
    if n <= 0:
        return np.zeros(0)
    if rate == float("inf"):
        return np.zeros(n)
    if rate <= 0 or burstiness <= 0:
        raise ValueError(f"rate and burstiness must be positive, got {rate}, {burstiness}")
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return np.concatenate([[0.0], np.cumsum(gaps)])
