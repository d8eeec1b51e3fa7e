"""jax's persistent compilation cache, so a second start of the same model and layout loads its
programs instead of compiling them (minutes at real sizes).

jax keys every entry on the program itself (its HLO, hence the model's shapes, dtype, sharding and
layout), the compile options, the jax / jaxlib version and the device kind, so another model, layout
or jax version never reuses a stale entry: it only misses. Every program is cached, however fast it
compiled: a start compiles hundreds of small ones.
"""

from __future__ import annotations

import os
from pathlib import Path


def default_dir() -> Path:
    """Under the user's cache directory (``$XDG_CACHE_HOME``, else ``~/.cache``)."""
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "distllm" / "jax-compile"


ENV = "DISTLLM_COMPILE_CACHE"  # how a process hands its cache directory to the actors it starts


def current_dir() -> str | None:
    """The directory this process caches compiled programs under (None: caching is off)."""
    import jax

    return jax.config.jax_compilation_cache_dir or None


def enable(path: str | Path | None) -> Path | None:
    """Cache compiled programs under ``path`` (created if missing); None leaves caching off. Call
    before the first compilation: jax sets its cache up once per process."""
    import jax

    if path is None:
        return None
    where = Path(path).expanduser().resolve()
    where.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(where))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return where
