"""SIGTERM during load drains the server: in-flight streams finish, then it exits 0. And the checked-in
gRPC stubs are what the .proto generates."""

from __future__ import annotations

import signal
import threading
from pathlib import Path

import grpc

from serve.client import Client
from serve.protos import PROTO, ROOT, generate
from server_proc import ServerProc, checkpoint_with_tokenizer


def test_sigterm_drains_in_flight_requests(converted, tmp_path):
    _, ckpt = converted("llama-tied")
    srv = ServerProc(checkpoint_with_tokenizer(ckpt, tmp_path / "ckpt"), "--mode", "chunked")
    results: list = [None] * 8
    first = threading.Barrier(9)

    def run(i):
        with Client(srv.address, timeout=120) as c:
            call = c.generate([3 + i, 4, 5], max_tokens=60, ignore_eos=True)
            it = iter(call)
            chunks = [next(it)]
            first.wait()
            try:
                chunks += list(it)
                results[i] = chunks
            except grpc.RpcError as e:
                results[i] = e

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    first.wait(timeout=120)
    srv.proc.send_signal(signal.SIGTERM)
    for t in threads:
        t.join(timeout=120)
    code = srv.wait(timeout=120)
    assert code == 0, "".join(srv.log[-30:])
    for r in results:
        assert isinstance(r, list), r
        assert r[-1].finished.finish_reason == "length" and r[-1].finished.output_tokens == 60
    assert any("drained" in line for line in srv.log)


def test_a_second_signal_during_the_drain_exits_at_once(converted, tmp_path):
    _, ckpt = converted("llama-tied")
    srv = ServerProc(checkpoint_with_tokenizer(ckpt, tmp_path / "ckpt"), "--mode", "colocated")
    with Client(srv.address, timeout=120) as c:
        call = c.generate([3, 4, 5], max_tokens=120, ignore_eos=True)
        next(iter(call))  # a request is running: the drain waits for it
        srv.proc.send_signal(signal.SIGTERM)
        while "draining" not in (line := srv.proc.stdout.readline()):
            assert line, "server exited"
            srv.log.append(line)
        srv.proc.send_signal(signal.SIGINT)
        code = srv.wait(timeout=120)
        call.cancel()
    assert code == 1, "".join(srv.log[-20:])
    assert [line for line in srv.log if "second signal" in line] == [
        "distllm serve: second signal during the drain: exiting now\n"]
    assert not any("drained" in line for line in srv.log)


def test_generated_stubs_are_current(tmp_path):
    for fresh in generate(tmp_path):
        checked_in = ROOT / fresh.relative_to(tmp_path)
        assert checked_in.read_text() == Path(fresh).read_text(), (
            f"{checked_in} is out of date with {PROTO}: run `python -m serve.protos`")
