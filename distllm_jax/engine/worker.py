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
from typing import Sequence

from distllm_jax.engine.controller import Controller, InstanceLost
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.programs import Segment
from distllm_jax.engine.request import Request, RequestState

IDLE_WAIT_S = 0.02  # an idle worker wakes this often to enforce deadlines


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


def mine(r: Request, inst: Instance, state: RequestState) -> bool:
    """``r`` is still in ``state`` with pages on ``inst``: no cancellation, failure or lost instance
    took it elsewhere while a step ran without the lock."""
    return r.state is state and inst in r.holders


class Worker(abc.ABC):
    def __init__(self, ctrl: Controller, inst: Instance):
        self.ctrl = ctrl
        self.inst = inst
        self.running: list[Request] = []  # requests in this instance's decode batch
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, name=f"distllm-{inst.name}", daemon=True)

    # ---- thread ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self.ctrl.cv:
            self.ctrl.cv.notify_all()

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
                with self.ctrl.cv:
                    self.ctrl.fail(list(self.running), e, f"{self.inst.name} scheduler")
                    self.running.clear()
                busy = False
            if not busy:
                with self.ctrl.cv:
                    if not self._stop.is_set() and not self.has_work():
                        self.ctrl.cv.wait(IDLE_WAIT_S)

    @abc.abstractmethod
    def step(self) -> bool:
        """Pick and run one step; False when there was nothing to do."""

    def has_work(self) -> bool:
        return bool(self.running)

    @property
    def load(self) -> int:
        return len(self.running)

    # ---- shared pieces ----------------------------------------------------------------------------

    def run(self, kind: str, reqs: Sequence[Request], segs: Sequence[Segment]) -> list[int] | None:
        """Run one step; on failure fail its requests (and, if the pool was lost, everyone's here)."""
        groups = split_micro(list(segs), [len(s.tokens) for s in segs], self.inst.spec.pp)
        try:
            outs = self.inst.run(kind, groups)
        except InstanceLost as e:
            with self.ctrl.cv:
                self.ctrl.lose_instance(e.inst, e)
                self.running = [r for r in self.running if r.state is not RequestState.DONE]
            return None
        except Exception as e:  # noqa: BLE001
            with self.ctrl.cv:
                self.ctrl.fail(reqs, e, f"{self.inst.name} {kind} step")
                if not self.inst.pools_ok():
                    self.ctrl.fail(self.ctrl.holding(self.inst), e, f"{self.inst.name} pool lost in {kind} step")
                    try:
                        self.inst.reset_pools()
                    except InstanceLost as lost:  # the process went with its pool
                        self.ctrl.lose_instance(lost.inst, lost)
                self.running = [r for r in self.running if r.state is not RequestState.DONE]
            return None
        return [int(t) for o, g in zip(outs, groups) for t in o[: len(g)]]

    def drop_finished(self, now: float) -> None:
        """Cancelled or expired requests leave the batch (their pages are freed at once)."""
        for r in list(self.running):
            if r.state is RequestState.DONE or self.ctrl.drop_if_over(r, now):
                self.running.remove(r)

    def first_token(self, r: Request, tok: int, now: float) -> bool:
        """A request's prompt is now fully cached and ``tok`` is its first token: stream it. True when
        the request goes on to decode (the caller then queues it where its policy says)."""
        r.num_computed = r.num_prompt
        if r.num_sampled:  # a prefill redone after its first instance was lost: the token was streamed
            return not self.ctrl.drop_if_over(r, now)
        if self.ctrl.drop_if_over(r, now) or not self.ctrl.emit(r, tok, now):
            return False
        r.last_token = tok
        return True

    def decode_segment(self, r: Request) -> Segment:
        return Segment([r.last_token], r.num_computed, self.inst.alloc.table(r.rid), r.params, r.seed)

    def decode_step(self) -> bool:
        """One continuous-batching step over ``self.running``."""
        with self.ctrl.cv:
            self.drop_finished(time.perf_counter())
            if not self.running:
                return False
            batch = list(self.running)
            segs = [self.decode_segment(r) for r in batch]
        tokens = self.run("decode", batch, segs)
        if tokens is not None:
            with self.ctrl.cv:
                self.after_decode(batch, tokens, time.perf_counter())
        return True

    def after_decode(self, batch: Sequence[Request], tokens: Sequence[int], now: float) -> None:
        for r, tok in zip(batch, tokens):
            if r.state is RequestState.DONE:
                continue
            r.num_computed += 1
            if self.ctrl.drop_if_over(r, now):
                self.running.remove(r)
            elif self.ctrl.emit(r, tok, now):
                r.last_token = tok
            else:
                self.running.remove(r)
