"""Cluster mode: each instance is a Ray actor owning its devices as one JAX process; the controller
(queues, FCFS, pull decisions) stays in the serving process and drives the actors through Ray calls.

    engine = ClusterEngine(source, EngineConfig(...), ClusterConfig(address="auto"))

Modules, one job each: ``config`` (what to start and where), ``bootstrap`` (joining Ray, actor
options), ``actor`` (the process that holds a real instance), ``remote`` (the serving-process proxy the
workers drive), ``kv_paths`` (KV migration between actors: transfer server, or staged through Ray's
object store), ``engine`` (the engine that wires them, and replaces lost actors).
"""

from distllm_jax.cluster.config import ClusterConfig, Placement
from distllm_jax.cluster.engine import ClusterEngine

__all__ = ["ClusterConfig", "ClusterEngine", "Placement"]
