"""TLS with a self-signed certificate, the bearer token, and the concurrency cap, on a real server."""

from __future__ import annotations

import subprocess
import threading

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve.client import Client
from server_proc import ServerProc, checkpoint_with_tokenizer

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("tls")
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(d / "key.pem"),
         "-out", str(d / "cert.pem"), "-days", "1", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory, tls_files):
    _, ckpt = converted("opt-pre-ln")
    ckpt = checkpoint_with_tokenizer(ckpt, tmp_path_factory.mktemp("serve-sec") / "ckpt")
    cert, key = tls_files
    srv = ServerProc(ckpt, "--tls-cert", str(cert), "--tls-key", str(key), "--max-concurrent", "2",
                     "--mode", "colocated", "--http-port", "0",
                     env={"DISTLLM_AUTH_TOKEN": TOKEN})
    srv.http = next(line.split()[-1] for line in srv.log if "OpenAI-compatible HTTP on" in line)
    yield srv
    assert srv.stop() == 0


def test_tls_and_token(server, tls_files):
    cert = tls_files[0].read_bytes()
    with Client(server.address, token=TOKEN, tls_ca=cert, timeout=60) as c:
        g = c.complete([1, 2, 3], max_tokens=4, ignore_eos=True)
        assert g.finished.finish_reason == "length" and len(g.token_ids) == 4


@pytest.mark.parametrize("token", [None, "wrong", ""])
def test_missing_or_wrong_token_is_unauthenticated(server, tls_files, token, monkeypatch):
    monkeypatch.delenv("DISTLLM_AUTH_TOKEN", raising=False)
    with Client(server.address, token=token, tls_ca=tls_files[0].read_bytes(), timeout=30) as c:
        for call in (lambda: list(c.generate([1, 2], max_tokens=2)), c.model_info, lambda: c.tokenize("hi")):
            with pytest.raises(grpc.RpcError) as e:
                call()
            assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_health_needs_no_token(server, tls_files):
    creds = grpc.ssl_channel_credentials(root_certificates=tls_files[0].read_bytes())
    with grpc.secure_channel(server.address, creds) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=30)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_plaintext_client_cannot_talk_to_tls_server(server):
    with Client(server.address, token=TOKEN, timeout=5) as c:
        with pytest.raises(grpc.RpcError) as e:
            c.model_info()
        assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_concurrency_cap(server, tls_files):
    cert = tls_files[0].read_bytes()
    with Client(server.address, token=TOKEN, tls_ca=cert, timeout=60) as c:
        started = threading.Barrier(3)
        calls = [c.generate([5, 6, 7], max_tokens=100, ignore_eos=True) for _ in range(2)]

        def first_token(call):
            next(iter(call))
            started.wait()

        threads = [threading.Thread(target=first_token, args=(call,)) for call in calls]
        for t in threads:
            t.start()
        started.wait(timeout=60)  # both long requests are streaming
        with pytest.raises(grpc.RpcError) as e:
            list(c.generate([1, 2], max_tokens=2))
        assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "concurrent" in e.value.details()
        for call in calls:
            call.cancel()
        for t in threads:
            t.join()


def test_http_frontend_follows_the_same_tls_and_token_rules(server, tls_files):
    import httpx

    assert server.http.startswith("https://")
    body = {"prompt": [1, 2, 3], "max_tokens": 3, "temperature": 0}
    ok = httpx.post(f"{server.http}/completions", json=body, verify=str(tls_files[0]), timeout=60,
                    headers={"Authorization": f"Bearer {TOKEN}"})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
    denied = httpx.post(f"{server.http}/completions", json=body, verify=str(tls_files[0]), timeout=60)
    assert denied.status_code == 401
    with pytest.raises(httpx.HTTPError):  # plaintext HTTP to the TLS port
        httpx.post(server.http.replace("https://", "http://") + "/completions", json=body, timeout=10)



def test_bearer_scheme_is_case_insensitive_and_one_value_only(server, tls_files):
    """RFC 7235: the scheme is case-insensitive. Two authorization values are refused: servers and
    proxies disagree on which one counts."""
    with Client(server.address, token=None, tls_ca=tls_files[0].read_bytes(), timeout=60) as c:
        c.metadata = (("authorization", f"bearer {TOKEN}"),)
        assert c.model_info().vocab_size == 256
        c.metadata = (("authorization", f"Bearer {TOKEN}"), ("authorization", "Bearer other"))
        with pytest.raises(grpc.RpcError) as e:
            c.model_info()
        assert e.value.code() == grpc.StatusCode.UNAUTHENTICATED and "more than one" in e.value.details()
