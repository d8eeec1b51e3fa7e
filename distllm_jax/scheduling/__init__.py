"""Scheduling policy, pure and device-free: who runs next, on which instance, with which pages.

The engine's workers and the placement simulator drive the *same* scheduler objects: a worker executes
the plans on devices and reports back under the controller's lock; the simulator times the plans with
the latency model. Nothing here imports jax, a device or a clock: ``now`` is always passed in.
"""

from distllm_jax.scheduling.protocols import QueueState, RequestState, Role, SchedRequest, Slot, Stamps
from distllm_jax.scheduling.scheduler_api import Scheduler
from distllm_jax.scheduling.plans import DecodePlan, MixedPlan, MixedRow, PrefillPlan, PullPlan, StepKind
from distllm_jax.scheduling.state import Queues, keep_computed, release
from distllm_jax.scheduling.prefill import PrefillScheduler, take_prompts
from distllm_jax.scheduling.memory import Admission, KVManager, KVPolicy, Preemption, RoomPlan, SwapOp
from distllm_jax.scheduling.decode import DecodeScheduler
from distllm_jax.scheduling.colocated import ChunkedScheduler, ColocatedScheduler

__all__ = [
    "Admission", "ChunkedScheduler", "ColocatedScheduler", "DecodePlan", "DecodeScheduler", "KVManager", "KVPolicy",
    "MixedPlan", "MixedRow", "Preemption", "PrefillPlan", "PrefillScheduler", "PullPlan", "QueueState", "Queues",
    "RequestState", "Role", "RoomPlan", "SchedRequest", "Scheduler", "Slot", "Stamps", "StepKind", "SwapOp", "keep_computed", "release",
    "take_prompts",
]
