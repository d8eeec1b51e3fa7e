"""The closed-loop conversation driver against fakes: an in-process engine, a gRPC client and an
OpenAI-compatible server (httpx's mock transport). Every turn of every conversation is sent in order,
each after the reply it builds on, with that reply's ids in its prompt. No model, no sleeps: arrivals
are all at once and think times are zero, and waits are on events."""

from __future__ import annotations

import asyncio
import json
import math

import httpx
import pytest

from bench.conversations import engine_sender, run_conversations_engine
from bench.driver import closed_loop, grpc_sender, openai_sender
from bench.metrics import RequestRecord, conversation_summary
from distllm_jax.engine import FinishReason, RequestOutput, RequestTimings
from distllm_jax.workload.conversations import Conversation, ConversationReplay, UserTurn
from serve.v1 import distllm_pb2 as pb

NL = 10


def conversations() -> list[Conversation]:
    return [Conversation("x", [UserTurn("", [1, 2], 3), UserTurn("", [4], 2), UserTurn("", [5, 6, 7], 4)], [NL]),
            Conversation("y", [UserTurn("", [8], 2), UserTurn("", [9, 9], 3)], [NL]),
            Conversation("z", [UserTurn("", [3, 3, 3], 1)], [NL])]


def replay() -> ConversationReplay:
    return ConversationReplay(conversations(), start_rate=math.inf, think_time_s=0.0, seed=0)


def reply_ids(prompt, n: int) -> list[int]:
    """What the fakes generate: deterministic in the prompt, different for every turn."""
    return [500 + (len(prompt) + 7 * j) % 200 for j in range(n)]


def expected_prompts() -> dict[str, list[list[int]]]:
    """Each conversation's prompts, turn by turn, when every reply is ``reply_ids``."""
    out = {}
    for c in conversations():
        prompts = [c.appended(0)]
        for k in range(1, len(c.turns)):
            prev = prompts[-1]
            prompts.append(prev + reply_ids(prev, c.turns[k - 1].reply_len) + c.appended(k))
        out[c.id] = prompts
    return out


def check_served_in_order(records: list[RequestRecord], sent: list[list[int]]) -> None:
    """Every turn was sent once, each conversation's in turn order, with the expected prompt."""
    want = expected_prompts()
    assert [(r.conversation, r.turn) for r in records] == [(c, k) for c, ps in want.items() for k in range(len(ps))]
    assert sorted(map(tuple, sent)) == sorted(tuple(p) for ps in want.values() for p in ps)
    for ps in want.values():
        assert [sent.index(p) for p in ps] == sorted(sent.index(p) for p in ps)  # turn k after turn k - 1
        for prev, cur in zip(ps, ps[1:]):  # each prompt starts with the previous prompt and its reply
            assert cur[:len(prev)] == prev and cur[len(prev):len(prev) + 1] == reply_ids(prev, 1)
    by_key = {(c, k): p for c, ps in want.items() for k, p in enumerate(ps)}
    convs = {c.id: c for c in conversations()}
    for i, r in enumerate(records):
        prompt, conv = by_key[(r.conversation, r.turn)], convs[r.conversation]
        assert r.index == i and r.ok and r.prompt_len == len(prompt) and r.output_tokens == r.output_len
        # the shared prefix: the previous turn's prompt and reply, all this prompt holds before its new message
        prev = by_key.get((r.conversation, r.turn - 1), [])
        assert r.shared_prefix == (len(prev) + conv.turns[r.turn - 1].reply_len if r.turn else 0)
        assert r.shared_prefix == len(prompt) - len(conv.appended(r.turn))
        assert r.finish >= r.first_token >= r.sent >= r.arrival >= 0 and len(r.token_times) == r.output_tokens


class FakeStream:
    def __init__(self, events, gate: asyncio.Event | None):
        self.events, self.gate = events, gate

    async def __aiter__(self):
        yield self.events[0]
        if self.gate is not None:
            await self.gate.wait()
        for e in self.events[1:]:
            yield e


class FakeEngine:
    """``submit`` returns a stream of the prompt's ``reply_ids`` in two events, the last one final;
    with ``gate``, the final event waits for it; prompts holding ``fail_token`` end in an error."""

    def __init__(self, gate: asyncio.Event | None = None, fail_token: int | None = None):
        self.prompts: list[list[int]] = []
        self.gate, self.fail_token = gate, fail_token

    def submit(self, prompt, params, loop=None):
        assert params.ignore_eos and loop is asyncio.get_running_loop()
        self.prompts.append(list(prompt))
        ids = reply_ids(prompt, params.max_tokens)
        failed = self.fail_token in prompt
        timings = RequestTimings(arrival=1.0, prefill_start=1.25, first_token=1.5, finish=2.0, token_times=[1.5, 2.0])
        last = RequestOutput("r", ids[1:], "b", finished=FinishReason.ERROR if failed else FinishReason.LENGTH,
                             error="boom" if failed else None, timings=timings)
        return FakeStream([RequestOutput("r", ids[:1], "a"), last], self.gate)


def test_engine_driver_serves_every_turn_in_order():
    eng = FakeEngine()
    r = replay()
    records = run_conversations_engine(eng, r)
    check_served_in_order(records, eng.prompts)
    assert all(x.finish_reason == "length" and x.server["ttft"] == 0.5 and x.server["e2e"] == 1.0 for x in records)
    s = conversation_summary(records, r.total_turns)
    prompt = sum(x.prompt_len for x in records)
    shared = sum(x.shared_prefix for x in records)
    assert (s["conversations"], s["turns"], s["turns_unsent"], s["mean_turns"]) == (3, 6, 0, 2.0)
    assert s["prompt_tokens"] == prompt and s["shared_prefix_tokens"] == shared > 0
    assert s["prefix_share"] == shared / prompt


def test_engine_driver_sends_a_turn_only_after_the_reply_it_builds_on():
    async def scenario():
        gate = asyncio.Event()
        eng = FakeEngine(gate)
        task = asyncio.ensure_future(closed_loop(engine_sender(eng), replay(), progress=False))
        for _ in range(20):  # let the loop run every first turn up to the gate
            await asyncio.sleep(0)
        assert len(eng.prompts) == 3  # first turns only: their replies have not ended
        gate.set()
        return eng, await task

    eng, records = asyncio.run(scenario())
    check_served_in_order(records, eng.prompts)


def test_a_failed_turn_ends_its_conversation():
    eng = FakeEngine(fail_token=9)  # y's second turn fails
    r = replay()
    records = run_conversations_engine(eng, r)
    bad = [x for x in records if not x.ok]
    assert [(x.conversation, x.turn, x.error) for x in bad] == [("y", 1, "boom")]
    assert len(records) == 6 and conversation_summary(records, r.total_turns)["turns_unsent"] == 0
    eng = FakeEngine(fail_token=4)  # x's second turn fails: its third is never sent
    records = run_conversations_engine(eng, replay())
    assert [(x.conversation, x.turn) for x in records] == [("x", 0), ("x", 1), ("y", 0), ("y", 1), ("z", 0)]
    assert conversation_summary(records, 6)["turns_unsent"] == 1 and len(eng.prompts) == 5


class FakeGrpcClient:
    def __init__(self):
        self.prompts: list[list[int]] = []

    async def generate(self, prompt, timeout=None, max_tokens=None, ignore_eos=None):
        assert ignore_eos
        self.prompts.append(list(prompt))
        ids = reply_ids(prompt, max_tokens)
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=ids[:2], text="ab"))
        yield pb.GenerateResponse(chunk=pb.TokenChunk(token_ids=ids[2:], text="c"))
        yield pb.GenerateResponse(finished=pb.Finished(finish_reason="length", timings=pb.Timings(ttft_s=0.25)))


def test_grpc_driver_builds_turns_on_the_streamed_ids():
    client = FakeGrpcClient()
    records = asyncio.run(closed_loop(grpc_sender(client, None), replay(), progress=False))
    check_served_in_order(records, client.prompts)
    assert all(x.finish_reason == "length" and x.server["ttft"] == 0.25 for x in records)


def test_openai_driver_builds_turns_on_the_encoded_text():
    prompts = []

    def handler(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        assert body["ignore_eos"] and body["stream"]
        prompts.append(body["prompt"])
        ids = reply_ids(body["prompt"], body["max_tokens"])
        events = [{"choices": [{"text": f" t{i}", "finish_reason": None}]} for i in ids[:-1]]
        events.append({"choices": [{"text": f" t{ids[-1]}", "finish_reason": "length"}]})
        events.append({"choices": [], "usage": {"completion_tokens": len(ids)}})
        sse = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        return httpx.Response(200, text=sse)

    def encode(text: str) -> list[int]:  # the local tokenizer: " t512" -> 512
        return [int(w[1:]) for w in text.split()]

    async def scenario():
        async with httpx.AsyncClient(transport=httpx.MockTransport(handler)) as http:
            send = openai_sender(http, "http://fake/v1", "m", None, None, encode)
            return await closed_loop(send, replay(), progress=False)

    records = asyncio.run(scenario())
    check_served_in_order(records, prompts)


def test_turn_fields_stay_out_of_other_runs_records():
    plain = RequestRecord(0, 0.0, 5, 3).to_dict()
    assert not {"conversation", "turn", "shared_prefix"} & set(plain)
    turn = RequestRecord(1, 0.5, 9, 2, conversation="x", turn=1, shared_prefix=6)
    d = turn.to_dict()
    assert (d["conversation"], d["turn"], d["shared_prefix"]) == ("x", 1, 6)
    back = RequestRecord.from_dict(json.loads(json.dumps(d)))
    assert (back.conversation, back.turn, back.shared_prefix) == ("x", 1, 6)
    assert RequestRecord.from_dict(plain).conversation is None
