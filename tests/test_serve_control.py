"""The server's control plane without a model: ports checked before anything loads, SIGHUP's re-plan
(validated first, NOT_SERVING meanwhile, a bounded wait) and SIGTERM's drain (NOT_SERVING while the
listener is still open). An engine that serves nothing stands in: these paths never generate."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
from types import SimpleNamespace

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve import server as srv
from serve.client import make_request

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class IdleEngine:
    """The engine surface the control plane touches, recording the lifecycle calls made on it."""

    def __init__(self, name: str = "old"):
        self.name, self.max_len, self.calls = name, 64, []
        self.model = SimpleNamespace(vocab_size=256)
        self.config = SimpleNamespace(mode="colocated", max_prefill_seqs=8, max_decode_batch=8)
        self.instances = []

    def stats(self):
        return {"waiting": 0, "held_in_prefill": 0, "instances": [], "compilations": 0, "migrations": 0,
                "active": 0}

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        self.calls.append("shutdown")

    def rebuild(self):
        self.calls.append("rebuild")
        return self


def listening_socket(reuseport: bool) -> socket.socket:
    s = socket.socket()
    if reuseport:  # as a server binding with SO_REUSEPORT would: grpc's default
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind(("127.0.0.1", 0))
    s.listen()
    return s


def run(coro_fn):
    """Start a server on an IdleEngine, run ``coro_fn(running, log)``, then stop it."""
    async def main():
        log: list[str] = []
        running = await srv.start(IdleEngine(), None, srv.ServerConfig(port=0))
        try:
            return await coro_fn(running, log)
        finally:
            await running.server.stop(None)

    return asyncio.run(main())


async def health(running) -> int:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
        return (await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)).status


@pytest.mark.parametrize("flag", ["--port", "--http-port", "--metrics-port"])
def test_a_taken_port_is_one_line_before_anything_loads(flag):
    with listening_socket(reuseport=True) as taken:
        port = taken.getsockname()[1]
        ports = {"--port": "0", "--http-port": "0", "--metrics-port": "0", flag: str(port)}
        r = subprocess.run([sys.executable, "-m", "distllm_jax.cli", "serve", *[x for kv in ports.items() for x in kv]],
                           capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "compiling" not in r.stdout, (r.stdout, r.stderr)
    assert r.stderr == f"distllm serve: error: port {port} is in use\n"


def test_grpc_does_not_share_a_port(monkeypatch):
    """Even past the up-front check, gRPC binds without SO_REUSEPORT: a second server on a port another
    one holds (with SO_REUSEPORT, as grpc's default binds) fails instead of splitting its traffic."""
    monkeypatch.setattr(srv, "check_ports", lambda host, ports: None)
    with listening_socket(reuseport=True) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(srv.PortInUse, match=f"port {port} is in use"):
            asyncio.run(srv.start(IdleEngine(), None, srv.ServerConfig(port=port)))


def test_a_bad_plan_is_refused_before_draining():
    def bad():
        raise ValueError("the layout needs 16 devices; this process has 8")

    async def body(running, log):
        ok = await running.replan(srv.Replan(prepare=bad, build=lambda plan: IdleEngine("new")), log.append)
        return ok, running.service.engine, await health(running)

    ok, engine, status = run(body)
    assert not ok and engine.name == "old" and engine.calls == [] and status == SERVING


def test_a_replan_reports_not_serving_and_resumes():
    building, release = threading.Event(), threading.Event()

    def build(plan):
        building.set()
        release.wait(60)
        return IdleEngine(plan)

    async def body(running, log):
        task = asyncio.ensure_future(running.replan(srv.Replan(prepare=lambda: "new", build=build), log.append))
        await asyncio.get_running_loop().run_in_executor(None, building.wait, 60)
        during = await health(running)
        release.set()
        return during, await task, running.service.engine, await health(running)

    during, ok, engine, after = run(body)
    assert (during, ok, engine.name, after) == (NOT_SERVING, True, "new", SERVING)


def test_a_replan_waits_for_running_requests_only_so_long():
    async def body(running, log):
        old = running.service.engine
        running.service.enter()  # a request that does not finish within the wait
        ok = await running.replan(srv.Replan(prepare=lambda: "new", build=lambda plan: IdleEngine(plan)),
                                  log.append, wait_s=0.01)
        running.service.leave()
        return ok, running.service.engine is old, old.calls, await health(running), log

    ok, same, calls, status, log = run(body)
    assert not ok and same and calls == [] and status == SERVING
    assert any("re-plan abandoned: 1 request(s) still running" in line for line in log), log


def test_drain_reports_not_serving_while_the_listener_is_open():
    async def body(running, log):
        running.service.enter()  # a request still running
        drain = asyncio.ensure_future(running.drain(60))
        statuses = [await health(running)]
        while statuses[-1] != NOT_SERVING:  # SERVING until the drain has begun; never refused
            statuses.append(await health(running))
        async with grpc.aio.insecure_channel(f"127.0.0.1:{running.port}") as ch:
            call = ch.unary_stream("/distllm.v1.Generation/Generate", request_serializer=lambda b: b)
            with pytest.raises(grpc.aio.AioRpcError) as e:
                async for _ in call(make_request([1, 2]).SerializeToString(), timeout=10):
                    pass
        running.service.leave()
        await drain
        return statuses, e.value.code(), running.stopped.is_set()

    statuses, code, stopped = run(body)
    assert statuses[-1] == NOT_SERVING and code == grpc.StatusCode.UNAVAILABLE and stopped
