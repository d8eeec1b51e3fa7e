"""Named serving systems for the simulator: the policies and limits a real system ran with, as
``SimConfig`` fields, so a recorded run of that system can be replayed under its own rules
(``distllm simulate --system``, ``bench/sim_vs_real.py``).

A system is a frozen dataclass whose fields are ``SimConfig`` overrides (one class per system, its
docstring citing where each number comes from); ``mode`` is the serving mode the system is bound to
(None: any). Extending a system with a mechanism the simulator learns later is adding a field here
once ``SimConfig`` has it; :func:`system_config` checks every field against ``SimConfig``.

Mirrors cited: LLMServe/DistServe (``main``; ``feat-add-simulator`` for the simulator), and
interestingLSY/vllm, the vLLM fork DistServe's artifact builds as its baseline (its Dockerfile:
"Make sure it is on the correct branch (distserve-baseline-vllm)"), whose ``-v0.2.0`` and ``-v0.2.3``
branches are upstream vLLM v0.2.0 / v0.2.3 plus token timestamps.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig

_SIM_FIELDS = {f.name for f in dataclasses.fields(SimConfig)}


@dataclasses.dataclass(frozen=True)
class System:
    """A system's SimConfig overrides (its dataclass fields) and the mode it is bound to."""

    name: ClassVar[str] = ""
    mode: ClassVar[str | None] = None

    def overrides(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class DistLLM(System):
    """This engine as it serves by default: SimConfig's own defaults (the engine's FCFS prefill
    batches up to 512 tokens and 64 prompts, decode batches up to 256), any mode."""

    name: ClassVar[str] = "distllm"


@dataclasses.dataclass(frozen=True)
class VLLM(System):
    """vLLM as DistServe's artifact launched it for the paper's baseline runs (one colocated instance,
    FCFS, prefill first: vLLM's scheduler runs a prompt-only batch whenever waiting prompts fit, else a
    decode step of every running sequence).

    Sources:
    - LLMServe/DistServe ``main:evaluation/2-benchmark-serving/2-start-api-server.py``, backend vllm:
      ``--max-num-batched-tokens 16384 --max-num-seqs 1024 --block-size 16 --gpu-memory-utilization 0.95``
      (``-tp 1`` for OPT-13B). The published A100 runs (``.exp`` files of the same script family) are
      most likely from this launch.
    - vLLM's scheduler (interestingLSY/vllm ``distserve-baseline-vllm:vllm/core/scheduler.py``): a
      prompt joins the batch while the batch's tokens stay within max_num_batched_tokens and the running
      plus new sequences within max_num_seqs, so ``max_prefill_seqs`` and ``max_decode_batch`` are both
      max_num_seqs.
    - ``--gpu-memory-utilization 0.95``: the KV capacity DistServe's memory profiler measured at 0.95
      (the profiles' ``kv_tokens_measured``; 66,144 tokens for OPT-13B on one A100).
    vLLM allocates blocks as tokens arrive and preempts by recompute when they run out
    (``vllm/core/scheduler.py``, ``PreemptionMode.RECOMPUTE`` for single-sequence groups, watermark
    0.01 in ``block_manager.py``): ``kv_admission = "on-demand"``, ``preemption = "recompute"``.
    """

    name: ClassVar[str] = "vllm"
    mode: ClassVar[str | None] = "colocated"
    prefill_token_budget: int = 16384
    max_prefill_seqs: int = 1024
    max_decode_batch: int = 1024
    memory_utilization: float = 0.95
    kv_admission: str = "on-demand"
    preemption: str = "recompute"


@dataclasses.dataclass(frozen=True)
class VLLMDefaults(VLLM):
    """vLLM v0.2.x with its own defaults (as a user who sets no flags runs it).

    Sources: vLLM v0.2.0 and v0.2.3 ``vllm/engine/arg_utils.py`` (``EngineArgs.max_num_batched_tokens:
    Optional[int] = None``, ``max_num_seqs: int = 256``) and ``vllm/config.py`` ``SchedulerConfig``
    (``max_num_batched_tokens = max(max_model_len, 2048)`` when not given: 2048 for OPT, whose
    max_position_embeddings is 2048), read in interestingLSY/vllm branches
    ``distserve-baseline-vllm-v0.2.0`` / ``-v0.2.3`` (upstream v0.2.0 / v0.2.3 plus token timestamps).
    v0.1.7, the fork's ``distserve-baseline-vllm`` branch, defaults to 2560 and 256 instead.
    """

    name: ClassVar[str] = "vllm-defaults"
    prefill_token_budget: int = 2048
    max_prefill_seqs: int = 256
    max_decode_batch: int = 256
    memory_utilization: float = 0.9  # EngineArgs.gpu_memory_utilization


@dataclasses.dataclass(frozen=True)
class DistServe(System):
    """DistServe's engine as its artifact launched it: disaggregated, FCFS in both stages.

    Sources: LLMServe/DistServe ``main:evaluation/2-benchmark-serving/2-start-api-server.py``, backend
    distserve: ``--context-sched-policy fcfs --context-max-batch-size 128
    --context-max-tokens-per-batch 8192 --decoding-sched-policy fcfs --decoding-max-batch-size 1024``
    (``--decoding-max-tokens-per-batch 65536``, ``--block-size 16 --max-num-blocks-per-req 128
    --gpu-memory-utilization 0.95``); ``main:distserve/config.py`` ``ContextStageSchedConfig`` /
    ``DecodingStageSchedConfig`` give these their meaning (max requests and max input tokens per
    batch). OPT-13B there: context tp2 pp1, decoding tp1 pp1.
    ``--gpu-memory-utilization 0.95``: the KV capacity DistServe's memory profiler measured at 0.95 (the
    profiles' ``kv_tokens_measured``): the decode instance's memory is what bounds it at the knee.
    The decoding stage admits by the blocks a request holds now and swaps the newest out when a step
    would run short (``decoding_stage_scheduler.py``): ``kv_admission = "on-demand"``, ``preemption =
    "swap"``.
    Not modelled: the 2048-token cap per request (128 blocks of 16; no ShareGPT request of the paper's
    preparation reaches it), the decoding stage's 65,536-token cap (never reached at 1,024 sequences
    of this workload), the time a swap takes over PCIe (``swap_gbps = 0``), and its rule that prefilled
    requests are accepted while the waiting ones hold under 5 % of its blocks. KV transfer keeps
    SimConfig's bandwidth.
    """

    name: ClassVar[str] = "distserve"
    mode: ClassVar[str | None] = "disaggregated"
    prefill_token_budget: int = 8192
    max_prefill_seqs: int = 128
    max_decode_batch: int = 1024
    memory_utilization: float = 0.95
    kv_admission: str = "on-demand"
    preemption: str = "swap"
    swap_gbps: float = 0.0


@dataclasses.dataclass(frozen=True)
class MII(System):
    """DeepSpeed-MII (DeepSpeed-FastGen), the paper's chunked-prefill baseline: one colocated
    instance whose every forward pass mixes one token of each running sequence with chunks of waiting
    prompts up to a fixed token count (Dynamic SplitFuse): the simulator's ``chunked`` mode, whose
    mixed steps are timed from the prefill and decode fits (``SimConfig.mixed_s``: the chunks cost a
    prefill batch, the decode rows and every cached prefix they read what the decode fit charges).

    Sources: microsoft/DeepSpeed ``deepspeed/inference/v2/ragged/manager_configs.py``
    ``DSStateManagerConfig``: ``max_ragged_batch_size = 768`` ("the maximum number of tokens that can
    be contained in a single ragged batch": the SplitFuse budget), ``max_ragged_sequence_count = 512``
    (sequences a forward pass may hold: every running sequence has a row in each step, so it bounds
    the decode batch), ``max_tracked_sequences = 2048``. The paper does not give MII's flags; these
    are its defaults (DeepSpeed-MII's FastGen benchmark client also passes 768).
    ``memory_utilization``: MII's ``MemoryConfig`` reserves 1 GB after the KV cache rather than a
    share; 0.95 keeps the KV capacity DistServe's profiler measured for the same A100s (the
    profiles' ``kv_tokens_measured``), as for the other two systems.
    Not modelled: MII's KV blocks of 128 tokens allocated as sequences grow (this reserves each
    request's whole length when its first chunk is admitted: ``kv_admission = "reserve"``)."""

    name: ClassVar[str] = "mii"
    mode: ClassVar[str | None] = "chunked"
    prefill_token_budget: int = 768
    max_prefill_seqs: int = 512
    max_decode_batch: int = 512
    memory_utilization: float = 0.95
    kv_admission: str = "reserve"


SYSTEMS: dict[str, type[System]] = {s.name: s for s in (DistLLM, VLLM, VLLMDefaults, DistServe, MII)}


def system_overrides(name: str, mode: str | None = None) -> dict[str, Any]:
    """System ``name``'s SimConfig fields; asking a bound system for another ``mode`` is an error
    (vLLM does not disaggregate)."""
    if name not in SYSTEMS:
        raise ValueError(f"unknown system {name!r}: one of {', '.join(SYSTEMS)}")
    system = SYSTEMS[name]()
    if system.mode is not None and mode is not None and mode != system.mode:
        raise ValueError(f"system {name!r} runs {system.mode}, not {mode}")
    return system.overrides()


def system_config(name: str, mode: str | None = None, *, prefill: tuple[InstanceSpec, ...] | None = None,
                  decode: tuple[InstanceSpec, ...] | None = None, colocated: tuple[InstanceSpec, ...] | None = None,
                  **overrides: Any) -> SimConfig:
    """The SimConfig of system ``name`` on a layout: the system's fields over SimConfig's defaults,
    then ``overrides`` (explicit settings win over the preset). ``mode`` defaults to the system's own."""
    fields = system_overrides(name, mode)
    system = SYSTEMS[name]
    unknown = sorted(set(fields) - _SIM_FIELDS) + sorted(set(overrides) - _SIM_FIELDS)
    if unknown:
        raise ValueError(f"system {name!r}: not SimConfig fields: {unknown}")
    fields.update(overrides)
    fields["mode"] = mode or system.mode or SimConfig.mode
    for k, v in (("prefill", prefill), ("decode", decode), ("colocated", colocated)):
        if v is not None:
            fields[k] = tuple(v)
    return SimConfig(**fields)
