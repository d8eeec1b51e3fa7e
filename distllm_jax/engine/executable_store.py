"""Compiled programs kept on disk whole, so that a second start neither traces nor lowers them.

jax's persistent compilation cache (:mod:`distllm_jax.compile_cache`) skips XLA's compile, but it is
keyed on the lowered program, so every start still traces each program (a step program is the whole
model, in Python) and lowers it before it can look the entry up: at real sizes that is most of a
warm start. An instance builds every program it runs through this store (its steps, sampling,
log-probabilities and page copies).
This store keys a serialized executable (``jax.experimental.serialize_executable``) on everything
the program is made from *without* tracing it:

- the program's name and its static arguments, described by value (:func:`stable_repr`; a static
  argument that has no such description makes the program unstorable, never a wrong hit);
- each argument's tree structure, shape, dtype and placement (device id and slice of every shard);
- the source of this package and of ``pallas_kernels`` (every ``.py`` and ``.json`` file, hashed), so
  an edited model, kernel or tuning table misses;
- jax's and jaxlib's versions, the backend's platform and version, the device kinds, ``XLA_FLAGS``,
  and the jax settings that change lowering.

An entry that fails to load (truncated, another format) is a miss: the program is built as usual and
the entry rewritten. Only a program XLA compiled in this process is stored: one that jax loaded from
its persistent cache does not always serialize whole again (on the CPU its code is missing, and the
fault shows only when it runs), so it runs, unstored, until a compile of its own stores it. Loading an entry runs what it holds, as jax's own cache does: the directory is
the user's own (created private), and nothing reads a store it was not pointed at.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import json
import logging
import os
import pickle
import threading
import types
from pathlib import Path
from typing import Any, Sequence

import jax
import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
SUBDIR = "executables"
MAX_BYTES = 8 << 30  # entries past this (oldest used first) are dropped: a code change orphans a whole set
_SETTINGS = ("jax_enable_x64", "jax_default_matmul_precision", "jax_threefry_partitionable",
             "jax_use_shardy_partitioner", "jax_numpy_rank_promotion", "jax_default_prng_impl")


_HIT_EVENT = "/jax/compilation_cache/cache_hits"
_local = threading.local()  # jax reports a cache hit on the thread that compiles
_listening = threading.Lock()
_listener_on = False


def _count_hit(event: str, **_: Any) -> None:
    if event == _HIT_EVENT:
        _local.hits = getattr(_local, "hits", 0) + 1


def _hits_on_this_thread() -> int:
    global _listener_on
    with _listening:
        if not _listener_on:
            jax.monitoring.register_event_listener(_count_hit)
            _listener_on = True
    return getattr(_local, "hits", 0)


class Unkeyable(ValueError):
    """A static argument with no description by value (a closure, an object printed by address)."""


def stable_repr(obj: Any) -> str:
    """A description of ``obj`` that is the same in every process that builds the same program."""
    if obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        return repr(obj)
    if isinstance(obj, enum.Enum):
        return f"{type(obj).__qualname__}.{obj.name}"
    if isinstance(obj, (tuple, list)):
        return f"{type(obj).__name__}({', '.join(stable_repr(x) for x in obj)})"
    if isinstance(obj, dict):
        return "{" + ", ".join(f"{stable_repr(k)}: {stable_repr(v)}" for k, v in sorted(obj.items(), key=repr)) + "}"
    if isinstance(obj, functools.partial):
        kw = ", ".join(f"{k}={stable_repr(v)}" for k, v in sorted(obj.keywords.items()))
        return f"partial({stable_repr(obj.func)}, {stable_repr(obj.args)}, {kw})"
    if isinstance(obj, (types.FunctionType, types.BuiltinFunctionType)):
        if "<locals>" in obj.__qualname__ or obj.__name__ == "<lambda>":
            raise Unkeyable(f"a local function {obj.__qualname__} has no description by value")
        return f"{obj.__module__}.{obj.__qualname__}"
    if isinstance(obj, type):
        return f"{obj.__module__}.{obj.__qualname__}"
    if dataclasses.is_dataclass(obj):
        fields = ", ".join(f"{f.name}={stable_repr(getattr(obj, f.name))}" for f in dataclasses.fields(obj))
        return f"{type(obj).__module__}.{type(obj).__qualname__}({fields})"
    if isinstance(obj, (np.dtype, np.generic)):
        return repr(obj)
    raise Unkeyable(f"no description by value for a {type(obj).__qualname__}")


def _leaf(x: Any) -> tuple:
    if isinstance(x, jax.Array):
        shards = sorted((d.id, str(idx)) for d, idx in x.sharding.devices_indices_map(x.shape).items())
        return ("array", x.shape, str(x.dtype), x.weak_type, type(x.sharding).__name__,
                str(x.sharding.memory_kind), tuple(shards))
    a = np.asarray(x)
    return ("host", a.shape, str(a.dtype))


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """A hash of every source and data file of this package and of ``pallas_kernels``."""
    import distllm_jax
    import pallas_kernels

    h = hashlib.sha256()
    for pkg in (distllm_jax, pallas_kernels):
        root = Path(pkg.__file__).resolve().parent
        for path in sorted(p for p in root.rglob("*") if p.suffix in (".py", ".json") and p.is_file()):
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


@functools.lru_cache(maxsize=1)
def runtime_fingerprint() -> str:
    """What else a compiled program depends on: versions, backend, devices, flags and settings."""
    import jaxlib

    devs = jax.devices()
    backend = devs[0].client
    facts = {
        "format": FORMAT, "jax": jax.__version__, "jaxlib": jaxlib.__version__,
        "platform": backend.platform, "platform_version": backend.platform_version,
        "devices": [(d.id, d.device_kind, d.process_index) for d in devs],
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "settings": {name: str(jax.config.values.get(name)) for name in _SETTINGS},
        "source": source_fingerprint(),
    }
    return hashlib.sha256(json.dumps(facts, sort_keys=True, default=str).encode()).hexdigest()


def program_key(name: str, args: tuple, kwargs: dict[str, Any], static: dict[str, Any]) -> str:
    """The store's key for ``name`` built for these arguments (raises :class:`Unkeyable`)."""
    leaves, tree = jax.tree.flatten((args, kwargs), is_leaf=lambda x: x is None)
    desc = {
        "name": name, "static": stable_repr(static), "tree": str(tree),
        "leaves": [None if x is None else _leaf(x) for x in leaves], "runtime": runtime_fingerprint(),
    }
    return hashlib.sha256(json.dumps(desc, default=str).encode()).hexdigest()


def _process_key(name: str, args: tuple, kwargs: dict[str, Any], static: dict[str, Any],
                 devices: Sequence[jax.Device]) -> tuple | None:
    """A key valid in this process only (static arguments and shardings by identity and hash), for
    the programs it already holds: an engine's instances mostly run the same ones. None when a
    static argument cannot be hashed."""
    leaves, tree = jax.tree.flatten((args, kwargs))
    desc = tuple((x.shape, x.dtype, x.sharding) if isinstance(x, jax.Array) else ("host", np.shape(x), np.result_type(x))
                 for x in leaves)
    key = (name, tuple(static.items()), tuple(d.id for d in devices), tree, desc)
    try:
        hash(key)
    except TypeError:
        return None
    return key


@dataclasses.dataclass
class StoreStats:
    loaded: int = 0
    built: int = 0
    saved: int = 0
    from_jax_cache: int = 0  # built from jax's persistent cache, hence not stored
    unkeyable: int = 0
    errors: list[str] = dataclasses.field(default_factory=list)


class ExecutableStore:
    """Serialized executables under ``root``, one file per key, at most ``max_bytes`` of them (the
    least recently used go first)."""

    def __init__(self, root: str | Path, max_bytes: int = MAX_BYTES) -> None:
        self.max_bytes = max_bytes
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.stats = StoreStats()
        self._lock = threading.Lock()
        self._memo: dict[tuple, jax.stages.Compiled] = {}  # what this process built or loaded

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.jaxexe"

    def _note(self, what: str) -> None:
        with self._lock:
            self.stats.errors.append(what)
        log.warning("executable store: %s", what)

    def load(self, key: str, devices: Sequence[jax.Device]) -> jax.stages.Compiled | None:
        """The entry under ``key``, loaded onto ``devices`` (the program's devices, in its order)."""
        from jax.experimental.serialize_executable import deserialize_and_load

        path = self._path(key)
        if not path.exists():
            return None
        try:
            payload, in_tree, out_tree = pickle.loads(path.read_bytes())
            compiled = deserialize_and_load(payload, in_tree, out_tree, backend=devices[0].client,
                                            execution_devices=list(devices))
        except Exception as e:  # noqa: BLE001 - a bad entry is a miss, never a failed start
            self._note(f"{path.name} did not load ({type(e).__name__}: {e}); building it again")
            path.unlink(missing_ok=True)
            return None
        try:
            os.utime(path)  # recently used: the last to be dropped
        except OSError:
            pass
        with self._lock:
            self.stats.loaded += 1
        return compiled

    def save(self, key: str, compiled: jax.stages.Compiled) -> None:
        from jax.experimental.serialize_executable import serialize

        try:
            data = pickle.dumps(serialize(compiled))
        except Exception as e:  # noqa: BLE001 - an executable this backend cannot serialize stays unstored
            self._note(f"not stored ({type(e).__name__}: {e})")
            return
        path = self._path(key)
        tmp = path.with_suffix(f".tmp{os.getpid()}.{threading.get_ident()}")
        try:
            tmp.write_bytes(data)
            os.replace(tmp, path)  # readers see the whole entry or none
        except OSError as e:  # a full or read-only disk costs the next start its speed, never this one
            try:
                tmp.unlink(missing_ok=True)
            except OSError:
                pass
            self._note(f"not stored ({type(e).__name__}: {e})")
            return
        with self._lock:
            self.stats.saved += 1
        self._trim(keep=path)

    def _trim(self, keep: Path) -> None:
        """Drop the least recently used entries until the store is within ``max_bytes``."""
        entries = []
        for e in self.root.glob("*.jaxexe"):
            try:
                st = e.stat()
            except OSError:  # another process dropped it
                continue
            entries.append((st.st_mtime, st.st_size, e))
        total = sum(size for _, size, _ in entries)
        for _, size, e in sorted(entries, key=lambda t: t[0]):
            if total <= self.max_bytes:
                break
            if e != keep:
                e.unlink(missing_ok=True)
                total -= size

    def build(self, name: str, fn: Any, args: tuple, kwargs: dict[str, Any], static: dict[str, Any],
              devices: Sequence[jax.Device]) -> jax.stages.Compiled:
        """``fn`` (a ``jax.jit`` function) compiled for these arguments: from the store when it holds
        the entry, else lowered and compiled (through jax's persistent cache) and stored.
        ``devices``: the ones the program runs on, in its order (its inputs' mesh, flattened)."""
        here = _process_key(name, args, kwargs, static, devices)  # cheap: what this process built already
        if here is not None and (hit := self._memo.get(here)) is not None:
            return hit
        try:
            key = program_key(name, args, kwargs, {**static, "devices": tuple(d.id for d in devices)})
        except Unkeyable as e:
            with self._lock:
                self.stats.unkeyable += 1
            log.info("executable store: %s is built, not stored: %s", name, e)
            key = None
        if key is not None and (hit := self.load(key, devices)) is not None:
            with self._lock:
                return self._memo.setdefault(here, hit) if here is not None else hit
        hits = _hits_on_this_thread()
        compiled = fn.lower(*args, **kwargs, **static).compile()
        cached = _hits_on_this_thread() > hits
        with self._lock:
            self.stats.built += 1
            self.stats.from_jax_cache += cached and key is not None
        if key is not None and not cached:
            self.save(key, compiled)
        if here is None:
            return compiled
        with self._lock:
            return self._memo.setdefault(here, compiled)


def build_program(store: ExecutableStore | None, name: str, fn: Any, args: tuple, kwargs: dict[str, Any],
                  static: dict[str, Any], devices: Sequence[jax.Device]) -> jax.stages.Compiled:
    """:meth:`ExecutableStore.build`, or with no store a plain lower and compile."""
    if store is None:
        return fn.lower(*args, **kwargs, **static).compile()
    return store.build(name, fn, args, kwargs, static, devices)


@functools.lru_cache(maxsize=8)
def _store_at(root: Path) -> ExecutableStore:
    return ExecutableStore(root)


def default_store() -> ExecutableStore | None:
    """The store beside jax's persistent compilation cache (none when that cache is off, or when its
    folder cannot be made); one per directory and process, so the instances of an engine share what
    it loaded."""
    from distllm_jax import compile_cache

    where = compile_cache.current_dir()
    if where is None:
        return None
    try:
        return _store_at(Path(where).expanduser().resolve() / SUBDIR)
    except OSError as e:
        log.warning("executable store: none (%s: %s); programs are built at every start", type(e).__name__, e)
        return None
