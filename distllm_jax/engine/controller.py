"""The request lifecycle, in one place: admit -> prefill -> (hold -> migrate) -> decode -> stream -> free.

All shared scheduling state (the FCFS queues, every request, every instance's allocator) is touched
only under :attr:`Controller.lock`. Workers (one thread per instance) take work from here, run their
programs outside the lock, and report back; every way a request can end goes through :meth:`finish`,
which returns its pages to every instance that holds some and sends the final event.

An instance can also be *lost* (its process died: a Ray actor in cluster mode, see
``distllm_jax.cluster``). :meth:`lose_instance` then stops routing to it and settles every request
that had pages there: work that can be redone from the prompt goes back to a queue, requests that were
decoding there fail with the reason.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
import traceback
from typing import Any, Callable, Iterable

from distllm_jax.engine.instance_api import InstanceAPI
from distllm_jax.engine.logprobs import TokenLogprob
from distllm_jax.engine.request import Request, RequestOutput, RequestState
from distllm_jax.engine.stopping import FinishReason
from distllm_jax.scheduling import Role, keep_computed, release
from distllm_jax.scheduling.plans import StepRecord
from distllm_jax.scheduling.routing import PrefillRouter

log = logging.getLogger(__name__)


class InstanceLost(RuntimeError):
    """An instance's process is gone, and its KV pool and programs with it (raised by remote instances
    and remote KV pullers; never by an in-process instance)."""

    def __init__(self, inst: InstanceAPI, cause: BaseException | str):
        why = f"{type(cause).__name__}: {cause}" if isinstance(cause, BaseException) else str(cause)
        super().__init__(f"instance {inst.name} was lost ({(why.splitlines() or ['no reason'])[0]})")
        self.inst = inst


class Controller:
    def __init__(self) -> None:
        # held to read or change any scheduling state (queues, request states, page tables); waited on
        # for a change (every change a worker or a waiting caller cares about notifies it)
        self.lock = threading.Condition()
        self.waiting: collections.deque[Request] = collections.deque()  # FCFS, not yet prefilled
        self.held: collections.deque[Request] = collections.deque()  # prefilled, KV in prefill memory
        self.requests: dict[str, Request] = {}
        self.finished: collections.Counter[str] = collections.Counter()
        self.migrations = 0
        self.migration_seconds = 0.0
        self.errors: collections.deque[str] = collections.deque(maxlen=32)  # recent step failures
        self.lost: set[InstanceAPI] = set()  # instances whose process died: nothing is routed to them
        self.requeued = 0  # requests sent back to the prefill queue by a lost instance
        self.on_lost: Callable[[InstanceAPI], None] | None = None  # called (lock held) once per lost instance
        self.router: PrefillRouter | None = None  # chooses a prompt instance for each new request
        self.step_log: collections.deque[StepRecord] = collections.deque(maxlen=1 << 16)  # appended lock-free

    # everything below runs with self.lock held -----------------------------------------------------

    def admit(self, req: Request) -> None:
        """Queue a request; its other samples (``req.siblings``) ride on its prefill."""
        for q in req.group:
            self.requests[q.rid] = q
        if self.router is not None:
            choice = self.router.route(req, self.waiting, self.lost)
            if choice is not None:
                log.debug("request %s -> %s (%d prompt tokens cached there, %d to prefill)", req.rid,
                          choice.instance, choice.cached_tokens, choice.prefill_tokens)
        self.waiting.append(req)
        self.lock.notify_all()

    def emit(self, req: Request, token: int, now: float, logprob: TokenLogprob | None = None) -> bool:
        """Hand one sampled token (and its log-probability, when asked for) to its request; False
        when the request ended with it."""
        req.sampled.append(token)
        if logprob is not None:
            req.cumulative_logprob += logprob.logprob
        t = req.timings
        if t.first_token is None:
            t.first_token = now
        try:
            delta = req.checker.append(token)
            text, reason = delta.text, delta.finished
            if reason is None and req.num_prompt + req.num_sampled >= req.max_len:
                text += req.checker.end(FinishReason.LENGTH).text  # the model's context is full
                reason = FinishReason.LENGTH
        except Exception as e:  # noqa: BLE001 - one request's bug must not stop the engine
            self.finish(req, FinishReason.ERROR, error=f"while streaming: {type(e).__name__}: {e}", now=now)
            return False
        ids = [delta.token] if delta.token is not None else []
        if ids:
            t.token_times.append(now)
        lps = [logprob] if ids and logprob is not None else []
        if reason is not None:
            self.finish(req, reason, token_ids=ids, text=text, now=now, logprobs=lps)
            return False
        self._push(req, self._output(req, ids, text, lps))
        return True

    def _output(self, req: Request, ids: list[int], text: str, lps: list[TokenLogprob], **final: Any) -> RequestOutput:
        """An event of ``req``'s stream: its sample's index, the log-probabilities it asked for, and
        the prompt's on the sample's first event."""
        p = req.params
        prompt = None
        if p.prompt_logprobs is not None and not req.prompt_logprobs_sent and len(req.prompt_logprobs) == req.num_prompt:
            prompt, req.prompt_logprobs_sent = list(req.prompt_logprobs), True
        return RequestOutput(req.stream.request_id, ids, text, index=req.sample,
                             logprobs=lps if p.logprobs is not None else None, prompt_logprobs=prompt, **final)

    def finish(
        self,
        req: Request,
        reason: FinishReason,
        *,
        error: str | None = None,
        token_ids: Iterable[int] = (),
        text: str = "",
        now: float | None = None,
        logprobs: list[TokenLogprob] = (),  # type: ignore[assignment]
    ) -> None:
        """End a request, wherever it is: free its pages everywhere, then send the final event. Its
        other samples still waiting on its prefill end with it."""
        if req.state is RequestState.DONE:
            return
        for sib in req.siblings:
            self.finish(sib, reason, error=error, now=now)
        req.siblings = []
        if reason in (FinishReason.STOP, FinishReason.LENGTH):
            keep_computed(req)
        self._release(req)
        req.state = RequestState.DONE
        req.timings.finish = now or time.perf_counter()
        if req.checker.finished is None:
            try:
                text += req.checker.end(reason).text
            except Exception:  # noqa: BLE001
                pass
        self.requests.pop(req.rid, None)
        self.finished[reason.value] += 1
        cumulative = req.cumulative_logprob if req.params.logprobs is not None else None
        self._push(req, self._output(req, list(token_ids), text, list(logprobs), finished=reason, error=error,
                                     num_prompt_tokens=req.num_prompt, num_output_tokens=len(req.checker.ids),
                                     timings=req.timings, cumulative_logprob=cumulative))
        self.lock.notify_all()

    def _release(self, req: Request) -> None:
        release(self, req)

    def _push(self, req: Request, out: RequestOutput) -> None:
        try:
            req.stream._push(out)
        except Exception:  # noqa: BLE001 - a broken consumer loses its stream, not the engine
            req.cancelled = True

    def drop_if_over(self, req: Request, now: float) -> bool:
        """Finish a cancelled or expired request; True if it ended."""
        if req.cancelled:
            self.finish(req, FinishReason.CANCELLED, now=now)
        elif req.expired(now):
            self.finish(req, FinishReason.DEADLINE, error="deadline exceeded", now=now)
        return req.state is RequestState.DONE

    def expire_queued(self, now: float) -> None:
        for q in (self.waiting, self.held):
            for r in [r for r in q if r.cancelled or r.expired(now)]:
                self.drop_if_over(r, now)

    def fail(self, reqs: Iterable[Request], exc: BaseException, where: str) -> None:
        """A step failed: its requests end with the error; the engine goes on with the others."""
        msg = f"{where} failed: {type(exc).__name__}: {exc}"
        self.errors.append(msg + "\n" + "".join(traceback.format_exception(exc))[-2000:])
        for r in list(reqs):
            self.finish(r, FinishReason.ERROR, error=msg)

    def requeue(self, req: Request) -> None:
        """Back to the prefill queue, in arrival order, with its pages freed everywhere. Tokens already
        streamed stay streamed: the prefill is redone over the prompt and them, and samples the next.
        Samples that wait on its prefill go back with it; such a sample alone just lets its pages go."""
        for sib in req.siblings:
            self._release(sib)
            sib.state = RequestState.WAITING
        self._release(req)
        if req.riding:  # waits on its first sample, which is requeued (or redone) too
            req.state = RequestState.WAITING
            return
        req.state = RequestState.WAITING
        req.num_computed = 0
        if not req.prompt_logprobs_sent:
            req.prompt_logprobs = [None]
        req.timings.migration_start = req.timings.decode_instance = None
        at = next((i for i, w in enumerate(self.waiting) if w.timings.arrival > req.timings.arrival), len(self.waiting))
        self.waiting.insert(at, req)
        self.requeued += 1

    def lose_instance(self, inst: InstanceAPI, exc: BaseException) -> None:
        """``inst`` died with its memory. Prefill work there (prefilling, held, migrating out) is redone
        from the prompt; a request migrating into a lost decode instance waits in prefill memory again;
        a request that was decoding there fails with the reason. Idempotent."""
        if inst in self.lost:
            return
        self.lost.add(inst)
        if self.router is not None:
            self.router.forget(inst.name, self.requests.values())
        msg = str(exc) if isinstance(exc, InstanceLost) else f"instance {inst.name} was lost: {exc}"
        self.errors.append(msg)
        for r in self.holding(inst):
            if inst.role is Role.PREFILL:
                self.requeue(r)
            elif r.state is RequestState.MIGRATING and r.holders[0] is not inst:
                inst.alloc.free(r.rid)
                r.holders.remove(inst)
                r.state = RequestState.HELD
                r.timings.migration_start = r.timings.decode_instance = None
                self.held.appendleft(r)
            else:
                self.finish(r, FinishReason.ERROR,
                            error=f"{msg} (the request had streamed {r.num_sampled} token(s))")
        if self.on_lost is not None:
            self.on_lost(inst)
        self.lock.notify_all()

    def holding(self, inst: object) -> list[Request]:
        return [r for r in self.requests.values() if inst in r.holders]

    def cancel(self, rid: str) -> bool:
        req = self.requests.get(rid)
        if req is None:
            return False
        for q in req.group:  # every sample of the request
            q.cancelled = True
            if q.state in (RequestState.WAITING, RequestState.HELD) and not q.riding:
                self.finish(q, FinishReason.CANCELLED)  # not in any worker's hands: free now
        self.lock.notify_all()  # workers free the others at the next step boundary
        return True
