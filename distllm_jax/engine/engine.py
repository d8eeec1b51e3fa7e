"""The engine API that the server and bench drive: build instances, compile, submit, stream, cancel.

    engine = Engine(CheckpointSource("ckpt/opt-1.3b"), EngineConfig(mode="disaggregated"))
    for out in engine.submit(prompt_ids, SamplingParams(max_tokens=32)):
        ...
    async for out in engine.generate(prompt_ids, params):   # from asyncio
        ...

Construction places each instance on its own devices (prefill instances first, then decode), loads its
params, and compiles every program it can run (with a progress bar), so serving compiles nothing.

A request's states (:class:`~distllm_jax.scheduling.RequestState`), each change made under the
controller's lock by the scheduler named beside it::

    submit ──> WAITING ──(PrefillScheduler / ColocatedScheduler / ChunkedScheduler takes it)──> PREFILLING
    PREFILLING ──(disaggregated: the prefill step ends)──> HELD     (KV stays in prefill memory)
    HELD ──(a DecodeScheduler with room chooses to pull it)──> MIGRATING ──(pages in place)──> RUNNING
    PREFILLING ──(colocated / chunked: the last prompt token is computed)──> RUNNING
    RUNNING ──(on-demand admission out of pages; the simulator only)──> SWAPPED ──(room)──> RUNNING
    any state ──(a stop, max_tokens, cancel, deadline, a failure)──> DONE   (its pages are freed)

A lost prefill instance sends its PREFILLING and HELD requests back to WAITING (their streamed tokens
are kept); a lost decode instance ends its MIGRATING and RUNNING ones with an error.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import itertools
import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import jax
import numpy as np

from distllm_jax.engine import compile_counter
from distllm_jax.engine.colocated import ChunkedWorker, ColocatedWorker
from distllm_jax.engine.config import EngineConfig
from distllm_jax.engine.controller import Controller
from distllm_jax.engine.decode import DecodeWorker
from distllm_jax.engine.executable_store import ExecutableStore, default_store
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.instance_api import InstanceAPI
from distllm_jax.engine.params_source import CheckpointSource, ParamSource
from distllm_jax.engine.prefill import PrefillWorker
from distllm_jax.engine.request import Request, RequestOutput, RequestStream
from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import StopChecker
from distllm_jax.engine.transfer import LocalKVPuller, KVPuller
from distllm_jax.engine.worker import Worker
from distllm_jax.kv_cache import pages_for
from distllm_jax.models.attention import REFERENCE, AttentionImpl
from distllm_jax.parallel import split_devices
from distllm_jax.scheduling import KVPolicy, Preemption, Role
from distllm_jax.scheduling.plans import StepRecord
from distllm_jax.scheduling.prefix_cache import HashChain
from distllm_jax.scheduling.routing import PrefillRouter, PrefillRouting


def attention_impl(name: str) -> AttentionImpl:
    """``auto``: the Pallas kernels on a GPU, the plain-jnp reference elsewhere (the fastest correct
    path on a CPU, where Pallas only interprets); ``pallas`` forces the kernels (interpreted on a CPU)."""
    if name == "auto":
        name = "pallas" if jax.default_backend() == "gpu" else "reference"
    if name == "reference":
        return REFERENCE
    if name == "pallas":
        from distllm_jax.models.pallas_attention import pallas_attention

        return pallas_attention()
    raise ValueError(f"unknown attention implementation {name!r} (known: auto, pallas, reference)")


def make_puller(kind: str, max_pages: int) -> KVPuller:
    if kind == "transfer-server":
        from distllm_jax.engine.transfer_server import TransferServerPuller

        return TransferServerPuller(max_pages)
    return LocalKVPuller(max_pages)


def make_worker(ctrl: Controller, inst: InstanceAPI, cfg: EngineConfig, puller: KVPuller | None,
                decoders: list[DecodeWorker]) -> Worker:
    """The worker of one instance, by its role, made here for the engine's start and for an instance
    that replaces a lost one (cluster mode) alike, so a replacement is wired as the original was. A
    prefill worker offers each finished batch to ``decoders`` (the engine's shared list of decode
    workers), and a decode worker balances its pulls across them; the caller puts a new decode
    worker into ``decoders``. The decode lookahead is switched here, and only here: on for the
    workers that run plain decode steps, when the instance can chain them and the config asks."""
    w: Worker
    policy = KVPolicy.of(cfg.kv_admission, cfg.preemption, cfg.kv_watermark)
    if inst.role is Role.PREFILL:
        w = PrefillWorker(ctrl, inst, cfg.prefill_token_budget, decoders)
    elif inst.role is Role.DECODE:
        if puller is None:
            raise ValueError(f"{inst.name}: a decode instance needs a KV puller")
        w = DecodeWorker(ctrl, inst, puller, decoders, cfg.check_transfers, policy)
    elif inst.role is Role.COLOCATED:
        w = ColocatedWorker(ctrl, inst, cfg.prefill_token_budget, policy)
    else:
        w = ChunkedWorker(ctrl, inst, cfg.prefill_token_budget, policy)
    w.lookahead = inst.role in (Role.DECODE, Role.COLOCATED) and inst.lookahead and cfg.async_decode
    return w


class EngineClosed(RuntimeError):
    pass


class Engine:
    def __init__(
        self,
        source: ParamSource | str | Path,
        config: EngineConfig | None = None,
        *,
        devices: Sequence[jax.Device] | None = None,
        tokenizer: Any = None,
        puller: KVPuller | None = None,
        start: bool = True,
    ):
        compile_counter.install()
        self.config = cfg = config or EngineConfig()
        self.source = CheckpointSource(source, cfg.dtype) if isinstance(source, (str, Path)) else source
        self.model = self.source.cfg
        self.tokenizer = tokenizer
        self.max_len = cfg.seq_len(self.model)
        # cached pages are this model's KV in this dtype only
        self._prefix_salt = json.dumps([dataclasses.asdict(self.model), self.source.dtype], sort_keys=True, default=str)
        self.ctrl = Controller()
        # where this process's instances keep their compiled programs (cluster mode: each actor its own)
        self.store: ExecutableStore | None = None
        self.instances = self._build_instances(devices)
        routing = PrefillRouting(cfg.prefill_routing if cfg.prefill_routing != "auto"
                                 else "prefix" if cfg.prefix_cache else "shared")
        if sum(i.role is not Role.DECODE for i in self.instances) > 1 and routing is not PrefillRouting.SHARED:
            self.ctrl.router = PrefillRouter(routing, self.instances)
        self.workers: list[Worker] = []
        self.puller: KVPuller | None = None
        self.decoders: list[DecodeWorker] = []  # shared by every disaggregated worker
        if cfg.mode == "disaggregated":
            self.puller = puller or self._make_puller()
        for inst in self.instances:
            w = make_worker(self.ctrl, inst, cfg, self.puller, self.decoders)
            if isinstance(w, DecodeWorker):
                self.decoders.append(w)
            self.workers.append(w)
        self._rng = np.random.default_rng(cfg.seed)
        self._ids = itertools.count()
        self._closed = False
        self.warmup_seconds = 0.0
        self.warmup_log: dict[str, float] = {}  # seconds each start-up program took (compiled or loaded, and run)
        self.warmup()
        if start:
            for w in self.workers:
                w.start()

    # ---- start-up -------------------------------------------------------------------------------

    def _build_instances(self, devices: Sequence[jax.Device] | None) -> list[Any]:
        """Place each instance on its own devices of this process, in config order (prefill first).
        Cluster mode (``distllm_jax.cluster``) places them in their own processes instead."""
        cfg = self.config
        devices = list(devices if devices is not None else jax.devices())
        if cfg.num_devices > len(devices):
            raise ValueError(f"{cfg.mode} layout needs {cfg.num_devices} devices, {len(devices)} available")
        impl = attention_impl(cfg.attention)
        self.store = default_store()
        layout = cfg.instances()
        out: list[Instance] = []
        counters: dict[str, int] = {}
        for (role, spec), devs in zip(layout, split_devices([s.num_devices for _, s in layout], devices)):
            i = counters[role] = counters.get(role, -1) + 1
            out.append(Instance(f"{role}{i}", role, spec, devs, self.source, cfg, impl, store=self.store))
        return out

    def _make_puller(self) -> KVPuller:
        return make_puller(self.config.kv_transfer, pages_for(self.max_len, self.config.page_size))

    def _transfer_pairs(self) -> list[tuple[Instance, Instance]]:
        p = [i for i in self.instances if i.role is Role.PREFILL]
        d = [i for i in self.instances if i.role is Role.DECODE]
        return [(a, b) for a in p for b in d]

    def warmup(self) -> None:
        """Compile every program once, before any request arrives."""
        from tqdm.auto import tqdm

        t0 = time.perf_counter()
        total = sum(i.num_programs() for i in self.instances)
        total += len(self._transfer_pairs()) * (len(self.puller.buckets) if self.puller else 0)
        bar = tqdm(total=total, desc="compiling", unit="program", disable=not self.config.progress)
        last = [t0, ""]

        def tick(what: str) -> None:
            now = time.perf_counter()
            if last[1]:
                self.warmup_log[last[1]] = now - last[0]
            last[:] = [now, what]
            bar.set_postfix_str(what, refresh=False)
            bar.update()

        self._precompile(tick)
        for inst in self.instances:
            inst.warmup(tick)
        for src, dst in self._transfer_pairs():
            self.puller.warmup(src, dst, tick)  # type: ignore[union-attr]
        tick("")
        bar.close()
        self.warmup_seconds = time.perf_counter() - t0

    def _precompile(self, tick: Callable[[str], None]) -> None:
        """Build the step programs, the big ones (each the whole model), on several threads before
        warmup runs every program once: compiled one after another, or each loaded from the
        persistent cache, they are most of a start."""
        threads = self.config.compile_threads or (1 if jax.default_backend() == "cpu" else min(8, os.cpu_count() or 1))
        jobs = [job for inst in self.instances for job in inst.step_compilers()]
        if threads < 2 or len(jobs) < 2:
            return
        tick("step programs, side by side")
        with concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="distllm-compile") as pool:
            for f in [pool.submit(job) for job in jobs]:
                f.result()

    # ---- requests -------------------------------------------------------------------------------

    def _tokenize(self, prompt: str | Sequence[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; pass token ids or give the engine one")
            return list(self.tokenizer.encode(prompt).ids)
        ids = [int(t) for t in prompt]
        bad = [t for t in ids if not 0 <= t < self.model.vocab_size]
        if bad:
            raise ValueError(f"token ids out of range [0, {self.model.vocab_size}): {bad[:5]}")
        return ids

    def _detokenize(self) -> Callable[[Sequence[int]], str] | None:
        if self.tokenizer is None:
            return None
        return lambda ids: self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def _check_fits(self, prompt: list[int], max_cached: int, n: int = 1) -> None:
        if not prompt:
            raise ValueError("the prompt is empty")
        if len(prompt) >= self.max_len:
            raise ValueError(f"prompt of {len(prompt)} tokens; the limit is {self.max_len - 1} (max_seq_len {self.max_len})")
        rows = min(self.config.max_prefill_seqs, self.config.max_decode_batch)
        if n > rows:
            raise ValueError(f"n = {n} samples; this engine's batches take at most {rows} (max_prefill_seqs, "
                             "max_decode_batch)")
        on_demand = self.config.kv_admission == "on-demand"
        for inst in self.instances:
            need = len(prompt) if inst.role is Role.PREFILL or on_demand else max_cached
            pages = pages_for(need, inst.page_size)
            if inst.role is not Role.DECODE:  # n samples share the prompt's full pages here
                pages += (n - 1) * (pages - len(prompt) // inst.page_size)
            if on_demand and inst.role is not Role.PREFILL:  # and one sample grows alone to its whole length
                pages = max(pages, pages_for(max_cached, inst.page_size))
            if pages > inst.alloc.capacity:
                raise ValueError(f"request needs {pages} KV pages on {inst.name}, which has {inst.alloc.capacity}")

    def submit(
        self,
        prompt: str | Sequence[int],
        params: SamplingParams | None = None,
        *,
        request_id: str | None = None,
        timeout: float | None = None,
        loop: Any = None,
    ) -> RequestStream:
        """Queue a request; returns its stream at once. ``timeout`` (seconds) ends it with
        finish reason ``deadline`` if it is not done by then. Bad input raises ``ValueError``.
        ``params.n`` samples share the one stream (each event says its ``index``) and one prefill."""
        if self._closed:
            raise EngineClosed("the engine is shutting down")
        params = params or SamplingParams()
        ids = self._tokenize(prompt)
        rid = request_id or f"req-{next(self._ids)}-{uuid.uuid4().hex[:8]}"
        seed = int(self._rng.integers(0, 2**32)) if params.seed is None else params.seed
        stream = RequestStream(rid, loop, n=params.n)
        checker = StopChecker(params, self.model.eos_token_ids, self._detokenize())
        deadline = None if timeout is None else time.perf_counter() + timeout
        req = Request(rid, ids, params, checker, seed, stream, self.max_len, deadline)
        if self.config.prefix_cache and params.prompt_logprobs is None:
            req.hash_chain = HashChain(self.config.page_size, self._prefix_salt)
        self._check_fits(ids, req.max_cached, params.n)
        for i in range(1, params.n):
            req.fork(i)
        with self.ctrl.lock:
            if any(q.rid in self.ctrl.requests for q in req.group):
                raise ValueError(f"request id {rid!r} is already in use")
            self.ctrl.admit(req)
        return stream

    async def generate(
        self, prompt: str | Sequence[int], params: SamplingParams | None = None, **kw: Any
    ) -> AsyncIterator[RequestOutput]:
        """Async stream of a request's events; leaving the loop early cancels the request."""
        import asyncio

        stream = self.submit(prompt, params, loop=asyncio.get_running_loop(), **kw)
        done = False
        try:
            async for out in stream:
                done = out.finished is not None
                yield out
        finally:
            if not done:
                self.cancel(stream.request_id)

    def generate_all(self, prompts: Sequence[str | Sequence[int]], params: SamplingParams | Sequence[SamplingParams] | None = None) -> list[RequestOutput]:
        """Offline convenience: submit all, wait for all; outputs in prompt order."""
        plist = params if isinstance(params, (list, tuple)) else [params] * len(prompts)
        streams = [self.submit(p, sp) for p, sp in zip(prompts, plist)]
        return [s.result() for s in streams]

    def cancel(self, request_id: str) -> bool:
        """End a request with finish reason ``cancelled``; its pages are freed. False if unknown."""
        with self.ctrl.lock:
            return self.ctrl.cancel(request_id)

    # ---- state ----------------------------------------------------------------------------------

    def cluster_info(self) -> dict[str, Any] | None:
        """The cluster's layout (actors, nodes, the KV path in use) in cluster mode; None here, where
        every instance runs in this process."""
        return None

    def stats(self) -> dict[str, Any]:
        with self.ctrl.lock:
            per = []
            for inst, w in zip(self.instances, self.workers):
                kv = w.sched.kv
                per.append({
                    **inst.describe(),
                    "pages_used": inst.alloc.num_used, "pages_free": inst.alloc.num_free,
                    # of those used, pages taken ahead of the KV written into them (the whole length, with
                    # reserve admission; at most the page of the next token, on demand)
                    "pages_reserved": inst.alloc.num_used - sum(
                        min(pages_for(r.num_computed, inst.page_size), len(inst.alloc.table(r.rid)))
                        for r in self.ctrl.holding(inst)),
                    "running": len(w.running), "steps": inst.steps,
                    "kv_admission": kv.policy.admission.value,
                    "preemptions": {k.value: kv.preemptions[k] for k in Preemption},
                    "swapped": len(kv.swapped), "pages_grown": kv.grown,
                    "prefix_cache": inst.alloc.prefix_cache, "prompt_tokens": kv.prompt_tokens,
                    "prefix_hit_tokens": kv.cached_tokens, "pages_cached": inst.alloc.num_cached,
                    "prefix_evictions": inst.alloc.evictions,
                })
            c = self.ctrl
            routing = None if c.router is None else {
                "policy": c.router.policy.value, "decisions": dict(c.router.decisions),
                "cache_routed": c.router.cache_routed}
            return {
                "routing": routing,
                "mode": self.config.mode,
                "attention": self.instances[0].impl.name,
                "waiting": len(c.waiting),
                "held_in_prefill": len(c.held),
                "active": len(c.requests),
                "finished": dict(c.finished),
                "migrations": c.migrations,
                "migration_seconds": c.migration_seconds,
                "migration_path": self.puller.kind if self.puller else None,
                "requeued": c.requeued,
                "lost_instances": [i.name for i in self.instances if i in c.lost],
                "compilations": compile_counter.compilations(),
                "compile_cache_hits": compile_counter.cache_hits(),
                "warmup_seconds": self.warmup_seconds,
                # this process's executable store: programs loaded whole, built, stored (None: no store here)
                "executable_store": None if self.store is None else {
                    "dir": str(self.store.root), "loaded": self.store.stats.loaded, "built": self.store.stats.built,
                    "saved": self.store.stats.saved, "errors": len(self.store.stats.errors)},
                "instances": per,
                "recent_errors": [e.splitlines()[0] for e in c.errors],
            }

    def step_log(self, since: float = 0.0) -> list[StepRecord]:
        """The recent steps (at most 65,536) that ended after ``since`` (``time.perf_counter()``):
        what each instance ran, when, and over which shapes."""
        return [r for r in list(self.ctrl.step_log) if r.end > since]

    def reset_prefix_cache(self) -> int:
        """Forget every cached page that no request holds, on every instance (vLLM's
        ``reset_prefix_cache``): later prompts start cold, as after a restart, without recompiling.
        Returns the pages let go of."""
        with self.ctrl.lock:
            return sum(inst.alloc.clear_cache() for inst in self.instances)

    def idle(self) -> bool:
        with self.ctrl.lock:
            return not self.ctrl.requests

    def wait_idle(self, timeout: float | None = None) -> bool:
        end = None if timeout is None else time.perf_counter() + timeout
        with self.ctrl.lock:
            while self.ctrl.requests:
                left = None if end is None else end - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                self.ctrl.lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    def assert_no_leaks(self) -> None:
        """Every page of every instance is free (call when idle)."""
        with self.ctrl.lock:
            for inst in self.instances:
                try:
                    inst.alloc.assert_no_leaks()
                except AssertionError as e:
                    raise AssertionError(f"{inst.name}: {e}") from None

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop taking requests; with ``drain`` let running ones finish, otherwise cancel them."""
        self._closed = True
        if drain:
            self.wait_idle(timeout)
        with self.ctrl.lock:
            for rid in list(self.ctrl.requests):
                self.ctrl.cancel(rid)
        if not drain or timeout is not None:
            self.wait_idle(5.0)
        for w in self.workers:
            w.stop()
        for w in self.workers:
            if w.thread.is_alive():
                w.join()

    def rebuild(self) -> "Engine":
        """A fresh engine of the same kind, source and config (a failed re-plan restores this)."""
        return type(self)(self.source, self.config, tokenizer=self.tokenizer)

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown(drain=False)
