"""The process that owns one instance: a Ray actor around a real :class:`Instance`.

It runs the steps the serving process asks for, and both ends of KV migration: as a source it gathers
a request's pages and either registers them with its jax transfer server (``offer``) or copies them to
the host for Ray's object store (``export_pages``); as a destination it pulls an offer straight into
its devices (``fetch``) or scatters host pages it was given (``import_pages``).
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import jax
import numpy as np

from distllm_jax import compile_cache
from distllm_jax.engine import compile_counter
from distllm_jax.engine.config import EngineConfig, InstanceSpec
from distllm_jax.engine.engine import attention_impl
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.params_source import ParamSource
from distllm_jax.engine.programs import HostStep, Segment
from distllm_jax.engine.swap import gather_stages, scatter_stages
from distllm_jax.engine.transfer import page_buckets, wait_pools
from distllm_jax.engine.transfer_server import KVOffer, TransferKVReceiver, TransferKVSender, start_server
from distllm_jax.shapes import StepKind, bucket


class InstanceActor:
    def __init__(self, name: str, role: str, spec: InstanceSpec, source: ParamSource, ecfg: EngineConfig,
                 max_pages: int, transfer_server: bool):
        compile_counter.install()
        self.compile_cache_error = self._cache_compiled_programs()
        devices = jax.devices()
        if len(devices) < spec.num_devices:
            raise RuntimeError(f"{name}: {spec.label()} needs {spec.num_devices} devices, this process has "
                               f"{len(devices)} ({jax.default_backend()})")
        self.inst = Instance(name, role, spec, devices[: spec.num_devices], source, ecfg,
                             attention_impl(ecfg.attention))
        self.buckets = page_buckets(max_pages)
        self.server_error: str | None = None
        self.sender: TransferKVSender | None = None
        self.receiver: TransferKVReceiver | None = None
        if transfer_server:
            try:
                import ray

                server = start_server(self.inst.devices, ray.util.get_node_ip_address())
                self.sender, self.receiver = TransferKVSender(server, max_pages), TransferKVReceiver(server)
            except Exception as e:  # noqa: BLE001 - the staged path still works; the engine reports why
                self.server_error = f"{type(e).__name__}: {e}"

    @staticmethod
    def _cache_compiled_programs() -> str | None:
        """Use the serving process's compilation cache directory. On another host that path may not
        be writable: the actor then compiles without a cache, and :meth:`info` says why."""
        where = os.environ.get(compile_cache.ENV)
        if not where:
            return None
        try:
            compile_cache.enable(where)
        except OSError as e:
            return f"{type(e).__name__}: {e}"
        return None

    def info(self) -> dict[str, Any]:
        """Static facts the serving process caches: layout, limits, where this process runs."""
        import ray

        ctx = ray.get_runtime_context()
        return {
            **self.inst.describe(),
            "max_batch": self.inst.max_batch, "max_prefill_seqs": self.inst.max_prefill_seqs,
            "prefix_cache": self.inst.prefix_cache,
            "num_programs": self.inst.num_programs(), "attention": self.inst.impl.name,
            "stage_ranges": [(st.lo, st.hi) for st in self.inst.stages],
            "pid": os.getpid(), "node_id": ctx.get_node_id(), "node_ip": ray.util.get_node_ip_address(),
            "platform": jax.default_backend(),
            "transfer_server": self.sender.address if self.sender else None,
            "transfer_server_error": self.server_error,
            "compile_cache": compile_cache.current_dir(), "compile_cache_error": self.compile_cache_error,
        }

    def ping(self) -> int:
        return os.getpid()

    def warmup(self) -> int:
        self.inst.warmup()
        return self.inst.num_programs()

    def compilations(self) -> int:
        return compile_counter.compilations()

    def run(self, kind: StepKind, micro_batches: Sequence[Sequence[Segment]]) -> list[HostStep]:
        out = self.inst.run(kind, micro_batches)
        self.inst.settle_swaps()  # swap-outs dispatched before this step: done with it, so no wait
        return out

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        self.inst.copy_pages(src, dst)

    def swap_out(self, key: str, pages: Sequence[int]) -> None:
        self.inst.swap_out(key, pages)

    def swap_in(self, key: str, pages: Sequence[int]) -> None:
        self.inst.swap_in(key, pages)

    def drop_swapped(self, key: str) -> None:
        self.inst.drop_swapped(key)

    def swapped_bytes(self) -> int:
        return self.inst.swapped_bytes()

    def pools_ok(self) -> bool:
        return self.inst.pools_ok()

    def reset_pools(self) -> None:
        self.inst.reset_pools()

    def host_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.inst.host_pages(pages)

    # ---- KV: jax transfer server -----------------------------------------------------------------

    def offer(self, pages: Sequence[int], dst_ranges: Sequence[tuple[int, int]], dst_tp: int) -> KVOffer:
        if self.sender is None:
            raise RuntimeError(f"{self.inst.name} has no transfer server ({self.server_error})")
        return self.sender.offer(self.inst, list(pages), [tuple(r) for r in dst_ranges], dst_tp)

    def fetch(self, offer: KVOffer, pages: Sequence[int]) -> None:
        if self.receiver is None:
            raise RuntimeError(f"{self.inst.name} has no transfer server ({self.server_error})")
        self.receiver.fetch(offer, self.inst, list(pages))

    # ---- KV: staged through the host and Ray's object store ----------------------------------------

    def export_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """[layers, len(pages), page_size, kv_heads, head_dim] K and V, gathered on the devices (a
        bucketed program) and copied to the host."""
        size, n = bucket(self.buckets, len(pages)), len(pages)
        bufs = gather_stages(self.inst, pages, size)
        return (np.concatenate([np.asarray(k)[:, :n] for k, _ in bufs]),
                np.concatenate([np.asarray(v)[:, :n] for _, v in bufs]))

    def import_pages(self, kv: tuple[np.ndarray, np.ndarray], pages: Sequence[int]) -> None:
        k, v = kv
        if k.shape[1] != len(pages) or k.shape[0] != self.inst.cfg.num_layers:
            raise ValueError(f"{self.inst.name}: got KV for {k.shape[1]} pages of {k.shape[0]} layers, "
                             f"{len(pages)} destination pages of {self.inst.cfg.num_layers} layers")
        size = bucket(self.buckets, len(pages))
        scatter_stages(self.inst, pages, size, [(k[st.lo : st.hi], v[st.lo : st.hi]) for st in self.inst.stages])
        wait_pools(self.inst)
