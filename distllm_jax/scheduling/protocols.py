"""What a scheduler reads and writes of instances and requests: the engine's ``Instance`` /
``RemoteInstance`` and ``Request`` satisfy these, and so do the simulator's timed stand-ins. The
states a request moves through are written here too (``RequestState``)."""

from __future__ import annotations

import collections
import enum
from typing import TYPE_CHECKING, Protocol, Sequence

if TYPE_CHECKING:
    from distllm_jax.kv_cache import PageAllocator


class Role(enum.StrEnum):
    """What an instance runs: prompts only, decode steps only (pulling KV from prefill instances),
    both on one instance (vLLM-style), or mixed steps of prompt chunks and decode tokens
    (SplitFuse-style). A ``StrEnum``: it equals, prints and serialises as its value."""

    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"
    CHUNKED = "chunked"


class RequestState(enum.Enum):
    WAITING = "waiting"  # queued for prefill
    PREFILLING = "prefilling"  # in a prefill batch (or, chunked, part of its prompt done)
    HELD = "held"  # prefilled; KV waits in prefill memory for a decode instance to pull it
    MIGRATING = "migrating"
    RUNNING = "running"  # in a decode batch
    SWAPPED = "swapped"  # taken out of a decode batch that ran out of pages; its KV off the pool
    DONE = "done"


class Slot(Protocol):
    """An instance as the policy sees it: its pages and its limits."""

    name: str
    role: Role
    alloc: PageAllocator
    max_batch: int
    max_prefill_seqs: int
    page_size: int


class Stamps(Protocol):
    """The moments a scheduler records on a request (the engine's ``RequestTimings``)."""

    arrival: float
    prefill_start: float | None
    migration_start: float | None
    prefill_instance: str | None
    decode_instance: str | None
    cached_prompt_tokens: int


class SchedRequest(Protocol):
    rid: str
    state: RequestState
    holders: list[Slot]  # instances whose allocator holds pages for it (the prefill one first)
    num_computed: int  # tokens whose K/V are in the cache
    max_cached: int  # tokens that can ever be in the cache (prompt + max_tokens - 1, capped)
    timings: Stamps
    siblings: list  # the other samples of an n > 1 request, riding on its prefill until its first token
    # its full pages by name (scheduling.prefix_cache.page_hashes of its prompt, then of the tokens
    # it sampled, as far as they go); read only by instances whose allocator caches prefixes
    prefix_hashes: Sequence[bytes]
    route: str | None  # the prompt instance a router sent it to (None: whichever takes it first)

    @property
    def num_prompt(self) -> int: ...

    @property
    def num_prefill(self) -> int:
        """Tokens a prefill of it computes: its prompt, and every token it sampled before it was
        preempted for recompute (or before the instance holding its KV was lost)."""


class QueueState(Protocol):
    """The FCFS queues every scheduler shares (the engine's controller, the simulator's ``Queues``)."""

    waiting: collections.deque  # not yet prefilled, arrival order
    held: collections.deque  # prefilled, KV waiting in prefill memory for a decode instance
