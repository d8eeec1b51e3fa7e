"""The gRPC server, started for real (subprocess, 127.0.0.1, ephemeral ports) on a tiny OPT checkpoint
with a byte-level tokenizer: streaming, health, reflection, metrics, validation, cancellation."""

from __future__ import annotations

import concurrent.futures as cf
import os
import signal
import threading
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings, strategies as st

from distllm_jax.checkpoint import restore_params
from distllm_jax.tokenizer import byte_level
from model_runner import greedy_generate
from serve.client import Client, make_request
from serve.v1 import distllm_pb2 as pb
from server_proc import ServerProc, checkpoint_with_tokenizer

MAX_LEN = 128


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    _, ckpt = converted("opt-pre-ln")
    ckpt = checkpoint_with_tokenizer(ckpt, tmp_path_factory.mktemp("serve") / "ckpt")
    srv = ServerProc(ckpt)
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-20:])


@pytest.fixture(scope="module")
def reference(converted):
    _, ckpt = converted("opt-pre-ln")
    cfg, params = restore_params(ckpt)
    return lambda ids, n: greedy_generate(params, cfg, [ids], n)[0]


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def wait_pages_free(server, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if server.metric("distllm_kv_pages_used") == 0 and server.metric("distllm_active_requests") == 0:
            return True
        time.sleep(0.05)
    return False


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as ch:
        h = health_pb2_grpc.HealthStub(ch)
        for name in ("", "distllm.v1.Generation"):
            assert h.Check(health_pb2.HealthCheckRequest(service=name)).status == health_pb2.HealthCheckResponse.SERVING
        from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase

        db = ProtoReflectionDescriptorDatabase(ch)
        assert "distllm.v1.Generation" in db.get_services()
        methods = [m.name for m in db.FindFileContainingSymbol("distllm.v1.Generation").service[0].method]
        assert methods == ["Generate", "Tokenize", "ModelInfo"]


def test_streaming_matches_the_model(client, reference):
    ids = [5, 9, 23, 7, 1, 100, 42, 17]
    responses = list(client.generate(ids, max_tokens=10, ignore_eos=True))
    chunks, fin = responses[:-1], responses[-1].finished
    assert all(r.HasField("chunk") for r in chunks) and len(chunks) == 10  # one message per token
    tokens = [t for r in chunks for t in r.chunk.token_ids]
    assert tokens == reference(ids, 10)
    assert fin.finish_reason == "length" and fin.output_tokens == 10 and fin.prompt_tokens == len(ids)
    assert fin.timings.ttft_s > 0 and fin.timings.tpot_s > 0 and fin.timings.migration_s > 0
    assert fin.timings.prefill_instance == "prefill0" and fin.timings.decode_instance == "decode0"


def test_text_prompt_and_tokenize(client, reference):
    text = "Hello, wörld"
    ids = client.tokenize(text)
    assert ids == byte_level().encode(text).ids
    g = client.complete(text, max_tokens=6, ignore_eos=True)
    assert g.token_ids == reference(ids, 6)
    assert g.text == byte_level().decode(g.token_ids)


def test_model_info(client):
    info = client.model_info()
    assert info.max_seq_len == MAX_LEN and info.vocab_size == 256
    assert '"mode": "disaggregated"' in info.engine_json and '"tp": 1' in info.engine_json


def test_64_concurrent_streams(server, client, reference):
    prompts = [[3 + i % 50, 7, 11 + i] for i in range(64)]
    with cf.ThreadPoolExecutor(64) as pool:
        outs = list(pool.map(lambda p: client.complete(p, max_tokens=8, ignore_eos=True), prompts))
    assert all(o.finished.finish_reason == "length" and len(o.token_ids) == 8 for o in outs)
    for p, o in list(zip(prompts, outs))[:6]:
        assert o.token_ids == reference(p, 8)
    assert wait_pages_free(server)


BAD = [
    (dict(prompt=""), "text"),
    (dict(prompt=[]), "token_ids"),
    (dict(prompt=[1, 300]), "token_ids"),
    (dict(prompt=[1] * MAX_LEN), "token_ids"),
    (dict(prompt=[1, 2], max_tokens=-1), "max_tokens"),
    (dict(prompt=[1, 2], max_tokens=10**9), "max_tokens"),
    (dict(prompt=[1, 2], max_tokens=0), "max_tokens"),
    (dict(prompt=[1, 2], top_p=0.0), "top_p"),
    (dict(prompt=[1, 2], top_p=1.5), "top_p"),
    (dict(prompt=[1, 2], temperature=-1.0), "temperature"),
    (dict(prompt=[1, 2], top_k=-3), "top_k"),
    (dict(prompt=[1, 2], seed=-5), "seed"),
    (dict(prompt=[1, 2], stop_token_ids=[999]), "stop_token_ids"),
    (dict(prompt=[1, 2], stop=[""]), "stop"),
]


@pytest.mark.parametrize("fields,field", BAD, ids=[f for _, f in BAD])
def test_bad_inputs_name_the_field(client, fields, field):
    fields = dict(fields)
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(fields.pop("prompt"), **fields))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(field), e.value.details()


def _raw_generate(server, payload: bytes):
    with grpc.insecure_channel(server.address) as ch:
        call = ch.unary_stream("/distllm.v1.Generation/Generate", request_serializer=lambda b: b,
                               response_deserializer=pb.GenerateResponse.FromString)
        return list(call(payload, timeout=30))


@pytest.mark.parametrize("payload,why", [
    (b"\xff\xff\xff", "not a valid"),
    (make_request([1, 2], max_tokens=3).SerializeToString() + b"\xa0\x06\x01", "unknown field"),
    (b"\x0a\x02\xed\xa0", "not a valid"),  # text: a lone surrogate's bytes, not UTF-8
    (make_request([1, 2]).SerializeToString() + b"\x42\x03\xed\xa0\x80", "not a valid"),  # stop: the same
    (make_request([1, 2]).SerializeToString() + b"\x38" + b"\xff" * 9 + b"\x01", "seed"),  # 2**64 - 1
])
def test_malformed_messages(server, client, payload, why):
    with pytest.raises(grpc.RpcError) as e:
        _raw_generate(server, payload)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and why in e.value.details()
    assert client.complete([1, 2], max_tokens=2).finished.finish_reason in ("length", "stop")  # still serving


def test_cancel_mid_stream_frees_pages(server, client):
    call = client.generate([4, 5, 6], max_tokens=100, ignore_eos=True)
    got = 0
    for r in call:
        got += 1
        if got == 3:
            call.cancel()
            break
    assert wait_pages_free(server), server.metrics()
    assert server.metric("distllm_requests_total", outcome="cancelled") >= 1


def test_deadline_exceeded_frees_pages(server, client):
    """A request whose deadline passes mid-generation ends DEADLINE_EXCEEDED and its pages are freed.
    The server is stopped (SIGSTOP) once the first token is out and resumed only after the client's
    deadline fired, so the deadline always passes mid-generation, however fast the steps are."""
    with Client(server.address, timeout=2.0) as c:
        stream = c.generate([4, 5, 6], max_tokens=MAX_LEN - 3, ignore_eos=True)
        first = next(stream)
        assert first.HasField("chunk")
        os.kill(server.proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(grpc.RpcError) as e:
                list(stream)  # returns when the client's deadline fires
        finally:
            os.kill(server.proc.pid, signal.SIGCONT)
    assert e.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert wait_pages_free(server)


def test_metrics_exposed(server, client):
    client.complete([9, 9, 9], max_tokens=3, ignore_eos=True)
    text = server.metrics()
    for name in ("distllm_requests_total", "distllm_ttft_seconds_bucket", "distllm_tpot_seconds_bucket",
                 "distllm_queue_length", "distllm_kv_pages_used", "distllm_compilations_total"):
        assert name in text, name
    assert server.metric("distllm_requests_total", outcome="length") >= 1
    assert server.metric("distllm_kv_pages_free", role="decode") > 0
    # the server's programs came from its executable store or were built into it
    assert (server.metric("distllm_executable_store_programs_total", outcome="loaded")
            + server.metric("distllm_executable_store_programs_total", outcome="built")) > 0


requests = st.fixed_dictionaries({
    "prompt": st.one_of(st.text(max_size=40), st.lists(st.integers(-5, 300), max_size=40)),
    "max_tokens": st.one_of(st.none(), st.integers(-3, 200)),
    "temperature": st.one_of(st.none(), st.floats(-1, 3), st.just(float("nan"))),
    "top_p": st.one_of(st.none(), st.floats(-0.5, 1.5), st.just(float("nan"))),
    "top_k": st.one_of(st.none(), st.integers(-2, 400)),
    "seed": st.one_of(st.none(), st.integers(-2, 2**33)),
    "stop": st.one_of(st.none(), st.lists(st.text(max_size=4), max_size=3)),
    "stop_token_ids": st.one_of(st.none(), st.lists(st.integers(-1, 300), max_size=3)),
    "ignore_eos": st.booleans(),
})


def _invalid_field(req: dict) -> str | None:
    """The field the README's API refuses in ``req``, or None when the request is valid: a prompt of
    1 to MAX_LEN - 1 tokens inside the vocabulary (text through the byte-level tokenizer),
    max_tokens in [1, what the context leaves], temperature in [0, 100], top_p in (0, 1], top_k in
    [0, vocabulary], seed in [0, 2**32), at most 16 non-empty stop strings, stop ids in the vocabulary."""
    from distllm_jax.tokenizer import byte_level

    prompt, vocab = req["prompt"], 256
    field = "text" if isinstance(prompt, str) else "token_ids"
    ids = byte_level().encode(prompt).ids if isinstance(prompt, str) else prompt
    if not ids or any(not 0 <= t < vocab for t in ids) or len(ids) >= MAX_LEN:
        return field
    checks = {
        "max_tokens": req["max_tokens"] is None or 1 <= req["max_tokens"] <= MAX_LEN - len(ids),
        "temperature": req["temperature"] is None or 0 <= req["temperature"] <= 100,
        "top_p": req["top_p"] is None or 0 < req["top_p"] <= 1,
        "top_k": req["top_k"] is None or 0 <= req["top_k"] <= vocab,
        "seed": req["seed"] is None or 0 <= req["seed"] < 2**32,
        "stop": req["stop"] is None or (len(req["stop"]) <= 16 and all(req["stop"])),
        "stop_token_ids": req["stop_token_ids"] is None or all(0 <= t < vocab for t in req["stop_token_ids"]),
    }
    return next((name for name, ok in checks.items() if not ok), None)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(req=requests)
def test_random_requests_end_with_tokens_or_a_clear_status(client, req):
    """A valid request ends with its tokens; an invalid one with INVALID_ARGUMENT naming a bad field."""
    req = dict(req)
    bad = _invalid_field(req)
    prompt = req.pop("prompt")
    try:
        responses = list(client.generate(prompt, **req))
    except grpc.RpcError as e:
        assert bad is not None, f"a valid request was refused: {e.code()} {e.details()}"
        assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, (e.code(), e.details())
        assert e.details() and ":" in e.details()
        return
    assert bad is None, f"{bad} was accepted"
    assert responses and responses[-1].HasField("finished")
    fin = responses[-1].finished
    assert fin.finish_reason in ("stop", "length")
    assert fin.output_tokens == sum(len(r.chunk.token_ids) for r in responses[:-1])


def test_max_tokens_past_the_context_is_refused_with_the_limit(client):
    prompt = [7] * 100
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(prompt, max_tokens=MAX_LEN - 99))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith("max_tokens: must be in [1, 28]"), e.value.details()
    g = client.complete(prompt, max_tokens=MAX_LEN - 100, ignore_eos=True)
    assert g.finished.finish_reason == "length" and len(g.token_ids) == 28
    assert len(client.complete([7] * 120).token_ids) <= 8  # the default (16) shortened to what is left


def test_huge_text_is_refused_without_stalling_streams(server, client):
    """D1: a prompt of megabytes is refused by its length before the tokenizer sees it, and a prompt at
    the limit is tokenised off the event loop, so a running stream keeps its pace. Gaps are measured on
    the client; the bound is generous (100 ms beyond the worst gap before the attack), where tokenising
    3.9 MB on the event loop stalled every stream for seconds."""
    streams: list[list[float]] = []  # token arrival times, stream by stream
    streaming, attacked = threading.Event(), threading.Event()

    def stream():
        # streams one after another until one has run wholly after the attack: some stream is always
        # running while it lasts, however slowly this machine serves
        while True:
            after = attacked.is_set()
            streams.append([])
            for _ in client.generate([4, 5, 6], max_tokens=MAX_LEN - 3, ignore_eos=True):
                streams[-1].append(time.perf_counter())
                if len(streams[-1]) == 20:  # a baseline long enough to hold this machine's own hiccups
                    streaming.set()
            if after:
                return

    t = threading.Thread(target=stream)
    t.start()
    assert streaming.wait(120)
    start = time.perf_counter()
    refusals = []
    for text in ("x" * 3_900_000, "x" * MAX_LEN):  # over the character limit; at it (then too many tokens)
        with pytest.raises(grpc.RpcError) as e:
            client.complete(text, max_tokens=1)
        refusals.append((e.value.code(), e.value.details().split(" ")[:3]))
    with pytest.raises(grpc.RpcError) as tok:
        client.tokenize("x" * 3_900_000)
    end = time.perf_counter()
    attacked.set()
    t.join(120)
    assert not t.is_alive()
    gaps = [(a, b - a) for arr in streams for a, b in zip(arr, arr[1:])]  # within a stream only
    before = [g for a, g in gaps[1:] if a + g < start]
    during = [g for a, g in gaps if a < end and a + g > start]
    assert during and max(during) < 0.1 + max(before), (max(during), max(before))
    assert refusals == [(grpc.StatusCode.INVALID_ARGUMENT, ["text:", "text", "of"]),
                        (grpc.StatusCode.INVALID_ARGUMENT, ["text:", "prompt", "of"])]
    assert tok.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot fit" in tok.value.details()
    assert client.tokenize("x" * MAX_LEN) == [ord("x")] * MAX_LEN


def test_sighup_without_a_plan_only_logs(server, client):
    compiled = server.metric("distllm_compilations_total")
    server.proc.send_signal(signal.SIGHUP)
    while "SIGHUP" not in (line := server.proc.stdout.readline()) and "re-plan" not in line:
        assert line, "server exited"
        server.log.append(line)
    assert "SIGHUP ignored: the server was started without --plan" in line, line
    assert client.complete([1, 2], max_tokens=2).finished.finish_reason in ("length", "stop")
    assert server.metric("distllm_compilations_total") == compiled  # nothing was rebuilt
