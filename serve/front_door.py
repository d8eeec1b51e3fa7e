"""The serving front door both frontends go through: the shared concurrency slots, the drain and
re-plan gates, submission to the engine with its errors mapped to one vocabulary, and the end of a
request's slot (a request whose client left is cancelled, so its pages free at once).

The gRPC handlers and the OpenAI HTTP handlers each translate a :class:`Refused` into their own
status (UNAVAILABLE / 503, RESOURCE_EXHAUSTED / 429, INVALID_ARGUMENT / 400); everything else about
admission is decided here, once."""

from __future__ import annotations

import asyncio
import enum
from typing import Any

from distllm_jax.engine import EngineClosed, SamplingParams
from serve.metrics import Metrics


class Refusal(enum.Enum):
    DRAINING = "draining"  # the server stops taking requests (or the engine closed under the request)
    AT_CAPACITY = "at capacity"  # every concurrency slot is taken
    INVALID = "invalid"  # the engine refused the request's parameters


class Refused(Exception):
    def __init__(self, why: Refusal, message: str):
        super().__init__(message)
        self.why = why


class FrontDoor:
    """Admission state of one server: ``max_concurrent`` slots shared by every frontend, ``draining``
    (set once, by the drain), ``ready`` (cleared while a re-plan swaps the engine: new requests wait
    for the new one) and ``idle`` (set while no request holds a slot: the drain and a re-plan wait on
    it). ``engine`` is read at each admission, so a re-plan's new engine takes the next request."""

    def __init__(self, engine: Any, max_concurrent: int, metrics: Metrics):
        self.engine = engine
        self.max_concurrent = max_concurrent
        self.metrics = metrics
        self.active = 0
        self.idle = asyncio.Event()
        self.idle.set()
        self.draining = False
        self.ready = asyncio.Event()
        self.ready.set()

    def refuse(self, why: Refusal, message: str) -> Refused:
        self.metrics.requests.labels("invalid" if why is Refusal.INVALID else "rejected").inc()
        return Refused(why, message)

    def check_open(self) -> None:
        """Refuse at once while draining (before the request is even parsed)."""
        if self.draining:
            raise self.refuse(Refusal.DRAINING, "the server is draining")

    async def admit(self, ids: list[int], params: SamplingParams, *, request_id: str | None = None,
                    timeout: float | None = None) -> "Admitted":
        """Take a slot and submit; the caller reads the returned stream and must ``close()`` it."""
        self.check_open()
        if self.active >= self.max_concurrent:
            raise self.refuse(Refusal.AT_CAPACITY,
                              f"the server is at its limit of {self.max_concurrent} concurrent requests")
        await self.ready.wait()
        try:
            stream = self.engine.submit(ids, params, request_id=request_id, timeout=timeout,
                                        loop=asyncio.get_running_loop())
        except EngineClosed:
            raise self.refuse(Refusal.DRAINING, "the server is draining") from None
        except ValueError as e:
            raise self.refuse(Refusal.INVALID, str(e)) from None
        self.enter()
        return Admitted(self, self.engine, stream)

    def enter(self) -> None:
        """A request takes a slot."""
        self.active += 1
        self.idle.clear()

    def leave(self) -> None:
        """The request's slot is free again; the last one out wakes a waiting re-plan or drain."""
        self.active -= 1
        if self.active == 0:
            self.idle.set()


class Admitted:
    """One admitted request: its stream, and its slot until :meth:`close`. ``finished()`` marks that
    the engine ended it; closing an unfinished one (the client went away, its deadline passed, the
    handler failed) cancels it in the engine that took it."""

    def __init__(self, door: FrontDoor, engine: Any, stream: Any):
        self.door, self.engine, self.stream = door, engine, stream
        self.done = False
        self._closed = False
        self._finals_read = 0

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    def finished(self) -> None:
        """The handler read a final event; the request is done once it has read every sample's.
        Counted here, not from the stream's own record: the engine may have ended every sample before
        the handler reads the first final, and the request must count as done exactly once."""
        self._finals_read += 1
        self.done = self._finals_read >= self.stream.n

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.door.leave()
        if not self.done:
            self.engine.cancel(self.stream.request_id)
            self.door.metrics.requests.labels("cancelled").inc()
