"""OpenAI-compatible HTTP beside gRPC, on the same engine: ``POST /v1/completions``,
``POST /v1/chat/completions`` (``stream: true`` as server-sent events ending in ``data: [DONE]``, usage
in a last chunk when ``stream_options.include_usage``), ``GET /v1/models``, ``GET /health`` and
``/metrics`` (the gRPC server's registry).

Errors come in OpenAI's shape, ``{"error": {"message", "type", "param", "code"}}``: 400 for a bad field
(named in ``param``), 401 without the bearer token, 404 for another model name, 413 for a body over the
limit, 415 for a body that is not ``application/json``, 429 at the concurrency cap (shared with gRPC),
503 while draining or re-planning. Extensions: ``top_k`` and ``ignore_eos``.

Served as OpenAI (and vLLM) serve them: ``n`` and ``best_of`` (the samples of a prompt share its
prefill; ``best_of`` keeps the ``n`` with the highest cumulative log-probability), ``logprobs``
(completions: ``logprobs: k``, in the legacy shape; chat: ``logprobs: true`` with ``top_logprobs: k``),
``echo`` with prompt log-probabilities (``max_tokens: 0`` scores a prompt, as evaluation harnesses
do), and a list of prompts in one completions request (choice ``index`` = prompt * n + sample). A field
this server does not implement (``frequency_penalty``, ``logit_bias``, ``tools``, ...) is a 400 naming
it rather than silently ignored; so is a ``max_tokens`` past what the context leaves after the prompt
(the message gives the limit). A client that disconnects, streaming or not, has its request cancelled.

Browsers: requests must be ``application/json`` (a cross-site "simple" POST cannot be), the Host header
must name the bound address or one of ``allowed_hosts`` (DNS rebinding), and CORS headers are sent only
for ``allowed_origins``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import json
import time
import uuid
from typing import Any, AsyncIterator, Callable, Iterable

from fastapi import FastAPI, Request  # module level: route annotations resolve against these globals
from fastapi.responses import JSONResponse, StreamingResponse

from distllm_jax.engine import FinishReason
from serve.auth import bearer_error
from serve.chat_template import ChatTemplate
from serve.front_door import Admitted, Refusal, Refused
from distllm_jax.engine.request import RequestOutput, combine
from distllm_jax.engine.sampling import MAX_LOGPROBS
from serve.openai_logprobs import chat_logprobs, completion_logprobs, legacy_text, token_bytes, token_text
from serve.validation import GenerationRequest, InvalidArgument, Limits, check_text, prompt_ids, sampling_params


class HTTPError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, counted: bool = False):
        """``counted``: the front door already counted this refusal in the request metrics."""
        super().__init__(message)
        self.status, self.type, self.param, self.code = status, type_, param, code
        self.counted = counted

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.type, "param": self.param, "code": self.code}}


_NUM = (int, float)
INT64 = 2**63

# accepted fields; the OpenAI API has more, refused by name below unless their value is a no-op
COMMON = {"model", "stream", "stream_options", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
          "ignore_eos", "user", "n", "logprobs"}
MAX_PROMPTS = 64  # prompts in one /v1/completions request (each is admitted as a request of its own)
FIELDS = {False: COMMON | {"prompt", "best_of", "echo"},
          True: COMMON | {"messages", "max_completion_tokens", "top_logprobs"}}
NO_OP = {"frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "suffix": "", "tools": [],
         "functions": [], "response_format": {"type": "text"}, "parallel_tool_calls": True, "store": False,
         "metadata": {}}


def _field(body: dict, name: str, types: tuple, default: Any = None) -> Any:
    v = body.get(name, default)
    if v is None:
        return default
    if isinstance(v, bool) and bool not in types:
        raise HTTPError(400, f"'{name}' must be {' or '.join(t.__name__ for t in types)}", param=name)
    if not isinstance(v, types):
        raise HTTPError(400, f"'{name}' must be {' or '.join(t.__name__ for t in types)}", param=name)
    if isinstance(v, int) and not isinstance(v, bool) and not -INT64 <= v < INT64:
        raise HTTPError(400, f"'{name}' is out of range: {str(v)[:20]}... has {len(str(v))} digits", param=name)
    if isinstance(v, int) and float in types:
        try:
            return float(v)
        except OverflowError:
            raise HTTPError(400, f"'{name}' is out of range ({len(str(v))} digits)", param=name) from None
    return v


@dataclasses.dataclass(frozen=True)
class Choices:
    """What a request asks of its completions: ``n`` per prompt, drawn from ``best_of`` samples (the
    ``n`` with the highest cumulative log-probability are kept), ``logprobs`` alternatives per token
    (None: no log-probabilities), and ``echo`` (the prompt before the completion, completions only)."""

    n: int = 1
    best_of: int = 1
    logprobs: int | None = None
    echo: bool = False


def choices_asked(body: dict, chat: bool) -> Choices:
    n = _field(body, "n", (int,), 1)
    best_of = n if chat else _field(body, "best_of", (int,), n)
    if best_of < n:
        raise HTTPError(400, f"best_of ({best_of}) must be at least n ({n})", param="best_of")
    if best_of > n and _field(body, "stream", (bool,), False):
        raise HTTPError(400, "best_of > n cannot stream (the best are known only at the end)", param="best_of")
    if chat:
        on = _field(body, "logprobs", (bool,), False)
        top = _field(body, "top_logprobs", (int,), None)
        if top is not None and not on:
            raise HTTPError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (top or 0) if on else None
        echo = False
    else:
        k = _field(body, "logprobs", (int,), None)
        echo = bool(_field(body, "echo", (bool,), False))
    if k is not None and not 0 <= k <= MAX_LOGPROBS:
        raise HTTPError(400, f"must be in [0, {MAX_LOGPROBS}], got {k}", param="top_logprobs" if chat else "logprobs")
    return Choices(n, best_of, k, echo)


def refuse_unimplemented(body: dict, chat: bool) -> None:
    """A field the server would otherwise ignore changes what the client gets without telling it: refuse
    it by name (a no-op value such as ``frequency_penalty: 0`` is accepted)."""
    if chat and body.get("echo") not in (None, False):
        raise HTTPError(400, "echo is for /v1/completions; chat replies do not repeat the messages", param="echo")
    for name in sorted(body):
        if name in FIELDS[chat] or body[name] is None or (name in NO_OP and body[name] == NO_OP[name]):
            continue
        raise HTTPError(400, f"'{name}' is not supported by this server", param=name, code="unsupported_parameter")


def build_request(body: dict, prompt: str | list[int], limits: Limits, chat: bool) -> GenerationRequest:
    """The OpenAI fields as the neutral request validation reads (``max_tokens`` left unset when
    absent: the default depends on the prompt's length). ``best_of`` samples are drawn (``n`` are
    kept later), with log-probabilities to rank them by; an ``echo`` with ``logprobs`` scores the
    prompt too."""
    refuse_unimplemented(body, chat)
    want = choices_asked(body, chat)
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise HTTPError(400, "'stop' must be a string or a list of strings", param="stop")
    try:
        for s in stop or ():
            check_text("stop", s, limits)
        if isinstance(prompt, str):
            check_text("prompt", prompt, limits)
    except InvalidArgument as e:
        raise HTTPError(400, str(e), param=_openai_param(e.field, chat)) from None
    max_tokens = _field(body, "max_tokens", (int,), None)
    if max_tokens is None and chat:
        max_tokens = _field(body, "max_completion_tokens", (int,), None)
    if max_tokens == 0 and not want.echo:
        raise HTTPError(400, "max_tokens 0 generates nothing: it needs echo (to score the prompt)", param="max_tokens")
    if not isinstance(prompt, str) and not all(0 <= t < INT64 for t in prompt):
        raise HTTPError(400, f"token ids out of the vocabulary [0, {limits.vocab_size})", param="prompt")
    ranked = want.best_of > want.n
    return GenerationRequest(
        prompt=prompt, max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", _NUM, 1.0)),
        top_p=float(_field(body, "top_p", _NUM, 1.0)),
        top_k=_field(body, "top_k", (int,), 0),
        seed=_field(body, "seed", (int,), None),
        stop=tuple(stop or ()),
        ignore_eos=bool(_field(body, "ignore_eos", (bool,), False)),
        n=want.best_of,
        logprobs=want.logprobs if want.logprobs is not None else (0 if ranked else None),
        prompt_logprobs=(want.logprobs or 0) if want.echo and (want.logprobs is not None or max_tokens == 0) else None,
    )


def host_check(bound: str, allowed: Iterable[str]) -> Callable[[str], bool]:
    """Which Host header values the server answers to: the bound address (for a loopback bind also
    ``localhost`` and the other loopback address; for a wildcard bind any IP literal), and ``allowed``
    (``*``: any). A page on another site that rebinds its DNS name to this address still sends its own
    name, so it is refused."""
    names = {h.lower() for h in allowed} | {bound.lower()}
    loopback = {"127.0.0.1", "::1", "localhost"}
    if names & loopback:
        names |= loopback
    wildcard = bound in ("", "0.0.0.0", "::")

    def ok(value: str) -> bool:
        if "*" in names:
            return True
        host = value.strip().lower()
        if host.startswith("["):
            host = host[1:host.find("]")]
        elif host.count(":") == 1:
            host = host.split(":")[0]
        if host in names or (wildcard and host == "localhost"):
            return True
        if wildcard:
            try:
                ipaddress.ip_address(host)
                return True
            except ValueError:
                return False
        return False

    return ok


class HostCheck:
    """ASGI middleware refusing requests whose Host header the server does not answer to."""

    def __init__(self, app: Any, ok: Callable[[str], bool]):
        self.app, self.ok = app, ok

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            hosts = [v.decode("latin-1") for k, v in scope["headers"] if k == b"host"]
            if len(hosts) != 1 or not self.ok(hosts[0]):
                shown = ", ".join(hosts) or "(none)"
                err = HTTPError(400, f"Host {shown} is not an address this server answers to (see --allowed-hosts)",
                                code="invalid_host")
                await JSONResponse(err.body(), status_code=400)(scope, receive, send)
                return
        await self.app(scope, receive, send)


class OpenAIFrontend:
    """Routes over the gRPC service's engine, limits and counters (one concurrency cap for both)."""

    def __init__(self, service: Any, model_name: str, token: str | None, max_body_bytes: int,
                 chat: ChatTemplate, bound_host: str = "127.0.0.1", allowed_hosts: Iterable[str] = (),
                 allowed_origins: Iterable[str] = ()):
        self.service = service
        self.model = model_name or "model"
        self.token = token
        self.max_body = max_body_bytes
        self.chat = chat
        self.host_ok = host_check(bound_host, allowed_hosts)
        self.origins = list(allowed_origins)

    def app(self):
        from fastapi.responses import Response
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        app = FastAPI(title="distllm OpenAI-compatible API", docs_url=None, redoc_url=None)

        @app.get("/metrics")
        async def metrics():
            return Response(generate_latest(self.service.metrics.registry), media_type=CONTENT_TYPE_LATEST)

        def error(e: HTTPError) -> JSONResponse:
            return JSONResponse(e.body(), status_code=e.status)

        @app.get("/health")
        async def health():
            if self.service.draining:
                return error(HTTPError(503, "the server is draining", "service_unavailable"))
            if not self.service.ready.is_set():
                return error(HTTPError(503, "the server is re-planning", "service_unavailable"))
            return {"status": "ok"}

        @app.get("/v1/models")
        async def models(request: Request):
            try:
                self._auth(request)
            except HTTPError as e:
                return error(e)
            return {"object": "list", "data": [{"id": self.model, "object": "model", "created": 0,
                                                "owned_by": "distllm", "max_model_len": self.service.limits.max_seq_len}]}

        async def handle(request: Request, chat: bool):
            try:
                self._auth(request)
                body = await self._body(request)
                jobs = [await self._job(body, prompt, chat) for prompt in self._prompts(body, chat)]
                stream = _field(body, "stream", (bool,), False)
                opts = body.get("stream_options") or {}
                usage = bool(opts.get("include_usage")) if isinstance(opts, dict) else False
                return await self._run(jobs, choices_asked(body, chat), chat, stream, usage, request)
            except HTTPError as e:
                if e.status in (400, 413) and not e.counted:
                    self.service.metrics.requests.labels("invalid").inc()
                return error(e)

        @app.post("/v1/completions")
        async def completions(request: Request):
            return await handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat_completions(request: Request):
            return await handle(request, chat=True)

        if self.origins:
            from fastapi.middleware.cors import CORSMiddleware

            app.add_middleware(CORSMiddleware, allow_origins=self.origins, allow_methods=["GET", "POST"],
                               allow_headers=["authorization", "content-type"])
        app.add_middleware(HostCheck, ok=self.host_ok)  # added last: runs first
        return app

    # ---- pieces ---------------------------------------------------------------------------------

    def _auth(self, request) -> None:
        if self.token is None:
            return
        why = bearer_error(request.headers.getlist("authorization"), self.token)
        if why is not None:
            raise HTTPError(401, why, "authentication_error", code="invalid_api_key")

    async def _body(self, request) -> dict:
        media = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if media != "application/json":
            raise HTTPError(415, f"the body must be application/json, not '{media or 'unspecified'}'",
                            code="unsupported_media_type")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            raise HTTPError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        raw = b""
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > self.max_body:
                raise HTTPError(413, f"request body over {self.max_body} bytes", code="request_too_large")
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            raise HTTPError(400, "the body is not valid JSON") from None
        except RecursionError:
            raise HTTPError(400, "the body's JSON is nested too deeply") from None
        if not isinstance(body, dict):
            raise HTTPError(400, "the body must be a JSON object")
        model = body.get("model")
        if model is not None and model != self.model:
            raise HTTPError(404, f"the model '{model}' does not exist (this server serves '{self.model}')",
                            param="model", code="model_not_found")
        return body

    def _prompts(self, body: dict, chat: bool) -> list[str | list[int]]:
        """The request's prompts: the rendered chat, or ``prompt`` as OpenAI takes it (a string, token
        ids, or a list of either for a batch)."""
        if chat:
            msgs = body.get("messages")
            if not isinstance(msgs, list) or not msgs or not all(
                    isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs):
                raise HTTPError(400, "'messages' must be a non-empty list of {role, content} strings", param="messages")
            try:
                text = self.chat.render(msgs)
            except Exception as e:  # noqa: BLE001 - a template's own error, e.g. roles out of order
                raise HTTPError(400, f"chat template: {e}", param="messages") from None
            return [text]
        p = body.get("prompt")
        batch = p if isinstance(p, list) and p and all(isinstance(q, (str, list)) for q in p) else [p]
        if len(batch) > MAX_PROMPTS:
            raise HTTPError(400, f"at most {MAX_PROMPTS} prompts in one request, got {len(batch)}", param="prompt")
        for q in batch:
            if not (isinstance(q, str) or (isinstance(q, list) and all(
                    isinstance(t, int) and not isinstance(t, bool) for t in q))):
                raise HTTPError(400, "'prompt' must be a string, a list of token ids, or a list of either",
                                param="prompt")
        return batch

    async def _job(self, body: dict, prompt: str | list[int], chat: bool) -> "PromptJob":
        """One prompt's engine inputs, checked."""
        req = build_request(body, prompt, self.service.limits, chat)
        try:
            special = not chat or self.chat.add_special_tokens
            ids = await prompt_ids(req, self.service.limits, self.service.tokenizer, special)
            if chat and req.max_tokens is None:  # a chat reply may use what the context leaves
                req = dataclasses.replace(req, max_tokens=max(1, min(1024, self.service.limits.max_seq_len - len(ids))))
            params = sampling_params(req, self.service.limits, len(ids))
        except InvalidArgument as e:
            raise HTTPError(400, str(e), param=_openai_param(e.field, chat)) from None
        if isinstance(prompt, str):
            text = prompt
        else:
            tok = self.service.tokenizer
            text = tok.decode(ids, skip_special_tokens=False) if tok is not None else ""
        return PromptJob(ids, params, text)

    async def _admit_all(self, jobs: list["PromptJob"]) -> list[Admitted]:
        out: list[Admitted] = []
        try:
            for job in jobs:
                out.append(await self.service.admit(job.ids, job.params))
        except Refused as e:
            for a in out:
                a.close()
            status, kind = _HTTP_STATUS[e.why]
            raise HTTPError(status, str(e), kind, counted=True) from None
        return out

    async def _run(self, jobs: list["PromptJob"], want: Choices, chat: bool, stream: bool, usage: bool,
                   request: Any = None):
        admitted = await self._admit_all(jobs)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        if stream:
            return StreamingResponse(self._sse(admitted, jobs, want, rid, created, chat, usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        # nothing is sent before the end, so only a watch on the connection notices a client that left
        watch = asyncio.ensure_future(self._cancel_on_disconnect(request, admitted)) if request else None
        try:
            results = []
            for a in admitted:
                events: dict[int, list[RequestOutput]] = {}
                async for out in _events(a, lambda out, a=a: self._observe(out, a.done)):
                    events.setdefault(out.index, []).append(out)
                results.append([combine(events[i]) for i in sorted(events)])
        finally:
            if watch is not None:
                watch.cancel()
            for a in admitted:
                a.close()
        choices, n_out = [], 0
        for i, (job, outs) in enumerate(zip(jobs, results)):
            n_out += sum(o.num_output_tokens for o in outs)
            if want.best_of > want.n:
                outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[: want.n]
            for j, out in enumerate(outs):
                choices.append(self._choice(i * want.n + j, job, out, want, chat))
        cached = sum(max(o.timings.cached_prompt_tokens for o in outs) for outs in results)
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": self.model, "choices": choices, "usage": usage_of(jobs, n_out, cached)}

    def _choice(self, index: int, job: "PromptJob", out: RequestOutput, want: Choices, chat: bool) -> dict:
        reason = out.finished.value if out.finished is not None else None
        lp = self._logprobs(job, out, want, chat, echo=want.echo)
        if chat:
            return {"index": index, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                    "finish_reason": reason}
        return {"index": index, "text": (job.text if want.echo else "") + out.text, "logprobs": lp,
                "finish_reason": reason}

    def _logprobs(self, job: "PromptJob", out: RequestOutput, want: Choices, chat: bool, echo: bool) -> dict | None:
        """An event's log-probabilities in the shape of its endpoint (None when not asked for);
        ``echo``: the prompt's come first (a choice's first completions event)."""
        if want.logprobs is None:
            return None
        tok = self.service.tokenizer
        if chat:
            return chat_logprobs(out.logprobs or [], token_text(tok), token_bytes(tok))
        tokens, lps = list(out.token_ids), list(out.logprobs or [])
        if echo:
            tokens, lps = job.ids + tokens, list(out.prompt_logprobs or [None] * len(job.ids)) + lps
        return completion_logprobs(tokens, lps, legacy_text(tok))

    async def _cancel_on_disconnect(self, request: Any, admitted: list[Admitted]) -> None:
        """Cancel the requests once their client disconnects (its body is read, so the next ASGI
        message is the disconnect)."""
        while (await request.receive())["type"] != "http.disconnect":
            pass
        for a in admitted:
            self.service.engine.cancel(a.request_id)

    def _observe(self, out: RequestOutput, last: bool) -> None:
        t = out.timings
        self.service.metrics.observe_finished(out.finished.value, t.ttft, t.tpot, out.num_output_tokens, last)

    async def _sse(self, admitted: list[Admitted], jobs: list["PromptJob"], want: Choices, rid: str, created: int,
                   chat: bool, usage: bool) -> AsyncIterator[bytes]:
        """Server-sent events of every choice as its tokens come (each chunk names its choice's
        ``index``); the prompts' streams are read side by side."""
        obj = "chat.completion.chunk" if chat else "text_completion"
        started: set[int] = set()
        n_out = 0
        cached: dict[int, int] = {}  # per prompt: the tokens its prefill started from cached pages for

        def chunk(index: int, out: RequestOutput, job: "PromptJob") -> bytes:
            reason = out.finished.value if out.finished is not None else None
            first = index not in started
            started.add(index)
            echo = first and want.echo
            lp = self._logprobs(job, out, want, chat, echo)
            if chat:
                delta: dict = {"role": "assistant"} if first else {}
                if out.text or reason is None:
                    delta["content"] = out.text
                choice = {"index": index, "delta": delta, "logprobs": lp, "finish_reason": reason}
            else:
                choice = {"index": index, "text": (job.text if echo else "") + out.text, "logprobs": lp,
                          "finish_reason": reason}
            return _event({"id": rid, "object": obj, "created": created, "model": self.model, "choices": [choice]})

        queue: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, a: Admitted) -> None:
            try:
                async for out in _events(a, lambda out: self._observe(out, a.done)):
                    await queue.put((i, out))
            except HTTPError as e:
                await queue.put((i, e))
            finally:
                await queue.put((i, None))

        tasks = [asyncio.ensure_future(pump(i, a)) for i, a in enumerate(admitted)]
        try:
            left = len(tasks)
            while left:
                i, out = await queue.get()
                if out is None:
                    left -= 1
                    continue
                if isinstance(out, HTTPError):
                    yield _event(out.body())
                    break
                if out.finished is not None:
                    n_out += out.num_output_tokens
                    cached[i] = max(cached.get(i, 0), out.timings.cached_prompt_tokens)
                if out.finished is None and not (out.text or out.token_ids or out.prompt_logprobs):
                    continue
                yield chunk(i * want.n + out.index, out, jobs[i])
            else:
                if usage:
                    yield _event({"id": rid, "object": obj, "created": created, "model": self.model, "choices": [],
                                  "usage": usage_of(jobs, n_out, sum(cached.values()))})
                yield b"data: [DONE]\n\n"
        finally:
            for t in tasks:
                t.cancel()
            for a in admitted:
                a.close()  # a client gone mid-stream: its requests are cancelled, their pages free now


@dataclasses.dataclass(frozen=True)
class PromptJob:
    """One prompt of a request: its ids, its engine parameters and its text (for an echo)."""

    ids: list[int]
    params: Any
    text: str


async def _events(admitted: Admitted, observe: Callable[[RequestOutput], None]) -> AsyncIterator[RequestOutput]:
    """An admitted request's events; each sample's final event is counted, and one that ended in
    an error, a deadline or a cancellation raises (a 500 in OpenAI's shape)."""
    async for out in admitted.stream:
        if out.finished is not None:
            admitted.finished()
            observe(out)
            if out.finished in (FinishReason.ERROR, FinishReason.DEADLINE, FinishReason.CANCELLED):
                raise HTTPError(500, out.error or out.finished.value, "server_error")
        yield out


_HTTP_STATUS = {Refusal.DRAINING: (503, "service_unavailable"), Refusal.AT_CAPACITY: (429, "rate_limit_error"),
                Refusal.INVALID: (400, "invalid_request_error")}


def usage_of(jobs: list["PromptJob"], completion_tokens: int, cached_tokens: int) -> dict:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens``: the prompt tokens whose KV came
    from the prefix cache (each prompt counted once, however many samples it has)."""
    n_in = sum(len(j.ids) for j in jobs)
    return {"prompt_tokens": n_in, "completion_tokens": completion_tokens, "total_tokens": n_in + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _event(obj: dict) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _openai_param(field: str, chat: bool) -> str:
    if field in ("text", "token_ids", "prompt"):
        return "messages" if chat else "prompt"
    return field


def make_uvicorn_server(app, host: str, port: int, tls_cert: str | None, tls_key: str | None):
    """A uvicorn server that leaves signals to the gRPC server's drain (one SIGTERM handler)."""
    import contextlib

    import uvicorn

    class Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):
            yield

    config = uvicorn.Config(app, host=host, port=port, log_level="warning", ssl_certfile=tls_cert,
                            ssl_keyfile=tls_key, lifespan="off", timeout_graceful_shutdown=5)
    return Server(config)
