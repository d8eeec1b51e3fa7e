"""The decode instance's worker: it pulls what :class:`~distllm_jax.scheduling.DecodeScheduler`
chooses, then steps the batch (continuous batching).

Pulls run on the worker's own pull thread, so the running batch keeps stepping while a request's KV
moves; a pulled request joins the batch at the next step dispatched after its pages are in place. A
prefill worker offers its finished batch at once (:meth:`DecodeWorker.offer`) and dispatches the
chosen pulls' gathers before its next step; a pull this worker chooses later has its gather wait for
the prefill step in flight on that pool, which can be a whole prefill step. A pull that finds either
side's process gone hands the loss to the controller (the request is redone or waits again, see
:meth:`Controller.lose_instance`).
"""

from __future__ import annotations

import dataclasses
import queue
import threading
import time
from typing import cast

from distllm_jax.engine.controller import Controller, InstanceLost
from distllm_jax.engine.instance_api import InstanceAPI
from distllm_jax.engine.request import RequestState
from distllm_jax.engine.transfer import KVPuller, StagedKVPuller, pages_equal
from distllm_jax.engine.worker import Worker, still_here
from distllm_jax.scheduling import DecodeScheduler, KVPolicy, PullPlan


class DecodeWorker(Worker):
    def __init__(self, ctrl: Controller, inst: InstanceAPI, puller: KVPuller, peers: list["DecodeWorker"],
                 check_transfers: bool = False, policy: KVPolicy | None = None):
        """``peers``: every decode worker (this one included, filled in by the caller): pulls are
        balanced across their schedulers."""
        self.peers = peers
        sched = DecodeScheduler(ctrl, inst, _PeerSchedulers(peers), lost=lambda: inst in ctrl.lost, policy=policy)
        super().__init__(ctrl, inst, sched)
        self.puller = puller
        self.check = check_transfers
        self._pulls: queue.SimpleQueue[PullPlan | None] = queue.SimpleQueue()
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

    def offer(self, now: float) -> list[PullPlan]:
        """Pulls chosen for this instance now (lock held), for a prefill worker whose step just ended
        to start: it stages them (:meth:`stage`) before it dispatches its next step, so their gathers
        do not queue behind that step. A puller that cannot stage gets them queued as they are."""
        jobs = self._choose_pulls(now)
        if not self.puller.staged:
            for job in jobs:
                self._pulls.put(job)
            return []
        return jobs

    def stage(self, jobs: list[PullPlan]) -> None:
        """Dispatch the gathers of offered pulls (on the prefill worker's thread, lock not held) and
        hand them to this instance's pull thread; a failed gather fails the pull there."""
        for job in jobs:
            try:
                staged = cast(StagedKVPuller, self.puller).stage(job.src, job.src_pages, self.inst)
            except Exception as e:  # noqa: BLE001 - settled by the pull thread, as a failed pull
                staged = e
            self._pulls.put(dataclasses.replace(job, staged=staged))

    def _pull_loop(self) -> None:
        while (job := self._pulls.get()) is not None:
            try:
                self._pull(job)
            except Exception as e:  # noqa: BLE001 - a bug in one pull must not stop the others
                with self.ctrl.lock:
                    if still_here(job.req, self.inst, RequestState.MIGRATING):
                        self.sched.pull_ended()
                        self.ctrl.fail([job.req], e, f"{self.inst.name} pull")

    def has_room(self) -> bool:
        return self.sched.has_room()

    def _choose_pulls(self, now: float) -> list[PullPlan]:
        return self.sched.choose_pulls(now)

    def _pull(self, job: PullPlan) -> None:
        """``job.src`` was read under the lock: by now a lost prefill instance may have re-queued the
        request (emptying its holders); the checks after the pull see that. ``job.staged``: the
        gathers a prefill worker dispatched for it (:meth:`offer`), or the error that raised."""
        r, src = job.req, job.src
        try:
            if isinstance(job.staged, BaseException):
                raise job.staged
            if job.staged is not None:  # both return when the pages are in place
                path = cast(StagedKVPuller, self.puller).put(job.staged, self.inst, job.dst_pages)
            else:
                path = self.puller.pull(src, job.src_pages, self.inst, job.dst_pages)
            if self.check and not pages_equal(src, job.src_pages, self.inst, job.dst_pages):
                raise AssertionError(f"KV of {r.rid} changed in transit")
        except InstanceLost as e:
            with self.ctrl.lock:
                self.sched.pull_ended()
                self.ctrl.lose_instance(e.inst, e)
            return
        except Exception as e:  # noqa: BLE001
            with self.ctrl.lock:
                self.sched.pull_ended()
                if still_here(r, self.inst, RequestState.MIGRATING):
                    self.ctrl.fail([r], e, f"KV pull {src.name}->{self.inst.name}")
            return
        with self.ctrl.lock:
            now = time.perf_counter()
            if not self.sched.pulled(r, src):
                return
            r.timings.migration_end = now
            r.timings.migration_path = path or self.puller.kind  # a puller may say which path it took
            self.ctrl.migrations += 1
            self.ctrl.migration_seconds += now - r.timings.migration_start
            self.ctrl.lock.notify_all()  # prefill memory was freed

    def step(self) -> bool:
        with self.ctrl.lock:
            pulls = self._choose_pulls(time.perf_counter())
        for job in pulls:
            self._pulls.put(job)
        return self.decode_step() or bool(pulls)


class _PeerSchedulers:
    """The peers' schedulers, read through the shared list of workers (a replaced worker's new
    scheduler is seen at once)."""

    def __init__(self, workers: list[DecodeWorker]):
        self.workers = workers

    def __iter__(self):
        return (w.sched for w in self.workers)
