"""Automatic prefix caching's bookkeeping: the hash chain that names a full page by the whole prefix
it ends, and the index of which pool page holds which hash.

A page's hash covers its tokens *and* every token before it (it chains the previous page's hash), so
two requests whose leading hashes agree have the same KV in those pages and can share them, as in
vLLM's hash-based design. The :class:`~distllm_jax.scheduling.pages.PageAllocator` owns the pages
and their reference counts; :class:`PrefixIndex` only remembers hashes and the order cached pages
were let go of, so that the allocator stays the one owner of every page id.
"""

from __future__ import annotations

import collections
import hashlib
import struct
from typing import Sequence

PAGE_HASH_BYTES = 16  # sha256 truncated: 128 bits keep a collision out of reach of any pool's traffic


def page_hashes(tokens: Sequence[int], page_size: int, salt: bytes | str) -> list[bytes]:
    """One hash per *full* page of ``tokens``, page ``i``'s hash taken over page ``i - 1``'s hash and
    page ``i``'s token ids, so equal hashes mean equal whole prefixes; a part-filled last page has
    none (it is still being written, so no other request may share it).

    ``salt`` seeds the chain (the engine passes model name, dtype and page size, so another model's
    KV never matches); the page size is hashed too. sha256 rather than :func:`hash`, so hashes agree
    across processes and runs. A caller that must compute at least one token of a fully cached prompt
    (its logits sample the first output token) hashes ``tokens[:-1]``: a leading run of the same chain.
    """
    return HashChain(page_size, salt).extend(tokens)


class HashChain:
    """:func:`page_hashes` of a sequence that grows (a request's prompt, then its sampled tokens),
    each page hashed once, when it fills: ``extend`` takes the tokens that follow those it was given
    before (``fed`` of them so far)."""

    def __init__(self, page_size: int, salt: bytes | str):
        if page_size < 1:
            raise ValueError(f"page size must be positive, got {page_size}")
        seed = salt.encode() if isinstance(salt, str) else salt
        self.page_size, self.salt = page_size, salt
        self.hashes: list[bytes] = []
        self.fed = 0
        self._pending: list[int] = []  # tokens of the part-filled page
        self._prev = hashlib.sha256(b"distllm-prefix\0" + struct.pack("<q", page_size) + seed).digest()[:PAGE_HASH_BYTES]

    def extend(self, tokens: Sequence[int]) -> list[bytes]:
        """Feed the next ``tokens``; returns the hashes of every full page so far (the chain's own
        list: do not modify it)."""
        ps, pending = self.page_size, self._pending
        pending.extend(tokens)
        self.fed += len(tokens)
        start = 0
        while len(pending) - start >= ps:
            page = struct.pack(f"<{ps}q", *pending[start : start + ps])
            self._prev = hashlib.sha256(self._prev + page).digest()[:PAGE_HASH_BYTES]
            self.hashes.append(self._prev)
            start += ps
        del pending[:start]
        return self.hashes


class PrefixIndex:
    """Which page holds which hash (``page_of`` and its inverse ``hash_of``: one page per hash, one
    hash per page), and the cached pages that no table holds (``evictable``, least recently let go of
    first): those stay matchable until the allocator needs their pages for something else."""

    def __init__(self) -> None:
        self.page_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: collections.OrderedDict[int, None] = collections.OrderedDict()

    def add(self, h: bytes, page: int) -> None:
        self.page_of[h] = page
        self.hash_of[page] = h

    def release(self, page: int) -> None:
        """``page``'s last table let it go: evictable, the most recently released."""
        self.evictable[page] = None

    def take(self, page: int) -> bool:
        """``page`` is held again: off the evictable list. Returns whether it was there."""
        if page not in self.evictable:
            return False
        del self.evictable[page]
        return True

    def evict(self) -> int:
        """The least recently released evictable page, its hash forgotten (its KV will be overwritten)."""
        page, _ = self.evictable.popitem(last=False)
        del self.page_of[self.hash_of.pop(page)]
        return page
