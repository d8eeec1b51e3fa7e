"""The load driver: replays a workload against a running server over gRPC or OpenAI HTTP and records
what each request saw (client-side TTFT/TPOT from the stream, plus the server's own timings).

Two loops share one way of sending a request (a :data:`Sender`):

- open loop (:func:`run_workload`, :func:`run_workload_openai`): every item at its arrival time,
  whatever the server's pace;
- closed loop (:func:`run_conversations`, :func:`run_conversations_openai`): conversations turn by
  turn, each next turn sent when a :class:`ConversationReplay` says, once the reply it builds on has
  come back.

Prompts go as token ids (exact lengths) with ``max_tokens`` = the output length asked for and
``ignore_eos`` (the lengths the dataset asks for, as serving benchmarks send them).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import time
from typing import AsyncIterator, Awaitable, Callable, Sequence

import grpc

from distllm_jax.workload.conversations import ConversationReplay, Turn
from distllm_jax.workload.datasets import Encode, Item
from bench.metrics import RequestRecord


@dataclasses.dataclass
class Reply:
    """What a request produced: its token ids (as far as the backend tells them) and its text."""

    token_ids: list[int]
    text: str


# sends one prompt asking for max_tokens, fills the record (times from t0) and returns the reply
Sender = Callable[[Sequence[int], int, float, RequestRecord], Awaitable[Reply]]


async def send_at(send: Sender, prompt_ids: Sequence[int], max_tokens: int, t0: float,
                  rec: RequestRecord) -> Reply:
    """Wait for the record's arrival time, then send (``rec.sent`` is when it went)."""
    delay = t0 + rec.arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rec.sent = time.perf_counter() - t0
    return await send(prompt_ids, max_tokens, t0, rec)


def show(label: str, rec: RequestRecord, prompt: str, reply: Reply) -> None:
    """Keep and print a request's prompt and response (``--verbose``)."""
    rec.prompt, rec.response = prompt, reply.text
    print(f"\n--- {label} ({rec.prompt_len} prompt tokens, {rec.output_tokens} generated"
          f"{', error ' + rec.error if rec.error else ''})\n>>> {rec.prompt[:500]}\n<<< {rec.response[:500]}",
          flush=True)


def grpc_sender(client, timeout: float | None) -> Sender:
    """Requests over distllm's gRPC API; the reply's ids are the ones the server streamed."""

    async def send(prompt_ids: Sequence[int], max_tokens: int, t0: float, rec: RequestRecord) -> Reply:
        ids, pieces = [], []
        try:
            async for r in client.generate(list(prompt_ids), timeout=timeout, max_tokens=max_tokens, ignore_eos=True):
                now = time.perf_counter() - t0
                if r.HasField("chunk"):
                    if r.chunk.token_ids:
                        rec.tokens_at(now, len(r.chunk.token_ids))
                        ids += r.chunk.token_ids
                    pieces.append(r.chunk.text)
                else:
                    f = r.finished
                    rec.finish = now
                    rec.finish_reason = f.finish_reason
                    t = f.timings
                    rec.server = {"ttft": t.ttft_s, "tpot": t.tpot_s, "queueing": t.queueing_s,
                                  "migration": t.migration_s, "e2e": t.e2e_s,
                                  "prefill_instance": t.prefill_instance, "decode_instance": t.decode_instance,
                                  "migration_path": t.migration_path}
        except grpc.RpcError as e:
            rec.error = f"{e.code().name}: {e.details()}"
        except Exception as e:  # noqa: BLE001 - a driver bug must not lose the other requests' records
            rec.error = f"{type(e).__name__}: {e}"
        if rec.error is None and rec.finish_reason is None:
            rec.error = "stream ended without a final message"
        return Reply(ids, "".join(pieces))

    return send


def openai_sender(http, base_url: str, model: str, token: str | None, timeout: float | None,
                  encode: Encode | None = None) -> Sender:
    """Requests through an OpenAI-compatible server: streamed completions with token-id prompts; TTFT
    from the first streamed text, token counts from the final usage chunk. The API streams text, not
    ids: the reply's ids are ``encode(text)`` (what a chat client resending the text would send; they
    can differ from the ids the server generated, so its prefix cache may hit less than the best
    case), or none without ``encode``."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    async def send(prompt_ids: Sequence[int], max_tokens: int, t0: float, rec: RequestRecord) -> Reply:
        body = {"model": model, "prompt": list(prompt_ids), "max_tokens": max_tokens, "temperature": 0.0,
                "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        pieces, usage = [], None
        try:
            async with http.stream("POST", f"{base_url}/completions", json=body, headers=headers,
                                   timeout=timeout) as resp:
                if resp.status_code != 200:
                    text = (await resp.aread()).decode(errors="replace")
                    raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    data = line[6:]
                    if data == "[DONE]":
                        break
                    ev = json.loads(data)
                    if "error" in ev:
                        raise RuntimeError(ev["error"].get("message", "stream error"))
                    now = time.perf_counter() - t0
                    if ev.get("usage"):
                        usage = ev["usage"]
                    for ch in ev.get("choices") or ():
                        if ch.get("text"):
                            rec.tokens_at(now, 1)
                            pieces.append(ch["text"])
                        if ch.get("finish_reason"):
                            rec.finish_reason = ch["finish_reason"]
                            rec.finish = now
            rec.output_tokens = usage["completion_tokens"] if usage else len(rec.token_times)
            if rec.finish_reason is None:
                rec.error = "stream ended without a finish reason"
        except Exception as e:  # noqa: BLE001 - record it; the run goes on
            rec.error = f"{type(e).__name__}: {e}"
        text = "".join(pieces)
        return Reply(list(encode(text)) if encode is not None and text else [], text)

    return send


async def open_loop(send: Sender, items: Sequence[Item], arrivals: Sequence[float], *, verbose: bool = False,
                    progress: bool = True, detok=lambda ids: "") -> list[RequestRecord]:
    """Every item at its arrival time (seconds from the start), one record each, in item order."""
    from tqdm.auto import tqdm

    records = [RequestRecord(i, float(a), it.prompt_len, it.output_len) for i, (it, a) in enumerate(zip(items, arrivals))]
    bar = tqdm(total=len(items), desc="requests", unit="req", disable=not progress)
    t0 = time.perf_counter()

    async def one(i: int) -> None:
        reply = await send_at(send, items[i].prompt_ids, items[i].output_len, t0, records[i])
        if verbose:
            show(f"request {i}", records[i], items[i].prompt or detok(items[i].prompt_ids), reply)
        bar.update()

    try:
        await asyncio.gather(*(one(i) for i in range(len(items))))
    finally:
        bar.close()
    return records


async def closed_loop(send: Sender, replay: ConversationReplay, *, verbose: bool = False, progress: bool = True,
                      detok=lambda ids: "") -> list[RequestRecord]:
    """Every conversation turn by turn: its first turn at its start time, each next one when the
    replay says, built on the ids the previous reply produced. A failed turn ends its conversation (its
    later turns would build on a reply that did not come). One record per turn sent, in conversation
    then turn order."""
    from tqdm.auto import tqdm

    done: list[tuple[int, int, RequestRecord]] = []
    bar = tqdm(total=replay.total_turns, desc="turns", unit="turn", disable=not progress)
    t0 = time.perf_counter()

    async def talk(turn: Turn | None) -> None:
        while turn is not None:
            rec = RequestRecord(0, turn.arrival, len(turn.prompt_ids), turn.max_tokens,
                                conversation=turn.conversation_id, turn=turn.index, shared_prefix=turn.shared_prefix)
            done.append((turn.conversation, turn.index, rec))
            reply = await send_at(send, turn.prompt_ids, turn.max_tokens, t0, rec)
            if verbose:
                show(f"conversation {turn.conversation_id} turn {turn.index}", rec, detok(turn.prompt_ids), reply)
            bar.update()
            turn = None if rec.error is not None else replay.finished(turn, rec.finish, reply.token_ids)

    try:
        await asyncio.gather(*(talk(t) for t in replay.first_turns()))
    finally:
        bar.close()
    records = [rec for _, _, rec in sorted(done, key=lambda d: d[:2])]
    for i, rec in enumerate(records):
        rec.index = i
    return records


@contextlib.asynccontextmanager
async def _grpc(address: str, token: str | None, tls_ca: str | None,
                timeout: float | None) -> AsyncIterator[Sender]:
    from serve.client import AsyncClient

    client = AsyncClient(address, token=token, tls_ca=tls_ca, options=[("grpc.max_concurrent_streams", 100000)])
    try:
        yield grpc_sender(client, timeout)
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def _openai(base_url: str, model: str, token: str | None, timeout: float | None,
                  encode: Encode | None) -> AsyncIterator[Sender]:
    import httpx

    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=None) as http:
        yield openai_sender(http, base_url, model, token, timeout, encode)


async def run_workload(address: str, items: Sequence[Item], arrivals: Sequence[float], *, token: str | None = None,
                       tls_ca: str | None = None, verbose: bool = False, progress: bool = True,
                       timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    """Open loop over gRPC."""
    async with _grpc(address, token, tls_ca, timeout) as send:
        return await open_loop(send, items, arrivals, verbose=verbose, progress=progress, detok=detok)


async def run_workload_openai(base_url: str, model: str, items: Sequence[Item], arrivals: Sequence[float], *,
                              token: str | None = None, verbose: bool = False, progress: bool = True,
                              timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    """Open loop over OpenAI HTTP."""
    async with _openai(base_url, model, token, timeout, None) as send:
        return await open_loop(send, items, arrivals, verbose=verbose, progress=progress, detok=detok)


async def run_conversations(address: str, replay: ConversationReplay, *, token: str | None = None,
                            tls_ca: str | None = None, verbose: bool = False, progress: bool = True,
                            timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    """Closed loop over gRPC: each next turn carries the ids the server streamed."""
    async with _grpc(address, token, tls_ca, timeout) as send:
        return await closed_loop(send, replay, verbose=verbose, progress=progress, detok=detok)


async def run_conversations_openai(base_url: str, model: str, replay: ConversationReplay, encode: Encode, *,
                                   token: str | None = None, verbose: bool = False, progress: bool = True,
                                   timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    """Closed loop over OpenAI HTTP: each next turn carries ``encode`` of the text the server streamed."""
    async with _openai(base_url, model, token, timeout, encode) as send:
        return await closed_loop(send, replay, verbose=verbose, progress=progress, detok=detok)
