"""Counts XLA compilations in this process (a metric, and how tests prove steady state compiles
nothing), and the programs loaded from the persistent compilation cache instead: jax reports both
through ``jax.monitoring``."""

from __future__ import annotations

import threading

import jax

_EVENT = "/jax/core/compile/backend_compile_duration"
_HIT = "/jax/compilation_cache/cache_hits"
_lock = threading.Lock()
_count = 0
_hits = 0
_installed = False


def _listener(event: str, duration: float, **_: object) -> None:
    global _count
    if event == _EVENT:
        with _lock:
            _count += 1


def _hit_listener(event: str, **_: object) -> None:
    global _hits
    if event == _HIT:
        with _lock:
            _hits += 1


def install() -> None:
    global _installed
    with _lock:
        if not _installed:
            jax.monitoring.register_event_duration_secs_listener(_listener)
            jax.monitoring.register_event_listener(_hit_listener)
            _installed = True


def compilations() -> int:
    """Programs built since :func:`install` was first called: compiled, or loaded from the persistent
    cache (:func:`cache_hits` of them)."""
    install()
    return _count


def cache_hits() -> int:
    """Programs loaded from the persistent compilation cache since :func:`install` (not compiled)."""
    install()
    return _hits
