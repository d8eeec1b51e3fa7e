"""Re-planning a running server (SIGHUP re-reads --plan): drain, re-place, resume, nothing lost."""

from __future__ import annotations

import json
import signal
import threading
import time

from serve.client import Client
from server_proc import ServerProc, checkpoint_with_tokenizer


def test_sighup_replaces_the_layout(converted, tmp_path):
    _, ckpt = converted("llama-gqa-llama3")
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"mode": "colocated", "colocated": [{"tp": 1, "pp": 1}]}))
    srv = ServerProc(checkpoint_with_tokenizer(ckpt, tmp_path / "ckpt"), "--plan", str(plan))
    try:
        with Client(srv.address, timeout=120) as c:
            assert json.loads(c.model_info().engine_json)["mode"] == "colocated"
            before = c.complete([5, 6, 7], max_tokens=12, ignore_eos=True).token_ids
            results = {}

            def long():
                results["long"] = c.complete([9, 8, 7], max_tokens=60, ignore_eos=True)

            t = threading.Thread(target=long)
            t.start()
            time.sleep(0.2)
            plan.write_text(json.dumps({"mode": "disaggregated", "prefill": [{"tp": 1, "pp": 1}],
                                        "decode": [{"tp": 2, "pp": 1}]}))
            srv.proc.send_signal(signal.SIGHUP)
            while "re-planning" not in (line := srv.proc.stdout.readline()):  # the server took the signal
                assert line, "server exited"
                srv.log.append(line)
            during = c.complete([5, 6, 7], max_tokens=12, ignore_eos=True)  # waits for the new engine
            t.join(timeout=120)
            assert results["long"].finished.finish_reason == "length" and len(results["long"].token_ids) == 60
            assert during.token_ids == before  # same greedy tokens on the new layout
            info = json.loads(c.model_info().engine_json)
            assert info["mode"] == "disaggregated" and [i["tp"] for i in info["instances"]] == [1, 2]
            assert during.finished.timings.decode_instance == "decode0"
    finally:
        assert srv.stop() == 0
    assert any("re-planned: disaggregated" in line for line in srv.log)
