"""A local Ray cluster for a test module (2 CPUs; actors reserve none), and the hooks the fault tests
inject faults through: at a named point of a request's life, in the engine's own thread and under the
controller's lock, so the fault lands where the test says whatever the host's speed."""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Iterator

import pytest

from distllm_jax.engine.request import Request, RequestState


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="distllm-tests")
    try:
        yield
    finally:
        ray.shutdown()


def on_state(monkeypatch: pytest.MonkeyPatch, state: RequestState, when: Callable[[Request], bool],
             action: Callable[[Request], None]) -> threading.Event:
    """Run ``action(r)`` once, at the moment a request ``r`` enters ``state`` while ``when(r)`` holds.

    Every state change happens under the controller's lock, so ``when`` and ``action`` see the
    engine's state as it is at that step (not as a poll from outside found it later). The returned
    event is set once the action ran."""
    fired = threading.Event()

    def get(r: Request) -> RequestState:
        return r.__dict__["state"]

    def set_(r: Request, value: RequestState) -> None:
        r.__dict__["state"] = value
        if value is state and not fired.is_set() and when(r):
            fired.set()
            action(r)

    monkeypatch.setattr(Request, "state", property(get, set_), raising=False)
    return fired


def wait_for(engine: Any, cond: Callable[[], bool], timeout: float) -> bool:
    """Wait until ``cond()`` (evaluated under the controller's lock) holds; False on timeout. The
    engine notifies the lock's condition at every change a test waits for (a loss, a finish)."""
    with engine.ctrl.lock:
        return engine.ctrl.lock.wait_for(cond, timeout)
