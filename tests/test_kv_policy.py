"""Pages on demand and preemption, as policy alone: the schedulers drive a fake model whose KV pool
holds the tokens themselves, so a page owned twice, a page lost, a swap that brings back the wrong
KV or a recompute that feeds the wrong tokens shows as a wrong token or a failed check."""

from __future__ import annotations

import dataclasses

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from distllm_jax.scheduling import (ChunkedScheduler, ColocatedScheduler, KVPolicy, PrefillPlan, Preemption, Queues,
                                    RequestState, release)
from distllm_jax.scheduling.pages import NULL_PAGE, PageAllocator, pages_for
from distllm_jax.placement.simulator import SimSlot


def next_token(prefix: list[int]) -> int:
    """The fake model: the next token is a function of the whole prefix, as a real one's is."""
    return hash(tuple(prefix)) % 997


@dataclasses.dataclass(eq=False)
class Req:
    rid: str
    prompt: list[int]
    max_tokens: int
    arrival: int
    output: list[int] = dataclasses.field(default_factory=list)
    state: RequestState = RequestState.WAITING
    holders: list = dataclasses.field(default_factory=list)
    siblings: list = dataclasses.field(default_factory=list)
    num_computed: int = 0
    prefill_start: float | None = None
    migration_start: float | None = None
    prefill_instance: str | None = None
    decode_instance: str | None = None
    route: str | None = None

    @property
    def timings(self):
        return self

    @property
    def num_prompt(self) -> int:
        return len(self.prompt)

    @property
    def num_prefill(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def max_cached(self) -> int:
        return len(self.prompt) + self.max_tokens - 1

    def reference(self) -> list[int]:
        seq = list(self.prompt)
        for _ in range(self.max_tokens):
            seq.append(next_token(seq))
        return seq[len(self.prompt):]


class FakeInstance:
    """The mechanism: a pool whose slots hold the token written there, and host copies of swaps."""

    def __init__(self, slot: SimSlot):
        self.slot, self.ps = slot, slot.page_size
        self.pool = {p: [None] * self.ps for p in range(slot.alloc.num_pages)}
        self.host: dict[str, list[list]] = {}

    def write(self, r: Req, start: int, tokens: list[int]) -> None:
        table = r.holders and self.slot.alloc.table(r.rid)
        assert table and len(table) >= pages_for(start + len(tokens), self.ps), "a write past the pages it holds"
        for i, t in enumerate(tokens, start):
            assert table[i // self.ps] != NULL_PAGE
            self.pool[table[i // self.ps]][i % self.ps] = t

    def check_kv(self, r: Req) -> None:
        """The KV of every cached position is the token the sequence has there."""
        table, seq = self.slot.alloc.table(r.rid), r.prompt + r.output
        got = [self.pool[table[i // self.ps]][i % self.ps] for i in range(r.num_computed)]
        assert got == seq[: r.num_computed], f"{r.rid}: KV lost or mixed up"

    def execute(self, room) -> None:
        for op in room.swaps:
            if op.out:
                self.host[op.req.rid] = [list(self.pool[p]) for p in op.pages]
            else:
                for p, content in zip(op.pages, self.host.pop(op.req.rid)):
                    self.pool[p] = list(content)


def check_pages(alloc: PageAllocator) -> None:
    owned = [p for rid in alloc.requests() for p in alloc.table(rid)]
    assert len(owned) == len(set(owned)) and NULL_PAGE not in owned, "a page owned twice"
    assert len(owned) + alloc.num_free == alloc.capacity, "a page lost"


def run(reqs: list[Req], sched, inst: FakeInstance, queues: Queues) -> None:
    """Steps until every request is done: arrivals by step number, then the scheduler's plan run on
    the fake model, checking the pages and the KV at every step."""
    chunked = isinstance(sched, ChunkedScheduler)
    pending, now, done = sorted(reqs, key=lambda r: r.arrival), 0, []

    def finish_or_go_on(r: Req) -> None:
        if len(r.output) == r.max_tokens:
            release(queues, r)
            r.state = RequestState.DONE
            done.append(r)
        else:
            sched.prefilled(r)

    def decode(r: Req) -> None:
        inst.check_kv(r)
        inst.write(r, r.num_computed, [r.output[-1]])
        r.num_computed += 1
        r.output.append(next_token(r.prompt + r.output))
        if len(r.output) == r.max_tokens:
            sched.running.remove(r)
            finish_or_go_on(r)

    def sample(r: Req) -> None:
        r.num_computed = r.num_prefill
        r.output.append(next_token(r.prompt + r.output))

    while len(done) < len(reqs):
        now += 1
        assert now < 20_000, "no progress"
        while pending and pending[0].arrival <= now:
            queues.waiting.append(pending.pop(0))
        room = sched.make_room(lambda r: r.num_computed + 1)
        inst.execute(room)
        plan = sched.plan(float(now))
        if plan is None:
            continue
        if isinstance(plan, PrefillPlan):
            for r in plan.batch:
                inst.write(r, 0, r.prompt + r.output)
                sample(r)
                finish_or_go_on(r)
        elif not chunked:
            for r in list(sched.running):
                decode(r)
        else:
            for row in plan.rows:
                r = row.req
                if not row.chunk:
                    decode(r)
                    continue
                inst.write(r, row.start, (r.prompt + r.output)[row.start : row.start + row.length])
                if sched.chunk_done(r, row.length):
                    r.num_computed -= row.length  # sample() sets it again
                    sample(r)
                    finish_or_go_on(r)
        check_pages(sched.inst.alloc)
    assert not inst.host, "a host copy left behind"


requests = st.lists(st.tuples(st.integers(1, 20), st.integers(1, 30), st.integers(0, 15)), min_size=1, max_size=12)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(reqs=requests, pages=st.integers(16, 48), page_size=st.integers(2, 4),
       preemption=st.sampled_from(list(Preemption)), watermark=st.sampled_from([0.0, 0.05]),
       chunked=st.booleans(), max_batch=st.integers(1, 6))
def test_preempted_requests_finish_with_their_own_tokens(reqs, pages, page_size, preemption, watermark, chunked,
                                                         max_batch):
    slot = SimSlot("c", "chunked" if chunked else "colocated", PageAllocator(pages + 1, page_size), max_batch,
                   max_batch, page_size)
    made = [Req(f"r{k}", [(7 * k + j) % 251 + 1 for j in range(p)], n, a) for k, (p, n, a) in enumerate(reqs)]
    made = [r for r in made if pages_for(r.max_cached, page_size) <= pages]  # the engine refuses the rest
    queues = Queues()
    policy = KVPolicy(preemption=preemption, watermark=watermark)
    kind = ChunkedScheduler if chunked else ColocatedScheduler
    sched = kind(queues, slot, 8 if chunked else 64, policy)
    run(made, sched, FakeInstance(slot), queues)
    for r in made:
        assert r.output == r.reference(), f"{r.rid} preempted {sched.kv.preemptions}"
    slot.alloc.assert_no_leaks()


def test_an_overflowing_workload_preempts_by_both_kinds():
    """Not only possible: the hypothesis test above does preempt (here, deterministically)."""
    for preemption in Preemption:
        slot = SimSlot("c", "colocated", PageAllocator(17, 4), 8, 8, 4)
        made = [Req(f"r{k}", [k + 1] * 10, 30, 0) for k in range(6)]  # 6 x 10 pages worst case, 16 pages
        queues = Queues()
        sched = ColocatedScheduler(queues, slot, 64, KVPolicy(preemption=preemption))
        run(made, sched, FakeInstance(slot), queues)
        assert all(r.output == r.reference() for r in made)
        assert sched.kv.preemptions[preemption] > 0 and sum(sched.kv.preemptions.values()) == sched.kv.preemptions[preemption]
