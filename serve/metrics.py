"""Prometheus metrics: request outcomes and latencies observed by the server, engine state read at
scrape time (queues, KV pages per instance, compilations), served over HTTP by prometheus_client."""

from __future__ import annotations

from typing import Any, Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EngineCollector:
    """Reads ``engine.stats()`` on every scrape, so gauges are never stale."""

    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.stats = stats

    def collect(self):
        s = self.stats()
        q = GaugeMetricFamily("distllm_queue_length", "Requests waiting, by queue", labels=["queue"])
        q.add_metric(["prefill"], s["waiting"])
        q.add_metric(["held_in_prefill"], s["held_in_prefill"])
        yield q
        used = GaugeMetricFamily("distllm_kv_pages_used", "KV pages in use", labels=["instance", "role"])
        free = GaugeMetricFamily("distllm_kv_pages_free", "KV pages free", labels=["instance", "role"])
        running = GaugeMetricFamily("distllm_running_requests", "Requests in a decode batch", labels=["instance"])
        reserved = GaugeMetricFamily("distllm_kv_pages_reserved", "KV pages in use ahead of the KV written "
                                     "into them", labels=["instance", "role"])
        swapped = GaugeMetricFamily("distllm_swapped_requests", "Requests preempted to host memory",
                                    labels=["instance"])
        preempted = CounterMetricFamily("distllm_preemptions", "Running requests preempted when KV pages ran "
                                        "out", labels=["instance", "kind"])
        grown = CounterMetricFamily("distllm_kv_pages_grown", "KV pages running sequences took as they grew",
                                    labels=["instance"])
        prompt = CounterMetricFamily("distllm_prompt_tokens", "Prompt tokens prefilled", labels=["instance"])
        hit = CounterMetricFamily("distllm_prefix_cache_hit_tokens", "Prompt tokens whose KV came from cached "
                                  "pages instead of a prefill", labels=["instance"])
        cached = GaugeMetricFamily("distllm_kv_pages_cached", "KV pages named in the prefix cache (in use or "
                                   "evictable)", labels=["instance"])
        evicted = CounterMetricFamily("distllm_prefix_cache_evictions", "Cached KV pages taken back for other KV",
                                      labels=["instance"])
        for inst in s["instances"]:
            if inst["role"] != "decode":
                prompt.add_metric([inst["name"]], inst["prompt_tokens"])
                hit.add_metric([inst["name"]], inst["prefix_hit_tokens"])
                cached.add_metric([inst["name"]], inst["pages_cached"])
                evicted.add_metric([inst["name"]], inst["prefix_evictions"])
            used.add_metric([inst["name"], inst["role"]], inst["pages_used"])
            free.add_metric([inst["name"], inst["role"]], inst["pages_free"])
            reserved.add_metric([inst["name"], inst["role"]], inst["pages_reserved"])
            running.add_metric([inst["name"]], inst["running"])
            swapped.add_metric([inst["name"]], inst["swapped"])
            grown.add_metric([inst["name"]], inst["pages_grown"])
            for kind, n in inst["preemptions"].items():
                preempted.add_metric([inst["name"], kind], n)
        yield from (used, free, reserved, running, swapped, preempted, grown, prompt, hit, cached, evicted)
        if s["routing"] is not None:
            routed = CounterMetricFamily("distllm_prefill_routing_decisions", "New requests routed to each "
                                         "prompt instance", labels=["instance", "policy"])
            for name, n in s["routing"]["decisions"].items():
                routed.add_metric([name, s["routing"]["policy"]], n)
            yield routed
            yield CounterMetricFamily("distllm_prefill_routed_to_cache", "New requests routed where cached pages "
                                      "held part of their prompt", value=s["routing"]["cache_routed"])
        yield CounterMetricFamily("distllm_compilations", "XLA compilations in this process", value=s["compilations"])
        if s["executable_store"] is not None:
            st = s["executable_store"]
            progs = CounterMetricFamily("distllm_executable_store_programs", "Programs this process's executable "
                                        "store loaded whole, built, saved, or failed to read or write",
                                        labels=["outcome"])
            for outcome in ("loaded", "built", "saved", "errors"):
                progs.add_metric([outcome], st[outcome])
            yield progs
        yield CounterMetricFamily("distllm_migrations", "KV migrations done", value=s["migrations"])
        yield GaugeMetricFamily("distllm_active_requests", "Requests in the engine", value=s["active"])
        yield CounterMetricFamily("distllm_requeued_requests", "Requests redone from their prompt after an "
                                  "instance was lost", value=s.get("requeued", 0))
        if "cluster" in s:
            yield from cluster_metrics(s["cluster"])


def cluster_metrics(c: dict[str, Any]):
    """Cluster mode's layout: one sample per actor (1 alive, 0 lost), the KV path, replacements."""
    actors = GaugeMetricFamily("distllm_cluster_actor", "Instance actors (1 alive, 0 lost)",
                               labels=["instance", "role", "node", "pid", "devices"])
    for a in c["actors"]:
        actors.add_metric([a["name"], a["role"], a["node_ip"], str(a["pid"]), str(len(a["devices"]))],
                          1 if a["alive"] else 0)
    yield actors
    path = GaugeMetricFamily("distllm_kv_path", "KV migration path between actors in use", labels=["path"])
    path.add_metric([c["kv_path"]], 1)
    yield path
    yield CounterMetricFamily("distllm_actor_replacements", "Lost actors replaced", value=c["replacements"])


class Metrics:
    def __init__(self, stats: Callable[[], dict[str, Any]]):
        self.registry = CollectorRegistry()
        self.requests = Counter("distllm_requests", "Finished requests by outcome", ["outcome"],
                                registry=self.registry)
        self.ttft = Histogram("distllm_ttft_seconds", "Time to first token", buckets=_LATENCY_BUCKETS,
                              registry=self.registry)
        self.tpot = Histogram("distllm_tpot_seconds", "Time per output token after the first",
                              buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.output_tokens = Counter("distllm_output_tokens", "Tokens streamed", registry=self.registry)
        self.registry.register(EngineCollector(stats))
        self._http = None

    def observe_finished(self, outcome: str, ttft: float | None, tpot: float | None, tokens: int,
                         last: bool = True) -> None:
        """One sample ended; ``last``: it was its request's last (a request of n samples counts once)."""
        if last:
            self.requests.labels(outcome).inc()
        if ttft is not None:
            self.ttft.observe(ttft)
        if tpot is not None:
            self.tpot.observe(tpot)
        self.output_tokens.inc(tokens)

    def serve(self, host: str, port: int) -> int:
        """Start the /metrics HTTP endpoint; returns the bound port (``port=0`` picks one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        self._http = server
        return server.server_address[1]

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http = None
