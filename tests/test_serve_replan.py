"""Re-planning a running server (SIGHUP re-reads --plan): a plan that cannot be placed is refused before
anything drains; a good one drains, re-places and resumes, nothing lost."""

from __future__ import annotations

import json
import signal
import threading

from serve.client import Client
from server_proc import ServerProc, checkpoint_with_tokenizer


def read_line(srv: ServerProc, word: str) -> str:
    """The server's next log line containing ``word``."""
    while word not in (line := srv.proc.stdout.readline()):
        assert line, "server exited"
        srv.log.append(line)
    srv.log.append(line)
    return line


def test_sighup_replaces_the_layout(converted, tmp_path):
    _, ckpt = converted("llama-gqa-llama3")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mode": "colocated", "colocated": [{"tp": 1, "pp": 1}]}))
    srv = ServerProc(checkpoint_with_tokenizer(ckpt, tmp_path / "ckpt"), "--plan", str(plan))
    try:
        with Client(srv.address, timeout=120) as c:
            assert json.loads(c.model_info().engine_json)["mode"] == "colocated"
            before = c.complete([5, 6, 7], max_tokens=12, ignore_eos=True).token_ids
            compiled = srv.metric("distllm_compilations_total")
            plan.write_text(json.dumps({"mode": "colocated", "colocated": [{"tp": 64, "pp": 1}]}))
            srv.proc.send_signal(signal.SIGHUP)  # a plan this process cannot place: refused, nothing drained
            assert "re-plan refused" in (line := read_line(srv, "re-plan")) and "64 devices" in line, line
            assert srv.metric("distllm_compilations_total") == compiled
            results = {}
            started = threading.Event()

            def long():
                chunks = []
                for r in c.generate([9, 8, 7], max_tokens=60, ignore_eos=True):
                    chunks.append(r)
                    started.set()
                results["long"] = chunks

            t = threading.Thread(target=long)
            t.start()
            assert started.wait(120)  # running when the re-plan begins
            plan.write_text(json.dumps({"mode": "disaggregated", "prefill": [{"tp": 1, "pp": 1}],
                                        "decode": [{"tp": 2, "pp": 1}]}))
            srv.proc.send_signal(signal.SIGHUP)
            read_line(srv, "re-planning")  # the server took the signal
            during = c.complete([5, 6, 7], max_tokens=12, ignore_eos=True)  # waits for the new engine
            t.join(timeout=120)
            fin = results["long"][-1].finished
            assert fin.finish_reason == "length" and fin.output_tokens == 60
            assert during.token_ids == before  # same greedy tokens on the new layout
            info = json.loads(c.model_info().engine_json)
            assert info["mode"] == "disaggregated" and [i["tp"] for i in info["instances"]] == [1, 2]
            assert during.finished.timings.decode_instance == "decode0"
    finally:
        assert srv.stop() == 0
    assert any("re-planned: disaggregated" in line for line in srv.log)
