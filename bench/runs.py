"""One benchmark run end to end (workload -> arrivals -> driver -> records -> JSON + table), and the
helpers ``distllm bench run|goodput`` share."""

from __future__ import annotations

import ast
import asyncio
import json
import math
from pathlib import Path
from typing import Any, Callable, Sequence

from distllm_jax.workload.arrivals import arrival_times
from distllm_jax.workload.conversations import ConversationReplay, ConversationSet, load_conversations
from distllm_jax.workload.datasets import Item, Workload, load
from bench.driver import run_conversations, run_workload
from bench.metrics import RequestRecord, conversation_summary, summarize, tightest_scale
from distllm_jax.workload.slo import SLO
from distllm_jax.placement.trace import Trace


def parse_pairs(text: str) -> list[tuple[int, float]]:
    """``"[(50, 2), (100, 4.5)]"`` -> [(50, 2.0), (100, 4.5)] (the artifact's argument form)."""
    try:
        pairs = ast.literal_eval(text)
        out = [(int(n), float(r)) for n, r in pairs]
    except (ValueError, SyntaxError, TypeError):
        raise ValueError(f"--num-prompts-req-rates {text!r}: expected a list like [(50, 2), (100, 4)]") from None
    if not out or any(n < 1 or not r > 0 for n, r in out):
        raise ValueError("each (num_prompts, rate) needs num_prompts >= 1 and rate > 0")
    return out


class Target:
    """The server under test: its address, what it serves, and a tokenizer for the workload."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | None = None,
                 tokenizer_path: str | None = None, backend: str = "distllm-grpc", base_url: str | None = None,
                 model: str | None = None, devices: int = 1):
        self.backend = backend
        self.address, self.token, self.tls_ca = address, token, tls_ca
        self.base_url: str | None = None  # the openai backend's API root
        if backend == "openai":
            self._openai(base_url, model, tokenizer_path, devices)
            return
        import grpc

        from serve.client import Client

        self.client = Client(address, token=token, tls_ca=tls_ca, timeout=30)
        try:
            info = self.client.model_info()
        except grpc.RpcError as e:
            raise ConnectionError(f"cannot reach a distllm server at {address}: {e.code().name} {e.details()}") from None
        self.model = info.model_name or "model"
        self.engine = json.loads(info.engine_json)
        self.mode = self.engine["mode"]
        self.max_len = info.max_seq_len
        self.devices = info.num_devices
        if tokenizer_path:
            from distllm_jax.tokenizer import load_tokenizer
            from tokenizers import Tokenizer

            p = Path(tokenizer_path)
            tok = Tokenizer.from_file(str(p)) if p.is_file() else load_tokenizer(p)
            self.encode = lambda s: tok.encode(s).ids
            self.decode = lambda ids: tok.decode(list(ids))
            self.tokenizer_id = f"local:{p.resolve()}"
        else:
            self.encode = self._server_encode
            self.decode = lambda ids: ""
            self.tokenizer_id = f"server:{self.model}:{info.vocab_size}"

    def _server_encode(self, text: str) -> list[int]:
        """The server's Tokenize. It refuses text too long to fit its context (so a huge text costs no
        tokenizer time): such a text stands as one token longer than the context, which the dataset's
        length filter drops, as it would drop the real ids."""
        import grpc

        try:
            return self.client.tokenize(text)
        except grpc.RpcError as e:
            if e.code() == grpc.StatusCode.INVALID_ARGUMENT and "cannot fit the context" in (e.details() or ""):
                return [0] * (self.max_len + 1)
            raise

    def _openai(self, base_url: str | None, model: str | None, tokenizer_path: str | None, devices: int) -> None:
        """Any OpenAI-compatible server: the model and context from /v1/models, a local tokenizer."""
        import httpx

        if not base_url:
            raise ValueError("--backend openai needs --base-url (e.g. http://127.0.0.1:8000/v1)")
        if not tokenizer_path:
            raise ValueError("--backend openai needs --tokenizer (the served model's tokenizer, to size the workload)")
        self.base_url = base_url.rstrip("/")
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        try:
            data = httpx.get(f"{self.base_url}/models", headers=headers, timeout=30).json()["data"]
        except Exception as e:  # noqa: BLE001
            raise ConnectionError(f"cannot reach an OpenAI-compatible server at {self.base_url}: {e}") from None
        entry = next((m for m in data if model is None or m["id"] == model), None)
        if entry is None:
            raise ValueError(f"model {model!r} is not served at {self.base_url} (it serves {[m['id'] for m in data]})")
        self.model = entry["id"]
        self.max_len = int(entry.get("max_model_len") or 2048)
        self.mode, self.engine, self.devices = "openai", {"base_url": self.base_url}, devices
        from distllm_jax.tokenizer import load_tokenizer
        from tokenizers import Tokenizer

        p = Path(tokenizer_path)
        tok = Tokenizer.from_file(str(p)) if p.is_file() else load_tokenizer(p)
        self.encode = lambda s: tok.encode(s).ids
        self.decode = lambda ids: tok.decode(list(ids))
        self.tokenizer_id = f"local:{p.resolve()}"

    def workload(self, dataset: str, n: int, seed: int, cache_dir: str | None) -> Workload:
        return load(dataset, self.encode, n, self.max_len, seed, Path(cache_dir) if cache_dir else None,
                    self.tokenizer_id)

    def conversations(self, dataset: str, n: int, seed: int, cache_dir: str | None) -> ConversationSet:
        return load_conversations(dataset, self.encode, n, self.max_len, seed,
                                  Path(cache_dir) if cache_dir else None, self.tokenizer_id)

    def config(self, dataset: str, slo: SLO | None, **fields: Any) -> dict[str, Any]:
        """A run file's ``config``: the server under test, the dataset, the SLO, and ``fields``."""
        return {"backend": self.backend, "address": self.base_url or self.address, "model": self.model,
                "mode": self.mode, "dataset": dataset, **fields, "devices": self.devices, "engine": self.engine,
                "slo": None if slo is None else {"ttft": slo.ttft, "tpot": slo.tpot}}


def _summary(records: Sequence[RequestRecord], slo: SLO | None) -> dict[str, Any]:
    summary = summarize(records, slo)
    if slo is not None:
        summary["tightest_slo_scale"] = tightest_scale(records, slo)
    return summary


def _save(out: dict[str, Any], results: str | None, folder: str, name: str) -> dict[str, Any]:
    """Write the run to ``results/folder/name.json`` (nothing without ``results``); its path goes in ``out``."""
    if results:
        path = Path(results) / folder / f"{name}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(out, indent=1, default=_json_default))
        out["path"] = str(path)
    return out


def run_once(target: Target, dataset: str, num_prompts: int, rate: float, slo: SLO | None, *,
             burstiness: float = 1.0, seed: int = 0, verbose: bool = False, progress: bool = True,
             results: str | None = "bench/results", cache_dir: str | None = None) -> dict[str, Any]:
    w = target.workload(dataset, num_prompts, seed, cache_dir)
    items = (w.items * (num_prompts // len(w.items) + 1))[:num_prompts]
    arrivals = arrival_times(len(items), rate, burstiness, seed)
    records = _drive(target, items, arrivals, verbose, progress)
    out = {
        "config": target.config(dataset, slo, num_prompts=num_prompts, rate=rate, burstiness=burstiness, seed=seed,
                                workload=w.stats()),
        "summary": _summary(records, slo),
        "requests": [r.to_dict() for r in records],
    }
    label = Path(dataset).stem if dataset.startswith("file:") else dataset
    return _save(out, results, f"{target.model}-{label}", f"{target.mode}-{num_prompts}-{rate:g}")


def run_conversations_once(target: Target, dataset: str, num_conversations: int, rate: float, slo: SLO | None, *,
                           think_time: float = 2.0, burstiness: float = 1.0, seed: int = 0, verbose: bool = False,
                           progress: bool = True, results: str | None = "bench/results",
                           cache_dir: str | None = None) -> dict[str, Any]:
    """A closed-loop run of ``sharegpt-conversations[:PATH]``: ``num_conversations`` conversations
    starting at ``rate`` per second, ``think_time`` seconds (mean) between a reply and the next turn.
    Besides the usual summary (per turn), it reports the turns served, turns per conversation and
    the best-case prefix share (see :func:`conversation_summary`)."""
    cs = target.conversations(dataset, num_conversations, seed, cache_dir)
    replay = ConversationReplay(cs.conversations, rate, think_time, seed, burstiness)
    records = _drive_conversations(target, replay, verbose, progress)
    out = {
        "config": target.config(dataset, slo, num_prompts=len(cs.conversations), rate=rate, burstiness=burstiness,
                                seed=seed, think_time_s=think_time, workload=cs.stats()),
        "summary": {**_summary(records, slo), **conversation_summary(records, replay.total_turns)},
        "requests": [r.to_dict() for r in records],
    }
    head, _, path = dataset.partition(":")
    label = f"{head}-{Path(path).stem}" if path else head
    return _save(out, results, f"{target.model}-{label}",
                 f"{target.mode}-{num_conversations}-{rate:g}-think{think_time:g}")


def _drive(target: Target, items: Sequence[Item], arrivals: Sequence[float], verbose: bool,
           progress: bool) -> list[RequestRecord]:
    """Send ``items`` at ``arrivals`` (seconds from the start) through the target's backend."""
    if target.backend == "openai":
        from bench.driver import run_workload_openai

        return asyncio.run(run_workload_openai(target.base_url, target.model, items, arrivals, token=target.token,
                                               verbose=verbose, progress=progress, detok=target.decode))
    return asyncio.run(run_workload(target.address, items, arrivals, token=target.token, tls_ca=target.tls_ca,
                                    verbose=verbose, progress=progress, detok=target.decode))


def _drive_conversations(target: Target, replay: ConversationReplay, verbose: bool,
                         progress: bool) -> list[RequestRecord]:
    """The replay's conversations, closed-loop, through the target's backend."""
    if target.backend == "openai":
        from bench.driver import run_conversations_openai

        return asyncio.run(run_conversations_openai(target.base_url, target.model, replay, target.encode,
                                                    token=target.token, verbose=verbose, progress=progress,
                                                    detok=target.decode))
    return asyncio.run(run_conversations(target.address, replay, token=target.token, tls_ca=target.tls_ca,
                                         verbose=verbose, progress=progress, detok=target.decode))


FILLER = "The quick brown fox jumps over the lazy dog while the cat watches from the warm windowsill. "


def trace_items(trace: Trace, encode: Callable[[str], Sequence[int]], max_len: int) -> list[Item]:
    """Prompts of the trace's exact lengths: a filler text's token ids repeated and cut (a trace keeps
    lengths, not text; what decides the timings is how many tokens, and the output length is forced by
    ``max_tokens`` with ``ignore_eos``). Every request must fit the server's context."""
    for i, r in enumerate(trace.requests):
        if r.prompt_len + r.output_len > max_len:
            n = sum(1 for q in trace.requests if q.prompt_len + q.output_len > max_len)
            raise ValueError(f"{trace.path}: request {i} (arrival {r.arrival_s:g} s) needs {r.prompt_len} + "
                             f"{r.output_len} tokens, over the server's context of {max_len} ({n} such requests)")
    base = list(encode(FILLER))
    if not base:
        raise ValueError("the tokenizer gives no tokens for the filler text")
    longest = max(r.prompt_len for r in trace.requests)
    ids = base * (longest // len(base) + 1)
    return [Item("", ids[:r.prompt_len], r.output_len) for r in trace.requests]


def run_trace(target: Target, trace_path: str, slo: SLO | None, *, verbose: bool = False, progress: bool = True,
              results: str | None = "bench/results") -> dict[str, Any]:
    """Replay a recorded run against a live server: its arrivals and (prompt, output) lengths. Besides
    the usual summary, ``trace_compare`` puts this server's strict summary (TTFT < target and TPOT <
    target, as ``distllm simulate --trace`` counts) beside the trace's measurements, when it has them."""
    from distllm_jax.placement.trace import read_trace, summarize as trace_summary

    trace = read_trace(trace_path)
    items = trace_items(trace, target.encode, target.max_len)
    arrivals = [r.arrival_s for r in trace.requests]
    records = _drive(target, items, arrivals, verbose, progress)
    summary = _summary(records, slo)
    span = arrivals[-1] - arrivals[0]
    rate = (len(arrivals) - 1) / span if span > 0 else math.inf
    out: dict[str, Any] = {
        "config": target.config(f"trace:{trace_path}", slo, trace=trace_path, num_prompts=len(items), rate=rate),
        "summary": summary,
    }
    if slo is not None:
        cmp = {"live": trace_summary([r.ttft for r in records], [r.tpot for r in records], (slo.ttft, slo.tpot)),
               "trace": None}
        if trace.measured:
            cmp["trace"] = trace_summary([r.ttft_s for r in trace.requests], [r.tpot_s for r in trace.requests],
                                         (slo.ttft, slo.tpot))
        out["trace_compare"] = cmp
    out["requests"] = [r.to_dict() for r in records]
    return _save(out, results, f"{target.model}-trace", f"{target.mode}-{trace.name}")


def _json_default(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    raise TypeError(type(x))


def load_run(path: Path) -> tuple[dict, list[RequestRecord]]:
    d = json.loads(path.read_text())
    return d, [RequestRecord.from_dict(r) for r in d["requests"]]


def _ms(x: float) -> str:
    return "-" if x is None or not math.isfinite(x) else f"{1e3 * x:.1f}"


def print_table(runs: Sequence[dict]) -> None:
    head = (f"{'mode':<14}{'reqs':>5}{'rate':>7}{'err':>5}  {'TTFT ms mean/p50/p90/p99':<28}"
            f"{'TPOT ms mean/p50/p90/p99':<28}{'tok/s':>8}{'attain':>8}")
    print(head)
    print("-" * len(head))
    for r in runs:
        c, s = r["config"], r["summary"]
        ttft = "/".join(_ms(s[f"{k}_ttft"]) for k in ("mean", "p50", "p90", "p99"))
        tpot = "/".join(_ms(s[f"{k}_tpot"]) for k in ("mean", "p50", "p90", "p99"))
        att = f"{100 * s['attainment']:.0f}%" if "attainment" in s else "-"
        print(f"{c['mode']:<14}{s['requests']:>5}{c['rate']:>7g}{s['errors']:>5}  {ttft:<28}{tpot:<28}"
              f"{s['output_throughput']:>8.0f}{att:>8}")
    for r in runs:  # a conversation replay's own numbers, under the table
        c, s = r["config"], r["summary"]
        if "turns" in s:
            unsent = f", {s['turns_unsent']} unsent after a failed turn" if s["turns_unsent"] else ""
            print(f"{c['mode']} at {c['rate']:g} conversations/s, think {c['think_time_s']:g} s: "
                  f"{s['conversations']} conversations, {s['turns']} turns ({s['mean_turns']:.2f} per conversation"
                  f"{unsent}), best-case prefix share {100 * s['prefix_share']:.1f}%")
