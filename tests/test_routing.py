"""KV-aware routing of new requests across prompt instances (scheduling.routing), on allocators alone."""

from __future__ import annotations

import collections
import dataclasses

from distllm_jax.scheduling import Role
from distllm_jax.scheduling.pages import PageAllocator
from distllm_jax.scheduling.prefix_cache import page_hashes
from distllm_jax.scheduling.routing import PrefillRouter, PrefillRouting

PS = 4


@dataclasses.dataclass
class Inst:
    name: str
    role: Role = Role.PREFILL
    alloc: PageAllocator = dataclasses.field(default_factory=lambda: PageAllocator(64, PS, prefix_cache=True))
    page_size: int = PS


@dataclasses.dataclass
class Req:
    rid: str
    tokens: list[int]
    num_computed: int = 0
    route: str | None = None

    @property
    def num_prefill(self) -> int:
        return len(self.tokens)

    @property
    def prefix_hashes(self) -> list[bytes]:
        return page_hashes(self.tokens, PS, "m")


def _cache(inst: Inst, tokens: list[int]) -> None:
    """``tokens``' full pages cached on ``inst`` (a finished request's)."""
    hashes = page_hashes(tokens, PS, "m")
    inst.alloc.ensure("done", len(tokens))
    inst.alloc.register("done", hashes)
    inst.alloc.free("done")


def test_prefix_routing_weighs_cached_tokens_against_the_queue():
    a, b = Inst("a"), Inst("b")
    router = PrefillRouter(PrefillRouting.PREFIX, [a, b, Inst("d", Role.DECODE)])
    convo = list(range(10, 30))  # 5 pages
    _cache(b, convo)
    r = Req("r1", convo + [1, 2])
    choice = router.route(r, [])
    assert (choice.instance, choice.cached_tokens, choice.prefill_tokens) == ("b", 20, 2) and r.route == "b"
    # a queue of 40 tokens on b outweighs its cache: 22 tokens to prefill on a against 2 + 40
    queued = [Req(f"q{i}", list(range(100 + 20 * i, 120 + 20 * i)), route="b") for i in range(2)]
    later = Req("r2", convo + [5, 6])
    assert router.route(later, queued).instance == "a"
    short = [Req("q", list(range(200, 210)), route="b")]
    assert router.route(Req("r3", convo + [7, 8, 9]), short).instance == "b"  # 3 + 10 on b against 23 on a
    assert router.route(Req("r4", convo + [7]), queued[:1]).instance == "a"  # 21 each: the shorter queue
    assert router.decisions == collections.Counter({"b": 2, "a": 2}) and router.cache_routed == 2


def test_round_robin_and_lost_instances():
    a, b = Inst("a"), Inst("b")
    router = PrefillRouter(PrefillRouting.ROUND_ROBIN, [a, b])
    assert [router.route(Req(str(i), [1, 2, 3]), []).instance for i in range(4)] == ["a", "b", "a", "b"]
    waiting = [Req("w", [1, 2], route="b")]
    router.forget("b", waiting)
    assert waiting[0].route is None
    assert {router.route(Req(str(i), [1]), [], lost=[b]).instance for i in range(3)} == {"a"}
    assert PrefillRouter(PrefillRouting.SHARED, [a, b]).route(Req("s", [1]), []) is None
