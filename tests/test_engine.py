"""Engine behaviour on one disaggregated engine (prefill tp1 with a small pool, decode tp2 with a pool
far smaller than the workload): bursts, cancellation, deadlines, failures, seeds, timings, the async
API and compilation discipline. A leak check runs after every test."""

from __future__ import annotations

import asyncio
import time

import pytest

from distllm_jax.engine import Engine, FinishReason, InstanceSpec, SamplingParams
from distllm_jax.engine import compile_counter
from distllm_jax.kv_cache import pages_for
from engine_workload import MAX_LEN, PAGE, greedy, hf_greedy, run_arrivals, small_config, workload

VARIANT = "llama-gqa-llama3"
WORK = workload(32, seed=3)
DECODE_PAGES = 40  # 39 usable pages: a handful of requests at a time
PREFILL_PAGES = 24  # 23 pages: prefilled requests waiting for decode fill it quickly


@pytest.fixture(scope="module")
def setup(converted):
    model, ckpt = converted(VARIANT)
    cfg = small_config(
        prefill=(InstanceSpec(1, num_pages=PREFILL_PAGES),),
        decode=(InstanceSpec(2, num_pages=DECODE_PAGES),),
    )
    engine = Engine(ckpt, cfg)
    yield engine, model
    engine.shutdown(drain=False)


@pytest.fixture
def engine(setup):
    engine = setup[0]
    yield engine
    assert engine.wait_idle(20), engine.stats()
    engine.assert_no_leaks()


def test_burst_larger_than_decode_pool(setup, engine):
    model = setup[1]
    reserved = sum(pages_for(len(p) + n - 1, PAGE) for p, n in WORK)
    assert reserved > 3 * (DECODE_PAGES - 1), "the burst must not fit the decode pool at once"
    streams = [engine.submit(p, greedy(n)) for p, n in WORK]  # all at once
    outs = [s.result() for s in streams]
    for (p, n), out in zip(WORK, outs):
        assert out.error is None and out.finished is FinishReason.LENGTH
        assert out.token_ids == hf_greedy(model, p, n)


def test_cancel_mid_decode_frees_pages_at_once(engine):
    stream = engine.submit([5, 6, 7, 8, 9, 10], SamplingParams(max_tokens=50, ignore_eos=True))
    got = 0
    for out in stream:
        if out.finished is not None:
            break
        got += len(out.token_ids)
        if got == 3:
            assert engine.cancel(stream.request_id)
    assert out.finished is FinishReason.CANCELLED
    assert 3 <= out.num_output_tokens < 50
    for inst in engine.stats()["instances"]:  # freed before the final event was sent
        assert inst["pages_used"] == 0, inst


def test_cancel_before_prefill_and_unknown_id(engine):
    streams = [engine.submit(p, greedy(n)) for p, n in WORK[:8]]
    for s in streams:
        engine.cancel(s.request_id)
    outs = [s.result() for s in streams]
    assert all(o.finished in (FinishReason.CANCELLED, FinishReason.LENGTH) for o in outs)
    assert any(o.finished is FinishReason.CANCELLED for o in outs)
    assert not engine.cancel("no-such-request")


def test_deadline(engine):
    out = engine.submit([1, 2, 3], SamplingParams(max_tokens=40, ignore_eos=True), timeout=0.0).result()
    assert out.finished is FinishReason.DEADLINE and "deadline" in out.error


def test_one_request_failing_does_not_stop_others(engine, monkeypatch):
    def broken():
        def detok(ids):
            raise RuntimeError("boom in detokenizer")
        return detok

    good = engine.submit([4, 5, 6], greedy(5))
    with monkeypatch.context() as m:
        m.setattr(engine, "_detokenize", broken)
        bad = engine.submit([7, 8, 9], greedy(5))
    out_bad, out_good = bad.result(), good.result()
    assert out_bad.finished is FinishReason.ERROR and "boom in detokenizer" in out_bad.error
    assert out_good.finished is FinishReason.LENGTH and len(out_good.token_ids) == 5
    assert engine.submit([7, 8, 9], greedy(5)).result().finished is FinishReason.LENGTH


def test_failed_step_fails_its_batch_and_engine_goes_on(engine, monkeypatch):
    decode = next(i for i in engine.instances if i.role == "decode")
    real = decode.dispatch_decode  # the decode worker's path (lookahead: one-stage instance)
    calls = {"n": 0}

    def flaky(*args, **kw):
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("injected device failure")
        return real(*args, **kw)

    monkeypatch.setattr(decode, "dispatch_decode", flaky)
    out = engine.submit([3, 1, 4, 1, 5], greedy(6)).result()
    assert out.finished is FinishReason.ERROR and "injected device failure" in out.error
    assert calls["n"] == 2
    monkeypatch.setattr(decode, "dispatch_decode", real)
    again = engine.submit([3, 1, 4, 1, 5], greedy(6)).result()
    assert again.finished is FinishReason.LENGTH and len(again.token_ids) == 6
    assert any("injected device failure" in e for e in engine.stats()["recent_errors"])


def test_seeds_reproduce(engine):
    sp = SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, seed=1234, ignore_eos=True)
    a = engine.submit([11, 12, 13], sp).result().token_ids
    _ = [engine.submit(p, greedy(n)) for p, n in WORK[:4]]  # other traffic in between
    b = engine.submit([11, 12, 13], sp).result().token_ids
    c = engine.submit([11, 12, 13], SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    assert a == b
    assert c.result().token_ids != a


def test_stop_token_and_single_token(setup, engine):
    model = setup[1]
    prompt = [9, 8, 7, 6]
    ref = hf_greedy(model, prompt, 6)
    stop_at = next(i for i in range(1, 6) if ref[i] not in ref[:i])
    out = engine.submit(prompt, SamplingParams(max_tokens=6, stop_token_ids=(ref[stop_at],), ignore_eos=True)).result()
    assert out.finished is FinishReason.STOP and out.token_ids == ref[:stop_at]
    one = engine.submit(prompt, greedy(1)).result()
    assert one.token_ids == ref[:1] and one.timings.migration_start is None


def test_lookahead_decode_stops_and_reuses_pages(setup, engine):
    """The decode instance dispatches step k+1 before reading step k: requests that end on a stop
    token get one step too many, which must neither stream nor corrupt the pages handed on."""
    model = setup[1]
    assert [w.lookahead for w in engine.workers] == [False, True]  # prefill, decode (one stage)
    items, expected, stops = WORK[:12], [], []
    for i, (p, n) in enumerate(items):
        ref = hf_greedy(model, p, n)
        at = next((k for k in range(1, n) if ref[k] not in ref[:k]), None) if i % 2 == 0 else None
        stops.append(() if at is None else (ref[at],))
        expected.append(ref if at is None else ref[:at])
    outs = run_arrivals(engine, items, lambda i, n: SamplingParams(max_tokens=n, stop_token_ids=stops[i],
                                                                    ignore_eos=True), gap_s=0.001)
    for out, exp, stop in zip(outs, expected, stops):
        assert out.token_ids == exp
        assert out.finished is (FinishReason.STOP if stop else FinishReason.LENGTH)
        assert out.num_output_tokens == len(exp)


def test_timings_in_order(engine):
    out = engine.submit(list(range(3, 30)), greedy(8)).result()
    t = out.timings
    assert t.arrival <= t.prefill_start <= t.first_token <= t.migration_start <= t.migration_end
    assert t.migration_end <= t.token_times[1] <= t.token_times[-1] <= t.finish
    assert len(t.token_times) == out.num_output_tokens == 8
    assert t.ttft > 0 and t.tpot > 0 and t.migration >= 0
    assert t.prefill_instance == "prefill0" and t.decode_instance == "decode0"
    # the idle decode instance had room: its pull was chosen as the prefill ended, and the prefill
    # worker dispatched its gathers before taking another batch
    assert t.migration_start == t.first_token


def test_async_stream_and_early_exit(engine):
    async def main():
        toks = []
        async for out in engine.generate([1, 2, 3, 4], greedy(7)):
            toks += out.token_ids
        partial = []
        async for out in engine.generate([1, 2, 3, 4], SamplingParams(max_tokens=50, ignore_eos=True)):
            partial += out.token_ids
            if len(partial) >= 2:
                break  # leaving the loop cancels the request
        return toks, partial

    toks, partial = asyncio.run(main())
    assert len(toks) == 7 and partial == toks[: len(partial)]


@pytest.mark.parametrize(
    "prompt,message",
    [([], "empty"), ([1] * MAX_LEN, "limit"), ([1, 10**6], "out of range"), ("text", "tokenizer")],
)
def test_bad_requests_raise(engine, prompt, message):
    with pytest.raises(ValueError, match=message):
        engine.submit(prompt, greedy(3))


def test_duplicate_request_id(engine):
    s = engine.submit([1, 2], SamplingParams(max_tokens=30, ignore_eos=True), request_id="dup")
    with pytest.raises(ValueError, match="already in use"):
        engine.submit([1, 2], greedy(3), request_id="dup")
    assert s.result().finished is FinishReason.LENGTH


def test_steady_state_compiles_nothing(engine):
    work = workload(100, seed=7)
    flavours = [
        lambda n: greedy(n),
        lambda n: SamplingParams(max_tokens=n, temperature=0.8, top_k=20, ignore_eos=True),
        lambda n: SamplingParams(max_tokens=n, temperature=1.2, top_p=0.8, seed=5),
        lambda n: SamplingParams(max_tokens=1),
        lambda n: SamplingParams(max_tokens=n, logprobs=5, prompt_logprobs=2),
        lambda n: SamplingParams(max_tokens=n, temperature=0.9, n=3, logprobs=0),
        lambda n: SamplingParams(max_tokens=0, prompt_logprobs=0),
    ]
    before = compile_counter.compilations()
    streams = []
    for i, (p, n) in enumerate(work):
        streams.append(engine.submit(p, flavours[i % len(flavours)](n)))
        if i % 10 == 9:
            time.sleep(0.01)
    outs = [o for s in streams for o in s.results()]
    assert all(o.error is None for o in outs)
    assert compile_counter.compilations() == before, "serving compiled a new program"


def test_stats(engine):
    s = engine.stats()
    assert s["mode"] == "disaggregated" and s["migration_path"] == "local"
    assert {i["role"] for i in s["instances"]} == {"prefill", "decode"}
    assert s["compilations"] > 0 and s["warmup_seconds"] > 0
    # the suite's compile cache is on, so the programs went through the store beside it
    st = s["executable_store"]
    assert st["dir"].endswith("executables") and st["loaded"] + st["built"] > 0
