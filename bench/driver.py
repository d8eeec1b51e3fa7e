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

from bench.datasets import Item
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
                              "prefill_instance": t.prefill_instance, "decode_instance": t.decode_instance}
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
