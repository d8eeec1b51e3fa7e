"""Page ids of a paged KV pool, on the host: the free list and one page table per request.

Pure Python and device-free, so the schedulers (and the simulator that drives them) own the same
allocator the engine does; the device arrays live in :mod:`distllm_jax.kv_cache`.
"""

from __future__ import annotations

from typing import Hashable

NULL_PAGE = 0  # never handed out: padding writes there and padded table entries point there


class OutOfPages(RuntimeError):
    """The pool cannot hold what was asked; callers queue the request instead of failing it."""


def pages_for(num_tokens: int, page_size: int) -> int:
    return -(-num_tokens // page_size)


class PageAllocator:
    """Host-side owner of a pool's page ids: a free list and one page table per request.

    Page 0 (:data:`NULL_PAGE`) is never handed out. Allocation is all-or-nothing, so a failed
    :meth:`ensure` leaves both the free list and the request's table unchanged, and :meth:`free` is
    idempotent, so every path that ends a request can call it without bookkeeping of its own.
    A page can be in several tables (:meth:`share`: the full prompt pages of ``n`` samples of one
    prompt); it is counted, and goes back to the free list when its last table lets it go.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError("a pool needs at least 2 pages (page 0 is the null page)")
        self.num_pages = num_pages
        self.page_size = page_size
        # LIFO free list: recently freed pages are reused first (warm in caches)
        self._free: list[int] = list(range(num_pages - 1, NULL_PAGE, -1))
        self._tables: dict[Hashable, list[int]] = {}
        self._shared: dict[int, int] = {}  # page -> tables holding it, for pages in more than one

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_pages - 1 - len(self._free)

    @property
    def capacity(self) -> int:
        return self.num_pages - 1

    def table(self, rid: Hashable) -> list[int]:
        return self._tables.get(rid, [])

    def has(self, rid: Hashable) -> bool:
        return rid in self._tables

    def extra_pages_needed(self, rid: Hashable, num_tokens: int) -> int:
        return max(0, pages_for(num_tokens, self.page_size) - len(self.table(rid)))

    def ensure(self, rid: Hashable, num_tokens: int) -> list[int]:
        """Grow ``rid``'s table to cover ``num_tokens`` tokens; returns the whole table."""
        need = self.extra_pages_needed(rid, num_tokens)
        if need > len(self._free):
            raise OutOfPages(f"request {rid!r} needs {need} more pages, {len(self._free)} free")
        table = self._tables.setdefault(rid, [])
        for _ in range(need):
            table.append(self._free.pop())
        return table

    def share(self, src: Hashable, dst: Hashable, num_pages: int) -> list[int]:
        """Start ``dst``'s table with ``src``'s first ``num_pages`` pages, held by both (pages that
        neither will write again); ``dst`` must hold none yet. Returns ``dst``'s table."""
        if self._tables.get(dst):
            raise ValueError(f"request {dst!r} already holds pages")
        pages = self.table(src)[:num_pages]
        if len(pages) < num_pages:
            raise ValueError(f"request {src!r} holds {len(pages)} pages, {num_pages} to share")
        for p in pages:
            self._shared[p] = self._shared.get(p, 1) + 1
        self._tables[dst] = list(pages)
        return self._tables[dst]

    def free(self, rid: Hashable) -> int:
        """Let go of all of ``rid``'s pages (each returns to the free list unless another table still
        holds it); a no-op for an unknown or already-freed request. Returns the pages let go of."""
        table = self._tables.pop(rid, None)
        if not table:
            return 0
        for p in reversed(table):
            held = self._shared.get(p, 1)
            if held > 2:
                self._shared[p] = held - 1
            elif held == 2:
                del self._shared[p]
            else:
                self._free.append(p)
        return len(table)

    def requests(self) -> list[Hashable]:
        return list(self._tables)

    def assert_no_leaks(self) -> None:
        """All pages free and no table left: run after every engine test."""
        if self._tables or self._shared or len(self._free) != self.num_pages - 1:
            raise AssertionError(
                f"page leak: {self.num_used} pages held by {sorted(map(str, self._tables))[:8]}"
            )
        if sorted(self._free) != list(range(1, self.num_pages)):
            raise AssertionError("free list corrupted (duplicate or foreign page ids)")
