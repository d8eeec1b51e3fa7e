"""The contract every instance's policy keeps with its worker and with the simulator."""

from __future__ import annotations

from typing import Callable, Protocol

from distllm_jax.scheduling.memory import KVManager, RoomPlan
from distllm_jax.scheduling.protocols import SchedRequest


class Scheduler(Protocol):
    """What every instance's policy offers its worker (and the simulator)."""

    running: list  # requests in the instance's decode batch
    kv: KVManager  # its pages: admission, growth, preemption

    @property
    def load(self) -> int: ...

    def has_work(self) -> bool: ...

    def make_room(self, need: Callable[[SchedRequest], int], can_preempt: bool = True) -> RoomPlan | None:
        """Pages for the running requests' next step (``need(r)`` tokens each), before it is planned;
        see :meth:`KVManager.make_room`."""
