"""The front door's own bookkeeping, without a server: a request of n samples is done exactly once."""

import asyncio

from distllm_jax.engine import SamplingParams
from distllm_jax.engine.request import RequestOutput, RequestStream
from distllm_jax.engine.stopping import FinishReason
from serve.front_door import FrontDoor
from serve.metrics import Metrics


class _Engine:
    """Ends every sample of a request before the handler reads its first event."""

    def __init__(self):
        self.cancelled: list[str] = []

    def submit(self, ids, params, *, request_id=None, timeout=None, loop=None):
        stream = RequestStream(request_id or "r", loop=loop, n=params.n)
        for i in range(params.n):
            stream._push(RequestOutput(stream.request_id, [1], "x", FinishReason.LENGTH, index=i))
        return stream

    def cancel(self, request_id):
        self.cancelled.append(request_id)


def test_a_request_of_n_samples_is_done_once_when_its_finals_arrive_together():
    async def run():
        engine = _Engine()
        door = FrontDoor(engine, max_concurrent=4, metrics=Metrics(dict))
        admitted = await door.admit([1, 2], SamplingParams(max_tokens=1, n=3), request_id="r")
        done = []
        async for out in admitted.stream:
            admitted.finished()
            done.append(admitted.done)
        admitted.close()
        return done, engine.cancelled, door.active

    done, cancelled, active = asyncio.run(run())
    assert done == [False, False, True] and cancelled == [] and active == 0
