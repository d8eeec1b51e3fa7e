"""KV migration through jax's transfer server (``jax.experimental.transfer``), for instances that live
in different processes or hosts; it also runs in one process (engine option ``kv_transfer``).

The two halves meet through a picklable :class:`KVOffer`:

- the **sender** (prefill side) gathers the request's pages into contiguous buffers, one per pair of
  overlapping (source stage, destination stage) layer ranges, and registers them with its server
  (``await_pull``); the buffers stay alive until pulled;
- the **receiver** (decode side) pulls each buffer by its uuid straight into device memory on its own
  devices, reshards it onto its pool's sharding, and scatters it into the (donated) pool.

The transfer moves shard by shard, so the receiving sharding must have the sender's shard layout:
both sides use ``g = gcd(tp_src, tp_dst)`` shards over KV heads (one shard when the heads do not
divide), the sender's on its first ``g`` devices and the receiver's on its first ``g``.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Any, Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from distllm_jax.engine.transfer import gather_pages_jit, page_buckets, page_index, scatter_pages_jit, warm_pulls
from distllm_jax.parallel import TP
from distllm_jax.shapes import bucket


def start_server(devices: Sequence[jax.Device] | None = None, host: str = "127.0.0.1") -> Any:
    from jax.experimental import transfer

    client = (devices or jax.devices())[0].client
    return transfer.start_transfer_server(client, f"{host}:0", [f"{host}:0"])


@dataclasses.dataclass(frozen=True)
class KVPart:
    uuid: int
    lo: int  # first layer (absolute)
    hi: int
    shape: tuple[int, ...]  # [hi-lo, pages (bucketed), page_size, kv_heads, head_dim]
    dtype: str


@dataclasses.dataclass(frozen=True)
class KVOffer:
    """Everything the receiver needs: where to pull from and what arrives (picklable)."""

    address: str
    num_pages: int  # real pages (the buffers are padded to a bucket)
    shards: int
    parts: tuple[KVPart, ...]


def _shards(src_tp: int, dst_tp: int, kv_heads: int) -> int:
    g = math.gcd(src_tp, dst_tp)
    return g if kv_heads % g == 0 else 1


def _layout(devices: Sequence[jax.Device], g: int) -> NamedSharding:
    spec = PartitionSpec(None, None, None, TP, None) if g > 1 else PartitionSpec()
    return NamedSharding(Mesh(np.asarray(list(devices)[:g]), (TP,)), spec)


_uuids = itertools.count((os.getpid() & 0xFFFF) << 40)


class TransferKVSender:
    def __init__(self, server: Any, max_pages: int):
        self.server = server
        self.address = server.address()
        self.buckets = page_buckets(max_pages)

    def offer(self, src: Any, pages: Sequence[int], dst_ranges: Sequence[tuple[int, int]], dst_tp: int) -> KVOffer:
        """Gather ``pages`` of every layer of ``src`` and register them for one pull."""
        size = bucket(self.buckets, len(pages))
        g = _shards(src.spec.tp, dst_tp, src.cfg.num_kv_heads)
        parts = []
        for s in src.stages:
            layout = _layout(list(s.mesh.devices.flat), g)
            for dlo, dhi in dst_ranges:
                lo, hi = max(s.lo, dlo), min(s.hi, dhi)
                if lo >= hi:
                    continue
                with src.lock:
                    k, v = gather_pages_jit(s.pool, page_index(pages, size, s.mesh), lo=lo - s.lo, hi=hi - s.lo)
                k, v = jax.device_put((k, v), layout)
                uid = next(_uuids)
                self.server.await_pull(uid, [k, v])
                parts.append(KVPart(uid, lo, hi, tuple(k.shape), str(k.dtype)))
        return KVOffer(self.address, len(pages), g, tuple(parts))


class TransferKVReceiver:
    def __init__(self, server: Any):
        self.server = server
        self._conns: dict[str, Any] = {}

    def _conn(self, address: str) -> Any:
        if address not in self._conns:
            self._conns[address] = self.server.connect(address)
        return self._conns[address]

    def fetch(self, offer: KVOffer, dst: Any, dst_pages: Sequence[int]) -> None:
        """Pull every part of ``offer`` and scatter it into ``dst_pages`` of ``dst`` (in place).

        A pull returns at once with buffers that fill as the bytes arrive; if the sender dies
        meanwhile they hold an error, and a scatter of them would leave that error in the whole
        (donated) pool, failing every request decoding there. So each part is waited for before
        it is scattered: a broken transfer raises here with the pool untouched."""
        if len(dst_pages) != offer.num_pages:
            raise ValueError(f"offer has {offer.num_pages} pages, {len(dst_pages)} destination pages given")
        conn = self._conn(offer.address)
        done = []
        for part in offer.parts:
            d = next(st for st in dst.stages if st.lo <= part.lo and part.hi <= st.hi)
            layout = _layout(list(d.mesh.devices.flat), offer.shards)
            want = jax.ShapeDtypeStruct(part.shape, np.dtype(part.dtype) if part.dtype != "bfloat16"
                                        else jax.numpy.bfloat16, sharding=layout)
            k, v = jax.block_until_ready(conn.pull(part.uuid, [want, want]))
            k, v = jax.device_put((k, v), d.buffer_sharding)
            with dst.lock:
                d.pool, written = scatter_pages_jit(d.pool, page_index(dst_pages, part.shape[1], d.mesh), k, v,
                                           lo=part.lo - d.lo)
            done.append(written)
        jax.block_until_ready(done)


class TransferServerPuller:
    """Both halves in one object: the :class:`~distllm_jax.engine.transfer.KVPuller` the engine uses
    when told to migrate through the transfer server (one server serves both directions)."""

    kind = "transfer-server"
    staged = False  # a pull is one offer and one fetch

    def __init__(self, max_pages: int, server: Any = None):
        self.server = server or start_server()
        self.sender = TransferKVSender(self.server, max_pages)
        self.receiver = TransferKVReceiver(self.server)
        self.buckets = self.sender.buckets

    def pull(self, src: Any, src_pages: Sequence[int], dst: Any, dst_pages: Sequence[int]) -> None:
        offer = self.sender.offer(src, src_pages, [(d.lo, d.hi) for d in dst.stages], dst.spec.tp)
        self.receiver.fetch(offer, dst, dst_pages)

    def warmup(self, src: Any, dst: Any, tick: Callable[[str], None] = lambda _: None) -> None:
        warm_pulls(self, src, dst, tick)
