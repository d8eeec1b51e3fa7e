"""ShareGPT conversations (pairing, context cut, min_turns, seeded draw, cache) and the closed-loop
replay's rules (arrivals, prompts built on the produced replies, shared prefixes, think times),
on small synthetic files and a one-token-a-word tokenizer."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from distllm_jax.workload.arrivals import arrival_times
from distllm_jax.workload.conversations import (Conversation, ConversationReplay, UserTurn, is_conversations,
                                                load_conversations, sharegpt_conversations, turn_pairs)
from distllm_jax.workload.datasets import load

NL = 0  # the newline's id


def enc(s: str) -> list[int]:
    """One token a word (its length), the newline a token of its own."""
    return [NL if t == "\n" else len(t) for t in re.findall(r"\n|\S+", s)]


def bos_enc(s: str) -> list[int]:
    """A tokenizer that puts a BOS (99) before every text."""
    return [99, *enc(s)]


def words(k: int, w: str = "w") -> str:
    return " ".join([w] * k)


def msg(role: str, text: str) -> dict:
    return {"from": role, "value": text}


def chat(*texts: str, first: str = "human") -> list[dict]:
    other = {"human": "gpt", "gpt": "human"}
    roles = [first if i % 2 == 0 else other[first] for i in range(len(texts))]
    return [msg(r, t) for r, t in zip(roles, texts)]


RECORDS = [
    {"id": "a", "conversations": chat(words(3), words(5), words(2), words(4), words(6), words(7))},  # 3 turns
    {"id": "b", "conversations": chat(words(9), words(2), words(3), words(1), words(4), first="gpt")},  # leads with a reply
    {"id": "c", "conversations": [msg("human", "x y"), msg("human", "z"), msg("gpt", "w w")]},  # no alternation
    {"id": "d", "conversations": chat(words(2), words(2))},  # one turn
    {"id": "e", "conversations": chat(words(2), words(3), words(4), "")},  # second reply empty: one turn
    {"id": "f", "conversations": [msg("system", "be nice"), *chat(words(2), words(3), words(2), words(3), "last?")]},
]


@pytest.fixture
def sg(tmp_path):
    """The records as a ShareGPT file, cut mid-way through one more record (as the packaged file is)."""
    path = tmp_path / "sg.json"
    text = json.dumps(RECORDS + [{"id": "g", "conversations": chat(words(2), words(2), words(2), words(2))}])
    path.write_text(text[: text.rindex('"id": "g"') + 12])
    return path


def test_turn_pairs_keep_alternating_human_gpt_turns():
    assert turn_pairs(chat("hi", "hello", "how", "fine")) == [("hi", "hello"), ("how", "fine")]
    assert turn_pairs(chat("reply", "q", "a", first="gpt")) == [("q", "a")]  # what leads the first human goes
    assert turn_pairs(chat("q", "a", "unanswered")) == [("q", "a")]
    assert turn_pairs([msg("system", "s"), *chat("q", "a")]) == [("q", "a")]
    assert turn_pairs([msg("human", "q"), msg("human", "again"), msg("gpt", "a")]) is None
    assert turn_pairs([*chat("q", "a"), msg("gpt", "more")]) is None
    assert turn_pairs([msg("human", "q"), msg("bing", "a")]) is None
    assert turn_pairs([msg("gpt", "only a reply")]) == []


def test_loader_pairs_turns_and_keeps_conversations_of_min_turns(sg):
    cs = sharegpt_conversations(enc, 100, 1000, path=sg)
    assert cs.source_records == len(RECORDS)  # the cut record is not read
    got = {c.id: c for c in cs.conversations}
    assert sorted(got) == ["a", "b", "f"]  # c does not alternate; d and e have one turn
    a = got["a"]
    assert [(t.text, t.ids, t.reply_len) for t in a.turns] == [
        (words(3), [1, 1, 1], 5), (words(2), [1, 1], 4), (words(6), [1] * 6, 7)]
    assert a.separator == [NL] and a.appended(0) == [1, 1, 1] and a.appended(1) == [NL, 1, 1]
    assert a.context_len == (3 + 5) + (1 + 2 + 4) + (1 + 6 + 7)
    assert [(t.ids, t.reply_len) for t in got["b"].turns] == [([1, 1], 3), ([1], 4)]  # the leading reply dropped
    assert [(t.text, t.reply_len) for t in got["f"].turns] == [(words(2), 3), (words(2), 3)]  # no unanswered "last?"


def test_loader_min_turns_one_keeps_single_turns(sg):
    ids = sorted(c.id for c in sharegpt_conversations(enc, 100, 1000, path=sg, min_turns=1).conversations)
    assert ids == ["a", "b", "d", "e", "f"]
    e = next(c for c in sharegpt_conversations(enc, 100, 1000, path=sg, min_turns=1).conversations if c.id == "e")
    assert len(e.turns) == 1  # the turn with the empty reply ends it


def test_loader_cuts_turns_past_the_context(sg):
    # a: 8 tokens after turn 0, 15 after turn 1, 29 after turn 2
    for max_len, turns in [(29, 3), (28, 2), (15, 2), (14, 1)]:
        a = [c for c in sharegpt_conversations(enc, 100, max_len, path=sg, min_turns=1).conversations if c.id == "a"]
        assert [len(c.turns) for c in a] == [turns]
        assert a[0].context_len <= max_len
    assert "a" not in {c.id for c in sharegpt_conversations(enc, 100, 14, path=sg).conversations}  # 1 turn < 2


def test_loader_tokenizer_bos_starts_the_first_message_only(sg):
    a = next(c for c in sharegpt_conversations(bos_enc, 100, 1000, path=sg).conversations if c.id == "a")
    assert a.turns[0].ids == [99, 1, 1, 1] and a.turns[1].ids == [1, 1] and a.separator == [NL]
    assert [t.reply_len for t in a.turns] == [5, 4, 7]  # a reply's length leaves the BOS out


def test_loader_draw_is_seeded(sg):
    def order(seed, n=100):
        return [c.id for c in sharegpt_conversations(enc, n, 1000, seed=seed, path=sg).conversations]

    assert order(0) == order(0) and sorted(order(0)) == ["a", "b", "f"]
    assert len({tuple(order(s)) for s in range(8)}) > 1  # other seeds, other orders
    assert order(3, n=2) == order(3)[:2] and len(order(3, n=1)) == 1


def test_load_conversations_caches_by_every_input(sg, tmp_path):
    calls = []

    def counting(s):
        calls.append(s)
        return enc(s)

    name = f"sharegpt-conversations:{sg}"
    a = load_conversations(name, counting, 10, 1000, cache_dir=tmp_path / "c", tokenizer_id="t")
    n = len(calls)
    b = load_conversations(name, counting, 10, 1000, cache_dir=tmp_path / "c", tokenizer_id="t")
    assert len(calls) == n and b == a  # from the cache, the same conversations
    for change in ({"min_turns": 1}, {"tokenizer_id": "other"}, {"seed": 1}):
        before = len(calls)
        load_conversations(name, counting, 10, 1000, cache_dir=tmp_path / "c", **{"tokenizer_id": "t", **change})
        assert len(calls) > before, change
    before = len(calls)
    load_conversations(name, counting, 10, 999, cache_dir=tmp_path / "c", tokenizer_id="t")
    assert len(calls) > before
    sg.write_text(json.dumps(RECORDS[:1]))  # an edited file is prepared again
    before = len(calls)
    c = load_conversations(name, counting, 10, 1000, cache_dir=tmp_path / "c", tokenizer_id="t")
    assert len(calls) > before and [x.id for x in c.conversations] == ["a"]
    assert c.stats()["turns"] == 3 and c.stats()["conversations"] == 1
    with pytest.raises(ValueError, match="no conversation of 2 or more turns"):
        load_conversations(name, enc, 10, 5, cache_dir=tmp_path / "c")
    with pytest.raises(ValueError, match="closed-loop workload"):
        load("sharegpt-conversations", enc, 10, 1000, cache_dir=tmp_path / "c")
    assert is_conversations(name) and is_conversations("sharegpt-conversations") and not is_conversations("sharegpt")


def convs() -> list[Conversation]:
    return [Conversation("x", [UserTurn("", [1, 2], 3), UserTurn("", [4], 2), UserTurn("", [5, 6, 7], 1)], [NL]),
            Conversation("y", [UserTurn("", [8], 1), UserTurn("", [9, 9], 4)], [NL])]


def test_replay_first_turns_arrive_as_poisson_starts():
    r = ConversationReplay(convs(), start_rate=3.0, think_time_s=2.0, seed=7)
    first = r.first_turns()
    assert [t.arrival for t in first] == list(arrival_times(2, 3.0, 1.0, 7))
    assert [(t.conversation, t.conversation_id, t.index, t.prompt_ids, t.max_tokens, t.shared_prefix)
            for t in first] == [(0, "x", 0, [1, 2], 3, 0), (1, "y", 0, [8], 1, 0)]
    assert r.total_turns == 5


def test_replay_next_turn_builds_on_the_produced_reply():
    r = ConversationReplay(convs(), start_rate=1.0, think_time_s=2.0, seed=0)
    t0 = r.first_turns()[0]
    t1 = r.finished(t0, 10.0, [70, 71, 72])
    assert (t1.conversation_id, t1.index, t1.max_tokens) == ("x", 1, 2)
    assert t1.arrival == 10.0 + r.think[0][0] and t1.arrival > 10.0
    assert t1.prompt_ids == [1, 2, 70, 71, 72, NL, 4] and t1.shared_prefix == 5
    t2 = r.finished(t1, 20.0, [80])  # a shorter reply than asked: the prompt carries what came
    assert t2.prompt_ids == [1, 2, 70, 71, 72, NL, 4, 80, NL, 5, 6, 7] and t2.shared_prefix == 8
    assert t2.arrival == 20.0 + r.think[0][1] and t2.max_tokens == 1
    assert r.finished(t2, 30.0, [90]) is None  # the conversation is over


def test_replay_think_times_are_seeded_and_exponential():
    many = [Conversation(str(i), [UserTurn("", [1], 1)] * 11, [NL]) for i in range(400)]

    def gaps(seed, think=2.0, order=None):
        r = ConversationReplay(many, 5.0, think, seed)
        firsts = r.first_turns()
        idx = order or range(len(firsts))
        return {i: r.finished(firsts[i], 100.0, [3]).arrival - 100.0 for i in idx}

    a = gaps(0)
    assert a == gaps(0, order=list(reversed(range(400))))  # whatever order turns finish in
    assert a != gaps(1)
    r = ConversationReplay(many, 5.0, 2.0, 0)
    all_gaps = np.concatenate(r.think)
    assert len(all_gaps) == 4000 and all_gaps.min() >= 0
    assert 1.9 < all_gaps.mean() < 2.1 and 1.9 < all_gaps.std() < 2.1  # exponential: std = mean
    assert set(gaps(0, think=0.0).values()) == {0.0}
    with pytest.raises(ValueError, match="think time"):
        ConversationReplay(many, 5.0, -1.0)


def test_packaged_sharegpt_conversations():
    from distllm_jax.tokenizer import bundled_gpt2

    tok = bundled_gpt2()
    gpt2 = lambda s: tok.encode(s).ids  # noqa: E731
    cs = sharegpt_conversations(gpt2, 60, 2048, seed=0)
    s = cs.stats()
    print(s)
    assert s["conversations"] == 60 and s["source_records"] > 15000 and s["context_max"] <= 2048
    assert all(len(c.turns) >= 2 for c in cs.conversations) and s["turns_mean"] > 2.5  # multi-turn, not pairs
    assert cs.conversations[0].separator == gpt2("\n")
    assert [c.id for c in sharegpt_conversations(gpt2, 20, 2048, seed=0).conversations] == \
        [c.id for c in cs.conversations[:20]]
