"""Conversation replays against an engine in this process (no server): the closed loop of
:func:`bench.driver.closed_loop` with a sender that submits to an ``Engine`` and reads its stream
from the event loop. For benchmarks that build the engine themselves (as ``bench/sim_vs_engine.py``
does), so the library's engine stays unaware of workloads."""

from __future__ import annotations

import asyncio
import time
from typing import Sequence

import numpy as np

from distllm_jax.placement.simulator import SimRequest, Simulator
from distllm_jax.scheduling.prefix_cache import page_hashes
from distllm_jax.workload.conversations import ConversationReplay, Turn
from bench.driver import Reply, Sender, closed_loop
from bench.metrics import RequestRecord

FAILED = ("error", "deadline", "cancelled")  # finish reasons that end a request without its output


def engine_sender(engine) -> Sender:
    """Requests to ``engine`` (anything with ``submit(prompt_ids, SamplingParams, loop=...)`` returning
    a stream of ``RequestOutput`` events to iterate with ``async for``): ``max_tokens`` with
    ``ignore_eos``, the client-side times from the events, the engine's own timings as ``server``."""
    from distllm_jax.engine.sampling import SamplingParams

    async def send(prompt_ids: Sequence[int], max_tokens: int, t0: float, rec: RequestRecord) -> Reply:
        ids, pieces = [], []
        try:
            stream = engine.submit(list(prompt_ids), SamplingParams(max_tokens=max_tokens, ignore_eos=True),
                                   loop=asyncio.get_running_loop())
            async for out in stream:
                now = time.perf_counter() - t0
                if out.token_ids:
                    rec.tokens_at(now, len(out.token_ids))
                    ids += out.token_ids
                pieces.append(out.text)
                if out.finished is not None:
                    rec.finish, rec.finish_reason = now, out.finished.value
                    if out.error or rec.finish_reason in FAILED:
                        rec.error = out.error or rec.finish_reason
                    rec.server = _timings(out.timings)
        except Exception as e:  # noqa: BLE001 - a refused request is recorded; the other conversations go on
            rec.error = f"{type(e).__name__}: {e}"
        if rec.error is None and rec.finish_reason is None:
            rec.error = "stream ended without a final event"
        return Reply(ids, "".join(pieces))

    return send


def _timings(t) -> dict:
    """The engine's ``RequestTimings`` in the keys the gRPC driver records the server's under."""
    if t is None:
        return {}
    e2e = None if t.finish is None else t.finish - t.arrival
    return {"ttft": t.ttft, "tpot": t.tpot, "queueing": t.queueing, "migration": t.migration, "e2e": e2e,
            "prefill_instance": t.prefill_instance, "decode_instance": t.decode_instance,
            "migration_path": t.migration_path, "cached_prompt_tokens": t.cached_prompt_tokens}


def run_conversations_engine(engine, replay: ConversationReplay, *, progress: bool = False,
                             verbose: bool = False, detok=lambda ids: "") -> list[RequestRecord]:
    """Replay ``replay``'s conversations against ``engine``; one record per turn sent (blocks until
    the last conversation ends; call it from a thread with no running event loop)."""
    return asyncio.run(closed_loop(engine_sender(engine), replay, verbose=verbose, progress=progress, detok=detok))


def simulate_conversations(simulator: Simulator, replay: ConversationReplay, page_size: int,
                           seed: int = 0) -> list[tuple[Turn, SimRequest]]:
    """``replay`` in the simulator, closed-loop as the engine serves it (each next turn when the
    reply before it ends, plus its think time). The simulator produces no tokens, so each reply's ids
    are drawn at random: only their identity across turns matters to a prefix cache, since the next
    turn's prompt holds them. A request's page hashes cover its prompt and its reply, so an instance
    that decoded it can keep the reply's pages too, as the engine's does."""
    rng = np.random.default_rng([2, seed])
    turns: dict[str, tuple[Turn, list[int]]] = {}

    def request(turn: Turn) -> SimRequest:
        reply = [int(x) for x in rng.integers(0, 1 << 31, turn.max_tokens)]
        r = SimRequest(turn.arrival, len(turn.prompt_ids), turn.max_tokens,
                       prefix_hashes=tuple(page_hashes([*turn.prompt_ids, *reply], page_size, "sim")))
        r.rid = f"c{turn.conversation}t{turn.index}"
        turns[r.rid] = (turn, reply)
        return r

    def follow(r: SimRequest) -> SimRequest | None:
        turn, reply = turns[r.rid]
        nxt = replay.finished(turn, r.finish, reply)
        return None if nxt is None else request(nxt)

    done = simulator.run([request(t) for t in replay.first_turns()], follow)
    return [(turns[r.rid][0], r) for r in done]
