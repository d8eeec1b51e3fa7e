"""What cluster mode starts and where: the Ray address, the KV path, and node placement from a plan.

A plan (:mod:`distllm_jax.placement.plan`, the file ``distllm place`` writes) may pin instances to
nodes and ask for the paper's low node affinity::

    {"mode": "disaggregated", "prefill": [{"tp": 2, "node": "10.0.0.5"}, {"tp": 2}],
     "decode": [{"tp": 2}, {"tp": 2}], "same_node": true}

``node`` is a Ray node id or a node's IP address. ``same_node`` (implied by Algorithm 2's
``"algorithm": "algorithm2-low-affinity"``) places decode instance *i* on the node of prefill
instance *i*, so the KV never crosses nodes. The plan checks both when it is read; this module only
carries them to the actors.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from distllm_jax.placement.plan import Plan

KV_PATHS = ("auto", "transfer-server", "staged")


@dataclasses.dataclass(frozen=True)
class Placement:
    """Node per instance (``None``: anywhere), in the engine config's order, and the pairing rule."""

    prefill: tuple[str | None, ...] = ()
    decode: tuple[str | None, ...] = ()
    same_node: bool = False

    @classmethod
    def from_plan(cls, plan: "Plan") -> "Placement":
        """The nodes a (checked) plan pins its prefill and decode instances to, and its pairing."""
        return cls(tuple(i.node for i in plan.prefill), tuple(i.node for i in plan.decode), plan.pairs_on_same_node)

    def node(self, role: str, index: int) -> str | None:
        nodes = self.prefill if role == "prefill" else self.decode
        return nodes[index] if index < len(nodes) else None


@dataclasses.dataclass(frozen=True)
class ClusterConfig:
    """``address``: ``auto`` starts a local Ray cluster, anything else is passed to ``ray.init`` to join
    one. ``kv_path``: ``auto`` uses jax's transfer server and falls back to the staged path (device ->
    host -> Ray object store -> device) when the backend cannot serve pulls. ``platform``: what the
    actors' devices are (``None``: GPUs when the cluster has any, else virtual CPU devices, one
    XLA process per actor with ``tp * pp`` of them). ``auto_replace`` starts a new actor for a lost
    one as soon as the loss is noticed."""

    address: str = "auto"
    kv_path: str = "auto"
    platform: str | None = None
    placement: Placement = Placement()
    auto_replace: bool = True
    actor_num_cpus: float = 0.0  # Ray CPU reservation per actor (0: actors never wait for CPU slots)
    num_cpus: int | None = None  # CPUs a local cluster advertises (address="auto" only)
    namespace: str = "distllm"
    pull_timeout_s: float = 120.0  # a KV pull that takes longer is treated as a lost peer
    health_interval_s: float = 1.0  # idle actors are pinged this often, so a death is noticed unused
    log_to_driver: bool = False  # actors' own stdout/stderr (Ray keeps them in its session logs)

    def __post_init__(self) -> None:
        if self.kv_path not in KV_PATHS:
            raise ValueError(f"kv_path must be one of {KV_PATHS}, got {self.kv_path!r}")
        if self.platform not in (None, "cpu", "gpu"):
            raise ValueError(f"platform must be cpu or gpu, got {self.platform!r}")
        if not self.address:
            raise ValueError("the cluster address is empty (use 'auto' to start a local cluster)")
        if self.actor_num_cpus < 0 or self.pull_timeout_s <= 0 or self.health_interval_s <= 0:
            raise ValueError("actor_num_cpus must be >= 0, pull_timeout_s and health_interval_s > 0")
