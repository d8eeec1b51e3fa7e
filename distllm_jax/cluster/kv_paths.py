"""KV migration between instance actors, behind the engine's ``KVPuller`` interface.

Two paths; the serving process only passes small handles between the actors, never the KV itself:

- ``transfer-server``: the source actor gathers the pages and registers them with its jax transfer
  server (a :class:`~distllm_jax.engine.transfer_server.KVOffer`); the destination actor pulls them by
  uuid straight into its devices. Between GPU hosts this is the path (device to device over the
  network, no host copy).
- ``staged``: the source gathers the pages and copies them to the host; Ray's object store carries the
  arrays (shared memory on one node, its object transfer between nodes) to the destination, which
  puts them on its devices and scatters them into its pool. For backends without a transfer server.

The offer (or the host arrays) goes from source to destination as a Ray object reference, so the
serving process issues both calls at once and waits once. When a pull fails, both actors are pinged:
a dead one is reported as :class:`InstanceLost` (the controller redoes or re-queues the request),
anything else is the error itself.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from distllm_jax.engine.controller import InstanceLost
from distllm_jax.engine.transfer import page_buckets
from distllm_jax.kv_cache import NULL_PAGE

PATHS = ("transfer-server", "staged")


class RemoteKVPuller:
    staged = False  # both halves are actor calls, issued together

    def __init__(self, kind: str, max_pages: int, timeout_s: float = 120.0):
        if kind not in PATHS:
            raise ValueError(f"KV path must be one of {PATHS}, got {kind!r}")
        self.kind = kind
        self.buckets = page_buckets(max_pages)
        self.timeout_s = timeout_s
        self.fallbacks = 0  # transfer-server pulls redone on the staged path

    def pull(self, src: Any, src_pages: Sequence[int], dst: Any, dst_pages: Sequence[int]) -> str:
        """Move ``src_pages`` of every layer of actor ``src`` into ``dst_pages`` of actor ``dst``;
        returns when they are in place, with the path that moved them. A transfer-server pull that
        fails while both actors live (a peer's death can break the transport for a moment) is redone
        on the staged path: the pages are still in the source."""
        if len(src_pages) != len(dst_pages):
            raise ValueError(f"page counts differ: {len(src_pages)} source, {len(dst_pages)} destination")
        kind = self.kind  # read once: a replacement's warm-up may switch the engine to staged meanwhile
        try:
            self._move(kind, src, list(src_pages), dst, list(dst_pages))
            return kind
        except Exception as e:
            for side in (src, dst):
                if not side.alive():
                    raise InstanceLost(side, e) from e
            if kind != "transfer-server":
                raise
            self.fallbacks += 1
        self._move("staged", src, list(src_pages), dst, list(dst_pages))
        return "staged"

    def _move(self, kind: str, src: Any, src_pages: list[int], dst: Any, dst_pages: list[int]) -> None:
        import ray

        if kind == "transfer-server":
            sent = src.actor.offer.remote(src_pages, dst.stage_ranges, dst.spec.tp)
            done = dst.actor.fetch.remote(sent, dst_pages)
        else:
            sent = src.actor.export_pages.remote(src_pages)
            done = dst.actor.import_pages.remote(sent, dst_pages)
        ray.get(done, timeout=self.timeout_s)

    def warmup(self, src: Any, dst: Any, tick: Callable[[str], None] = lambda _: None) -> None:
        """Compile the pair's programs for every page bucket: the staged path's always (it is the
        fallback), the transfer server's when that is the path."""
        for kind in dict.fromkeys((self.kind, "staged")):
            for size in self.buckets:
                tick(f"{kind} {src.name}->{dst.name} {size} pages")
                self._move(kind, src, [NULL_PAGE] * size, dst, [NULL_PAGE] * size)
