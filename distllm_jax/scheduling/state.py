"""The shared queues, and how a request leaves them."""

from __future__ import annotations

import collections
import dataclasses

from distllm_jax.scheduling.protocols import QueueState, RequestState, SchedRequest


@dataclasses.dataclass
class Queues:
    waiting: collections.deque = dataclasses.field(default_factory=collections.deque)
    held: collections.deque = dataclasses.field(default_factory=collections.deque)


def release(queues: QueueState, req: SchedRequest) -> None:
    """Out of every queue, pages returned to every instance that holds some: how every request ends."""
    # only a waiting request is in the waiting queue and only a held one in the held queue (looking
    # in the others would cost a scan, and a failed deque.remove formats the request)
    q = queues.waiting if req.state is RequestState.WAITING else queues.held if req.state is RequestState.HELD else None
    if q is not None and req in q:
        q.remove(req)
    for inst in req.holders:
        inst.alloc.free(req.rid)
    req.holders.clear()


def keep_computed(req: SchedRequest) -> None:
    """``req`` ended with its KV whole (it finished, rather than failed): every instance that holds
    its pages and caches prefixes names the full pages of its computed tokens, prompt and output, so
    the next turn of a chat, whose prompt is this one and its reply, starts from them (a no-op where
    the allocator caches nothing). Call it before :func:`release`, which lets the pages go."""
    hashes = req.prefix_hashes
    for inst in req.holders:
        n = min(req.num_computed // inst.page_size, len(hashes), len(inst.alloc.table(req.rid)))
        inst.alloc.register(req.rid, list(hashes[:n]))
