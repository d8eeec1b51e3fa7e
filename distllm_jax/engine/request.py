"""What a request is while the engine holds it, and what its caller receives.

The caller sees a :class:`RequestStream` of :class:`RequestOutput` events (new tokens with their text,
then exactly one final event with the finish reason and the request's :class:`RequestTimings`). The
stream can be read from a thread (``for out in stream``) or from asyncio (``async for out in stream``).
A request of ``n`` samples streams each one's events with its ``index`` on the one stream, which
ends after the last sample's final event.
"""

from __future__ import annotations

import asyncio
import dataclasses
import queue
import time
from typing import TYPE_CHECKING, AsyncIterator, Iterator, Sequence

from distllm_jax.engine.logprobs import TokenLogprob
from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import FinishReason, StopChecker
from distllm_jax.scheduling.prefix_cache import HashChain
from distllm_jax.scheduling.protocols import RequestState  # noqa: F401 - the engine's request states

if TYPE_CHECKING:
    from distllm_jax.engine.instance import Instance


@dataclasses.dataclass
class RequestTimings:
    """Wall-clock stamps (``time.perf_counter`` seconds). Migration stamps are set only when the
    request moved from a prefill instance to a decode instance."""

    arrival: float
    prefill_start: float | None = None
    first_token: float | None = None
    migration_start: float | None = None
    migration_end: float | None = None
    finish: float | None = None
    token_times: list[float] = dataclasses.field(default_factory=list)
    prefill_instance: str | None = None
    decode_instance: str | None = None
    migration_path: str | None = None  # the KV path that moved it: local, transfer-server or staged
    cached_prompt_tokens: int = 0  # prompt tokens its (last) prefill started from cached pages for

    @property
    def ttft(self) -> float | None:
        return None if self.first_token is None else self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first (None with fewer than two tokens)."""
        if len(self.token_times) < 2:
            return None
        return (self.token_times[-1] - self.token_times[0]) / (len(self.token_times) - 1)

    @property
    def queueing(self) -> float | None:
        return None if self.prefill_start is None else self.prefill_start - self.arrival

    @property
    def migration(self) -> float | None:
        if self.migration_start is None or self.migration_end is None:
            return None
        return self.migration_end - self.migration_start

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(ttft=self.ttft, tpot=self.tpot, queueing=self.queueing, migration=self.migration)
        return d


@dataclasses.dataclass
class RequestOutput:
    request_id: str
    token_ids: list[int]  # tokens new in this event
    text: str  # text that became final with them
    finished: FinishReason | None = None
    error: str | None = None
    num_prompt_tokens: int = 0
    num_output_tokens: int = 0
    timings: RequestTimings | None = None  # on the final event
    index: int = 0  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when asked for
    # every prompt token's (None for the first), when asked for: on the sample's first event
    prompt_logprobs: list[TokenLogprob | None] | None = None
    cumulative_logprob: float | None = None  # of every sampled token, on the final event, when asked for


class RequestStream:
    """Events of one request, readable from a thread or from an event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop | None = None, n: int = 1):
        self.request_id = request_id
        self.n = n
        self._q: queue.SimpleQueue[RequestOutput] = queue.SimpleQueue()
        self._loop = loop
        self._aq: asyncio.Queue[RequestOutput] | None = asyncio.Queue() if loop is not None else None
        self.final: RequestOutput | None = None  # the last final event so far
        self.finals: dict[int, RequestOutput] = {}  # each sample's final event

    def _push(self, out: RequestOutput) -> None:
        if out.finished is not None:
            self.final = out
            self.finals[out.index] = out
        if self._loop is not None:
            try:
                self._loop.call_soon_threadsafe(self._aq.put_nowait, out)  # type: ignore[union-attr]
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass
        else:
            self._q.put(out)

    def __iter__(self) -> Iterator[RequestOutput]:
        if self._loop is not None:
            raise RuntimeError("this stream was opened from asyncio: use `async for`")
        left = self.n
        while True:
            out = self._q.get()
            yield out
            left -= out.finished is not None
            if not left:
                return

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        if self._aq is None:
            raise RuntimeError("this stream was opened without an event loop: iterate it synchronously")
        left = self.n
        while True:
            out = await self._aq.get()
            yield out
            left -= out.finished is not None
            if not left:
                return

    def result(self) -> RequestOutput:
        """Block until the request ends; the final event carries all tokens in ``token_ids`` (and
        their log-probabilities, and the prompt's, when asked for). One sample: see :meth:`results`."""
        if self.n != 1:
            raise ValueError(f"this request has {self.n} samples: use results()")
        return self.results()[0]

    def results(self) -> list[RequestOutput]:
        """Block until every sample ends; one combined final event per sample, in index order."""
        events: dict[int, list[RequestOutput]] = {}
        for out in self:
            events.setdefault(out.index, []).append(out)
        return [combine(events[i]) for i in sorted(events)]


def combine(events: list[RequestOutput]) -> RequestOutput:
    """One sample's events as one: all its tokens, text and log-probabilities on its final event."""
    ids = [t for e in events for t in e.token_ids]
    lps = [lp for e in events for lp in (e.logprobs or [])] if any(e.logprobs is not None for e in events) else None
    prompt = next((e.prompt_logprobs for e in events if e.prompt_logprobs is not None), None)
    return dataclasses.replace(events[-1], token_ids=ids, text="".join(e.text for e in events), logprobs=lps,
                               prompt_logprobs=prompt)


class Request:
    """Engine-side state of one request (touched only under the controller's lock)."""

    def __init__(
        self,
        rid: str,
        prompt: list[int],
        params: SamplingParams,
        checker: StopChecker,
        seed: int,
        stream: RequestStream,
        max_len: int,
        deadline: float | None,
    ):
        self.rid = rid
        self.prompt = prompt
        self.params = params
        self.checker = checker
        self.seed = seed
        self.stream = stream
        self.deadline = deadline
        # tokens that can ever be in the cache: the last sampled token is never fed back (a
        # max_tokens of 0 still computes the prompt's)
        self.max_cached = min(len(prompt) + max(params.max_tokens, 1) - 1, max_len - 1)
        self.max_len = max_len
        self.state = RequestState.WAITING
        self.timings = RequestTimings(arrival=time.perf_counter())
        self.holders: list[Instance] = []  # instances whose allocator holds pages for this request
        self.num_computed = 0  # tokens whose K/V are in the cache
        self.last_token: int | None = None  # sampled, not yet fed
        self.sampled: list[int] = []  # every token sampled (stop tokens included): a recompute feeds them
        self.cancelled = False
        self.sample = 0  # which of its group's n samples
        self.group: list[Request] = [self]  # every sample of the request (all share the stream)
        self.siblings: list[Request] = []  # the other samples, until the prefill hands them their first tokens
        self.prompt_logprobs: list[TokenLogprob | None] = [None]  # filled as the prompt is computed
        self.prompt_logprobs_sent = False
        self.cumulative_logprob = 0.0
        # names its full pages by their tokens (prompt, then sampled): set by the engine when its
        # instances cache prefixes; None when they do not, or when the request asks for prompt
        # log-probabilities (which a prefill started from cached pages cannot give)
        self.hash_chain: HashChain | None = None
        self.route: str | None = None  # the prompt instance a router chose (scheduling.routing)

    def fork(self, sample: int) -> "Request":
        """Sample ``sample`` of this request: same prompt, parameters, seed and stream, its own pages
        (sharing the prompt's full pages) and its own random draws (the seed folded with ``sample``)."""
        child = Request(f"{self.rid}/{sample}", self.prompt, self.params, self.checker.fresh(), self.seed,
                        self.stream, self.max_len, self.deadline)
        child.sample, child.group = sample, self.group
        if self.hash_chain is not None:
            child.hash_chain = HashChain(self.hash_chain.page_size, self.hash_chain.salt)
        child.timings = RequestTimings(arrival=self.timings.arrival)
        self.group.append(child)
        self.siblings.append(child)
        return child

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)

    @property
    def prefix_hashes(self) -> Sequence[bytes]:
        """Its full pages' hashes, prompt then sampled tokens (none without a hash chain); each page
        is hashed once, the first time it is asked for after it filled."""
        chain = self.hash_chain
        if chain is None:
            return ()
        n = self.num_prefill
        if n // chain.page_size > len(chain.hashes):
            chain.extend(self.prefill_tokens(chain.fed, n))
        return chain.hashes

    @property
    def num_sampled(self) -> int:
        return len(self.sampled)

    @property
    def num_prefill(self) -> int:
        """Tokens its next prefill computes: the prompt, and every token sampled before a preemption
        (or a lost instance) took its KV away; that prefill then samples its next token."""
        return len(self.prompt) + len(self.sampled)

    def prefill_tokens(self, start: int, end: int) -> list[int]:
        """Tokens ``[start, end)`` of what a prefill of it computes (prompt, then sampled tokens)."""
        n = len(self.prompt)
        return self.prompt[start:end] if end <= n else self.prompt[start:] + self.sampled[max(0, start - n) : end - n]

    @property
    def riding(self) -> bool:
        """A sample that waits on its first sample's prefill (it has no first token of its own yet)."""
        return self in self.group[0].siblings

    def expired(self, now: float) -> bool:
        return self.deadline is not None and now > self.deadline

    def __repr__(self) -> str:
        return f"Request({self.rid!r}, {self.state.value}, prompt={len(self.prompt)})"
