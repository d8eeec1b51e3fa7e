"""Joining Ray, and the options that give each actor its own process, devices and node.

Every actor gets its own ``runtime_env``: Ray then starts a fresh worker process for it (never one that
ran something else and already imported jax), with ``XLA_FLAGS`` asking for exactly the actor's
number of virtual CPU devices (on GPUs, Ray's ``num_gpus`` sets ``CUDA_VISIBLE_DEVICES`` instead) and
``PYTHONPATH`` leading to the same ``distllm_jax`` this process runs, and the directory of the
persistent compilation cache this process uses (``serve --compile-cache``): an actor, its replacement
and the next start then load each other's programs instead of compiling them again.
"""

from __future__ import annotations

import os
import re
import uuid
from pathlib import Path
from typing import Any

from distllm_jax import compile_cache
from distllm_jax.cluster.config import ClusterConfig
from distllm_jax.engine.config import InstanceSpec

ACTOR_CONCURRENCY = 4  # a step, a KV transfer and a liveness ping can overlap in one actor


def connect(cfg: ClusterConfig) -> bool:
    """Start (``auto``) or join Ray unless this process already did; True when this call started a
    local cluster that the caller then owns (and shuts down)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.address == "auto":
        ray.init(num_cpus=cfg.num_cpus, include_dashboard=False, namespace=cfg.namespace,
                 log_to_driver=cfg.log_to_driver)
        return True
    ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=cfg.log_to_driver)
    return False


def cluster_platform(cfg: ClusterConfig) -> str:
    import ray

    if cfg.platform is not None:
        return cfg.platform
    return "gpu" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"


def resolve_node(node: str) -> str:
    """A Ray node id for a node given by id or IP address (alive nodes only)."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    for n in alive:
        if node in (n["NodeID"], n["NodeManagerAddress"]):
            return n["NodeID"]
    known = ", ".join(f"{n['NodeManagerAddress']} ({n['NodeID'][:8]})" for n in alive)
    raise ValueError(f"no alive Ray node {node!r} (nodes: {known})")


def _env(spec: InstanceSpec, platform: str, name: str) -> dict[str, str]:
    root = str(Path(__file__).resolve().parents[2])  # the directory holding this distllm_jax
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
    env = {"PYTHONPATH": path, "DISTLLM_INSTANCE": name}
    cache = compile_cache.current_dir()
    if cache is not None:
        env[compile_cache.ENV] = cache
    if platform == "cpu":
        flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", os.environ.get("XLA_FLAGS", ""))
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={spec.num_devices}".strip()
        env["JAX_PLATFORMS"] = "cpu"
    return env


def actor_options(name: str, spec: InstanceSpec, platform: str, node_id: str | None,
                  cfg: ClusterConfig) -> dict[str, Any]:
    """``.options(...)`` for one instance's actor: its own process and devices, pinned to ``node_id``
    when placement asks for it."""
    opts: dict[str, Any] = {
        "name": f"distllm-{name}-{uuid.uuid4().hex[:8]}",
        "num_cpus": cfg.actor_num_cpus,
        "num_gpus": spec.num_devices if platform == "gpu" else 0,
        "max_concurrency": ACTOR_CONCURRENCY,
        "max_restarts": 0,  # a lost actor is replaced by the engine, which knows what it held
        "runtime_env": {"env_vars": _env(spec, platform, name)},
    }
    if node_id is not None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        opts["scheduling_strategy"] = NodeAffinitySchedulingStrategy(node_id, soft=False)
    return opts
