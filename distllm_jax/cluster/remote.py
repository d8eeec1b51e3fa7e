"""The serving process's stand-in for an instance that lives in a Ray actor.

Workers and the controller use it exactly like a local :class:`~distllm_jax.engine.instance.Instance`:
the page allocator stays here (page ids are plain ints, and the controller owns all scheduling state),
``run`` is one Ray call that returns the sampled ids, and a dead actor surfaces as
:class:`~distllm_jax.engine.controller.InstanceLost` so the controller can settle its requests.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Sequence

import numpy as np

from distllm_jax.engine.config import InstanceSpec
from distllm_jax.engine.controller import InstanceLost
from distllm_jax.engine.programs import HostStep, Segment
from distllm_jax.kv_cache import PageAllocator
from distllm_jax.scheduling.protocols import Role
from distllm_jax.shapes import StepKind

PING_TIMEOUT_S = 10.0  # the least an actor is given to answer a ping before it counts as wedged


@dataclasses.dataclass(frozen=True)
class RemoteImpl:
    """The attention implementation the actor runs, by name (what stats report)."""

    name: str


def actor_gone(e: BaseException) -> bool:
    """The error says the actor's process is gone for good (not that a method raised, and not a
    transient "unavailable" that may pass)."""
    from ray.exceptions import ActorUnavailableError, RayActorError

    return isinstance(e, RayActorError) and not isinstance(e, ActorUnavailableError)


def runtime_failure(e: BaseException) -> bool:
    """A failure of Ray's machinery (the process, the connection), not an exception a method raised."""
    from ray.exceptions import RayError, RayTaskError

    return isinstance(e, RayError) and not isinstance(e, RayTaskError)


class RemoteInstance:
    def __init__(self, name: str, role: str, spec: InstanceSpec, actor: Any, info: dict[str, Any], index: int = 0):
        """``index``: its place among the instances of its role, which the plan's node pins and a
        same-node partner refer to (a replacement keeps it)."""
        self.name, self.role, self.spec, self.actor, self.info = name, Role(role), spec, actor, info
        self.index = index
        self.page_size = int(info["page_size"])
        self.num_pages = int(info["num_pages"])
        self.prefix_cache = bool(info["prefix_cache"])
        self.alloc = PageAllocator(self.num_pages, self.page_size, prefix_cache=self.prefix_cache)
        self.max_batch = int(info["max_batch"])
        self.max_prefill_seqs = int(info["max_prefill_seqs"])
        self.devices: list[str] = list(info["devices"])
        self.stage_ranges: list[tuple[int, int]] = [tuple(r) for r in info["stage_ranges"]]
        self.impl = RemoteImpl(info["attention"])
        self.steps = 0
        # A ping competes for the host with whatever the actor runs, so a fixed bound declares a busy
        # actor on a loaded host dead; the engine raises this to the measured warm-up (an actor that
        # answers nothing for as long as compiling all programs took is wedged, not slow).
        self.ping_timeout = PING_TIMEOUT_S

    def call(self, method: str, *args: Any, timeout: float | None = None) -> Any:
        """One actor method, waited for; a dead actor raises :class:`InstanceLost`."""
        import ray

        try:
            return ray.get(getattr(self.actor, method).remote(*args), timeout=timeout)
        except Exception as e:
            if runtime_failure(e) and (actor_gone(e) or not self.alive()):
                raise InstanceLost(self, e) from e
            raise

    def alive(self, timeout: float | None = None) -> bool:
        """Answers a ping within ``timeout`` (default :attr:`ping_timeout`; retried while Ray calls it
        only unavailable)."""
        import ray
        from ray.exceptions import ActorUnavailableError, GetTimeoutError

        end = time.monotonic() + (self.ping_timeout if timeout is None else timeout)
        while True:
            try:
                ray.get(self.actor.ping.remote(), timeout=max(0.1, end - time.monotonic()))
                return True
            except (ActorUnavailableError, GetTimeoutError):
                if time.monotonic() >= end:
                    return False  # wedged or unreachable: not serving either way
                time.sleep(0.1)
            except Exception:  # noqa: BLE001 - died
                return False

    # ---- what workers call -----------------------------------------------------------------------

    @property
    def lookahead(self) -> bool:
        """No: a step is one Ray call that returns its ids, so nothing stays in flight to chain."""
        return False

    def run(self, kind: StepKind, micro_batches: Sequence[Sequence[Segment]]) -> list[HostStep]:
        self.steps += 1
        return self.call("run", kind, [list(m) for m in micro_batches])

    def copy_pages(self, src: Sequence[int], dst: Sequence[int]) -> None:
        self.call("copy_pages", list(src), list(dst))

    # swapped-out copies live in the actor's process, next to its devices

    def swap_out(self, key: str, pages: Sequence[int]) -> None:
        self.call("swap_out", key, list(pages))

    def swap_in(self, key: str, pages: Sequence[int]) -> None:
        self.call("swap_in", key, list(pages))

    def drop_swapped(self, key: str) -> None:
        self.call("drop_swapped", key)

    def swapped_bytes(self) -> int:
        return int(self.call("swapped_bytes"))

    def settle_swaps(self) -> None:
        """Nothing to do here: the actor settles its copies after each step it runs (``run`` waits for
        the step, so the gathers dispatched before it are done by then)."""

    def warmup(self, tick: Callable[[str], None] = lambda _: None) -> None:
        n = self.call("warmup")
        for i in range(n):
            tick(f"{self.name} program {i + 1}/{n}")

    def num_programs(self) -> int:
        return int(self.info["num_programs"])

    def pools_ok(self) -> bool:
        try:
            return bool(self.call("pools_ok"))
        except Exception:  # noqa: BLE001
            return False

    def reset_pools(self) -> None:
        self.call("reset_pools")

    def host_pages(self, pages: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        return self.call("host_pages", list(pages))

    def describe(self) -> dict[str, Any]:
        keys = ("name", "role", "tp", "pp", "devices", "num_pages", "page_size", "pid", "node_id", "node_ip",
                "platform", "transfer_server", "compile_cache", "compile_cache_error")
        return {**{k: self.info[k] for k in keys}, "actor": self.info.get("actor", "")}
