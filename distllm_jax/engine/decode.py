"""The decode instance's policy: pull prefilled requests when there is room, then continuous batching.

Pulls run on the worker's own pull thread, so the running batch keeps stepping while a request's KV
moves; a pulled request joins the batch at the next step dispatched after its pages are in place. A
prefill worker offers its finished batch at once (:meth:`DecodeWorker.offer`) and dispatches the
chosen pulls' gathers before its next step; a pull this worker chooses later has its gather wait for
the prefill step in flight on that pool, which can be a whole prefill step.

A request is pulled only when this instance has a batch slot and pages for the request's whole
possible length (prompt + max_tokens, capped by the context), so the running batch never runs out of
pages. With several decode instances, a request goes to the least-loaded one that has room. A pull that
finds either side's process gone hands the loss to the controller (the request is redone or waits
again, see :meth:`Controller.lose_instance`).
"""

from __future__ import annotations

import queue
import threading
import time

from distllm_jax.engine.controller import Controller, InstanceLost
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.request import Request, RequestState
from distllm_jax.engine.transfer import KVPuller, can_stage, pages_equal
from distllm_jax.engine.worker import Worker, mine
from distllm_jax.kv_cache import pages_for


class DecodeWorker(Worker):
    def __init__(self, ctrl: Controller, inst: Instance, puller: KVPuller, peers: list["DecodeWorker"],
                 check_transfers: bool = False):
        super().__init__(ctrl, inst)
        self.puller = puller
        self.peers = peers  # every decode worker (self included): pulls are balanced across them
        self.check = check_transfers
        self._pulling = 0  # chosen and not yet in the batch (counted against its room)
        self._pulls: queue.SimpleQueue = queue.SimpleQueue()
        self._puller_thread = threading.Thread(target=self._pull_loop, name=f"distllm-{inst.name}-pull", daemon=True)

    def start(self) -> None:
        self._puller_thread.start()
        super().start()

    def stop(self) -> None:
        super().stop()
        self._pulls.put(None)

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self._puller_thread.is_alive():
            self._puller_thread.join(timeout)

    def offer(self, now: float) -> list[tuple]:
        """Pulls chosen for this instance now (lock held), for a prefill worker whose step just ended
        to start: it stages them (:meth:`stage`) before it dispatches its next step, so their gathers
        do not queue behind that step. A puller that cannot stage gets them queued as they are."""
        jobs = self._choose_pulls(now)
        if not can_stage(self.puller):
            for job in jobs:
                self._pulls.put(job)
            return []
        return jobs

    def stage(self, jobs: list[tuple]) -> None:
        """Dispatch the gathers of offered pulls (on the prefill worker's thread, lock not held) and
        hand them to this instance's pull thread; a failed gather fails the pull there."""
        for job in jobs:
            _, src, src_pages, _ = job
            try:
                staged = self.puller.stage(src, src_pages, self.inst)
            except Exception as e:  # noqa: BLE001 - settled by the pull thread, as a failed pull
                staged = e
            self._pulls.put((*job, staged))

    def _pull_loop(self) -> None:
        while (job := self._pulls.get()) is not None:
            try:
                self._pull(*job)
            except Exception as e:  # noqa: BLE001 - a bug in one pull must not stop the others
                r = job[0]
                with self.ctrl.cv:
                    if mine(r, self.inst, RequestState.MIGRATING):
                        self._pulling -= 1
                        self.ctrl.fail([r], e, f"{self.inst.name} pull")

    @property
    def load(self) -> int:
        return len(self.running) + self._pulling

    def has_room(self) -> bool:
        return (len(self.running) + self._pulling < self.inst.max_batch and self.inst.alloc.num_free > 0
                and not self.lost)

    def has_work(self) -> bool:
        return bool(self.running) or (bool(self.ctrl.held) and self.has_room())

    def _fits(self, r: Request) -> bool:
        return self.inst.alloc.extra_pages_needed(r.rid, r.max_cached) <= self.inst.alloc.num_free

    def _choose_pulls(self, now: float) -> list[tuple[Request, Instance, list[int], list[int]]]:
        out = []
        while self.ctrl.held and self.has_room():
            r = self.ctrl.held[0]
            if not self._fits(r):
                break
            others = [w.load for w in self.peers if w is not self and w.has_room() and w._fits(r)]
            if others and self.load > min(others):
                break  # a less-loaded peer takes it
            self.ctrl.held.popleft()
            self.inst.alloc.ensure(r.rid, r.max_cached)
            r.holders.append(self.inst)
            r.state = RequestState.MIGRATING
            r.timings.migration_start = now
            r.timings.decode_instance = self.inst.name
            n = pages_for(r.num_computed, self.inst.page_size)
            src = r.holders[0]
            out.append((r, src, list(src.alloc.table(r.rid))[:n], list(self.inst.alloc.table(r.rid))[:n]))
            self._pulling += 1
        return out

    def _pull(self, r: Request, src: Instance, src_pages: list[int], dst_pages: list[int], staged=None) -> None:
        """``src`` was read under the lock: by now a lost prefill instance may have re-queued ``r``
        (emptying its holders); the checks after the pull see that. ``staged``: the gathers a prefill
        worker dispatched for it (:meth:`offer`), or the error that dispatching them raised."""
        try:
            if isinstance(staged, BaseException):
                raise staged
            if staged is not None:  # both return when the pages are in place
                path = self.puller.put(staged, self.inst, dst_pages)
            else:
                path = self.puller.pull(src, src_pages, self.inst, dst_pages)
            if self.check and not pages_equal(src, src_pages, self.inst, dst_pages):
                raise AssertionError(f"KV of {r.rid} changed in transit")
        except InstanceLost as e:
            with self.ctrl.cv:
                self._pulling -= 1
                self.ctrl.lose_instance(e.inst, e)
            return
        except Exception as e:  # noqa: BLE001
            with self.ctrl.cv:
                self._pulling -= 1
                if mine(r, self.inst, RequestState.MIGRATING):
                    self.ctrl.fail([r], e, f"KV pull {src.name}->{self.inst.name}")
            return
        with self.ctrl.cv:
            now = time.perf_counter()
            self._pulling -= 1
            if not mine(r, self.inst, RequestState.MIGRATING) or src not in r.holders:
                return
            src.alloc.free(r.rid)
            r.holders.remove(src)
            r.timings.migration_end = now
            r.timings.migration_path = path or self.puller.kind  # a puller may say which path it took
            self.ctrl.migrations += 1
            self.ctrl.migration_seconds += now - r.timings.migration_start
            r.state = RequestState.RUNNING
            self.running.append(r)
            self.ctrl.cv.notify_all()  # prefill memory was freed

    def step(self) -> bool:
        with self.ctrl.cv:
            pulls = self._choose_pulls(time.perf_counter())
        for job in pulls:
            self._pulls.put(job)
        return self.decode_step() or bool(pulls)
