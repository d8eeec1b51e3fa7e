"""An instance: its own devices (one mesh per pipeline stage), params, KV pool, allocator and programs.

Pipeline parallelism splits the layers into ``pp`` contiguous stages, each on a ``tp``-device mesh
with its slice of the params and of the pool (page ids are shared: one allocator per instance).
A step is dispatched micro-batch by micro-batch, stage by stage; jax dispatches asynchronously and
the stages sit on different devices, so stage s works on micro-batch m while stage s+1 works on m-1.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from distllm_jax.engine.config import EngineConfig, InstanceSpec
from distllm_jax.engine.executable_store import ExecutableStore, build_program, default_store
from distllm_jax.engine.params_source import ParamSource, stage_tensor_names
from distllm_jax.engine.swap import HostKVStore
from distllm_jax.engine.transfer import read_host_pages
from distllm_jax.engine.logprobs import PROMPT_LOGPROBS, ROW_LOGPROBS
from distllm_jax.engine.programs import (COPY_PAGES, SAMPLE, STAGE_STEP, HostStep, PendingStep, Segment,
                                         logprob_picks, pack_decode, pack_mixed, pack_picks, pack_prefill,
                                         pick_buckets, prompt_rows)
from distllm_jax.kv_cache import NULL_PAGE, KVPool, PageAllocator, create_pool, pages_for
from distllm_jax.models.attention import AttentionImpl
from distllm_jax.models.serving_layout import serving_layer
from distllm_jax.parallel import kv_buffer_sharding, kv_pool_sharding, make_mesh, replicated
from distllm_jax.scheduling.protocols import Role
from distllm_jax.shapes import StepKind, bucket, compiled_shapes


@dataclasses.dataclass
class Stage:
    mesh: Mesh
    lo: int  # first layer
    hi: int  # one past the last layer
    params: dict
    pool: KVPool
    pool_sharding: NamedSharding  # each layer's pool array
    buffer_sharding: NamedSharding  # a gathered [layers, pages, ...] migration buffer
    first: bool
    last: bool

    @property
    def repl(self) -> NamedSharding:
        return replicated(self.mesh)


def layer_split(num_layers: int, pp: int) -> list[tuple[int, int]]:
    """Contiguous layer ranges, as even as possible (earlier stages take the remainder)."""
    if pp > num_layers:
        raise ValueError(f"{pp} pipeline stages for {num_layers} layers")
    base, extra = divmod(num_layers, pp)
    out, lo = [], 0
    for s in range(pp):
        hi = lo + base + (1 if s < extra else 0)
        out.append((lo, hi))
        lo = hi
    return out


class Instance:
    """``role`` is prefill, decode, colocated or chunked; it decides which programs are compiled."""

    def __init__(
        self,
        name: str,
        role: str,
        spec: InstanceSpec,
        devices: Sequence[jax.Device],
        source: ParamSource,
        ecfg: EngineConfig,
        impl: AttentionImpl,
        store: ExecutableStore | None | bool = True,
    ):
        """``store``: where the step programs are kept compiled (:mod:`.executable_store`); True
        takes the one beside jax's persistent compilation cache (none when that cache is off),
        None or False keeps them in this process only."""
        if len(devices) != spec.num_devices:
            raise ValueError(f"{name}: {spec.label()} needs {spec.num_devices} devices, got {len(devices)}")
        self.name, self.role, self.spec, self.impl = name, Role(role), spec, impl
        self.cfg = cfg = source.cfg
        self.devices = list(devices)
        self.page_size = ecfg.page_size
        self.num_pages = spec.num_pages or ecfg.num_pages
        self.max_len = ecfg.seq_len(cfg)
        self.width = pages_for(self.max_len, self.page_size)  # page-table columns
        self.prefix_cache = ecfg.prefix_cache and self.role is not Role.DECODE
        self.alloc = PageAllocator(self.num_pages, self.page_size, prefix_cache=self.prefix_cache)
        self.lock = threading.Lock()  # held while dispatching anything that reads or donates a pool
        self.dtype = jnp.dtype(source.dtype)
        self.stages: list[Stage] = []
        split = layer_split(cfg.num_layers, spec.pp)
        for s, (lo, hi) in enumerate(split):
            mesh = make_mesh(self.devices[s * spec.tp : (s + 1) * spec.tp])
            first, last = s == 0, s == len(split) - 1
            params = source.load(mesh, stage_tensor_names(cfg, lo, hi, first, last))
            params["layers"] = layers = params["layers"][lo:hi]
            for j, lp in enumerate(layers):  # one layer at a time: the stacked copy and the parts never all coexist
                layers[j] = serving_layer(lp, cfg)
            del lp
            sh = kv_pool_sharding(cfg, mesh)
            pool = create_pool(_stage_cfg(cfg, hi - lo), self.num_pages, self.page_size, self.dtype, sh)
            self.stages.append(Stage(mesh, lo, hi, params, pool, sh, kv_buffer_sharding(cfg, mesh), first, last))

        self.max_prefill_seqs = ecfg.max_prefill_seqs
        self.max_batch = ecfg.max_decode_batch
        # prompts over cached prefixes run as mixed steps here: those take prefill batches' shapes and rows
        prefix_prefill = self.prefix_cache and self.role is not Role.CHUNKED
        self.mixed_rows = max(self.max_batch, self.max_prefill_seqs) if prefix_prefill else self.max_batch
        # the step shapes compiled below; the simulator pads to the same ones (CompiledShapes.sim_fields)
        self.compiled = compiled_shapes(prefill_token_budget=ecfg.prefill_token_budget,
                                        max_decode_batch=ecfg.max_decode_batch, max_len=self.max_len,
                                        min_token_bucket=ecfg.min_token_bucket,
                                        prefix_prefill=prefix_prefill)
        self.steps = 0
        self.preemption = ecfg.preemption  # "swap": warmup compiles the swap programs
        self.swaps = HostKVStore(self.width)  # a request never holds more than one sequence's pages
        self._zero_ids: jax.Array | None = None  # the feed of a decode step that follows none
        self.store = default_store() if store is True else (store or None)
        # each stage's step programs, compiled, by (stage, kind, input shapes): called directly, so
        # a program the store held is never traced
        self._programs: dict[tuple, Callable[..., Any]] = {}
        self._programs_lock = threading.Lock()

    # ---- the programs ---------------------------------------------------------------------------

    def kinds(self) -> tuple[StepKind, ...]:
        """The step kinds this instance runs. With the prefix cache, a prompt that starts from cached
        pages runs as a mixed step (its new tokens attend over the pool), so prefill-running
        instances compile that program too."""
        P, D, M = StepKind.PREFILL, StepKind.DECODE, StepKind.MIXED
        kinds = {Role.PREFILL: (P,), Role.DECODE: (D,), Role.COLOCATED: (P, D), Role.CHUNKED: (M,)}[self.role]
        return kinds + (M,) if self.prefix_cache and M not in kinds else kinds

    def shapes(self, kind: StepKind) -> list[int]:
        return list(self.compiled.for_kind(kind))

    def pack(self, kind: StepKind, segs: Sequence[Segment], size: int):
        if kind == StepKind.PREFILL:
            return pack_prefill(segs, size, self.max_prefill_seqs, self.page_size)
        if kind == StepKind.DECODE:
            return pack_decode(segs, size, self.width)
        return pack_mixed(segs, size, self.mixed_rows, self.width, self.page_size)

    def bucket_for(self, kind: StepKind, segs: Sequence[Segment]) -> int:
        n = len(segs) if kind == StepKind.DECODE else sum(len(s.tokens) for s in segs)
        return bucket(self.shapes(kind), n)

    @property
    def lookahead(self) -> bool:
        """Decode steps feed each other on the device (:meth:`dispatch_decode`). One stage only: a
        pipelined instance already overlaps its micro-batches, and its ids would have to cross
        from the last stage's mesh to the first's."""
        return len(self.stages) == 1

    def dispatch(self, kind: StepKind, micro_batches: Sequence[Sequence[Segment]]) -> list[PendingStep]:
        """Dispatch one step (several micro-batches when pipelined); returns each micro-batch's
        results on the device, without waiting for them."""
        if kind == StepKind.DECODE and self.lookahead and len(micro_batches) == 1:
            return [self.dispatch_decode(micro_batches[0])]
        self.steps += 1
        return self._launch(kind, [(segs, self.pack(kind, segs, self.bucket_for(kind, segs))) for segs in micro_batches])

    def dispatch_decode(self, segs: Sequence[Segment], prev: PendingStep | None = None,
                        src: Sequence[int] | None = None) -> PendingStep:
        """Dispatch one decode step whose rows may take their input token from ``prev``, the ids of
        a step dispatched earlier and not yet read (row i uses ``prev[src[i]]`` when ``src[i] >= 0``,
        else its segment's token). The serving loop dispatches step k+1 this way before it reads
        step k, so the host's packing and launch overlap the device's work instead of leaving it
        idle between steps. Its ids come padded to ``max_batch`` rows."""
        if not self.lookahead:
            raise ValueError(f"{self.name}: a {len(self.stages)}-stage instance has no decode lookahead")
        self.steps += 1
        B = self.bucket_for(StepKind.DECODE, segs)
        feed = self.decode_feed(B, None if prev is None else prev.ids, src)
        return self._launch(StepKind.DECODE, [(segs, self.pack(StepKind.DECODE, segs, B))], feeds=[feed])[0]

    def decode_feed(self, size: int, prev: jax.Array | None = None,
                    src: Sequence[int] | None = None) -> tuple[jax.Array, np.ndarray]:
        """``stage_step``'s feed for a decode step of bucket ``size``: the earlier step's ids (zeros
        when it follows none) and each row's index into them (-1: the row's own token)."""
        s = np.full(size, -1, np.int32)
        if src is not None:
            s[: len(src)] = src
        if prev is None:
            if self._zero_ids is None:
                self._zero_ids = jax.device_put(np.zeros(self.max_batch, np.int32), self.stages[0].repl)
            prev = self._zero_ids
        return prev, s

    def _launch(self, kind: StepKind, host: Sequence[tuple[Sequence[Segment], tuple[Any, Any]]], warm: bool = False,
                feeds: Sequence[Any] | None = None) -> list[PendingStep]:
        """Host inputs go to the programs as numpy: jit's C++ path places them on each stage's mesh
        (replicated) far cheaper than a Python ``device_put`` per leaf (about 0.5 ms a step on an
        H100, measured). Only the activations between pipeline stages are moved explicitly.
        ``warm`` (start-up): also run every sampling and log-probability program the step can call."""
        outs = []
        last = self.stages[-1]
        with self.lock:
            for i, (segs, (batch, sb)) in enumerate(host):
                feed = feeds[i] if feeds is not None else None
                x = None
                for st in self.stages:
                    if x is not None:
                        x = jax.device_put(x, st.repl)
                    x, st.pool = self._step(st, x, batch, kind, feed)
                greedy, logits, hidden = x
                if warm:
                    for size in pick_buckets(logits.shape[0]):
                        self._run(last, "sample_rows", SAMPLE, greedy, logits, sb, np.zeros(size, np.int32))
                if np.any(sb.temperature > 0):
                    greedy = self._run(last, "sample_rows", SAMPLE, greedy, logits, sb,
                                       pack_picks(sb.temperature, logits.shape[0], greedy.shape[0]))
                outs.append(self._logprobs(kind, segs, PendingStep(greedy, len(segs)), logits, hidden, warm))
        return outs

    def _logprobs(self, kind: StepKind, segs: Sequence[Segment], out: PendingStep, logits: jax.Array,
                  hidden: jax.Array, warm: bool) -> PendingStep:
        """Dispatch the log-probability programs for the rows of ``segs`` that ask (none: nothing
        runs). Row picks are padded to a bucket (:func:`pick_buckets`: one row asking costs one
        row's log-softmax and top-k, not the batch's) and prompt rows to the step's token bucket;
        every one of these programs is compiled at start-up."""
        picks, ks = logprob_picks(segs)
        R = logits.shape[0]
        last = self.stages[-1]
        for size in pick_buckets(R) if warm else ():
            self._run(last, "row_logprobs", ROW_LOGPROBS, logits, out.ids, np.full(size, R, np.int32))
        if picks:
            size = bucket(pick_buckets(R), len(picks))
            out.row_lp = self._run(last, "row_logprobs", ROW_LOGPROBS, logits, out.ids,
                                   np.array(picks + [R] * (size - len(picks)), np.int32))
            out.row_picks, out.row_ks = picks, ks
        if kind == StepKind.DECODE:
            return out
        rows, targets, spans = prompt_rows(segs)
        if rows or warm:
            T = hidden.shape[0]
            pad = T - len(rows)
            out.prompt_lp = self._run(last, "prompt_logprobs", PROMPT_LOGPROBS, last.params, hidden,
                                      np.array(rows + [0] * pad, np.int32), np.array(targets + [0] * pad, np.int32),
                                      fixed=1, cfg=self.cfg)
            out.prompt_spans = spans
        return out

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        """Copy whole pages within the pool (every layer, every stage): the part-filled last prompt
        page that ``n`` samples of one prompt each need their own copy of. Dispatched after the step
        that wrote ``src`` and before any that writes ``dst`` (the pool is donated along), so the
        device runs them in that order."""
        width = self.max_batch
        with self.lock:
            for lo in range(0, len(src), width):
                s = np.full(width, NULL_PAGE, np.int32)
                d = np.full(width, NULL_PAGE, np.int32)
                n = min(width, len(src) - lo)
                s[:n], d[:n] = src[lo : lo + n], dst[lo : lo + n]
                for st in self.stages:
                    st.pool = self._run(st, "copy_pages", COPY_PAGES, st.pool, s, d, fixed=1)

    # ---- preemption by swapping: pages to host memory and back (distllm_jax.engine.swap) ----------

    def swap_out(self, key: str, pages: Sequence[int]) -> None:
        """Gather ``pages`` (every layer, every stage) and start copying them to the host, kept under
        ``key``; no waiting. Ordered after the steps dispatched before and before any dispatched
        later, so the caller may free and reuse the pages at once."""
        self.swaps.swap_out(self, key, pages)

    def swap_in(self, key: str, pages: Sequence[int]) -> None:
        """Write the copy under ``key`` into ``pages`` (as many as were swapped out), before any step
        dispatched later, and forget it."""
        self.swaps.swap_in(self, key, pages)

    def drop_swapped(self, key: str) -> None:
        self.swaps.drop(key)

    def swapped_bytes(self) -> int:
        return self.swaps.nbytes()

    def settle_swaps(self) -> None:
        """Pending swap-outs to host arrays, freeing their device buffers (waits for those gathers)."""
        self.swaps.settle()

    def run(self, kind: StepKind, micro_batches: Sequence[Sequence[Segment]]) -> list[HostStep]:
        """Run one step and wait for its sampled ids (and the log-probabilities asked for: the only
        device->host transfers)."""
        return [o.host() for o in self.dispatch(kind, micro_batches)]

    def step_compilers(self) -> list[Callable[[], Any]]:
        """One call per step program of the first stage (every kind and bucket) that lowers and
        compiles it, with the inputs :meth:`warmup` runs it on, so that warmup's run finds it built.
        Independent of each other and of the pools' contents: start-up runs them on several threads
        (XLA compiles, and loads from the persistent cache, without holding Python's lock). Later
        stages take the hidden states of the stage before as input and compile as warmup runs them."""
        st = self.stages[0]
        out = []
        for kind in self.kinds():
            for size in self.shapes(kind):
                batch, _ = self.pack(kind, [], size)
                feed = self.decode_feed(size) if kind == StepKind.DECODE and self.lookahead else None
                out.append(functools.partial(self._program, st, None, batch, kind, feed))
        return out

    def _step(self, st: Stage, x: jax.Array | None, batch: Any, kind: StepKind,
              feed: tuple[jax.Array, Any] | None) -> tuple[Any, KVPool]:
        """One stage's step program on these inputs (the pool donated)."""
        return self._program(st, x, batch, kind, feed)(st.params, x, batch, st.pool, feed=feed)

    def _program(self, st: Stage, x: jax.Array | None, batch: Any, kind: StepKind,
                 feed: tuple[jax.Array, Any] | None) -> Callable[..., Any]:
        static = {"kind": kind, "cfg": self.cfg, "impl": self.impl, "first": st.first, "last": st.last}
        return self._compiled(st, "stage_step", STAGE_STEP, (st.params, x, batch, st.pool), {"feed": feed}, static,
                              varying=(x, batch, feed))

    def _run(self, st: Stage, name: str, fn: Any, *args: Any, fixed: int = 0, **static: Any) -> Any:
        """``fn(*args, **static)`` as a compiled program of ``st``'s mesh; the first ``fixed`` args
        are the stage's own arrays (params, pool), the same at every call."""
        return self._compiled(st, name, fn, args, {}, static, varying=args[fixed:])(*args)

    def _compiled(self, st: Stage, name: str, fn: Any, args: tuple, kwargs: dict[str, Any],
                  static: dict[str, Any], varying: Any) -> Callable[..., Any]:
        """``fn`` (a ``jax.jit`` function) compiled for these inputs: built (or loaded from the
        store) the first time inputs of these shapes come, then called without jit's dispatch
        having to trace anything. ``varying``: the inputs whose shapes pick the program."""
        key = (name, st.lo, tuple(static.items()),
               tuple((a.shape, a.dtype) for a in jax.tree.leaves(varying)), jax.tree.structure(varying))
        prog = self._programs.get(key)
        if prog is not None:
            return prog
        prog = build_program(self.store, name, fn, args, kwargs, static, tuple(st.mesh.devices.flat))
        with self._programs_lock:
            return self._programs.setdefault(key, prog)

    def warmup(self, tick: Callable[[str], None] = lambda _: None) -> None:
        """Compile every program this instance can run (all-padding inputs touch only the null page)."""
        for kind in self.kinds():
            for size in self.shapes(kind):
                tick(f"{self.name} {kind} {size}")
                feeds = [self.decode_feed(size)] if kind == StepKind.DECODE and self.lookahead else None
                self._launch(kind, [([], self.pack(kind, [], size))], warm=True, feeds=feeds)[0].host()
        self.copy_pages([NULL_PAGE], [NULL_PAGE])
        if self.preemption == "swap":
            self.swaps.warmup(self, tick)

    def num_programs(self) -> int:
        swaps = self.swaps.num_programs(len(self.stages)) if self.preemption == "swap" else 0
        return sum(len(self.shapes(k)) for k in self.kinds()) * len(self.stages) + swaps

    # ---- for benchmarks: one stage's program, its inputs already on the device ---------------------

    def device_replay(self, kind: StepKind, segs: Sequence[Segment]) -> Callable[[int], None]:
        """``run(n)`` runs this step's program ``n`` times back to back with its inputs already on the
        device and waits for the last: the device's time for the step, without the host's packing,
        copies and sync (a decode step fed from the step before, as serving's lookahead runs it).
        One-stage instances; the pool is donated and replaced at each run, as serving does."""
        if len(self.stages) != 1:
            raise ValueError(f"{self.name}: device replay times one stage, this instance has {len(self.stages)}")
        (st,) = self.stages
        size = self.bucket_for(kind, segs)
        batch = jax.device_put(self.pack(kind, segs, size)[0], st.repl)
        ahead = kind == StepKind.DECODE and self.lookahead
        src = jax.device_put(self.decode_feed(size, src=range(size))[1], st.repl)

        def run(n: int) -> None:
            x = None
            with self.lock:
                for _ in range(n):
                    feed = (self.decode_feed(size)[0] if x is None else x[0], src) if ahead else None
                    x, st.pool = self._step(st, None, batch, kind, feed)
            jax.block_until_ready(x)

        return run

    def compiled_text(self, kind: StepKind, segs: Sequence[Segment]) -> str:
        """The optimised HLO of this step's program (one stage), for counting what it launches."""
        (st,) = self.stages
        size = self.bucket_for(kind, segs)
        batch = self.pack(kind, segs, size)[0]
        feed = self.decode_feed(size) if kind == StepKind.DECODE and self.lookahead else None
        return STAGE_STEP.lower(st.params, None, batch, st.pool, kind=kind, cfg=self.cfg, impl=self.impl,
                                first=True, last=True, feed=feed).compile().as_text()

    def fill_pools(self, fill: Callable[[jax.Array, int], jax.Array]) -> None:
        """Replace every layer array of the pools by ``fill(array, index)`` (which may donate it), one
        array at a time, so a benchmark's random K/V never needs a second copy of the pool."""
        with self.lock:
            for st in self.stages:
                k, v = list(st.pool.k), list(st.pool.v)
                st.pool = None
                for arrs, off in ((k, 0), (v, len(k))):
                    for i, a in enumerate(arrs):
                        arrs[i] = fill(a, off + i)
                st.pool = KVPool(tuple(k), tuple(v))
        jax.block_until_ready([st.pool for st in self.stages])

    # ---- health ---------------------------------------------------------------------------------

    def pools_ok(self) -> bool:
        """False when a failed step left a pool deleted or poisoned."""
        try:
            for st in self.stages:
                if any(a.is_deleted() for a in jax.tree.leaves(st.pool)):
                    return False
                jax.block_until_ready(st.pool)
            return True
        except Exception:  # noqa: BLE001 - any runtime error means the buffers are unusable
            return False

    def reset_pools(self) -> None:
        """Fresh zero pools (after a failure that lost them); the caller fails every request here."""
        with self.lock:
            for st in self.stages:
                st.pool = create_pool(_stage_cfg(self.cfg, st.hi - st.lo), self.num_pages, self.page_size,
                                      self.dtype, st.pool_sharding)

    def host_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return read_host_pages(self, pages)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name, "role": self.role, "tp": self.spec.tp, "pp": self.spec.pp,
            "devices": [str(d) for d in self.devices], "num_pages": self.num_pages,
            "page_size": self.page_size,
        }


def _stage_cfg(cfg, num_layers: int):
    return dataclasses.replace(cfg, num_layers=num_layers)
