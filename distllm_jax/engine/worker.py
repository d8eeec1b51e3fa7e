"""One thread per instance, and the decode loop every decoding instance shares.

A worker picks its next step under the controller's lock, runs it without the lock (jax releases the
GIL while devices compute, so instances proceed in parallel), and reports the sampled tokens back
under the lock. A failed step fails the requests in it; if the failure also lost the instance's pool,
every request with pages there fails and the pool is rebuilt, and the worker serves on. If the step
found the instance's process gone (:class:`InstanceLost`), the controller settles its requests and
this worker stops: a replacement instance comes with a new worker.
"""

from __future__ import annotations

import abc
import threading
import time
from typing import Callable, NamedTuple, Sequence, TypeVar, cast

from distllm_jax.engine.controller import Controller, InstanceLost
from distllm_jax.engine.logprobs import TokenLogprob
from distllm_jax.scheduling.plans import StepRecord
from distllm_jax.engine.instance_api import InstanceAPI, LookaheadInstance
from distllm_jax.engine.programs import HostStep, PendingStep, Segment
from distllm_jax.engine.request import Request, RequestState
from distllm_jax.engine.stopping import FinishReason
from distllm_jax.scheduling import Scheduler
from distllm_jax.shapes import StepKind

IDLE_WAIT_S = 0.02  # an idle worker wakes this often to enforce deadlines
T = TypeVar("T")


class InFlight(NamedTuple):
    """A decode step dispatched and not yet read: its requests (row order), its results on the
    device, when it was dispatched and its segments (for the step log)."""

    batch: list[Request]
    out: PendingStep
    dispatched: float
    segs: list[Segment]


class SampledRow(NamedTuple):
    """A logits row's sampled token, with its log-probability when its request asks."""

    token: int
    logprob: TokenLogprob | None


class StepRows(NamedTuple):
    """A step's results in segment order: ``rows[i]`` are segment i's sampled rows (its
    ``samples`` of them) and ``prompt_logprobs[i]`` its prompt tokens' log-probabilities."""

    rows: list[list[SampledRow]]
    prompt_logprobs: list[list[TokenLogprob]]

    @classmethod
    def read(cls, outs: Sequence[HostStep], groups: Sequence[Sequence[Segment]]) -> "StepRows":
        rows: list[list[SampledRow]] = []
        prompt: list[list[TokenLogprob]] = []
        for o, g in zip(outs, groups):
            j = 0
            for i, seg in enumerate(g):
                rows.append([SampledRow(int(o.ids[j + k]), o.logprobs[j + k]) for k in range(seg.samples)])
                j += seg.samples
                prompt.append(o.prompt_logprobs[i])
        return cls(rows, prompt)


def split_micro(items: Sequence, weights: Sequence[int], parts: int) -> list[list]:
    """Contiguous groups with about equal weight (tokens), at most ``parts`` of them, none empty."""
    if parts <= 1 or len(items) <= 1:
        return [list(items)] if items else []
    total = sum(weights)
    out: list[list] = [[]]
    acc = 0
    for item, w in zip(items, weights):
        if out[-1] and acc >= total * len(out) / parts and len(out) < parts:
            out.append([])
        out[-1].append(item)
        acc += w
    return out


def still_here(r: Request, inst: InstanceAPI, state: RequestState) -> bool:
    """``r`` is still in ``state`` with pages on ``inst``: no cancellation, failure or lost instance
    took it elsewhere while a step ran without the lock."""
    return r.state is state and inst in r.holders


class Worker(abc.ABC):
    def __init__(self, ctrl: Controller, inst: InstanceAPI, sched: Scheduler):
        """``sched``: the instance's policy (:mod:`distllm_jax.scheduling`), which owns its queues'
        share, its batch and its page reservations; this worker executes its plans."""
        self.ctrl = ctrl
        self.inst = inst
        self.sched = sched
        # decode steps overlap the host (see _decode_step_ahead); engine.make_worker switches it on
        self.lookahead = False
        self.inflight: InFlight | None = None  # the decode step dispatched and not yet read
        self._last_read = 0.0  # when the last decode step's ids were read
        self._settle = False  # swap-outs dispatched whose host copies are not settled yet
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"distllm-{inst.name}", daemon=True)

    # ---- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.ctrl.lock:
            self.ctrl.lock.notify_all()

    def join(self, timeout: float | None = None) -> None:
        self.thread.join(timeout)

    @property
    def lost(self) -> bool:
        """The instance died; read under the controller's lock to act on it."""
        return self.inst in self.ctrl.lost

    def _loop(self) -> None:
        while not self._stop.is_set() and not self.lost:
            try:
                busy = self.step()
            except Exception as e:  # noqa: BLE001 - a scheduling bug must not kill the instance
                with self.ctrl.lock:
                    self.ctrl.fail(list(self.running), e, f"{self.inst.name} scheduler")
                    self.running.clear()
                    self.inflight = None
                busy = False
            if not busy:
                with self.ctrl.lock:
                    if not self._stop.is_set() and not self.has_work() and self.inflight is None:
                        self.ctrl.lock.wait(IDLE_WAIT_S)

    @abc.abstractmethod
    def step(self) -> bool:
        """Pick and run one step; False when there was nothing to do."""

    @property
    def running(self) -> list[Request]:
        """The requests in this instance's decode batch (the scheduler's list)."""
        return self.sched.running

    @running.setter
    def running(self, reqs: list[Request]) -> None:
        self.sched.running = reqs

    def has_work(self) -> bool:
        return self.sched.has_work()

    @property
    def load(self) -> int:
        return self.sched.load

    # ---- shared pieces ----------------------------------------------------------------------------

    def run(self, kind: StepKind, reqs: Sequence[Request], segs: Sequence[Segment]) -> StepRows | None:
        """Run one step; on failure fail its requests (and, if the pool was lost, everyone's here)."""
        groups = split_micro(list(segs), [len(s.tokens) for s in segs], self.inst.spec.pp)
        t0 = time.perf_counter()
        outs = self.guarded(kind, reqs, lambda: self.inst.run(kind, groups))
        if outs is None:
            return None
        self.log_step(kind, t0, time.perf_counter(), segs)
        return StepRows.read(outs, groups)

    def log_step(self, kind: StepKind, start: float, end: float, segs: Sequence[Segment]) -> None:
        self.ctrl.step_log.append(StepRecord(self.inst.name, kind, start, end, tuple(len(s.tokens) for s in segs),
                                             sum(s.start + len(s.tokens) for s in segs)))

    def guarded(self, kind: StepKind, reqs: Sequence[Request], fn: Callable[[], T]) -> T | None:
        """``fn()`` (a dispatch or a read of a step); None after a failure has been settled."""
        try:
            return fn()
        except InstanceLost as e:
            with self.ctrl.lock:
                self.ctrl.lose_instance(e.inst, e)
                self.running = [r for r in self.running if r.state is not RequestState.DONE]
            return None
        except Exception as e:  # noqa: BLE001
            with self.ctrl.lock:
                self.ctrl.fail(reqs, e, f"{self.inst.name} {kind} step")
                if not self.inst.pools_ok():
                    self.ctrl.fail(self.ctrl.holding(self.inst), e, f"{self.inst.name} pool lost in {kind} step")
                    try:
                        self.inst.reset_pools()
                    except InstanceLost as lost:  # the process went with its pool
                        self.ctrl.lose_instance(lost.inst, lost)
                self.running = [r for r in self.running if r.state is not RequestState.DONE]
            return None

    def drop_finished(self, now: float) -> None:
        """Cancelled or expired requests leave the batch (their pages are freed at once), and those
        swapped out let their host copies go."""
        for r in list(self.running):
            if r.state is RequestState.DONE or self.ctrl.drop_if_over(r, now):
                self.running.remove(r)
        swapped = self.sched.kv.swapped
        for r in list(swapped):
            if r.state is RequestState.DONE or self.ctrl.drop_if_over(r, now):
                swapped.remove(r)
                self.inst.drop_swapped(r.rid)

    def make_room(self, need: Callable[[Request], int], can_preempt: bool = True) -> bool:
        """Pages for the running requests' next step (lock held; see :meth:`KVManager.make_room`),
        and the swap copies that decided, dispatched in order before that step. False when it would
        have to preempt and ``can_preempt`` is False."""
        room = self.sched.make_room(need, can_preempt)
        if room is None:
            return False
        for op in room.swaps:
            if op.out:
                self.inst.swap_out(op.req.rid, op.pages)
                self._settle = True
            else:
                self.inst.swap_in(op.req.rid, op.pages)
        if room.recompute:
            self.ctrl.lock.notify_all()  # they wait for a prefill again
        return True

    def settle_swaps(self) -> None:
        """Host copies of this step's swap-outs (lock not held, after the step was dispatched)."""
        if self._settle:
            self._settle = False
            self.inst.settle_swaps()

    def prompt_segment(self, r: Request, start: int = 0, length: int | None = None) -> Segment:
        """``r``'s prefill tokens ``[start, start + length)`` (the rest of them by default: its prompt,
        and after a preemption for recompute the tokens it sampled too). The last chunk draws a row
        for each of ``r``'s samples still riding on it, and a request that asks for prompt
        log-probabilities scores each prompt token's successor (once: not when a prefill is redone
        after they were sent)."""
        end = r.num_prefill if length is None else start + length
        targets = r.prompt[start + 1 : end + 1] if r.params.prompt_logprobs is not None and not r.prompt_logprobs_sent else ()
        samples = 1 + len(r.siblings) if end == r.num_prefill else 1
        return Segment(r.prefill_tokens(start, end), start, list(self.inst.alloc.table(r.rid)), r.params, r.seed,
                       samples, r.sample, targets)

    def prompt_segments(self, batch: Sequence[Request]) -> tuple[StepKind, list[Segment]]:
        """A prefill batch's step kind and segments: each prompt from where its cached pages end, and
        a mixed step (new tokens attending over the pool) when any starts after cached pages."""
        segs = [self.prompt_segment(r, r.num_computed) for r in batch]
        return (StepKind.MIXED if any(s.start for s in segs) else StepKind.PREFILL), segs

    def prompt_done(self, r: Request, rows: Sequence[SampledRow], prompt_lps: Sequence[TokenLogprob],
                    now: float) -> list[Request]:
        """The step that computed the end of ``r``'s prompt is back (``rows``: a sampled row per
        sample riding on it, ``prompt_lps``: the prompt log-probabilities of this step's part).
        Hands each sample its first token; returns those that go on to decode (the caller queues
        them where its policy says). The other samples take their own copy of the part-filled last
        prompt page now, before anything writes there."""
        r.prompt_logprobs += prompt_lps
        self.sched.kv.prompt_cached(r)
        members, r.siblings = [r, *r.siblings], []
        ps = self.inst.page_size
        if len(members) > 1 and r.num_prompt % ps:
            last = r.num_prompt // ps
            dst = [self.inst.alloc.table(q.rid)[last] for q in members[1:] if q.state is RequestState.PREFILLING]
            if dst:
                self.inst.copy_pages([self.inst.alloc.table(r.rid)[last]] * len(dst), dst)
        go_on = []
        for q, row in zip(members, rows):
            if q is not r:
                q.prompt_logprobs = r.prompt_logprobs
            if q.state is not RequestState.DONE and self.first_token(q, row, now):
                go_on.append(q)
        return go_on

    def first_token(self, r: Request, row: SampledRow, now: float) -> bool:
        """A prefill of ``r`` is back and ``row`` holds the token after it: stream it (its first, or,
        after a recompute, the next one). True when the request goes on to decode. ``max_tokens ==
        0`` ends here, with no token."""
        r.num_computed = r.num_prefill
        if self.ctrl.drop_if_over(r, now):
            return False
        if r.params.max_tokens == 0:
            r.timings.first_token = now
            self.ctrl.finish(r, FinishReason.LENGTH, now=now)
            return False
        if not self.ctrl.emit(r, row.token, now, row.logprob):
            return False
        r.last_token = row.token
        return True

    def decode_segment(self, r: Request) -> Segment:
        return Segment([r.last_token], r.num_computed, self.inst.alloc.table(r.rid), r.params, r.seed,
                       sample=r.sample)

    def decode_step(self) -> bool:
        """One continuous-batching step over ``self.running``."""
        if self.lookahead:
            return self._decode_step_ahead()
        with self.ctrl.lock:
            self.drop_finished(time.perf_counter())
            self.make_room(lambda r: r.num_computed + 1)
            if not self.running:
                return False
            batch = list(self.running)
            segs = [self.decode_segment(r) for r in batch]
        out = self.run(StepKind.DECODE, batch, segs)
        self.settle_swaps()
        if out is not None:
            with self.ctrl.lock:
                self.after_decode(batch, out.rows, time.perf_counter())
        return True

    def _decode_step_ahead(self) -> bool:
        """The decode step with one step in flight: dispatch step k+1, then read step k.

        Rows of requests in step k take their input token from step k's ids on the device, at
        position one further on. A request sure to end with step k's token (``max_tokens``, the
        context) is left out; one that may end there (a stop token or string, a cancellation)
        rides along and the extra token is dropped when step k shows it ended. Its pages may be
        freed and reused meanwhile: every later use of them is dispatched after step k+1 on the
        same donated pool, so the device runs them in order. A step that needs a preemption waits
        for the step in flight first, which may still write the victims' pages.
        """
        with self.ctrl.lock:
            self.drop_finished(time.perf_counter())
            prev = self.inflight
            rows = {} if prev is None else {r.rid: j for j, r in enumerate(prev.batch)}
            # a row of the step in flight is fed one position further on
            roomy = self.make_room(lambda r: r.num_computed + (2 if r.rid in rows else 1), can_preempt=prev is None)
            batch, segs, src = [], [], []
            for r in self.running if roomy else ():
                j = rows.get(r.rid)
                if j is None:
                    segs.append(self.decode_segment(r))
                elif r.num_computed + 2 <= r.max_cached:
                    segs.append(Segment([0], r.num_computed + 1, self.inst.alloc.table(r.rid), r.params, r.seed,
                                        sample=r.sample))
                else:
                    continue
                batch.append(r)
                src.append(-1 if j is None else j)
        if not roomy:
            self.flush()
            return True
        if not batch and prev is None:
            return False
        self.inflight = None
        if batch:
            t = time.perf_counter()
            out = self.guarded(StepKind.DECODE, batch, lambda: cast(LookaheadInstance, self.inst).dispatch_decode(
                segs, None if prev is None else prev.out, src))
            if out is not None:
                self.inflight = InFlight(batch, out, t, segs)
            self.settle_swaps()
        if prev is not None:
            self._read(prev)
        return True

    def _read(self, prev: InFlight) -> None:
        """Wait for a dispatched decode step's ids and hand its tokens on."""
        out = self.guarded(StepKind.DECODE, prev.batch, prev.out.host)
        if out is None:
            return
        now = time.perf_counter()
        self.log_step(StepKind.DECODE, max(prev.dispatched, self._last_read), now, prev.segs)
        self._last_read = now
        with self.ctrl.lock:
            self.after_decode(prev.batch, StepRows.read([out], [prev.segs]).rows, now)

    def flush(self) -> None:
        """Read the step in flight, if any (before a step of another kind on this instance)."""
        while self.inflight is not None:
            prev, self.inflight = self.inflight, None
            self._read(prev)

    def after_decode(self, batch: Sequence[Request], rows: Sequence[Sequence[SampledRow]], now: float) -> None:
        """A decode step's tokens (one row per request) to their requests."""
        for r, (row,) in zip(batch, rows):
            if r.state is RequestState.DONE:
                continue
            r.num_computed += 1
            if self.ctrl.drop_if_over(r, now):
                self.running.remove(r)
            elif self.ctrl.emit(r, row.token, now, row.logprob):
                r.last_token = row.token
            else:
                self.running.remove(r)
