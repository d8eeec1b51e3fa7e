"""One instance's parallelism, for the engine that builds it and the simulator and placement search
that time and place it.

Pure (no jax): ``distllm_jax.engine`` imports jax in its package, and the simulator, the placement
search and the benchmarks' parents must stay free of it. ``distllm_jax.engine.config`` re-exports
:class:`InstanceSpec`, so ``from distllm_jax.engine import InstanceSpec`` keeps working.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class InstanceSpec:
    """One instance's parallelism: ``tp`` devices per pipeline stage, ``pp`` stages (tp*pp devices).
    ``num_pages`` overrides the engine-wide pool size for this instance."""

    tp: int = 1
    pp: int = 1
    num_pages: int | None = None

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def num_devices(self) -> int:
        return self.tp * self.pp

    def label(self) -> str:
        return f"tp{self.tp}" + (f"pp{self.pp}" if self.pp > 1 else "")
