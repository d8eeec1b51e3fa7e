"""The load driver: replays a workload against a running server at given arrival times over gRPC and
records what each request saw (client-side TTFT/TPOT from the stream, plus the server's own timings).

Prompts go as token ids (exact lengths) with ``max_tokens`` = the item's output length and
``ignore_eos`` (the lengths the dataset asks for, as serving benchmarks send them).
"""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import grpc

from distllm_jax.workload.datasets import Item
from bench.metrics import RequestRecord


async def _one(client, i: int, item: Item, arrival: float, t0: float, verbose: bool, timeout: float | None,
               rec: RequestRecord, detok) -> None:
    delay = t0 + arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rec.sent = time.perf_counter() - t0
    pieces = []
    try:
        async for r in client.generate(item.prompt_ids, timeout=timeout, max_tokens=item.output_len,
                                       ignore_eos=True):
            now = time.perf_counter() - t0
            if r.HasField("chunk"):
                if r.chunk.token_ids:
                    if not rec.token_times:
                        rec.first_token = now
                    rec.token_times += [now] * len(r.chunk.token_ids)
                    rec.output_tokens += len(r.chunk.token_ids)
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
    if verbose:
        rec.prompt = item.prompt or detok(item.prompt_ids)
        rec.response = "".join(pieces)
        print(f"\n--- request {i} ({item.prompt_len} prompt tokens, {rec.output_tokens} generated"
              f"{', error ' + rec.error if rec.error else ''})\n>>> {rec.prompt[:500]}\n<<< {rec.response[:500]}",
              flush=True)


async def _one_openai(http, base_url: str, model: str, i: int, item: Item, arrival: float, t0: float,
                      verbose: bool, timeout: float | None, rec: RequestRecord, detok, token: str | None) -> None:
    """The same request through an OpenAI-compatible server: streamed completions with token-id
    prompts; TTFT from the first streamed text, token counts from the final usage chunk."""
    import json as _json

    delay = t0 + arrival - time.perf_counter()
    if delay > 0:
        await asyncio.sleep(delay)
    rec.sent = time.perf_counter() - t0
    body = {"model": model, "prompt": item.prompt_ids, "max_tokens": item.output_len, "temperature": 0.0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    pieces, usage = [], None
    try:
        async with http.stream("POST", f"{base_url}/completions", json=body, headers=headers, timeout=timeout) as resp:
            if resp.status_code != 200:
                text = (await resp.aread()).decode(errors="replace")
                raise RuntimeError(f"HTTP {resp.status_code}: {text[:300]}")
            async for line in resp.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                ev = _json.loads(data)
                if "error" in ev:
                    raise RuntimeError(ev["error"].get("message", "stream error"))
                now = time.perf_counter() - t0
                if ev.get("usage"):
                    usage = ev["usage"]
                for ch in ev.get("choices") or ():
                    if ch.get("text"):
                        if not rec.token_times:
                            rec.first_token = now
                        rec.token_times.append(now)
                        pieces.append(ch["text"])
                    if ch.get("finish_reason"):
                        rec.finish_reason = ch["finish_reason"]
                        rec.finish = now
        rec.output_tokens = usage["completion_tokens"] if usage else len(rec.token_times)
        if rec.finish_reason is None:
            rec.error = "stream ended without a finish reason"
    except Exception as e:  # noqa: BLE001 - record it; the run goes on
        rec.error = f"{type(e).__name__}: {e}"
    if verbose:
        rec.prompt = item.prompt or detok(item.prompt_ids)
        rec.response = "".join(pieces)
        print(f"\n--- request {i} ({item.prompt_len} prompt tokens, {rec.output_tokens} generated)\n"
              f">>> {rec.prompt[:500]}\n<<< {rec.response[:500]}", flush=True)


async def run_workload_openai(base_url: str, model: str, items: Sequence[Item], arrivals: Sequence[float], *,
                              token: str | None = None, verbose: bool = False, progress: bool = True,
                              timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    import httpx
    from tqdm.auto import tqdm

    records = [RequestRecord(i, float(a), it.prompt_len, it.output_len) for i, (it, a) in enumerate(zip(items, arrivals))]
    bar = tqdm(total=len(items), desc="requests", unit="req", disable=not progress)
    t0 = time.perf_counter()
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    async with httpx.AsyncClient(limits=limits, timeout=None) as http:
        async def tracked(i):
            await _one_openai(http, base_url, model, i, items[i], arrivals[i], t0, verbose, timeout, records[i],
                              detok, token)
            bar.update()

        await asyncio.gather(*(tracked(i) for i in range(len(items))))
    bar.close()
    return records


async def run_workload(address: str, items: Sequence[Item], arrivals: Sequence[float], *, token: str | None = None,
                       tls_ca: str | None = None, verbose: bool = False, progress: bool = True,
                       timeout: float | None = None, detok=lambda ids: "") -> list[RequestRecord]:
    from tqdm.auto import tqdm

    from serve.client import AsyncClient

    client = AsyncClient(address, token=token, tls_ca=tls_ca,
                         options=[("grpc.max_concurrent_streams", 100000)])
    records = [RequestRecord(i, float(a), it.prompt_len, it.output_len) for i, (it, a) in enumerate(zip(items, arrivals))]
    bar = tqdm(total=len(items), desc="requests", unit="req", disable=not progress)
    t0 = time.perf_counter()

    async def tracked(i):
        await _one(client, i, items[i], arrivals[i], t0, verbose, timeout, records[i], detok)
        bar.update()

    try:
        await asyncio.gather(*(tracked(i) for i in range(len(items))))
    finally:
        bar.close()
        await client.close()
    return records
