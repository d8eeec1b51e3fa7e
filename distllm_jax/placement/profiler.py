"""``distllm profile``: time the engine's own prefill and decode programs on the present devices over a
grid of batch shapes and tensor degrees, fit the latency model, and write a profile JSON."""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Sequence

import jax
import numpy as np

from distllm_jax.models.params import param_count
from distllm_jax.placement.latency import Fit, Profile, fit_decode_split, fit_prefill
from distllm_jax.shapes import StepKind


def median_ms(fn, repeats: int) -> float:
    """Median milliseconds of ``fn()`` over ``repeats`` runs after one warm-up run; ``fn`` waits for
    its own results (as :func:`run_decode_steps` does by reading the ids back)."""
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(ts)


def run_decode_steps(inst: Any, segs: Sequence[Any], steps: int) -> None:
    """``steps`` decode steps as the serving loop runs them: with lookahead (one-stage instances),
    step k+1 is dispatched before step k's ids are read, so host packing overlaps the device;
    otherwise each step is packed, run and read in turn."""
    if not inst.lookahead:
        for _ in range(steps):
            inst.run(StepKind.DECODE, [segs])
        return
    prev, src = None, list(range(len(segs)))
    for _ in range(steps):
        out = inst.dispatch_decode(segs, prev, None if prev is None else src)
        if prev is not None:
            prev.host()
        prev = out
    prev.host()


DECODE_STEPS = 8  # decode steps timed together (the lookahead needs a run of them)


def decode_step_ms(inst: Any, segs: Sequence[Any], repeats: int, steps: int = DECODE_STEPS) -> float:
    """One decode step of :func:`run_decode_steps`, median over ``repeats`` runs of ``steps``."""
    return median_ms(lambda: run_decode_steps(inst, segs, steps), repeats) / steps


def _device_memory() -> float:
    stats = jax.devices()[0].memory_stats() or {}
    if "bytes_limit" in stats:
        return float(stats["bytes_limit"])
    import psutil

    return psutil.virtual_memory().total / max(1, len(jax.devices()))


class Profiler:
    """One tensor degree's profiling instance over a grid of batch shapes, kept so the grid can be
    timed again: on a shared host the speed drifts by several percent over minutes, and a check of
    a simulator against serving wants the programs timed around each run, not once before all.

    The engine's programs are run as the engine runs them (host packing and the token-id sync
    included, decode steps overlapped as the serving loop overlaps them, so the fit holds what
    serving pays per step). ``max_prefill_tokens``: leave out prefill batches longer than this (the
    token budget the engine will serve with; a line fitted over batches it never runs is bent away
    from those it does). ``max_seq_len``: the serving engine's (default: just what the grid needs).
    Its page-table width is part of every decode program, and the CPU's reference attention reads
    the whole table: a profile taken with 7 pages a row ran 2 % faster at batch 8 than the engine
    serving with 8. ``max_decode_pages``: leave out decode points whose KV takes more pages than this
    (the serving pool's size: the engine never runs a batch its pool cannot hold, and a 13B model's
    profile over batch 64 at context 2048 would need a pool of 100 GB beside the engine's)."""

    def __init__(self, source: Any, tp: int, prompt_lens: Sequence[int], prompts_per_batch: Sequence[int],
                 batches: Sequence[int], contexts: Sequence[int], page_size: int = 16,
                 max_prefill_tokens: int | None = None, max_seq_len: int | None = None,
                 max_decode_pages: int | None = None):
        from distllm_jax.engine import EngineConfig, InstanceSpec
        from distllm_jax.engine.engine import attention_impl
        from distllm_jax.engine.instance import Instance
        from distllm_jax.kv_cache import pages_for

        need = max(max(contexts) + 2, max(prompt_lens) + 1)
        if max_seq_len is not None and max_seq_len < need:
            raise ValueError(f"max_seq_len {max_seq_len} is shorter than the grid's longest sequence ({need} tokens)")
        max_len = min(source.cfg.max_position_embeddings, max_seq_len or need)
        grid = [(L, k) for L in prompt_lens for k in prompts_per_batch
                if max_prefill_tokens is None or L * k <= max_prefill_tokens or k == 1]
        decode = [(c, b) for c in contexts for b in batches
                  if max_decode_pages is None or b * pages_for(c + 2, page_size) <= max_decode_pages]
        if not decode:
            raise ValueError(f"no decode point of the grid fits in {max_decode_pages} pages")
        pages = max(max(b * pages_for(c + 2, page_size) for c, b in decode),
                    sum(pages_for(L, page_size) for L in prompt_lens) * max(prompts_per_batch)) + 2
        ecfg = EngineConfig(page_size=page_size, num_pages=pages, max_seq_len=max_len,
                            prefill_token_budget=max(L * k for L, k in grid), max_prefill_seqs=max(prompts_per_batch),
                            max_decode_batch=max(b for _, b in decode), progress=False, dtype=source.dtype)
        self.tp = tp
        self.inst = Instance(f"profile-tp{tp}", "colocated", InstanceSpec(tp, num_pages=pages), jax.devices()[:tp],
                             source, ecfg, attention_impl("auto"))
        self.points = [("p", L, k) for L, k in grid] + [("d", c, b) for c, b in decode]
        self._warm = False
        self._rng = np.random.default_rng(0)
        self._vocab = source.cfg.vocab_size

    def _tokens(self, n: int) -> list[int]:
        """Random token ids, as real prompts are: a matrix product over identical rows (every token
        the same) draws less power and runs several percent faster on a GPU than serving does."""
        return [int(t) for t in self._rng.integers(3, self._vocab, n)]

    def _time(self, point: tuple) -> float:
        from distllm_jax.engine import SamplingParams
        from distllm_jax.engine.programs import Segment

        kind, x, n, inst, sp = *point, self.inst, SamplingParams()
        if kind == "p":
            segs = [Segment(self._tokens(x), 0, inst.alloc.ensure(("p", i), x), sp, 0) for i in range(n)]
            t0 = time.perf_counter()
            inst.run(StepKind.PREFILL, [segs])
            ms = 1e3 * (time.perf_counter() - t0)
        else:
            segs = [Segment(self._tokens(1), x, inst.alloc.ensure(("p", i), x + 1), sp, 0) for i in range(n)]
            t0 = time.perf_counter()
            run_decode_steps(inst, segs, DECODE_STEPS)
            ms = 1e3 * (time.perf_counter() - t0) / DECODE_STEPS
        for i in range(n):
            inst.alloc.free(("p", i))
        return ms

    def measure(self, rounds: int) -> dict[tuple, list[float]]:
        """ms per grid point, ``rounds`` times each. Rounds go over the whole grid, so a slow spell of
        the host spreads over every point instead of biasing the few measured during it; the first
        call warms (compiles) with a round it drops."""
        if not self._warm:
            for pt in self.points:
                self._time(pt)
            self._warm = True
        times: dict[tuple, list[float]] = {pt: [] for pt in self.points}
        for _ in range(rounds):
            for pt in self.points:
                times[pt].append(self._time(pt))
        return times

    def fit(self, times: dict[tuple, list[float]], log=None) -> tuple[Fit, dict]:
        """The latency model fitted to each point's median; with the fit errors and the samples."""
        med = {pt: statistics.median(ts) for pt, ts in times.items()}
        pre = [([x] * n, ms) for (kind, x, n), ms in med.items() if kind == "p"]
        dec = [(n, n * (x + 1), ms) for (kind, x, n), ms in med.items() if kind == "d"]
        p_fit, p_err = fit_prefill(pre)
        d_fit, d_err = fit_decode_split(dec)
        if log is not None:
            log(f"tp{self.tp}: prefill fit {p_fit} (mean |err| {100 * p_err:.1f}%), decode fit {d_fit.decode_small}, "
                f"{d_fit.decode_large} from batch {d_fit.threshold} (mean |err| {100 * d_err:.1f}%)")
        return dataclasses.replace(d_fit, prefill=p_fit), {
            "prefill_mean_rel_err": p_err, "decode_mean_rel_err": d_err, "prefill_samples": pre, "decode_samples": dec}


def make_profile(source: Any, fits: dict[int, Fit], name: str) -> Profile:
    """A profile of ``fits`` measured on the present devices for ``source``'s model."""
    cfg = source.cfg
    item = jax.numpy.dtype(source.dtype).itemsize
    return Profile(
        model=name, device=f"{jax.devices()[0].device_kind} ({jax.default_backend()}, jax {jax.__version__})",
        fits=fits, params_bytes=param_count(cfg) * item,
        kv_bytes_per_token=2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * item,
        gpu_memory_bytes=_device_memory(), num_layers=cfg.num_layers,
        source=f"distllm profile on {jax.devices()[0].device_kind}",
    )


def profile(source: Any, tps: Sequence[int], prompt_lens: Sequence[int], prompts_per_batch: Sequence[int],
            batches: Sequence[int], contexts: Sequence[int], page_size: int = 16, repeats: int = 3,
            name: str = "model", log=print, max_prefill_tokens: int | None = None,
            max_seq_len: int | None = None) -> tuple[Profile, dict]:
    """Time the grid ``repeats`` times at each tensor degree (see :class:`Profiler`), fit the model."""
    fits: dict[int, Fit] = {}
    errors: dict[int, dict] = {}
    for tp in tps:
        prof = Profiler(source, tp, prompt_lens, prompts_per_batch, batches, contexts, page_size,
                        max_prefill_tokens, max_seq_len)
        fits[tp], errors[tp] = prof.fit(prof.measure(repeats), log)
        prof = None  # free this degree's instance before the next one loads
    return make_profile(source, fits, name), errors


def host_contention(step_a, step_b, seconds: float = 1.0, rounds: int = 3) -> tuple[float, float]:
    """How much two instances slow each other when they share one host's cores (virtual CPU devices
    of one process: the XLA CPU threads and the GIL are shared; disjoint GPUs give about 1.0).

    ``step_a`` and ``step_b`` each run one step of an instance and wait for it. Each is timed alone,
    then both loop together in two threads for ``seconds``; returns each one's slowdown (>= 1), the
    median over ``rounds`` such measurements (one round moved by a tenth between calls on a shared
    host). They need not share alike (a long prefill program holds the cores longer than a short
    decode step).
    :class:`~distllm_jax.placement.simulator.SimConfig` takes them as ``host_contention`` (prefill)
    and ``host_contention_decode``.
    """
    import threading

    def rate(fn, stop: threading.Event, out: list) -> None:
        n, t0 = 0, time.perf_counter()
        while not stop.is_set():
            fn()
            n += 1
        out.append(n / (time.perf_counter() - t0))

    def once() -> tuple[float, float]:
        alone = []
        for fn in (step_a, step_b):
            stop, out = threading.Event(), []
            threading.Timer(seconds / 2, stop.set).start()
            rate(fn, stop, out)
            alone.append(out[0])
        stop, outs = threading.Event(), [[], []]
        threads = [threading.Thread(target=rate, args=(fn, stop, o)) for fn, o in zip((step_a, step_b), outs)]
        for t in threads:
            t.start()
        time.sleep(seconds)
        stop.set()
        for t in threads:
            t.join()
        a, b = (max(1.0, x / o[0]) for x, o in zip(alone, outs))
        return a, b

    for fn in (step_a, step_b):
        fn()  # warm
    got = [once() for _ in range(rounds)]
    return statistics.median(a for a, _ in got), statistics.median(b for _, b in got)
