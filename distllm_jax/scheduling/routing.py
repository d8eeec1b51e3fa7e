"""Which prompt instance a new request goes to, when several take prompts (KV-aware routing, as
Dynamo's KV router and llm-d's prefix-aware scheduler do it).

- ``PREFIX``: the instance where its prompt costs least: the tokens it would prefill there (its
  prompt less the cached pages its leading pages match) plus the tokens already waiting for that
  instance. A conversation's next turn goes where its earlier turns' pages are, unless that
  instance's queue outweighs what the cache saves.
- ``ROUND_ROBIN``: each instance in turn, whatever it holds (the baseline routing is measured by).
- ``SHARED``: no routing; whichever instance is free first takes the head of the one queue.

Pure: it reads the instances' allocators (``match`` takes nothing) and the waiting queue.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Iterable, Sequence

from distllm_jax.scheduling.prefill import matchable_hashes
from distllm_jax.scheduling.protocols import Role, SchedRequest, Slot


class PrefillRouting(enum.StrEnum):
    SHARED = "shared"
    PREFIX = "prefix"
    ROUND_ROBIN = "round-robin"


@dataclasses.dataclass(frozen=True)
class RouteChoice:
    """Where a request was sent: the instance, the prompt tokens its cache held for it then, and the
    tokens it would prefill there."""

    instance: str
    cached_tokens: int
    prefill_tokens: int


class PrefillRouter:
    """Routes each new request to one of the prompt-running ``instances`` (their ``name``s go on
    ``r.route``), and counts the decisions per instance and how many found cached pages where they
    went. ``instances`` is read at every decision (not copied), so an instance that replaces a lost
    one in that sequence is routed to."""

    def __init__(self, policy: PrefillRouting, instances: Sequence[Slot]):
        self.policy, self.instances = policy, instances
        self.decisions: collections.Counter[str] = collections.Counter()
        self.cache_routed = 0  # decisions that went where cached pages matched
        self._turn = 0
        self._tokens: dict[str, int] = {}  # rid -> tokens its prefill costs where it was routed

    def route(self, r: SchedRequest, waiting: Iterable[SchedRequest], lost: Iterable[Slot] = ()) -> RouteChoice | None:
        """Choose for ``r`` (None: ``SHARED``, or no live instance) and set ``r.route``."""
        gone = set(map(id, lost))
        live = [i for i in self.instances if i.role is not Role.DECODE and id(i) not in gone]
        if self.policy is PrefillRouting.SHARED or not live:
            return None
        if self.policy is PrefillRouting.ROUND_ROBIN:
            inst = live[self._turn % len(live)]
            self._turn += 1
            cached = self._cached(r, inst)
            choice = RouteChoice(inst.name, cached, r.num_prefill - cached)
        else:
            queued = self._queued(waiting)
            offers = [RouteChoice(inst.name, c, r.num_prefill - c) for inst in live for c in [self._cached(r, inst)]]
            choice = min(offers, key=lambda c: (c.prefill_tokens + queued[c.instance], queued[c.instance]))
        r.route = choice.instance
        self._tokens[r.rid] = choice.prefill_tokens
        self.decisions[choice.instance] += 1
        self.cache_routed += choice.cached_tokens > 0
        return choice

    def _cached(self, r: SchedRequest, inst: Slot) -> int:
        hashes = matchable_hashes(r, inst) if inst.alloc.prefix_cache else []
        return len(inst.alloc.match(hashes)) * inst.page_size if hashes else 0

    def _queued(self, waiting: Iterable[SchedRequest]) -> dict[str, int]:
        """Tokens waiting per instance: each request at what it cost when it was routed (one this
        router did not route, at its whole prefill); forgets requests no longer waiting."""
        out: dict[str, int] = collections.defaultdict(int)
        still = {}
        for q in waiting:
            if q.route is None:
                continue
            still[q.rid] = self._tokens.get(q.rid, q.num_prefill - q.num_computed)
            out[q.route] += still[q.rid]
        self._tokens = still
        return out

    def forget(self, name: str, requests: Iterable[SchedRequest]) -> None:
        """Instance ``name`` is lost: requests routed to it go to whichever instance is free."""
        for r in requests:
            if r.route == name:
                r.route = None
