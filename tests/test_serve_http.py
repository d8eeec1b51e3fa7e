"""The OpenAI-compatible HTTP frontend on a real server (subprocess), spoken to with the official
`openai` client and raw HTTP: equal to gRPC for the same greedy request, streaming, errors in OpenAI's
shape with their status codes, disconnects, draining, and bench's openai backend (429 and 503
are also checked on the frontend directly, without racing a live server)."""

from __future__ import annotations

import concurrent.futures as cf
import json
import signal
import threading
import time

import httpx
import openai
import pytest

from distllm_jax.cli import main as cli
from serve.client import Client
from server_proc import ServerProc, checkpoint_with_tokenizer

TOKEN = "http-secret"
CAP = 34


@pytest.fixture(scope="module")
def ckpt(converted, tmp_path_factory):
    _, c = converted("opt-pre-ln")
    return checkpoint_with_tokenizer(c, tmp_path_factory.mktemp("http") / "tiny-http")


@pytest.fixture(scope="module")
def server(ckpt):
    srv = ServerProc(ckpt, "--http-port", "0", "--max-concurrent", str(CAP), "--max-message-bytes", "100000",
                     env={"DISTLLM_AUTH_TOKEN": TOKEN})
    srv.http = next(line.split()[-1] for line in srv.log if "OpenAI-compatible HTTP on" in line)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def oai(server):
    return openai.OpenAI(base_url=server.http, api_key=TOKEN, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def grpc_client(server):
    with Client(server.address, token=TOKEN, timeout=60) as c:
        yield c


GREEDY = dict(temperature=0, max_tokens=8, extra_body={"ignore_eos": True})


def test_models_and_health(server, oai):
    assert [m.id for m in oai.models.list().data] == ["tiny-http"]
    assert httpx.get(server.http.replace("/v1", "/health")).json() == {"status": "ok"}


def test_completions_equal_grpc(oai, grpc_client):
    ref = grpc_client.complete("Hello there", max_tokens=8, ignore_eos=True)
    r = oai.completions.create(model="tiny-http", prompt="Hello there", **GREEDY)
    assert r.choices[0].text == ref.text and r.usage.completion_tokens == 8 == len(ref.token_ids)
    assert r.choices[0].finish_reason == "length" and r.object == "text_completion"
    ids = oai.completions.create(model="tiny-http", prompt=[72, 105], **GREEDY)  # token-id prompt
    assert ids.choices[0].text == grpc_client.complete([72, 105], max_tokens=8, ignore_eos=True).text
    chunks = list(oai.completions.create(model="tiny-http", prompt="Hello there", stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref.text
    assert chunks[-1].usage.completion_tokens == 8 and chunks[-2].choices[0].finish_reason == "length"


def test_usage_reports_prompt_tokens_served_from_the_prefix_cache(oai, grpc_client):
    """The prefix cache is on by default: a prompt sent again starts from its full pages (two of 16
    tokens; the last token is always computed), and both frontends say how many tokens that was."""
    prompt = "a prompt of forty bytes for the cache!!!"
    first = oai.completions.create(model="tiny-http", prompt=prompt, **GREEDY)
    assert first.usage.prompt_tokens == 40 and first.usage.prompt_tokens_details.cached_tokens == 0
    again = oai.completions.create(model="tiny-http", prompt=prompt, **GREEDY)
    assert again.usage.prompt_tokens_details.cached_tokens == 32 and again.choices[0].text == first.choices[0].text
    chunks = list(oai.completions.create(model="tiny-http", prompt=prompt, stream=True,
                                         stream_options={"include_usage": True}, **GREEDY))
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 32
    ref = grpc_client.complete(prompt, max_tokens=8, ignore_eos=True)
    assert ref.finished.cached_prompt_tokens == 32 and ref.text == first.choices[0].text


def test_chat_equals_grpc_on_the_plain_template(oai, grpc_client):
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]
    ref = grpc_client.complete("system: be brief\nuser: hi\nassistant:", max_tokens=8, ignore_eos=True)
    r = oai.chat.completions.create(model="tiny-http", messages=msgs, **GREEDY)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    stream = list(oai.chat.completions.create(model="tiny-http", messages=msgs, stream=True, **GREEDY))
    assert stream[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in stream) == ref.text


def test_raw_sse_ends_with_done(server):
    with httpx.stream("POST", f"{server.http}/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"prompt": "abc", "max_tokens": 3, "stream": True, "temperature": 0}, timeout=60) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_32_concurrent_streams(oai):
    def one(i):
        chunks = list(oai.completions.create(model="tiny-http", prompt=f"stream {i}", stream=True,
                                             stream_options={"include_usage": True}, **GREEDY))
        return chunks[-2].choices[0].finish_reason, chunks[-1].usage.completion_tokens

    with cf.ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(one, range(32)))
    assert outs == [("length", 8)] * 32


def _post(server, path, body=None, token=TOKEN, raw=None):
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if raw is not None:
        headers["Content-Type"] = "application/json"
    return httpx.post(f"{server.http}{path}", headers=headers, timeout=60,
                      **({"content": raw} if raw is not None else {"json": body}))


@pytest.mark.parametrize("body,param", [
    ({"prompt": "x", "temperature": -1}, "temperature"),
    ({"prompt": "x", "top_p": 2}, "top_p"),
    ({"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ({"prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"prompt": "x", "n": 99}, "n"),
    ({"prompt": "x", "n": 0}, "n"),
    ({"prompt": "x", "logprobs": 21}, "logprobs"),
    ({"prompt": "x", "logprobs": -1}, "logprobs"),
    ({"prompt": "x", "n": 3, "best_of": 2}, "best_of"),
    ({"prompt": "x", "best_of": 2, "stream": True}, "best_of"),
    ({"prompt": "x", "echo": True, "logprobs": 0, "max_tokens": 0, "n": 99}, "n"),
    ({"prompt": ""}, "prompt"),
    ({"prompt": [1, 999]}, "prompt"),
    ({}, "prompt"),
    ({"prompt": "x" * 400}, "prompt"),
])
def test_bad_fields_are_400_naming_the_field(server, oai, body, param):
    r = _post(server, "/completions", body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["type"] == "invalid_request_error" and err["message"]
    assert oai.completions.create(model="tiny-http", prompt="ok", **GREEDY).choices  # still serving


def test_other_errors(server):
    assert _post(server, "/chat/completions", {"messages": "hi"}).json()["error"]["param"] == "messages"
    bad_json = _post(server, "/completions", raw=b"{not json")
    assert bad_json.status_code == 400 and "JSON" in bad_json.json()["error"]["message"]
    for token in (None, "wrong"):
        r = _post(server, "/completions", {"prompt": "x"}, token=token)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    r = _post(server, "/completions", {"prompt": "x", "model": "gpt-9"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = _post(server, "/completions", {"prompt": "x" * 200_000})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def _pages_used(server) -> float:
    text = httpx.get(server.http.replace("/v1", "/metrics"), timeout=30).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith("distllm_kv_pages_used{"))


def test_disconnect_cancels_and_frees_pages(server):
    with httpx.stream("POST", f"{server.http}/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                      json={"prompt": "abc", "max_tokens": 100, "stream": True, "ignore_eos": True}, timeout=60) as r:
        it = r.iter_lines()
        for _ in range(6):
            next(it)
    end = time.monotonic() + 15
    while _pages_used(server) and time.monotonic() < end:
        time.sleep(0.05)
    assert _pages_used(server) == 0


def test_bench_openai_backend_matches_grpc(server, ckpt, tmp_path):
    common = ["--dataset", "sharegpt", "--num-prompts-req-rates", "[(8, 50)]", "--results", str(tmp_path),
              "--token", TOKEN, "--cache-dir", str(tmp_path / "cache"), "--tokenizer", str(ckpt)]
    assert cli(["bench", "run", "--backend", "distllm-grpc", "--address", server.address, *common]) == 0
    assert cli(["bench", "run", "--backend", "openai", "--base-url", server.http, *common]) == 0
    grpc_run = json.loads((tmp_path / "tiny-http-sharegpt" / "disaggregated-8-50.json").read_text())
    oai_run = json.loads((tmp_path / "tiny-http-sharegpt" / "openai-8-50.json").read_text())
    counts = lambda run: [r["output_tokens"] for r in run["requests"]]  # noqa: E731
    assert counts(grpc_run) == counts(oai_run) == [r["output_len"] for r in grpc_run["requests"]]
    assert all(r["error"] is None and r["ttft"] is not None for r in oai_run["requests"])


def _error(r, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert err["message"] and set(err) == {"message", "type", "param", "code"}
    return err


AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded"])
def test_the_body_must_be_json(server, content_type):
    """A page on another site can POST text/plain or a form without a CORS preflight; JSON it cannot."""
    headers = {**AUTH, **({"Content-Type": content_type} if content_type else {})}
    r = httpx.post(f"{server.http}/completions", content=b'{"prompt": "x", "max_tokens": 1}', headers=headers,
                   timeout=60)
    assert _error(r, 415)["code"] == "unsupported_media_type"
    ok = httpx.post(f"{server.http}/completions", content=b'{"prompt": "x", "max_tokens": 1}', timeout=60,
                    headers={**AUTH, "Content-Type": "application/json; charset=utf-8"})
    assert ok.status_code == 200, ok.text


@pytest.mark.parametrize("path", ["/completions", "/models", "/health"])
def test_the_host_header_must_name_this_server(server, path):
    """DNS rebinding: a page's own name pointed at 127.0.0.1 still sends that name as Host."""
    url = server.http.replace("/v1", "") + ("/health" if path == "/health" else "/v1" + path)
    send = (lambda **kw: httpx.post(url, json={"prompt": "x", "max_tokens": 1}, timeout=60, **kw)) \
        if path == "/completions" else (lambda **kw: httpx.get(url, timeout=60, **kw))
    assert _error(send(headers={**AUTH, "Host": "evil.example"}), 400)["code"] == "invalid_host"
    port = url.split(":")[2].split("/")[0]
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "[::1]"):
        assert send(headers={**AUTH, "Host": host}).status_code == 200, host


def test_no_cors_headers_by_default(server):
    pre = httpx.options(f"{server.http}/completions", timeout=60, headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    post = httpx.post(f"{server.http}/completions", json={"prompt": "x", "max_tokens": 1}, timeout=60,
                      headers={**AUTH, "Origin": "http://evil.example"})
    assert post.status_code == 200
    for r in (pre, post):
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], dict(r.headers)


def test_cors_only_for_allowed_origins():
    import asyncio
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from serve.chat_template import ChatTemplate
    from serve.openai_http import OpenAIFrontend

    service = SimpleNamespace(draining=False, ready=asyncio.Event(), limits=SimpleNamespace(max_seq_len=8))
    front = OpenAIFrontend(service, "m", None, 1000, ChatTemplate(), allowed_hosts=["testserver"],
                           allowed_origins=["https://app.example"])
    client = TestClient(front.app())
    ask = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    ok = client.options("/v1/completions", headers={"Origin": "https://app.example", **ask})
    assert ok.headers["access-control-allow-origin"] == "https://app.example"
    other = client.options("/v1/completions", headers={"Origin": "http://evil.example", **ask})
    assert "access-control-allow-origin" not in other.headers
    assert client.get("/v1/models", headers={"Origin": "https://app.example"}).headers[
        "access-control-allow-origin"] == "https://app.example"


def test_health_is_503_while_re_planning():
    import asyncio
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from serve.chat_template import ChatTemplate
    from serve.openai_http import OpenAIFrontend

    service = SimpleNamespace(draining=False, ready=asyncio.Event())  # cleared: a re-plan is under way
    client = TestClient(OpenAIFrontend(service, "m", None, 1000, ChatTemplate(), allowed_hosts=["testserver"]).app())
    r = client.get("/health")
    assert r.status_code == 503 and "re-planning" in r.json()["error"]["message"]
    service.ready.set()
    assert client.get("/health").json() == {"status": "ok"}


NESTED = b'{"prompt": "x", "deep": ' + b"[" * 45_000 + b"]" * 45_000 + b"}"


@pytest.mark.parametrize("raw,param", [
    (b'{"prompt": "x", "max_tokens": 9223372036854775808}', "max_tokens"),
    (b'{"prompt": "x", "top_k": 18446744073709551616}', "top_k"),
    (b'{"prompt": "x", "seed": 1' + b"0" * 30 + b"}", "seed"),
    (b'{"prompt": [1, 100000000000000000000]}', "prompt"),
    (b'{"prompt": "x", "temperature": 1' + b"0" * 400 + b"}", "temperature"),
    (b'{"prompt": "\\ud800"}', "prompt"),
    (b'{"prompt": "x", "stop": ["\\ud800"]}', "stop"),
    (NESTED, None),
], ids=["max_tokens", "top_k", "seed", "prompt_id", "temperature", "surrogate_prompt", "surrogate_stop", "nested"])
def test_hostile_values_are_400_not_500(server, oai, raw, param):
    err = _error(_post(server, "/completions", raw=raw), 400)
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert oai.completions.create(model="tiny-http", prompt="ok", **GREEDY).choices  # still serving


def test_hostile_chat_content_is_400(server):
    r = _post(server, "/chat/completions", raw=b'{"messages": [{"role": "user", "content": "\\udfff"}]}')
    assert _error(r, 400)["param"] == "messages"


@pytest.mark.parametrize("path,field,value", [
    ("/completions", "frequency_penalty", 0.5),
    ("/completions", "presence_penalty", 1),
    ("/completions", "logit_bias", {"5": 10}),
    ("/completions", "suffix", "end"),
    ("/chat/completions", "response_format", {"type": "json_object"}),
    ("/chat/completions", "tools", [{"type": "function", "function": {"name": "f"}}]),
    ("/chat/completions", "echo", True),
    ("/chat/completions", "best_of", 2),
    ("/chat/completions", "top_logprobs", 2),  # without logprobs: true
    ("/chat/completions", "no_such_field", 1),
])
def test_unimplemented_fields_are_refused_by_name(server, path, field, value):
    base = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"}
    err = _error(_post(server, path, {**base, "max_tokens": 2, field: value}), 400)
    assert err["param"] == field and field in err["message"]


def test_no_op_values_of_unimplemented_fields_are_accepted(server):
    body = {"prompt": "hi", "max_tokens": 2, "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {},
            "echo": False, "n": 1, "best_of": 1, "suffix": None, "user": "me"}
    assert _post(server, "/completions", body).status_code == 200


def test_lower_case_bearer_and_two_authorization_headers(server):
    body = {"prompt": "hi", "max_tokens": 1}
    ok = httpx.post(f"{server.http}/completions", json=body, timeout=60, headers={"Authorization": f"bearer {TOKEN}"})
    assert ok.status_code == 200, ok.text
    two = httpx.post(f"{server.http}/completions", json=body, timeout=60,
                     headers=[("Authorization", f"Bearer {TOKEN}"), ("Authorization", "Bearer other")])
    assert "more than one" in _error(two, 401)["message"]


def test_max_tokens_past_the_context_is_400_with_the_limit(server):
    err = _error(_post(server, "/completions", {"prompt": [7] * 100, "max_tokens": 29}), 400)
    assert err["param"] == "max_tokens" and "[1, 28]" in err["message"]
    r = _post(server, "/completions", {"prompt": [7] * 100, "max_tokens": 28, "ignore_eos": True})
    assert r.json()["usage"]["completion_tokens"] == 28


def test_disconnect_cancels_a_non_streaming_request(server):
    import socket
    from urllib.parse import urlsplit

    cancelled = server.metric("distllm_requests_total", outcome="cancelled") if "cancelled" in server.metrics() else 0
    body = json.dumps({"prompt": [4, 5, 6], "max_tokens": 125, "ignore_eos": True}).encode()
    u = urlsplit(server.http)
    sock = socket.create_connection((u.hostname, u.port), timeout=60)
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                 + f"Authorization: Bearer {TOKEN}\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
    end = time.monotonic() + 60
    while server.metric("distllm_active_requests") == 0:  # the request is in the engine
        assert time.monotonic() < end, "the request never started"
    sock.close()
    while server.metric("distllm_active_requests") or _pages_used(server):
        assert time.monotonic() < end + 60, "the request was not cancelled"
    assert server.metric("distllm_requests_total", outcome="cancelled") == cancelled + 1


# ---- logprobs, echo, n and best_of (issue: what real clients send) ------------------------------

def _hf_logprobs(model, ids):
    import torch

    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


@pytest.fixture(scope="module")
def hf(converted):
    return converted("opt-pre-ln")[0]


def test_completion_logprobs_equal_transformers(oai, hf):
    prompt = [72, 105, 33, 250, 17]
    r = oai.completions.create(model="tiny-http", prompt=prompt, logprobs=3, **GREEDY)
    c = r.choices[0]
    lp = c.logprobs
    plain = oai.completions.create(model="tiny-http", prompt=prompt, **GREEDY)  # the same greedy text
    assert plain.choices[0].text == c.text and len(lp.tokens) == len(lp.token_logprobs) == 8
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(8)]
    tokens = []
    for tok_text, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert tok_text in top and top[tok_text] == value and 3 <= len(top) <= 4
        tokens.append(value)
    # the values: transformers' log-softmax (the prompt's through an echo, the first generated one's)
    full = oai.completions.create(model="tiny-http", prompt=prompt, max_tokens=0, echo=True, logprobs=0, temperature=0)
    assert full.choices[0].logprobs.token_logprobs[0] is None
    ref = _hf_logprobs(hf, prompt)
    assert full.choices[0].logprobs.token_logprobs[1:] == pytest.approx(
        [ref[j - 1, prompt[j]].item() for j in range(1, len(prompt))], abs=1e-4)
    greedy_next = int(ref[-1].argmax())
    assert tokens[0] == pytest.approx(ref[-1, greedy_next].item(), abs=1e-4)


def test_lm_eval_loglikelihood_requests(server, hf):
    """The requests lm-evaluation-harness's ``local-completions`` model sends for a loglikelihood task:
    a batch of token-id prompts (context + continuation), echo, logprobs 1, max_tokens 0; scored as
    the harness scores them (summed continuation log-probabilities and whether each was greedy)."""
    pairs = [([72, 105, 33], [250, 17]), ([5, 9, 23, 7, 1, 100], [42]), ([3, 4], [5, 6, 7])]
    body = {"model": "tiny-http", "prompt": [c + x for c, x in pairs], "max_tokens": 0, "temperature": 0,
            "logprobs": 1, "echo": True, "seed": 1234}
    r = _post(server, "/completions", body)
    assert r.status_code == 200, r.text
    choices = sorted(r.json()["choices"], key=lambda c: c["index"])
    assert [c["index"] for c in choices] == [0, 1, 2]
    for (ctx, cont), choice in zip(pairs, choices):
        lp = choice["logprobs"]
        assert len(lp["token_logprobs"]) == len(ctx) + len(cont) and lp["token_logprobs"][0] is None
        got = sum(lp["token_logprobs"][len(ctx):])
        greedy = all(v == max(top.values()) for v, top in zip(lp["token_logprobs"][len(ctx):],
                                                               lp["top_logprobs"][len(ctx):]))
        ref = _hf_logprobs(hf, ctx + cont)
        want = sum(ref[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))
        want_greedy = all(int(ref[len(ctx) - 1 + j].argmax()) == t for j, t in enumerate(cont))
        assert got == pytest.approx(want, abs=1e-4) and greedy == want_greedy
    # the context's own continuation under greedy decoding is greedy by construction
    ctx = [72, 105, 33]
    nxt = int(_hf_logprobs(hf, ctx)[-1].argmax())
    one = _post(server, "/completions", {**body, "prompt": [ctx + [nxt]]}).json()["choices"][0]["logprobs"]
    assert one["token_logprobs"][-1] == max(one["top_logprobs"][-1].values())


def test_chat_logprobs_in_the_chat_shape(oai):
    msgs = [{"role": "user", "content": "hi"}]
    r = oai.chat.completions.create(model="tiny-http", messages=msgs, logprobs=True, top_logprobs=2, **GREEDY)
    content = r.choices[0].logprobs.content
    text = r.choices[0].message.content
    # the tokens' own bytes join into the reply (a trailing part of a character is not shown as text)
    assert len(content) == 8 and bytes(b for e in content for b in e.bytes).decode(errors="replace").startswith(text)
    for e in content:
        assert len(e.top_logprobs) == 2 and e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.logprob == pytest.approx(e.top_logprobs[0].logprob) and len(e.bytes) == 1  # byte-level, 256 ids
    plain = oai.chat.completions.create(model="tiny-http", messages=msgs, **GREEDY)
    assert plain.choices[0].logprobs is None and plain.choices[0].message.content == r.choices[0].message.content
    streamed = list(oai.chat.completions.create(model="tiny-http", messages=msgs, logprobs=True, stream=True,
                                                **GREEDY))
    got = [e.logprob for c in streamed if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert got == pytest.approx([e.logprob for e in content])


def test_n_best_of_and_streamed_choices(server, oai):
    before = server.metric("distllm_requests_total", outcome="length")
    greedy = oai.completions.create(model="tiny-http", prompt="Hello", n=3, **GREEDY)
    assert [c.index for c in greedy.choices] == [0, 1, 2] and len({c.text for c in greedy.choices}) == 1
    assert greedy.usage.completion_tokens == 3 * 8
    assert server.metric("distllm_requests_total", outcome="length") == before + 1  # one request of 3 samples
    sampled = dict(model="tiny-http", prompt="Hello", n=4, temperature=1.0, seed=9, max_tokens=8,
                   extra_body={"ignore_eos": True})
    a, b = oai.completions.create(**sampled), oai.completions.create(**sampled)
    assert [c.text for c in a.choices] == [c.text for c in b.choices]  # reproducible with a seed
    assert len({c.text for c in a.choices}) == 4  # and the samples differ
    chunks = list(oai.completions.create(**sampled, stream=True))
    texts: dict[int, str] = {}
    for ch in chunks:
        for c in ch.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
    assert [texts[i] for i in range(4)] == [c.text for c in a.choices]
    best = oai.completions.create(model="tiny-http", prompt="Hello", n=2, best_of=4, temperature=1.0, seed=9,
                                  max_tokens=8, extra_body={"ignore_eos": True})
    assert [c.index for c in best.choices] == [0, 1] and all(c.logprobs is None for c in best.choices)
    assert {c.text for c in best.choices} <= {c.text for c in a.choices}  # the same 4 draws, the best 2 kept
    ranked = oai.completions.create(model="tiny-http", prompt="Hello", n=4, logprobs=0, temperature=1.0, seed=9,
                                    max_tokens=8, extra_body={"ignore_eos": True})
    score = {c.text: sum(c.logprobs.token_logprobs) for c in ranked.choices}
    assert sorted(c.text for c in best.choices) == sorted(sorted(score, key=score.get)[-2:])
    chat = oai.chat.completions.create(model="tiny-http", messages=[{"role": "user", "content": "hi"}], n=2, **GREEDY)
    assert [c.index for c in chat.choices] == [0, 1] and chat.choices[0].message == chat.choices[1].message


def test_echo_returns_the_prompt_text_first(oai):
    r = oai.completions.create(model="tiny-http", prompt="Hello there", echo=True, **GREEDY)
    plain = oai.completions.create(model="tiny-http", prompt="Hello there", **GREEDY)
    assert r.choices[0].text == "Hello there" + plain.choices[0].text
    batch = oai.completions.create(model="tiny-http", prompt=["Hello there", "abc"], **GREEDY)
    assert [c.index for c in batch.choices] == [0, 1] and batch.choices[0].text == plain.choices[0].text


def test_sigterm_drains_http(server):
    """Last: streams in flight complete, new requests get 503 meanwhile, the process exits 0."""
    results, started = {}, threading.Barrier(7)

    def long(i):
        with httpx.stream("POST", f"{server.http}/completions", headers={"Authorization": f"Bearer {TOKEN}"},
                          json={"prompt": [3 + i], "max_tokens": 120, "stream": True, "ignore_eos": True},
                          timeout=120) as r:
            lines = r.iter_lines()
            first = next(lines)
            started.wait(timeout=60)
            results[i] = [first] + [line for line in lines if line]

    threads = [threading.Thread(target=long, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    started.wait(timeout=60)  # six 120-token streams are running
    server.proc.send_signal(signal.SIGTERM)
    got_503 = False
    end = time.monotonic() + 30
    while time.monotonic() < end and not got_503:
        r = _post(server, "/completions", {"prompt": "x", "max_tokens": 1})
        got_503 = r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    for t in threads:
        t.join(timeout=120)
    assert got_503, "no 503 while the server drained"
    assert sorted(results) == list(range(6)) and all(v[-1] == "data: [DONE]" for v in results.values())
    assert server.wait() == 0


def test_cap_and_drain_statuses_on_the_frontend():
    """429 at the cap and 503 while draining, on the frontend itself (a live server reaches the cap only
    for as long as its held streams last, which makes a timing test flaky)."""
    import asyncio
    from types import SimpleNamespace

    from distllm_jax.engine import SamplingParams
    from serve.chat_template import ChatTemplate
    from serve.front_door import FrontDoor
    from serve.openai_http import Choices, HTTPError, OpenAIFrontend, PromptJob

    counter = SimpleNamespace(inc=lambda: None)
    service = FrontDoor(engine=None, max_concurrent=4, metrics=SimpleNamespace(requests=SimpleNamespace(labels=lambda _: counter)))
    service.active = 4  # every slot taken
    front = OpenAIFrontend(service, "m", None, 1000, ChatTemplate())

    async def run():
        try:
            await front._run([PromptJob([1], SamplingParams(), "")], Choices(), False, False, False)
        except HTTPError as e:
            return e

    e = asyncio.run(run())
    assert e.status == 429 and e.body()["error"]["type"] == "rate_limit_error"
    service.draining = True
    e = asyncio.run(run())
    assert e.status == 503 and e.body()["error"]["type"] == "service_unavailable"
