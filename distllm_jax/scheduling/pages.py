"""Page ids of a paged KV pool, on the host: the free list, one page table per request, and the
pages kept for automatic prefix caching.

Pure Python and device-free, so the schedulers (and the simulator that drives them) own the same
allocator the engine does; the device arrays live in :mod:`distllm_jax.kv_cache`.
"""

from __future__ import annotations

from typing import Hashable, Sequence

from distllm_jax.scheduling.prefix_cache import PrefixIndex

NULL_PAGE = 0  # never handed out: padding writes there and padded table entries point there


class OutOfPages(RuntimeError):
    """The pool cannot hold what was asked; callers queue the request instead of failing it."""


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    """Host-side owner of a pool's page ids: a free list and one page table per request.

    Page 0 (:data:`NULL_PAGE`) is never handed out. Allocation is all-or-nothing, so a failed
    :meth:`ensure` leaves the free list, the cache and the request's table unchanged, and :meth:`free`
    is idempotent, so every path that ends a request can call it without bookkeeping of its own.
    A page can be in several tables (:meth:`share`: the full prompt pages of ``n`` samples of one
    prompt; :meth:`ensure_with_prefix`: a cached prefix); it is counted, and is let go of when its
    last table lets it go.

    With ``prefix_cache`` on, :meth:`register` names a request's full pages by their page hashes
    (:func:`~distllm_jax.scheduling.prefix_cache.page_hashes`), and a later request whose leading
    hashes match starts its table with those pages instead of computing their KV again. A cached
    page that no table holds is not freed but kept *evictable* (still matchable) until :meth:`ensure`
    runs short of free pages and takes the least recently released one. So :attr:`num_free` counts
    free and evictable pages alike: both are pages a request could get now. With it off nothing is
    ever cached and the allocator behaves as it did without a cache.
    """

    def __init__(self, num_pages: int, page_size: int, prefix_cache: bool = False):
        if num_pages < 2:
            raise ValueError("a pool needs at least 2 pages (page 0 is the null page)")
        self.num_pages = num_pages
        self.page_size = page_size
        self.prefix_cache = prefix_cache
        # LIFO free list: recently freed pages are reused first (warm in caches)
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._shared: dict[int, int] = {}  # page -> tables holding it, for pages in more than one
        self.cache = PrefixIndex()  # stays empty with prefix_cache off
        self.evictions = 0  # cached pages taken back for other KV

    @property
    def num_free(self) -> int:
        """Pages a request could get now: free ones and evictable cached ones."""
        return len(self._free) + len(self.cache.evictable)

    @property
    def num_used(self) -> int:
        """Pages held by at least one table."""
        return self.num_pages - 1 - len(self._free) - len(self.cache.evictable)

    @property
    def num_cached(self) -> int:
        """Pages holding a cached hash, held by a table or evictable."""
        return len(self.cache.hash_of)

    @property
    def num_evictable(self) -> int:
        return len(self.cache.evictable)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def table(self, rid: Hashable) -> list[int]:
        return self._tables.get(rid, [])

    def has(self, rid: Hashable) -> bool:
        return rid in self._tables

    def refcount(self, page: int) -> int:
        """Tables holding ``page`` (0: free or evictable). Scans the free list, so it is for checks."""
        if not NULL_PAGE < page < self.num_pages:
            raise ValueError(f"page {page} is not in a pool of {self.num_pages}")
        if page in self.cache.evictable or page in self._free:
            return 0
        return self._shared.get(page, 1)

    def extra_pages_needed(self, rid: Hashable, num_tokens: int) -> int:
        return max(0, pages_for(num_tokens, self.page_size) - len(self.table(rid)))

    def ensure(self, rid: Hashable, num_tokens: int) -> list[int]:
        """Grow ``rid``'s table to cover ``num_tokens`` tokens; returns the whole table. Free pages go
        first; only when they run short are the least recently released cached pages evicted."""
        need = self.extra_pages_needed(rid, num_tokens)
        if need > self.num_free:
            raise OutOfPages(f"request {rid!r} needs {need} more pages, {self.num_free} free")
        table = self._tables.setdefault(rid, [])
        table.extend(self._fresh(need))
        return table

    def match(self, hashes: Sequence[bytes]) -> list[int]:
        """The cached pages of the longest leading run of ``hashes``; takes nothing."""
        pages = []
        for h in hashes:
            page = self.cache.page_of.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def pages_needed_with_prefix(self, hashes: Sequence[bytes], num_tokens: int) -> int:
        """What :meth:`ensure_with_prefix` would take out of :attr:`num_free` for a request holding no
        pages: fresh pages past the matched prefix, and the matched pages that are evictable now (taking
        them makes them unavailable to others). For admission checks against ``num_free``."""
        return self._prefix_plan(hashes, num_tokens)[1]

    def ensure_with_prefix(self, rid: Hashable, hashes: Sequence[bytes], num_tokens: int) -> int:
        """Start ``rid``'s table with the cached pages :meth:`match` finds for ``hashes`` (held, so no
        longer evictable), then grow it to cover ``num_tokens`` tokens as :meth:`ensure` does. Returns
        the pages matched: the prefill skips that many pages of tokens.

        One call rather than a match, a take and an ensure, so that it is all-or-nothing like
        :meth:`ensure` (OutOfPages changes nothing, the cache's recency order included) and so that
        growing cannot evict the very pages just matched. ``rid`` must hold no pages: a cached prefix
        can only be a table's first pages."""
        if self._tables.get(rid):
            raise ValueError(f"request {rid!r} already holds pages")
        hit, need = self._prefix_plan(hashes, num_tokens)
        if need > self.num_free:
            raise OutOfPages(f"request {rid!r} needs {need} more pages, {self.num_free} free")
        for p in hit:
            self._hold(p)
        self._tables[rid] = hit + self._fresh(pages_for(num_tokens, self.page_size) - len(hit))
        return len(hit)

    def register(self, rid: Hashable, hashes: Sequence[bytes]) -> int:
        """Cache ``rid``'s first ``len(hashes)`` pages under ``hashes`` once their KV is written (after
        its prefill). Pass full pages' hashes only: a part-filled page is still being written.

        A page already cached under its hash (it came from a match) stays as it is. When another page
        already holds a hash, the cache keeps that one copy: this page stays private to ``rid`` and goes
        back to the free list when freed (its table entry cannot be swapped for the cached copy, as a
        step in flight may read it). A no-op with ``prefix_cache`` off, so callers need not check.
        Returns the pages newly cached."""
        if not self.prefix_cache:
            return 0
        table = self.table(rid)
        if len(hashes) > len(table):
            raise ValueError(f"request {rid!r} holds {len(table)} pages, {len(hashes)} hashes to cache")
        for h, page in zip(hashes, table):
            if self.cache.hash_of.get(page, h) != h:
                raise ValueError(f"page {page} of request {rid!r} is cached under another hash")
        added = 0
        for h, page in zip(hashes, table):
            if page not in self.cache.hash_of and h not in self.cache.page_of:
                self.cache.add(h, page)
                added += 1
        return added

    def share(self, src: Hashable, dst: Hashable, num_pages: int) -> list[int]:
        """Start ``dst``'s table with ``src``'s first ``num_pages`` pages, held by both (pages that
        neither will write again); ``dst`` must hold none yet. Returns ``dst``'s table."""
        if self._tables.get(dst):
            raise ValueError(f"request {dst!r} already holds pages")
        pages = self.table(src)[:num_pages]
        if len(pages) < num_pages:
            raise ValueError(f"request {src!r} holds {len(pages)} pages, {num_pages} to share")
        for p in pages:
            self._hold(p)
        self._tables[dst] = list(pages)
        return self._tables[dst]

    def free(self, rid: Hashable) -> int:
        """Let go of all of ``rid``'s pages; a no-op for an unknown or already-freed request. Returns
        the pages let go of. A page no other table holds goes back to the free list, or, if cached, to
        the evictable ones; last page first, so that a prefix's tail is evicted before its head (a tail
        page matches only while every page before it is cached)."""
        table = self._tables.pop(rid, None)
        if not table:
            return 0
        for p in reversed(table):
            held = self._shared.get(p, 1)
            if held > 2:
                self._shared[p] = held - 1
            elif held == 2:
                del self._shared[p]
            elif p in self.cache.hash_of:
                self.cache.release(p)
            else:
                self._free.append(p)
        return len(table)

    def clear_cache(self) -> int:
        """Forget every evictable cached page, back to the free list (cached pages a table holds stay
        cached). Returns the pages let go of."""
        n = len(self.cache.evictable)
        while self.cache.evictable:
            self._free.append(self.cache.evict())
        return n

    def requests(self) -> list[Hashable]:
        return list(self._tables)

    def assert_no_leaks(self) -> None:
        """No table left and every page free or evictable, once: run after every engine test."""
        idle = self._free + list(self.cache.evictable)
        if self._tables or self._shared or len(idle) != self.num_pages - 1:
            raise AssertionError(
                f"page leak: {self.num_used} pages held by {sorted(map(str, self._tables))[:8]}"
            )
        if sorted(idle) != list(range(1, self.num_pages)):
            raise AssertionError("free list corrupted (duplicate or foreign page ids)")
        index = self.cache
        if set(index.hash_of) != set(index.evictable) or {h: p for p, h in index.hash_of.items()} != index.page_of:
            raise AssertionError("prefix cache corrupted (a cached page held, lost, or named twice)")

    def _prefix_plan(self, hashes: Sequence[bytes], num_tokens: int) -> tuple[list[int], int]:
        """The matched pages a table covering ``num_tokens`` would start with, and the pages of
        :attr:`num_free` that taking them and growing past them uses up."""
        hit = self.match(hashes)[: pages_for(num_tokens, self.page_size)]
        revived = sum(p in self.cache.evictable for p in hit)
        return hit, pages_for(num_tokens, self.page_size) - len(hit) + revived

    def _hold(self, page: int) -> None:
        """One more table holds ``page``: an evictable page leaves the evictable list."""
        if not self.cache.take(page):
            self._shared[page] = self._shared.get(page, 1) + 1

    def _fresh(self, n: int) -> list[int]:
        """``n`` pages no table holds, the caller having checked :attr:`num_free`: free ones first,
        then evicted ones."""
        pages = []
        for _ in range(n):
            if self._free:
                pages.append(self._free.pop())
            else:
                pages.append(self.cache.evict())
                self.evictions += 1
        return pages
