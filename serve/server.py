"""The gRPC server on ``grpc.aio``: the Generation service, standard health and reflection services,
bearer-token auth, a concurrency cap, Prometheus metrics, and a graceful drain on SIGTERM.

Requests are parsed here (raw bytes in), not by grpc, so a malformed or foreign message gets
INVALID_ARGUMENT with the reason rather than a generic INTERNAL.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import json
import os
import signal
import socket
import sys
import time
from typing import Any, AsyncIterator, Callable, Iterable

import grpc
from grpc_health.v1 import _async as health_async
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from distllm_jax.engine import Engine, FinishReason, RequestOutput
from distllm_jax.engine.logprobs import TokenLogprob
from serve.auth import bearer_error
from serve.front_door import FrontDoor, Refusal, Refused
from serve.metrics import Metrics
from serve.v1 import distllm_pb2 as pb
from serve.validation import (GenerationRequest, InvalidArgument, Limits, check_text, encode, parse, prompt_ids,
                              sampling_params)

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # distllm.v1.Generation


@dataclasses.dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 50051  # 0 picks a free port
    metrics_port: int | None = None  # None: no metrics endpoint; 0 picks a free port
    tls_cert: str | None = None
    tls_key: str | None = None
    auth_token: str | None = None
    max_concurrent: int = 256
    max_n: int = 8  # samples one request may ask for (n, best_of)
    max_message_bytes: int = 4 * 1024 * 1024
    drain_timeout_s: float = 300.0
    model_name: str = ""
    http_port: int | None = None  # OpenAI-compatible HTTP; None: off, 0: pick a free port
    chat_template: Any = None  # serve.chat_template.ChatTemplate (default: the plain template)
    allowed_hosts: tuple[str, ...] = ()  # HTTP Host values accepted beside the bound address
    allowed_origins: tuple[str, ...] = ()  # origins given CORS headers (none: no CORS headers at all)


_GRPC_STATUS = {Refusal.DRAINING: grpc.StatusCode.UNAVAILABLE, Refusal.AT_CAPACITY: grpc.StatusCode.RESOURCE_EXHAUSTED,
                Refusal.INVALID: grpc.StatusCode.INVALID_ARGUMENT}


class PortInUse(OSError):
    """A port another process holds: reported in one line (``port N is in use``), not a traceback."""

    def __init__(self, port: int):
        super().__init__(errno.EADDRINUSE, f"port {port} is in use")
        self.port = port

    def __str__(self) -> str:
        return f"port {self.port} is in use"


def check_ports(host: str, ports: Iterable[int | None]) -> None:
    """Bind each fixed port once, the way the servers will (SO_REUSEADDR, never SO_REUSEPORT), so a
    port taken by another process is reported before minutes of loading and compiling, and two servers
    never split one port's traffic. Port 0 and None need no check."""
    for port in ports:
        if not port:
            continue
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        except socket.gaierror as e:
            raise OSError(f"cannot resolve --host {host}: {e}") from None
        for family, kind, proto, _, addr in infos:
            with socket.socket(family, kind, proto) as sock:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    sock.bind(addr)
                except OSError as e:
                    if e.errno == errno.EADDRINUSE:
                        raise PortInUse(port) from None
                    raise


def token_logprob(lp: TokenLogprob | None, token: int) -> pb.TokenLogprob:
    """``lp`` as sent; None (the prompt's first token, which nothing precedes) keeps ``token`` and
    leaves ``logprob`` unset, so the prompt's entries stay aligned with its tokens."""
    if lp is None:
        return pb.TokenLogprob(token_id=token)
    return pb.TokenLogprob(token_id=lp.token, logprob=lp.logprob,
                           top=[pb.TopLogprob(token_id=t, logprob=v) for t, v in lp.top])


def token_chunk(out: RequestOutput, prompt: list[int]) -> pb.TokenChunk | None:
    """The chunk for one engine event, or None when the event brings nothing new (a final event
    after the last token). A sample's prompt log-probabilities can come alone: with max_tokens 0
    they are all its final event brings. Fields a request did not ask for stay at proto3's
    defaults, so an old client's messages are what they were before they existed."""
    if not (out.token_ids or out.text or out.prompt_logprobs is not None):
        return None
    return pb.TokenChunk(
        token_ids=out.token_ids, text=out.text, index=out.index,
        logprobs=[token_logprob(lp, t) for t, lp in zip(out.token_ids, out.logprobs or ())],
        prompt_logprobs=[token_logprob(lp, t) for t, lp in zip(prompt, out.prompt_logprobs or ())],
    )


class GenerationService(FrontDoor):
    """The gRPC service, which is also the server's front door (:class:`FrontDoor`): the HTTP
    frontend admits through the same object, so both share its slots, drain and re-plan gates."""

    def __init__(self, engine: Engine, tokenizer: Any, cfg: ServerConfig, metrics: Metrics):
        super().__init__(engine, cfg.max_concurrent, metrics)
        self.tokenizer = tokenizer
        self.cfg = cfg
        self.limits = Limits.for_engine(engine, tokenizer, cfg.max_n)

    def handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Generate": grpc.unary_stream_rpc_method_handler(
                self.Generate, response_serializer=pb.GenerateResponse.SerializeToString),
            "Tokenize": grpc.unary_unary_rpc_method_handler(
                self.Tokenize, response_serializer=pb.TokenizeResponse.SerializeToString),
            "ModelInfo": grpc.unary_unary_rpc_method_handler(
                self.ModelInfo, response_serializer=pb.ModelInfoResponse.SerializeToString),
        })

    async def Generate(self, raw: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        try:
            self.check_open()
            try:
                req = GenerationRequest.from_proto(parse(raw, pb.GenerateRequest))
                ids = await prompt_ids(req, self.limits, self.tokenizer)
                params = sampling_params(req, self.limits, len(ids))
            except InvalidArgument as e:
                raise self.refuse(Refusal.INVALID, str(e)) from None
            admitted = await self.admit(ids, params, request_id=req.request_id,
                                        timeout=context.time_remaining())
        except Refused as e:
            await context.abort(_GRPC_STATUS[e.why], str(e))
        try:
            async for out in admitted.stream:  # every sample's events; it ends after the last one's final
                chunk = token_chunk(out, ids)
                if chunk is not None:
                    yield pb.GenerateResponse(chunk=chunk)
                if out.finished is None:
                    continue
                admitted.finished()
                t = out.timings
                self.metrics.observe_finished(out.finished.value, t.ttft, t.tpot, out.num_output_tokens,
                                              last=admitted.done)
                if out.finished is FinishReason.ERROR:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error or "engine error")
                if out.finished is FinishReason.DEADLINE:
                    await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "the request's deadline passed")
                yield pb.GenerateResponse(finished=pb.Finished(
                    request_id=out.request_id, finish_reason=out.finished.value, index=out.index,
                    prompt_tokens=out.num_prompt_tokens, output_tokens=out.num_output_tokens,
                    cumulative_logprob=out.cumulative_logprob, cached_prompt_tokens=t.cached_prompt_tokens,
                    timings=pb.Timings(
                        ttft_s=t.ttft or 0.0, tpot_s=t.tpot or 0.0, queueing_s=t.queueing or 0.0,
                        migration_s=t.migration or 0.0, e2e_s=(t.finish or time.perf_counter()) - t.arrival,
                        prefill_instance=t.prefill_instance or "", decode_instance=t.decode_instance or "",
                        migration_path=t.migration_path or "",
                    ),
                ))
        finally:
            admitted.close()  # an unfinished request (client gone, deadline) is cancelled: its pages free now

    async def Tokenize(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        if self.tokenizer is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this server has no tokenizer")
        try:
            req = parse(raw, pb.TokenizeRequest)
            check_text("text", req.text, self.limits)  # the reply for a longer text could pass no limit
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        enc = await encode(self.tokenizer, req.text)
        return pb.TokenizeResponse(ids=enc.ids, tokens=enc.tokens)

    async def ModelInfo(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.ModelInfoResponse:
        try:
            parse(raw, pb.ModelInfoRequest)
        except InvalidArgument as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        e = self.engine
        engine_info = {
            "mode": e.config.mode, "page_size": e.config.page_size,
            "prefill_token_budget": e.config.prefill_token_budget, "max_decode_batch": e.config.max_decode_batch,
            "kv_transfer": e.config.kv_transfer, "attention": e.config.attention,
            "instances": [i.describe() for i in e.instances],
        }
        cluster = await asyncio.get_running_loop().run_in_executor(None, e.cluster_info)
        if cluster is not None:  # cluster mode: actors, nodes, the KV path in use
            engine_info["cluster"] = cluster
        return pb.ModelInfoResponse(
            model_json=json.dumps(e.model.to_dict()), engine_json=json.dumps(engine_info),
            max_seq_len=e.max_len, vocab_size=e.model.vocab_size,
            max_concurrent_requests=self.cfg.max_concurrent, max_message_bytes=self.cfg.max_message_bytes,
            model_name=self.cfg.model_name, num_devices=sum(len(i.devices) for i in e.instances),
        )


class BearerAuth(grpc.aio.ServerInterceptor):
    """Requests to the Generation service need ``authorization: Bearer <token>``; health and
    reflection stay open (load balancers and generic clients use them)."""

    def __init__(self, token: str):
        self.token = token

    async def intercept_service(self, continuation, details):
        if not details.method.startswith(f"/{SERVICE}/"):
            return await continuation(details)
        values = [v for k, v in details.invocation_metadata or () if k == "authorization"]
        why = bearer_error([v.decode(errors="replace") if isinstance(v, bytes) else v for v in values], self.token)
        if why is None:
            return await continuation(details)

        async def deny(request, context):
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        if details.method.endswith("/Generate"):
            async def deny_stream(request, context):
                await deny(request, context)
                yield  # pragma: no cover - never reached

            return grpc.unary_stream_rpc_method_handler(deny_stream)
        return grpc.unary_unary_rpc_method_handler(deny)


@dataclasses.dataclass
class Replan:
    """How SIGHUP re-places the engine: ``prepare()`` reads and validates the new plan, raising with the
    reason, before anything drains (a bad plan costs no waiting); ``build(plan)`` places and compiles it."""

    prepare: Callable[[], Any]
    build: Callable[[Any], Any]


SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class RunningServer:
    """A started server: ``port``/``metrics_port`` are the bound ones; :meth:`drain` stops it gently."""

    def __init__(self, server, service, health, metrics, port, metrics_port, http=None, http_task=None,
                 http_port=None):
        self.server, self.service, self.health, self.metrics = server, service, health, metrics
        self.port, self.metrics_port = port, metrics_port
        self.http, self.http_task, self.http_port = http, http_task, http_port
        self.stopped = asyncio.Event()
        self.replanning = False

    async def set_health(self, status: int) -> None:
        """The status both health services report (the server's and the Generation service's)."""
        for name in ("", SERVICE):
            await self.health.set(name, status)

    async def replan(self, plan: Replan, announce: Callable[[str], None] = print, wait_s: float = 300.0) -> bool:
        """Validate, drain, re-place, resume. A plan that fails ``prepare()`` leaves serving untouched.
        Otherwise health says NOT_SERVING, new requests wait while running ones finish on the old engine
        (at most ``wait_s``: past it the re-plan is abandoned and the old engine serves on, so no request
        is cut off), the old engine is shut down (its devices freed), ``build`` places and compiles the
        new one, and serving resumes. If the new plan cannot be built, the old one is rebuilt. True when
        the new plan serves."""
        s = self.service
        if s.draining or self.replanning:
            announce("distllm serve: SIGHUP ignored: a re-plan or drain is already under way")
            return False
        self.replanning = True
        try:
            return await self._replan(plan, announce, wait_s)
        finally:
            self.replanning = False

    async def _replan(self, plan: Replan, announce: Callable[[str], None], wait_s: float) -> bool:
        s = self.service
        loop = asyncio.get_running_loop()
        try:
            new_plan = await loop.run_in_executor(None, plan.prepare)
        except Exception as e:  # noqa: BLE001 - any reason the plan is unusable; keep serving
            announce(f"distllm serve: re-plan refused, serving on the current layout: {type(e).__name__}: {e}")
            return False
        announce("distllm serve: re-planning (drain, re-place, resume)")
        s.ready.clear()
        await self.set_health(NOT_SERVING)
        old = s.engine
        try:
            try:
                await asyncio.wait_for(s.idle.wait(), wait_s)
            except asyncio.TimeoutError:
                announce(f"distllm serve: re-plan abandoned: {s.active} request(s) still running after "
                         f"{wait_s:g} s; serving on the current layout")
                return False
            await loop.run_in_executor(None, old.shutdown, True, 60.0)
            try:
                s.engine = await loop.run_in_executor(None, plan.build, new_plan)
                ok = True
            except Exception as e:  # noqa: BLE001 - keep serving on the previous layout
                announce(f"distllm serve: re-plan failed ({type(e).__name__}: {e}); restoring the previous layout")
                s.engine = await loop.run_in_executor(None, old.rebuild)
                ok = False
            s.limits = Limits.for_engine(s.engine, s.tokenizer, s.cfg.max_n)
            return ok
        finally:
            s.ready.set()
            if not s.draining:
                await self.set_health(SERVING)

    async def drain(self, timeout: float) -> None:
        """No new requests; running ones finish (up to ``timeout``); then stop. The listeners stay open
        until then, so health checks read NOT_SERVING (and requests get UNAVAILABLE/503) while draining."""
        if self.service.draining:
            return
        self.service.draining = True
        await self.health.enter_graceful_shutdown()
        end = time.monotonic() + timeout
        try:
            await asyncio.wait_for(self.service.idle.wait(), timeout)
        except asyncio.TimeoutError:
            pass
        await self.server.stop(grace=max(1.0, end - time.monotonic()))
        if self.http is not None:
            self.http.should_exit = True
            await self.http_task
        await asyncio.get_running_loop().run_in_executor(None, self.service.engine.shutdown, True, 5.0)
        self.metrics.close()
        self.stopped.set()


async def start(engine: Engine, tokenizer: Any, cfg: ServerConfig) -> RunningServer:
    if cfg.auth_token is not None and not cfg.auth_token:
        raise ValueError("the auth token is empty")
    holder: list[GenerationService] = []
    metrics = Metrics(lambda: holder[0].engine.stats())  # whichever engine serves now
    service = GenerationService(engine, tokenizer, cfg, metrics)
    holder.append(service)
    opts = [("grpc.max_receive_message_length", cfg.max_message_bytes),
            ("grpc.max_send_message_length", cfg.max_message_bytes), ("grpc.so_reuseport", 0)]
    server = grpc.aio.server(interceptors=[BearerAuth(cfg.auth_token)] if cfg.auth_token else [], options=opts)
    server.add_generic_rpc_handlers([service.handler()])
    health = health_async.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    reflection.enable_server_reflection(
        [SERVICE, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server)
    check_ports(cfg.host, (cfg.port, cfg.http_port, cfg.metrics_port))
    addr = f"{cfg.host}:{cfg.port}"
    if cfg.tls_cert or cfg.tls_key:
        if not (cfg.tls_cert and cfg.tls_key):
            raise ValueError("TLS needs both --tls-cert and --tls-key")
        with open(cfg.tls_key, "rb") as k, open(cfg.tls_cert, "rb") as c:
            creds = grpc.ssl_server_credentials([(k.read(), c.read())])
        bind = lambda: server.add_secure_port(addr, creds)  # noqa: E731
    else:
        bind = lambda: server.add_insecure_port(addr)  # noqa: E731
    try:
        port = bind()
    except RuntimeError:  # newer grpc raises where older ones return 0
        port = 0
    if port == 0:
        raise PortInUse(cfg.port) if cfg.port else OSError(f"could not bind {addr}")
    try:
        metrics_port = metrics.serve(cfg.host, cfg.metrics_port) if cfg.metrics_port is not None else None
    except OSError as e:
        raise PortInUse(cfg.metrics_port) if e.errno == errno.EADDRINUSE else e from None
    await server.start()
    http = http_task = http_port = None
    if cfg.http_port is not None:
        from serve.chat_template import ChatTemplate
        from serve.openai_http import OpenAIFrontend, make_uvicorn_server

        front = OpenAIFrontend(service, cfg.model_name, cfg.auth_token, cfg.max_message_bytes,
                               cfg.chat_template or ChatTemplate(), bound_host=cfg.host,
                               allowed_hosts=cfg.allowed_hosts, allowed_origins=cfg.allowed_origins)
        http = make_uvicorn_server(front.app(), cfg.host, cfg.http_port, cfg.tls_cert, cfg.tls_key)
        http_task = asyncio.create_task(http.serve())
        while not http.started:
            if http_task.done():
                raise OSError(f"the HTTP server could not start on {cfg.host}:{cfg.http_port}: {http_task.exception()}")
            await asyncio.sleep(0.01)
        http_port = http.servers[0].sockets[0].getsockname()[1]
    running = RunningServer(server, service, health, metrics, port, metrics_port, http, http_task, http_port)
    await running.set_health(SERVING)
    return running


async def serve_forever(engine: Engine, tokenizer: Any, cfg: ServerConfig, announce: Callable[[str], None] = print,
                        replan: Replan | None = None) -> None:
    """Start, announce, and run until SIGTERM/SIGINT, then drain; a second one during the drain exits at
    once (code 1). SIGHUP re-places the engine with ``replan`` (the CLI re-reads ``--plan``); without
    one it only logs that there is nothing to re-read (its default action would kill the server)."""
    running = await start(engine, tokenizer, cfg)
    scheme = "grpcs" if cfg.tls_cert else "grpc"
    announce(f"distllm serve: listening on {scheme}://{cfg.host}:{running.port}")
    if running.metrics_port is not None:
        announce(f"distllm serve: metrics on http://{cfg.host}:{running.metrics_port}/metrics")
    if running.http_port is not None:
        announce(f"distllm serve: OpenAI-compatible HTTP on {'https' if cfg.tls_cert else 'http'}://{cfg.host}:"
                 f"{running.http_port}/v1")
    loop = asyncio.get_running_loop()

    def on_stop() -> None:
        if running.service.draining:
            print("distllm serve: second signal during the drain: exiting now", file=sys.stderr, flush=True)
            sys.stdout.flush()
            os._exit(1)
        announce(f"distllm serve: draining ({running.service.active} request(s) running; "
                 "a second signal exits at once)")
        asyncio.ensure_future(running.drain(cfg.drain_timeout_s))

    async def do_replan() -> None:
        if await running.replan(replan, announce, cfg.drain_timeout_s):
            e = running.service.engine
            announce(f"distllm serve: re-planned: {e.config.mode} "
                     f"[{', '.join(i.name + ':' + i.spec.label() for i in e.instances)}]; ready")

    def on_hup() -> None:
        if replan is None:
            announce("distllm serve: SIGHUP ignored: the server was started without --plan, nothing to re-read")
        else:
            asyncio.ensure_future(do_replan())

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop)
    loop.add_signal_handler(signal.SIGHUP, on_hup)
    announce("distllm serve: ready")
    await running.stopped.wait()
    announce("distllm serve: drained, exiting")
