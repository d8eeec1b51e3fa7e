"""Counts XLA compilations in this process (a metric, and how tests prove steady state compiles
nothing): jax reports every backend compilation through ``jax.monitoring``."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_lock = threading.Lock()
_count = 0
_installed = False


def _listener(event: str, duration: float, **_: object) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            _installed = True


def compilations() -> int:
    """Backend compilations since :func:`install` was first called."""
    install()
    return _count
