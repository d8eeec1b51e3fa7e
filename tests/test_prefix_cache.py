"""Automatic prefix caching in the page allocator: page hashes name whole prefixes, a matched page
holds the KV its hash promises, cached pages are evicted least recently released first and never
while a table holds them, and every page is counted once whatever the mix of requests."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from distllm_jax.scheduling.pages import NULL_PAGE, OutOfPages, PageAllocator, pages_for
from distllm_jax.scheduling.prefix_cache import page_hashes

SALT = "tiny-model|bfloat16|"


def hashes(tokens: list[int], page_size: int) -> list[bytes]:
    return page_hashes(tokens, page_size, SALT)


def prefilled(a: PageAllocator, rid: str, tokens: list[int]) -> int:
    """Admit ``rid`` through the cache and cache its full pages, as the engine's prefill will."""
    hs = hashes(tokens, a.page_size)
    hit = a.ensure_with_prefix(rid, hs, len(tokens))
    a.register(rid, hs)
    return hit


def released(a: PageAllocator, rid: str, tokens: list[int]) -> list[int]:
    """Prefill ``rid`` through the cache and end it: its full pages stay cached, evictable. Its table."""
    prefilled(a, rid, tokens)
    table = list(a.table(rid))
    a.free(rid)
    return table


def emptied(a: PageAllocator, *rids: str) -> None:
    """End ``rids``; then no leak, both with the evictable pages kept and once they are cleared."""
    for rid in rids:
        a.free(rid)
    a.assert_no_leaks()
    a.clear_cache()
    a.assert_no_leaks()
    assert a.num_cached == 0


def state(a: PageAllocator) -> tuple:
    """All a caller can see of the pool, to compare before and after a call that must change nothing."""
    tables = {r: list(a.table(r)) for r in a.requests()}
    return tables, list(a.cache.evictable), dict(a.cache.page_of), a.num_free, a.evictions


def test_page_hashes_name_whole_prefixes():
    base = list(range(1, 11))  # two full pages of 4 and two tokens
    hs = hashes(base, 4)
    assert len(hs) == 2 and all(isinstance(h, bytes) and len(h) == 16 for h in hs)
    assert hashes(base[:8], 4) == hs and hashes(base[:7], 4) == hs[:1], "a part-filled page has no hash"
    assert hashes(base + [0] * 6, 4)[:2] == hs, "the same prefix gives the same leading hashes"
    head_changed, tail_changed = hashes([0] + base[1:], 4), hashes(base[:4] + [0] + base[5:], 4)
    assert all(x != y for x, y in zip(head_changed, hs)), "a change in page 0 changes every later hash"
    assert tail_changed[0] == hs[0] and tail_changed[1] != hs[1]
    same = hashes([5] * 8, 4)
    assert same[0] != same[1], "equal pages at other positions are other prefixes"
    assert not set(page_hashes(base, 4, "other-model|bfloat16|")) & set(hs), "the salt separates models"
    assert page_hashes(base, 4, SALT.encode()) == hs
    assert not set(hashes(base[:8], 2)) & set(hs), "the page size separates pools"
    assert hashes([], 4) == [] and hashes([1, 2, 3], 4) == []
    with pytest.raises(ValueError):
        hashes(base, 0)


def test_page_hashes_agree_across_processes():
    """No Python ``hash()`` inside: another interpreter with another hash seed gets the same bytes."""
    code = ("from distllm_jax.scheduling.prefix_cache import page_hashes; "
            f"print(b''.join(page_hashes(list(range(1, 11)), 4, {SALT!r})).hex())")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == b"".join(hashes(list(range(1, 11)), 4)).hex()


def test_prefix_cache_off_behaves_as_before():
    a = PageAllocator(num_pages=9, page_size=4)
    prompt = list(range(1, 11))
    first = list(a.ensure("a", 10))
    assert first == [1, 2, 3]
    assert a.register("a", hashes(prompt, 4)) == 0 and a.num_cached == 0
    assert a.free("a") == 3 and a.num_free == 8 and a.num_evictable == 0
    assert a.match(hashes(prompt, 4)) == []
    assert a.ensure_with_prefix("b", hashes(prompt, 4), 10) == 0
    assert a.table("b") == first, "the LIFO free list hands the same pages back"
    a.free("b")
    assert a.evictions == 0
    a.assert_no_leaks()


def test_a_registered_prefix_is_matched_after_its_request_ends():
    a = PageAllocator(num_pages=9, page_size=4, prefix_cache=True)
    prompt = list(range(1, 11))
    assert prefilled(a, "a", prompt) == 0
    first = list(a.table("a"))
    assert a.num_cached == 2, "only the two full pages are cached"
    a.free("a")
    assert a.num_evictable == 2 and a.num_free == 8 and a.num_used == 0
    assert first[2] not in a.cache.hash_of and a.refcount(first[2]) == 0, "the part-filled page is freed"
    longer = hashes(prompt + [7, 7], 4)
    assert a.match(longer) == first[:2] and a.num_evictable == 2, "match takes nothing"
    assert a.match(hashes([0] + prompt[1:], 4)) == [] and a.match(hashes(prompt[:4] + [0] * 4, 4)) == first[:1]
    assert a.pages_needed_with_prefix(longer, 12) == 3, "one fresh page and two taken off the evictable list"
    assert a.ensure_with_prefix("b", longer, 12) == 2
    assert a.table("b")[:2] == first[:2] and a.num_evictable == 0 and a.num_free == 5
    assert [a.refcount(p) for p in a.table("b")] == [1, 1, 1]
    assert a.ensure_with_prefix("c", longer, 3) == 1 and a.table("c") == first[:1], "only the pages 3 tokens need"
    assert a.refcount(first[0]) == 2
    a.free("c")
    with pytest.raises(ValueError, match="already holds"):
        a.ensure_with_prefix("b", longer, 12)
    a.free("b")
    assert a.clear_cache() == 2 and a.num_cached == 0 and a.num_free == 8
    a.assert_no_leaks()


def test_eviction_takes_the_least_recently_released_tail_first():
    a = PageAllocator(num_pages=7, page_size=2, prefix_cache=True)
    (x0, x1), (y0, y1) = released(a, "x", [1, 2, 3, 4]), released(a, "y", [5, 6, 7, 8])
    assert list(a.cache.evictable) == [x1, x0, y1, y0]
    a.ensure("z", 6)  # two free pages and one evicted
    assert a.evictions == 1 and x1 in a.table("z") and x1 not in a.cache.hash_of
    assert a.match(hashes([1, 2, 3, 4], 2)) == [x0], "the head still matches"
    assert prefilled(a, "w", [5, 6, 7, 8]) == 2 and list(a.cache.evictable) == [x0]
    a.free("w")
    assert list(a.cache.evictable) == [x0, y1, y0], "released again: the most recent"
    a.ensure("z", 10)
    assert a.evictions == 3 and a.match(hashes([5, 6, 7, 8], 2)) == [y0] and list(a.cache.evictable) == [y0]
    emptied(a, "z")


def test_a_failed_ensure_changes_nothing_the_cache_included():
    a = PageAllocator(num_pages=7, page_size=2, prefix_cache=True)
    released(a, "x", [1, 2, 3, 4])
    a.ensure("y", 6)  # one page left free besides the two evictable ones
    before = state(a)
    with pytest.raises(OutOfPages):
        a.ensure("y", 14)
    with pytest.raises(OutOfPages):
        a.ensure_with_prefix("z", hashes([1, 2, 3, 4] + [9] * 6, 2), 10)  # two revived and three fresh
    assert state(a) == before and not a.has("z")
    emptied(a, "y")


def test_growing_past_a_match_evicts_other_pages_not_the_matched_ones():
    a = PageAllocator(num_pages=5, page_size=2, prefix_cache=True)
    x, z = released(a, "x", [1, 2, 3, 4]), released(a, "z", [9, 9, 9, 9])
    assert a.num_free == 4 and list(a.cache.evictable)[:2] == x[::-1], "x's pages are the oldest"
    assert a.ensure_with_prefix("y", hashes([1, 2, 3, 4, 5, 6, 7, 8], 2), 8) == 2
    assert a.table("y") == x + z[::-1] and a.evictions == 2 and a.num_free == 0
    assert a.match(hashes([1, 2, 3, 4], 2)) == x and a.match(hashes([9, 9], 2)) == []
    emptied(a, "y")


def test_a_duplicate_prefill_keeps_one_cached_copy():
    a = PageAllocator(num_pages=9, page_size=2, prefix_cache=True)
    prefilled(a, "x", [1, 2, 3, 4])
    x = list(a.table("x"))
    a.ensure("y", 4)  # prefilled the same prompt alongside, without a match
    assert a.register("y", hashes([1, 2, 3, 4], 2)) == 0
    assert not set(a.table("y")) & set(a.cache.hash_of)
    a.ensure("w", 4)
    assert a.register("w", hashes([1, 2, 9, 9], 2)) == 1, "a new page behind a duplicate is cached"
    w = list(a.table("w"))
    assert w[0] not in a.cache.hash_of and a.match(hashes([1, 2, 9, 9], 2)) == [x[0], w[1]]
    for rid in ("y", "w", "x"):
        a.free(rid)
    assert a.num_evictable == 3 and a.num_free == 8, "the duplicates went back to the free list"
    emptied(a)


def test_register_refuses_what_it_cannot_cache_and_changes_nothing():
    a = PageAllocator(num_pages=9, page_size=2, prefix_cache=True)
    prefilled(a, "x", [1, 2, 3, 4])
    before = state(a)
    with pytest.raises(ValueError, match="holds 2 pages, 3 hashes"):
        a.register("x", hashes([1, 2, 3, 4, 5, 6], 2))
    with pytest.raises(ValueError, match="under another hash"):
        a.register("x", hashes([1, 2, 0, 0], 2)[::-1])
    assert state(a) == before
    emptied(a, "x")


def test_samples_share_cached_pages_and_the_last_holder_releases_them():
    a = PageAllocator(num_pages=9, page_size=2, prefix_cache=True)
    prompt = [1, 2, 3, 4, 5]
    released(a, "x", prompt)
    assert prefilled(a, "lead", prompt) == 2
    cached = a.table("lead")[:2]
    a.share("lead", "s1", 2)
    a.ensure("s1", 5)
    assert [a.refcount(p) for p in cached] == [2, 2] and a.table("s1")[2] != a.table("lead")[2]
    a.free("lead")
    assert [a.refcount(p) for p in cached] == [1, 1] and a.num_evictable == 0
    a.free("s1")
    assert list(a.cache.evictable) == cached[::-1] and a.num_free == 8
    prefilled(a, "left", prompt)
    with pytest.raises(AssertionError, match="page leak"):
        a.assert_no_leaks()
    emptied(a, "left")


class Pool:
    """The allocator beside a model of the KV it stands for: each page's written tokens, each live
    request's sequence, and the page of tokens every registered hash promises. Each operation checks
    its own contract; :meth:`check` checks the invariants that hold between operations."""

    def __init__(self, a: PageAllocator):
        self.a, self.ps = a, a.page_size
        self.kv: dict[int, list[int | None]] = {p: [None] * self.ps for p in range(1, a.num_pages)}
        self.seqs: dict[int, list[int]] = {}
        self.promised: dict[bytes, list[int]] = {}

    def _write(self, rid: int, seq: list[int], start: int) -> None:
        """The KV write of ``seq[start:]``: only into pages the writer alone holds, uncached."""
        table = self.a.table(rid)
        for i in range(start, len(seq)):
            p = table[i // self.ps]
            assert self.a.refcount(p) == 1 and p not in self.a.cache.hash_of, "a write into a shared page"
            self.kv[p][i % self.ps] = seq[i]
        self.seqs[rid] = seq

    def _refused(self, need: int, before: tuple) -> None:
        event("out of pages")
        assert need > before[3] and state(self.a) == before, "a failed allocation changed something"

    def admit(self, rid: int, tokens: list[int]) -> None:
        a, hs = self.a, hashes(tokens, self.ps)
        promised, need, before = a.match(hs), a.pages_needed_with_prefix(hs, len(tokens)), state(a)
        try:
            hit = a.ensure_with_prefix(rid, hs, len(tokens))
        except OutOfPages:
            return self._refused(need, before)
        event(["no match", "matched a page", "matched 2+ pages"][min(hit, 2)])
        assert need <= before[3] and a.num_free == before[3] - need
        assert hit == min(len(promised), pages_for(len(tokens), self.ps)) and a.table(rid)[:hit] == promised[:hit]
        for i, p in enumerate(promised[:hit]):
            assert self.kv[p] == tokens[i * self.ps : (i + 1) * self.ps], "a match promised other tokens"
        self._write(rid, tokens, hit * self.ps)

    def grow(self, rid: int, new: list[int]) -> None:
        seq, before = self.seqs[rid], state(self.a)
        need = self.a.extra_pages_needed(rid, len(seq) + len(new))
        try:
            self.a.ensure(rid, len(seq) + len(new))
        except OutOfPages:
            return self._refused(need, before)
        self._write(rid, seq + new, len(seq))

    def register(self, rid: int) -> None:
        seq = self.seqs[rid]
        hs = hashes(seq, self.ps)
        if self.a.register(rid, hs) < len(hs):
            event("registered a page already cached")
        for i, h in enumerate(hs):
            page = seq[i * self.ps : (i + 1) * self.ps]
            assert self.promised.setdefault(h, page) == page, "one hash for two prefixes"
            assert h in self.a.cache.page_of

    def share(self, src: int, dst: int, k: int) -> None:
        k %= len(self.seqs[src]) // self.ps + 1
        self.a.share(src, dst, k)
        self.seqs[dst] = self.seqs[src][: k * self.ps]

    def free(self, rid: int) -> None:
        table = list(self.a.table(rid))
        self.a.free(rid)
        del self.seqs[rid]
        released = [p for p in reversed(table) if self.a.refcount(p) == 0 and p in self.a.cache.hash_of]
        assert list(self.a.cache.evictable)[len(self.a.cache.evictable) - len(released):] == released, \
            "released cached pages join the evictable list last, the request's last page first"

    def check(self, rid: int, evictable_before: list[int], evictions_before: int) -> None:
        a, ps = self.a, self.ps
        tables = {r: a.table(r) for r in a.requests()}
        assert set(tables) == set(self.seqs)
        held: collections.Counter[int] = collections.Counter()
        for r, t in tables.items():
            assert len(t) == len(set(t)) and NULL_PAGE not in t, "a page owned twice by one table"
            assert len(t) == pages_for(len(self.seqs[r]), ps)
            held.update(t)
        assert all(a.refcount(p) == held[p] for p in range(1, a.num_pages)), "a refcount off"
        evictable = list(a.cache.evictable)
        assert not set(evictable) & set(held) and set(evictable) <= set(a.cache.hash_of)
        assert a.num_free == a.capacity - len(held) and a.num_used == len(held), "a page lost or counted twice"
        assert {h: p for p, h in a.cache.hash_of.items()} == a.cache.page_of, "hash and page maps disagree"
        assert (a.num_cached, a.num_evictable) == (len(a.cache.hash_of), len(evictable))
        for h, p in a.cache.page_of.items():
            assert self.kv[p] == self.promised[h], "a cached page holds other tokens than its hash names"
        for r, seq in self.seqs.items():
            assert [self.kv[tables[r][i // ps]][i % ps] for i in range(len(seq))] == seq, "KV overwritten"
        evicted = [p for p in evictable_before if p not in a.cache.hash_of]
        assert len(evicted) == a.evictions - evictions_before, "an eviction uncounted, or a hash lost"
        if evicted:
            event("evicted")
            unheld = [p for p in evictable_before if not (held[p] and p in a.cache.hash_of)]
            assert evicted == unheld[: len(evicted)], "evicted other than the least recently released"
            assert all(held[p] == 1 and p in tables[rid] for p in evicted), "an evicted page is not fresh"


OPS = ["admit"] * 3 + ["grow"] * 2 + ["register"] * 3 + ["free"] * 3 + ["share", "clear"]
tokens = st.lists(st.integers(0, 2), max_size=9)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(pages=st.integers(2, 16), page_size=st.integers(2, 4),
       prefixes=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=13), min_size=1, max_size=3),
       ops=st.lists(st.tuples(st.sampled_from(OPS), st.integers(0, 3), st.integers(0, 3), tokens), min_size=20,
                     max_size=60))
def test_random_requests_keep_pages_counted_and_matches_true(pages, page_size, prefixes, ops):
    """Random admissions from a few shared prefixes (ending anywhere in a page), growth, registering,
    sharing, freeing and clearing on random pool sizes: after every operation each page is free,
    evictable or held (its refcount the tables holding it), the cache's maps are inverse, and every
    cached, matched or held page holds the tokens it should."""
    a = PageAllocator(pages + 1, page_size, prefix_cache=True)
    pool = Pool(a)
    for op, rid, other, new in ops:
        evictable, evictions = list(a.cache.evictable), a.evictions
        live = rid in pool.seqs
        if op == "admit" and not live:
            pool.admit(rid, prefixes[other % len(prefixes)] + new)
        elif op == "grow" and live:
            pool.grow(rid, new)
        elif op == "register" and live:
            pool.register(rid)
        elif op == "free" and live:
            pool.free(rid)
        elif op == "share" and not live and other in pool.seqs:
            pool.share(other, rid, len(new))
        elif op == "clear":
            held_cached = sum(a.refcount(p) > 0 for p in a.cache.hash_of)
            assert a.clear_cache() == len(evictable) and a.num_cached == held_cached
            evictable = []
        pool.check(rid, evictable, evictions)
    for rid in list(pool.seqs):
        pool.free(rid)
    emptied(a)
