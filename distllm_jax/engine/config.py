"""Engine configuration: which mode, how many instances of which parallelism, pool and batch limits.

Every limit that shapes a compiled program (token buckets, batch buckets, pages per sequence) is
derived from here (the shapes themselves by :func:`distllm_jax.shapes.compiled_shapes`), so the set of
programs compiled at start-up is known before serving begins.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from distllm_jax.instance_spec import InstanceSpec  # re-exported: the engine's name for it
from distllm_jax.models.config import ModelConfig
from distllm_jax.shapes import MIN_TOKEN_BUCKET

Mode = Literal["disaggregated", "colocated", "chunked"]
MODES: tuple[str, ...] = ("disaggregated", "colocated", "chunked")
KV_ADMISSIONS: tuple[str, ...] = ("on-demand", "reserve")
PREEMPTIONS: tuple[str, ...] = ("recompute", "swap")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """``prefill``/``decode`` describe the disaggregated instances; ``colocated`` the instances of the
    colocated and chunked baselines (each serves both phases).

    ``prefill_token_budget`` is the paper's L_m: the most prompt tokens batched into one prefill (a
    single longer prompt still runs, alone); in ``chunked`` mode it is the tokens per mixed step.
    ``kv_admission``: ``on-demand`` (vLLM's way) admits a request by the pages it needs now, leaving
    ``kv_watermark`` of the pool free, and a running sequence takes a page as it crosses a page
    boundary; when a step would run out, the newest running request is preempted (``preemption``:
    ``recompute`` frees its pages and requeues it ahead of new work, ``swap`` moves its pages to host
    memory and back). ``reserve`` takes pages for a request's whole possible length when it joins, so
    a running batch never preempts, at the cost of admitting fewer requests.
    """

    mode: Mode = "disaggregated"
    prefill: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    decode: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    colocated: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    page_size: int = 16
    num_pages: int = 256
    max_seq_len: int | None = None  # default: min(model positions, 2048)
    prefill_token_budget: int = 512
    max_prefill_seqs: int = 16
    max_decode_batch: int = 32
    min_token_bucket: int = MIN_TOKEN_BUCKET
    dtype: str | None = None  # params and KV dtype; None: the checkpoint's own
    attention: str = "auto"  # auto (Pallas on GPU, reference on CPU) | pallas | reference
    kv_transfer: str = "local"  # local (device_put between meshes) | transfer-server
    check_transfers: bool = False  # compare every migrated page bit for bit (tests, debugging)
    # decode dispatches step k+1 before reading step k (its ids feed k+1 on the device), so host
    # work overlaps the device's; one-stage instances only (see Instance.dispatch_decode)
    async_decode: bool = True
    kv_admission: str = "on-demand"  # on-demand | reserve
    preemption: str = "recompute"  # recompute | swap (on-demand admission only)
    kv_watermark: float = 0.01  # the share of each pool admission leaves free for running sequences
    # keep prompts' full KV pages after their requests end, keyed by their tokens, and start a prompt
    # that begins with them from those pages (prefill, colocated and chunked instances)
    prefix_cache: bool = False
    # which prompt instance a new request goes to when several take prompts (scheduling.routing):
    # prefix (least prefill plus queued tokens, counting cached pages), round-robin, shared (one queue,
    # first free instance), or auto (prefix with the prefix cache on, else shared)
    prefill_routing: str = "auto"
    # threads that lower and compile (or load from the persistent cache) the step programs at start-up,
    # side by side; 1: one at a time, as warmup first runs each; 0: one per CPU core, at most 8, on an
    # accelerator, and 1 on a CPU (whose compiler already uses every core for one program)
    compile_threads: int = 0
    progress: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.page_size < 1 or self.num_pages < 2:
            raise ValueError("page_size must be >= 1 and num_pages >= 2")
        for name in ("prefill_token_budget", "max_prefill_seqs", "max_decode_batch", "min_token_bucket"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.mode == "chunked" and self.max_decode_batch > self.prefill_token_budget:
            raise ValueError("chunked mode needs prefill_token_budget >= max_decode_batch")
        if self.attention not in ("auto", "pallas", "reference"):
            raise ValueError(f"attention must be auto, pallas or reference, got {self.attention!r}")
        if self.kv_transfer not in ("local", "transfer-server"):
            raise ValueError(f"kv_transfer must be 'local' or 'transfer-server', got {self.kv_transfer!r}")
        if self.kv_admission not in KV_ADMISSIONS:
            raise ValueError(f"kv_admission must be one of {KV_ADMISSIONS}, got {self.kv_admission!r}")
        if self.preemption not in PREEMPTIONS:
            raise ValueError(f"preemption must be one of {PREEMPTIONS}, got {self.preemption!r}")
        if self.prefill_routing not in ("auto", "prefix", "round-robin", "shared"):
            raise ValueError(f"prefill_routing must be auto, prefix, round-robin or shared, got {self.prefill_routing!r}")
        if self.compile_threads < 0:
            raise ValueError(f"compile_threads must be >= 0, got {self.compile_threads}")
        if not 0.0 <= self.kv_watermark < 1.0:
            raise ValueError(f"kv_watermark must be in [0, 1), got {self.kv_watermark}")
        if self.mode == "disaggregated" and (not self.prefill or not self.decode):
            raise ValueError("disaggregated mode needs at least one prefill and one decode instance")
        if self.mode != "disaggregated" and not self.colocated:
            raise ValueError(f"{self.mode} mode needs at least one instance in `colocated`")

    def seq_len(self, cfg: ModelConfig) -> int:
        limit = cfg.max_position_embeddings
        if self.max_seq_len is None:
            return min(limit, 2048)
        if self.max_seq_len > limit:
            raise ValueError(f"max_seq_len {self.max_seq_len} exceeds the model's {limit} positions")
        return self.max_seq_len

    def instances(self) -> list[tuple[str, InstanceSpec]]:
        """(role, spec) in device order: prefill instances first, then decode (or the colocated ones)."""
        if self.mode == "disaggregated":
            return [("prefill", s) for s in self.prefill] + [("decode", s) for s in self.decode]
        return [(self.mode, s) for s in self.colocated]

    @property
    def num_devices(self) -> int:
        return sum(s.num_devices for _, s in self.instances())
