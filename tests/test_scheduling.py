"""The scheduling policy on its own (pure, device-free): FCFS prompt batches, pull choice and room,
on-demand pages with swap-outs, chunked steps. The engine's workers and the simulator run these
same objects (tests/test_decision_parity.py checks that they do so alike)."""

from __future__ import annotations

from distllm_jax.placement.simulator import SimRequest, SimSlot
from distllm_jax.scheduling import (Admission, ChunkedScheduler, ColocatedScheduler, DecodePlan, DecodeScheduler,
                                    KVPolicy, Preemption, PrefillPlan, PrefillScheduler, Queues, RequestState, release)

RESERVE = KVPolicy(Admission.RESERVE)
from distllm_jax.scheduling.pages import PageAllocator


def slot(name="i", role="decode", pages=64, max_batch=8, max_seqs=8, page_size=4) -> SimSlot:
    return SimSlot(name, role, PageAllocator(pages + 1, page_size), max_batch, max_seqs, page_size)


def req(k: int, prompt: int, output: int) -> SimRequest:
    return SimRequest(float(k), prompt, output, rid=f"r{k}")


def test_prefill_batches_are_fcfs_within_budget_and_pool():
    q = Queues()
    s = slot("p", "prefill", pages=8)
    sched = PrefillScheduler(q, s, budget=12)
    a, b, c, d = req(0, 8, 2), req(1, 4, 2), req(2, 4, 2), req(3, 20, 2)
    q.waiting.extend([a, b, c, d])
    assert sched.plan(0.0).batch == [a, b]  # c would pass the budget
    assert (a.state, a.holders, a.prefill_start, a.prefill_instance) == (RequestState.PREFILLING, [s], 0.0, "p")
    assert sched.plan(1.0).batch == [c]  # d (5 pages) does not fit the 8 - 2 - 1 - 1 left: the head waits
    assert sched.plan(2.0) is None and list(q.waiting) == [d]
    release(q, a)
    assert sched.plan(3.0).batch == [d]  # longer than the budget: alone


def test_decode_reserves_whole_length_and_defers_to_a_less_loaded_peer():
    q, peers = Queues(), []
    src = slot("p", "prefill")
    d0, d1 = slot("d0", pages=6), slot("d1", pages=6)
    s0, s1 = DecodeScheduler(q, d0, peers, policy=RESERVE), DecodeScheduler(q, d1, peers, policy=RESERVE)
    peers += [s0, s1]
    reqs = [req(k, 8, 9) for k in range(3)]  # max_cached 16: 4 pages of 4 tokens each
    for r in reqs:
        src.alloc.ensure(r.rid, r.prompt_len)
        r.holders.append(src)
        r.num_computed, r.state = r.prompt_len, RequestState.HELD
        q.held.append(r)
    (p0,) = s0.choose_pulls(0.0)  # then s1 has the smaller load: s0 defers the next to it
    assert p0.req is reqs[0] and p0.src is src and len(p0.src_pages) == len(p0.dst_pages) == 2
    assert len(d0.alloc.table("r0")) == 4 and reqs[0].state is RequestState.MIGRATING
    (p1,) = s1.choose_pulls(0.0)
    assert p1.req is reqs[1] and s0.choose_pulls(0.0) == []  # 2 pages left: not the whole length
    assert s0.pulled(reqs[0], src) and s0.running == [reqs[0]] and not src.alloc.has("r0")
    assert s0.plan() == DecodePlan([reqs[0]])


def _running(sched, d, reqs):
    for r in reqs:
        r.num_computed, r.state, r.holders = r.prompt_len, RequestState.RUNNING, [d]
        d.alloc.ensure(r.rid, r.num_computed + 1)
        sched.running.append(r)


def test_on_demand_pages_grow_and_swap_out_the_newest():
    q = Queues()
    d = slot("d", pages=5)
    sched = DecodeScheduler(q, d, [], policy=KVPolicy(preemption=Preemption.SWAP))
    reqs = [req(k, 7, 30) for k in range(2)]  # 8 tokens cached+next: 2 pages each now
    _running(sched, d, reqs)
    assert d.alloc.num_free == 1
    for r in reqs:
        r.num_computed += 1  # one step: both cross into their third page, one page is free
    r1_pages = list(d.alloc.table("r1")[:2])
    room = sched.make_room(lambda r: r.num_computed + 1)
    assert sched.plan().batch == [reqs[0]] and list(sched.kv.swapped) == [reqs[1]]
    assert sched.kv.preemptions == {Preemption.SWAP: 1} and room.recompute == []
    (op,) = room.swaps  # its 2 pages of KV (8 tokens) go to the host before anything reuses them
    assert op.out and op.req is reqs[1] and op.pages == r1_pages
    assert reqs[1].state is RequestState.SWAPPED and not d.alloc.has("r1") and len(d.alloc.table("r0")) == 3
    q.held.append(req(9, 4, 2))
    assert sched.choose_pulls(0.0) == []  # swapped requests come back before any new pull
    sched.running.remove(reqs[0])  # it ended (its worker takes it out of the batch)
    release(q, reqs[0])
    (back,) = sched.make_room(lambda r: r.num_computed + 1).swaps
    assert not back.out and back.req is reqs[1] and len(back.pages) == 2 and len(d.alloc.table("r1")) == 3
    assert sched.plan().batch == [reqs[1]] and not sched.kv.swapped and reqs[1].state is RequestState.RUNNING


def test_recompute_requeues_the_newest_ahead_of_new_work():
    q = Queues()
    d = slot("d", pages=5)
    sched = DecodeScheduler(q, d, [])  # on demand, recompute: the engine's default
    reqs = [req(k, 7, 30) for k in range(2)]
    _running(sched, d, reqs)
    newcomer = req(5, 3, 3)
    q.waiting.append(newcomer)
    for r in reqs:
        r.num_computed += 1
        r.generated = 2
    room = sched.make_room(lambda r: r.num_computed + 1)
    assert room.recompute == [reqs[1]] and room.swaps == [] and list(q.waiting) == [reqs[1], newcomer]
    assert reqs[1].state is RequestState.WAITING and reqs[1].num_computed == 0 and reqs[1].holders == []
    assert reqs[1].num_prefill == 7 + 2  # its prompt and both tokens it produced are recomputed
    assert sched.running == [reqs[0]] and not d.alloc.has("r1")


def test_make_room_without_preempting_changes_nothing():
    q = Queues()
    d = slot("d", pages=5)
    sched = DecodeScheduler(q, d, [])
    reqs = [req(k, 7, 30) for k in range(2)]
    _running(sched, d, reqs)
    for r in reqs:
        r.num_computed += 1
    assert sched.make_room(lambda r: r.num_computed + 1, can_preempt=False) is None
    assert sched.running == reqs and d.alloc.num_free == 1 and not q.waiting


def test_on_demand_admission_keeps_the_watermark_free():
    q = Queues()
    s = slot("c", "colocated", pages=100)
    sched = ColocatedScheduler(q, s, budget=64, policy=KVPolicy(watermark=0.05))  # 5 pages
    first, second = req(0, 4 * 50, 500), req(1, 4 * 46, 500)  # 50 and 46 pages of prompt
    q.waiting.extend([first, second])
    assert sched.plan(0.0).batch == [first] and s.alloc.num_used == 50  # not its whole length (175 pages)
    first.num_computed = first.num_prefill  # its worker, as the prefill is back
    sched.prefilled(first)
    assert sched.plan(1.0) == DecodePlan([first])  # 46 + 5 > 50 free: the second waits
    assert sched.make_room(lambda r: r.num_computed + 1).grown == 1
    q.waiting.popleft()
    q.waiting.append(req(2, 4 * 44, 500))
    assert len(sched.plan(2.0).batch) == 1  # 44 + 5 <= 49


def test_colocated_prefills_first_then_decodes():
    q = Queues()
    s = slot("c", "colocated", pages=32)
    sched = ColocatedScheduler(q, s, budget=16, policy=RESERVE)
    a = req(0, 8, 4)
    q.waiting.append(a)
    plan = sched.plan(0.0)
    assert isinstance(plan, PrefillPlan) and plan.batch == [a] and len(s.alloc.table("r0")) == 3  # 11 tokens
    a.num_computed = a.num_prefill
    sched.prefilled(a)
    assert sched.plan(1.0) == DecodePlan([a]) and a.state is RequestState.RUNNING


def test_chunked_steps_mix_decode_rows_and_prompt_chunks():
    q = Queues()
    s = slot("c", "chunked", pages=32)
    sched = ChunkedScheduler(q, s, budget=10, policy=RESERVE)
    a, b = req(0, 14, 3), req(1, 6, 3)
    q.waiting.extend([a, b])
    rows = sched.plan(0.0).rows
    assert [(r.req.rid, r.start, r.length, r.chunk) for r in rows] == [("r0", 0, 10, True)]
    assert not sched.chunk_done(a, 10)
    rows = sched.plan(1.0).rows  # a's last 4 tokens, then b's first 6
    assert [(r.req.rid, r.start, r.length) for r in rows] == [("r0", 10, 4), ("r1", 0, 6)]
    assert sched.chunk_done(a, 4) and sched.chunk_done(b, 6)
    sched.prefilled(a)
    sched.prefilled(b)
    rows = sched.plan(2.0).rows
    assert [(r.req.rid, r.chunk) for r in rows] == [("r0", False), ("r1", False)]
