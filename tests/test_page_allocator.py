"""The host-side page allocator never leaks, never double-books, and fails atomically."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from distllm_jax.kv_cache import NULL_PAGE, OutOfPages, PageAllocator, pages_for


def test_basic_lifecycle():
    a = PageAllocator(num_pages=9, page_size=4)
    assert a.capacity == 8 and a.num_free == 8
    t = a.ensure("r1", 5)
    assert len(t) == 2 and NULL_PAGE not in t
    assert a.ensure("r1", 8) == t, "no growth needed within the pages held"
    assert len(a.ensure("r1", 9)) == 3
    assert a.free("r1") == 3 and a.free("r1") == 0
    a.assert_no_leaks()


def test_out_of_pages_is_atomic():
    a = PageAllocator(num_pages=5, page_size=2)
    a.ensure("a", 4)
    before = (a.num_free, list(a.table("b")))
    with pytest.raises(OutOfPages):
        a.ensure("b", 7)
    assert (a.num_free, list(a.table("b"))) == before and not a.has("b")
    a.free("a")
    a.assert_no_leaks()


def test_leak_check_fires():
    a = PageAllocator(num_pages=3, page_size=2)
    a.ensure("x", 1)
    with pytest.raises(AssertionError, match="page leak"):
        a.assert_no_leaks()


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["ensure", "free"]), st.integers(0, 5), st.integers(1, 40)),
                    max_size=60))
def test_random_operations_keep_invariants(ops):
    """Against a model of its own (pages held per request): every ``ensure`` that raises OutOfPages
    asked for more pages than were free, every other one succeeds, and a failure changes nothing."""
    a = PageAllocator(num_pages=17, page_size=4)
    held_model: dict[int, int] = {}
    for op, rid, n in ops:
        if op == "ensure":
            have = held_model.get(rid, 0)
            extra = max(0, pages_for(n, 4) - have)
            free_before, table_before = a.num_free, list(a.table(rid))
            try:
                a.ensure(rid, n)
            except OutOfPages:
                assert extra > a.capacity - sum(held_model.values()), (rid, n, held_model)
                assert (a.num_free, list(a.table(rid))) == (free_before, table_before)
            else:
                assert extra <= a.capacity - sum(held_model.values()), (rid, n, held_model)
                assert len(a.table(rid)) == have + extra and a.table(rid)[:have] == table_before
                held_model[rid] = have + extra
        else:
            a.free(rid)
            held_model.pop(rid, None)
        held = [p for r in a.requests() for p in a.table(r)]
        assert len(held) == len(set(held)), "a page is in two tables"
        assert NULL_PAGE not in held
        assert len(held) + a.num_free == a.capacity
        assert {r: len(a.table(r)) for r in a.requests() if a.table(r)} == {r: k for r, k in held_model.items() if k}
    for r in a.requests():
        a.free(r)
    a.assert_no_leaks()


def test_shared_pages_are_freed_once_by_the_last_holder():
    a = PageAllocator(num_pages=9, page_size=4)
    lead = list(a.ensure("lead", 10))  # 3 pages: 2 full prompt pages and a part-filled one
    assert a.share("lead", "s1", 2) == lead[:2]
    a.ensure("s1", 10)
    assert a.table("s1")[:2] == lead[:2] and a.table("s1")[2] not in lead and a.num_free == 4
    with pytest.raises(ValueError, match="already holds"):
        a.share("lead", "s1", 1)
    with pytest.raises(ValueError, match="holds 3 pages, 4 to share"):
        a.share("lead", "s2", 4)
    assert a.free("lead") == 3 and a.num_free == 5  # only its own page came back
    with pytest.raises(AssertionError, match="page leak"):
        a.assert_no_leaks()
    assert a.free("s1") == 3 and a.num_free == 8
    a.assert_no_leaks()


@settings(max_examples=150, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["ensure", "share", "free"]), st.integers(0, 5), st.integers(0, 5),
                              st.integers(1, 24)), max_size=60))
def test_random_sharing_keeps_counts(ops):
    """Against a model of its own (each table's pages): a page is free exactly when no table holds
    it, a shared page is in every table that shares it, and every page comes back once."""
    a = PageAllocator(num_pages=17, page_size=4)
    tables: dict[int, list[int]] = {}
    for op, rid, other, n in ops:
        if op == "ensure":
            try:
                tables[rid] = list(a.ensure(rid, n))
            except OutOfPages:
                pass
        elif op == "share":
            k = min(len(tables.get(other, [])), pages_for(n, 4))
            if tables.get(rid) or rid == other:
                continue
            tables[rid] = list(a.share(other, rid, k))
            if not tables[rid]:
                tables.pop(rid)
        else:
            a.free(rid)
            tables.pop(rid, None)
        held = {p for t in tables.values() for p in t}
        assert NULL_PAGE not in held
        assert len(held) + a.num_free == a.capacity, "a page is both free and held, or lost"
        assert {r: a.table(r) for r in a.requests() if a.table(r)} == {r: t for r, t in tables.items() if t}
    for r in a.requests():
        a.free(r)
    a.assert_no_leaks()
