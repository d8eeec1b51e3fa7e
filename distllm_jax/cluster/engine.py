"""The engine with each instance in its own Ray actor; scheduling stays in this process.

:class:`ClusterEngine` is :class:`~distllm_jax.engine.Engine` with three things swapped: instances
are :class:`RemoteInstance` proxies of :class:`InstanceActor` processes, KV moves between actors
(:mod:`distllm_jax.cluster.kv_paths`), and a lost actor is replaced by a fresh one (automatically, or
with :meth:`ClusterEngine.replace_instance`) while the others keep serving. Controller, queues,
workers and the page allocators are the single-process engine's own.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any, Sequence

from distllm_jax.cluster.actor import InstanceActor
from distllm_jax.cluster.bootstrap import actor_options, cluster_platform, connect, resolve_node
from distllm_jax.cluster.config import ClusterConfig
from distllm_jax.cluster.kv_paths import RemoteKVPuller
from distllm_jax.cluster.remote import PING_TIMEOUT_S, RemoteInstance
from distllm_jax.engine.config import EngineConfig, InstanceSpec
from distllm_jax.engine.controller import InstanceLost
from distllm_jax.engine.decode import DecodeWorker
from distllm_jax.engine.engine import Engine, EngineClosed, make_worker
from distllm_jax.engine.params_source import ParamSource
from distllm_jax.kv_cache import pages_for
from distllm_jax.scheduling import Role

_REMOTE_ACTOR: Any = None


def _actor_class() -> Any:
    global _REMOTE_ACTOR
    if _REMOTE_ACTOR is None:
        import ray

        _REMOTE_ACTOR = ray.remote(InstanceActor)
    return _REMOTE_ACTOR


class ClusterEngine(Engine):
    def __init__(self, source: ParamSource | str | Path, config: EngineConfig | None = None,
                 cluster: ClusterConfig | None = None, *, tokenizer: Any = None, start: bool = True):
        config = config or EngineConfig()
        if config.mode != "disaggregated":
            raise ValueError(f"cluster mode runs disaggregated prefill and decode actors, not {config.mode!r}")
        self.cluster = cluster or ClusterConfig()
        self.owns_ray = connect(self.cluster)
        self.platform = cluster_platform(self.cluster)
        self.kv_path_note: str | None = None
        self.replacements = 0
        self.warmup_seconds = 0.0  # measured by warmup(); read while the actors start
        self._replacing: dict[str, threading.Thread] = {}
        self._replace_lock = threading.Lock()
        self._actors: list[Any] = []
        self._monitor = threading.Thread(target=self._watch, daemon=True, name="distllm-actor-health")
        try:
            super().__init__(source, config, tokenizer=tokenizer, start=start)
        except BaseException:
            self._kill_actors()
            raise
        self._monitor.start()

    # ---- start-up (Engine's hooks) ------------------------------------------------------------------

    @property
    def _max_pages(self) -> int:
        return pages_for(self.max_len, self.config.page_size)

    def _start_actor(self, name: str, role: str, spec: InstanceSpec, node: str | None) -> tuple[Any, str]:
        opts = actor_options(name, spec, self.platform, resolve_node(node) if node else None, self.cluster)
        actor = _actor_class().options(**opts).remote(
            name, role, spec, self.source, self.config, self._max_pages, self.cluster.kv_path != "staged")
        self._actors.append(actor)
        return actor, opts["name"]

    def _connect(self, name: str, role: str, spec: InstanceSpec, index: int, started: tuple[Any, str]) -> RemoteInstance:
        import ray

        actor, actor_name = started
        try:
            info = ray.get(actor.info.remote())
        except Exception as e:
            raise RuntimeError(f"the actor for {name} ({spec.label()}) did not start: {e}") from e
        inst = RemoteInstance(name, role, spec, actor, {**info, "actor": actor_name}, index=index)
        inst.ping_timeout = self._ping_timeout()
        return inst

    def _ping_timeout(self) -> float:
        """How long an actor may leave a ping unanswered: at least as long as the warm-up took
        (before the first warm-up, the fixed minimum)."""
        return max(PING_TIMEOUT_S, self.warmup_seconds)

    def _build_instances(self, devices: Sequence[Any] | None) -> list[Any]:
        """One actor per instance, all started at once (prefill first, so that with ``same_node``
        each decode actor can follow its prefill partner to that node)."""
        if devices is not None:
            raise ValueError("cluster mode places instances on their actors' devices; pass no devices")
        self.ctrl.on_lost = self._on_lost
        place = self.cluster.placement
        named = [(f"{role}{i}", role, spec, i) for role, specs in ((Role.PREFILL, self.config.prefill),
                                                                   (Role.DECODE, self.config.decode))
                 for i, spec in enumerate(specs)]
        prefill = [(n, r, s, i, self._start_actor(n, r, s, place.node(r, i))) for n, r, s, i in named if r is Role.PREFILL]
        out = [self._connect(*started) for started in prefill]
        decode = []
        for n, r, s, i in named:
            if r is Role.DECODE:
                node = place.node(r, i) or (out[i].info["node_id"] if place.same_node else None)
                decode.append((n, r, s, i, self._start_actor(n, r, s, node)))
        return out + [self._connect(*started) for started in decode]

    def _make_puller(self) -> RemoteKVPuller:
        kind = "staged" if self.cluster.kv_path == "staged" else "transfer-server"
        return RemoteKVPuller(kind, self._max_pages, self.cluster.pull_timeout_s)

    def warmup(self) -> None:
        """Every actor compiles its programs at once (each in its own process), then every
        prefill->decode pair warms the KV path (``auto`` falls back to staged here if it must)."""
        import ray

        t0 = time.perf_counter()
        try:
            ray.get([inst.actor.warmup.remote() for inst in self.instances])
        except Exception as e:
            raise RuntimeError(f"an instance actor failed to compile its programs: {e}") from e
        self._warm_paths(self._transfer_pairs())
        self.warmup_seconds = time.perf_counter() - t0
        for inst in self.instances:
            inst.ping_timeout = self._ping_timeout()

    def _warm_paths(self, pairs: Sequence[tuple[Any, Any]]) -> None:
        puller: RemoteKVPuller = self.puller  # type: ignore[assignment]
        if puller.kind == "transfer-server":
            try:
                missing = {i.name: i.info["transfer_server_error"] for i in self.instances if not i.info["transfer_server"]}
                if missing:
                    raise RuntimeError(f"no transfer server in {missing}")
                for src, dst in pairs:
                    puller.warmup(src, dst)
                return
            except InstanceLost:
                raise
            except Exception as e:  # noqa: BLE001
                if self.cluster.kv_path != "auto":
                    raise
                self.kv_path_note = f"transfer server unusable, KV goes the staged path: {type(e).__name__}: {e}"
                puller.kind = "staged"
        for src, dst in pairs:
            puller.warmup(src, dst)

    # ---- lost actors ------------------------------------------------------------------------------

    def _watch(self) -> None:
        """Ping every live actor each ``health_interval_s``: an actor that died while idle (nothing
        routed to it, or KV held there waiting for decode room) is settled and replaced at once."""
        from distllm_jax.cluster.remote import actor_gone

        import ray

        while not self._closed:
            try:
                with self.ctrl.lock:
                    live = [i for i in self.instances if i not in self.ctrl.lost]
                pings = {i.actor.ping.remote(): i for i in live}
                pending, end = list(pings), time.monotonic() + self.cluster.pull_timeout_s
                while pending and not self._closed:  # each answer as it comes: a busy actor delays no other
                    ready, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, end - time.monotonic()))
                    if not ready:
                        break
                    try:
                        ray.get(ready[0])
                    except Exception as e:  # noqa: BLE001
                        if actor_gone(e):
                            with self.ctrl.lock:
                                self.ctrl.lose_instance(pings[ready[0]], InstanceLost(pings[ready[0]], e))
            except Exception:  # noqa: BLE001 - Ray going down under a closing engine
                if self._closed:
                    return
                raise
            time.sleep(self.cluster.health_interval_s)

    def _on_lost(self, inst: Any) -> None:
        """Controller hook (lock held): start a replacement in the background."""
        if not self.cluster.auto_replace or self._closed or inst.name in self._replacing:
            return
        t = threading.Thread(target=self._replace_in_background, args=(inst,), daemon=True,
                             name=f"distllm-replace-{inst.name}")
        self._replacing[inst.name] = t
        t.start()

    def _replace_in_background(self, lost: RemoteInstance) -> None:
        try:
            self.replace_instance(lost.name, lost=lost)
        except Exception as e:  # noqa: BLE001 - reported in stats; the other instances serve on
            with self.ctrl.lock:
                self.ctrl.errors.append(f"replacing {lost.name} failed: {type(e).__name__}: {e}")
        finally:
            with self.ctrl.lock:
                self._replacing.pop(lost.name, None)
                self.ctrl.lock.notify_all()

    def replace_instance(self, name: str, lost: RemoteInstance | None = None) -> RemoteInstance:
        """Start a fresh actor for instance ``name``, compile its programs and KV paths, and route to it.
        A live instance is first killed and settled like a lost one (its prefill work is re-queued,
        its decoding requests fail), so this also restarts a wedged actor. ``lost``: replace only that
        instance (the background replacement of a lost actor), and do nothing if a replacement came
        meanwhile; otherwise settling a live instance here, which starts that background replacement,
        would have it kill the fresh one as soon as this call returned."""
        import ray

        with self._replace_lock:
            with self.ctrl.lock:
                if self._closed:
                    raise EngineClosed("the engine is shutting down")
                idx = next((k for k, i in enumerate(self.instances) if i.name == name), None)
                if idx is None:
                    raise ValueError(f"no instance {name!r} (instances: {[i.name for i in self.instances]})")
                old = self.instances[idx]
                if lost is not None and old is not lost:
                    return old
                if old not in self.ctrl.lost:
                    self.ctrl.lose_instance(old, RuntimeError("replaced on request"))
            _kill(old.actor)
            new = self._connect(name, old.role, old.spec, old.index,
                                self._start_actor(name, old.role, old.spec, self._node_for(old)))
            try:
                new.call("warmup")
                live = [i for i in self.instances if i.role != old.role and i not in self.ctrl.lost]
                self._warm_paths([(new, d) for d in live] if old.role is Role.PREFILL else [(p, new) for p in live])
                with self.ctrl.lock:
                    if self._closed:
                        raise EngineClosed("the engine is shutting down")
                    gone = self.workers[idx]
                    worker = make_worker(self.ctrl, new, self.config, self.puller, self.decoders)
                    if isinstance(worker, DecodeWorker):
                        self.decoders[self.decoders.index(gone)] = worker
                    self.instances[idx], self.workers[idx] = new, worker
                    self.replacements += 1
                    self.ctrl.lock.notify_all()
            except BaseException:
                _kill(new.actor)
                raise
            gone.stop()
            worker.start()
            ray.get(new.actor.ping.remote())
            return new

    def _node_for(self, old: RemoteInstance) -> str | None:
        """Where a replacement goes: the plan's pin, or with ``same_node`` its partner's node."""
        place = self.cluster.placement
        pinned = place.node(old.role, old.index)
        if pinned or not place.same_node:
            return pinned
        other = Role.DECODE if old.role is Role.PREFILL else Role.PREFILL
        partner = next(x for x in self.instances if x.role == other and x.index == old.index)
        return partner.info["node_id"]

    def wait_replacements(self, timeout: float | None = None) -> bool:
        """Wait until no replacement is in flight; False on timeout."""
        end = None if timeout is None else time.perf_counter() + timeout
        with self.ctrl.lock:
            while self._replacing:
                left = None if end is None else end - time.perf_counter()
                if left is not None and left <= 0:
                    return False
                self.ctrl.lock.wait(0.05 if left is None else min(left, 0.05))
        return True

    # ---- state ------------------------------------------------------------------------------------

    def cluster_info(self) -> dict[str, Any]:
        """The layout: actors (node, process, devices), the KV path in use, losses and replacements."""
        import ray

        with self.ctrl.lock:
            actors = [{**i.describe(), "alive": i not in self.ctrl.lost} for i in self.instances]
            lost = [i.name for i in self.instances if i in self.ctrl.lost]  # not yet replaced
            replacing = sorted(self._replacing)
        return {
            "address": self.cluster.address, "platform": self.platform,
            "nodes": len({a["node_id"] for a in actors}), "cluster_nodes": sum(1 for n in ray.nodes() if n.get("Alive")),
            "kv_path": self.puller.kind, "kv_path_requested": self.cluster.kv_path,  # type: ignore[union-attr]
            "kv_path_note": self.kv_path_note, "kv_fallbacks": self.puller.fallbacks,  # type: ignore[union-attr]
            "actors": actors, "lost": lost,
            "replacements": self.replacements, "replacing": replacing,
        }

    def stats(self) -> dict[str, Any]:
        import ray

        s = super().stats()
        with self.ctrl.lock:
            live = [i for i in self.instances if i not in self.ctrl.lost]
        try:  # compilations happen in the actors; a dying actor must not break a metrics scrape
            s["compilations"] += sum(ray.get([i.actor.compilations.remote() for i in live], timeout=5))
        except Exception:  # noqa: BLE001
            pass
        s["cluster"] = self.cluster_info()
        return s

    def rebuild(self) -> "ClusterEngine":
        return ClusterEngine(self.source, self.config, self.cluster, tokenizer=self.tokenizer)

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        super().shutdown(drain, timeout)
        if self._monitor.is_alive():
            self._monitor.join(self.cluster.health_interval_s + 10)
        for t in list(self._replacing.values()):
            t.join(120)
        self._kill_actors()
        if self.owns_ray:
            import ray

            ray.shutdown()
            self.owns_ray = False

    def _kill_actors(self) -> None:
        for a in self._actors:
            _kill(a)
        self._actors.clear()


def _kill(actor: Any) -> None:
    import ray

    try:
        ray.kill(actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already gone
        pass
