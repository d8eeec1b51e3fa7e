"""Multi-turn chat: ShareGPT conversations, replayed turn by turn in a closed loop.

Every turn of a chat resends the whole conversation so far, which is what a prefix cache reuses; a
replay of first turns alone (``sharegpt``) never shows it anything to reuse. A turn cannot be sent
before the reply it builds on has come back, so the replay is closed-loop: :class:`ConversationReplay`
says what to send next once a turn has finished, and a driver (``bench``) does the sending and keeps
the clock. Everything here is pure: no clock, no device, no server.

Turns (rule of :func:`turn_pairs`). A ShareGPT record is a list of ``{"from", "value"}`` messages.
Messages before the first ``human`` one are dropped (ShareGPT V3 splits long chats, so about a third
of its records open with the reply to a message they do not hold, a few with a ``system`` message).
From there the roles must alternate ``human``, ``gpt``, ``human``, ...; a last ``human`` message with
no reply is dropped, and a record that breaks the alternation (two messages of one side in a row, or
another role) is skipped whole: its turns would not be one user talking to one assistant.

Prompts (rule of :meth:`Conversation.appended`). Turn ``k``'s prompt is turn ``k - 1``'s prompt, the
reply the server produced for it, a newline, and message ``k``: plain concatenation of token ids,
with the newline's ids as the only separator. What the tokenizer puts before every text (its BOS,
``encode("")``) starts the first message only. Replies are asked for at the dataset reply's length
(drivers send ``ignore_eos``), so the lengths are the dataset's and the text is the server's own.
"""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path
from typing import Sequence

import numpy as np

from distllm_jax.workload.arrivals import arrival_times
from distllm_jax.workload.datasets import Encode, cache_file, iter_json_array, sharegpt_path

DATASET = "sharegpt-conversations"
SEPARATOR = "\n"  # between a reply and the next user message


@dataclasses.dataclass
class UserTurn:
    """One user message of a conversation and how long the dataset's reply to it is."""

    text: str
    ids: list[int]  # the message's token ids (the tokenizer's BOS, if any, on the first message only)
    reply_len: int  # tokens to ask the server for: the dataset reply's length


@dataclasses.dataclass
class Conversation:
    id: str
    turns: list[UserTurn]
    separator: list[int]  # ids joining a reply to the next message

    def appended(self, k: int) -> list[int]:
        """The ids turn ``k`` adds after the previous reply: the separator (after the first turn)
        and the user's message."""
        return list(self.turns[k].ids) if k == 0 else [*self.separator, *self.turns[k].ids]

    @property
    def context_len(self) -> int:
        """Tokens the whole conversation holds once its last reply has come, replies at their lengths."""
        return sum(len(self.appended(k)) + t.reply_len for k, t in enumerate(self.turns))


@dataclasses.dataclass
class ConversationSet:
    name: str
    conversations: list[Conversation]
    source_records: int  # records read from the source before pairing and cuts

    def stats(self) -> dict:
        turns = [t for c in self.conversations for t in c.turns]
        per = np.array([len(c.turns) for c in self.conversations])
        ctx = np.array([c.context_len for c in self.conversations])
        return {"dataset": self.name, "conversations": len(self.conversations), "turns": len(turns),
                "source_records": self.source_records, "turns_mean": float(per.mean()), "turns_max": int(per.max()),
                "message_mean": float(np.mean([len(t.ids) for t in turns])),
                "reply_mean": float(np.mean([t.reply_len for t in turns])),
                "context_mean": float(ctx.mean()), "context_max": int(ctx.max())}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ConversationSet":
        convs = [Conversation(c["id"], [UserTurn(**t) for t in c["turns"]], c["separator"])
                 for c in d["conversations"]]
        return cls(d["name"], convs, d["source_records"])


def turn_pairs(messages: Sequence[dict]) -> list[tuple[str, str]] | None:
    """A ShareGPT record's (user message, reply) pairs in order; None when its messages, from the
    first ``human`` one on, do not alternate ``human``/``gpt`` (the module docstring's rule)."""
    start = next((i for i, m in enumerate(messages) if m.get("from") == "human"), len(messages))
    rest = messages[start:]
    if any(m.get("from") != ("human", "gpt")[i % 2] for i, m in enumerate(rest)):
        return None
    return [(h.get("value") or "", g.get("value") or "") for h, g in zip(rest[0::2], rest[1::2])]


def _after(ids: Sequence[int], lead: Sequence[int]) -> list[int]:
    """``ids`` without the tokenizer's leading ids (its BOS) when they start with them."""
    ids = list(ids)
    return ids[len(lead):] if lead and ids[:len(lead)] == list(lead) else ids


def conversation(cid: str, pairs: Sequence[tuple[str, str]], encode: Encode, max_len: int) -> Conversation:
    """The pairs tokenised, cut before the first turn that would take the conversation past
    ``max_len`` (every message, separator and reply up to that turn's reply) or whose message or reply
    is empty (nothing to send, or nothing to ask for)."""
    lead = list(encode(""))
    conv = Conversation(cid, [], _after(encode(SEPARATOR), lead))
    used = 0
    for text, reply in pairs:
        ids = list(encode(text)) if not conv.turns else _after(encode(text), lead)
        out = len(_after(encode(reply), lead))
        add = len(ids) + (len(conv.separator) if conv.turns else 0) + out
        if not ids or out < 1 or used + add > max_len:
            break
        conv.turns.append(UserTurn(text, ids, out))
        used += add
    return conv


def sharegpt_conversations(encode: Encode, n: int, max_len: int, seed: int = 0, path: Path | None = None,
                           min_turns: int = 2) -> ConversationSet:
    """``n`` conversations of at least ``min_turns`` turns each that fit ``max_len`` (cut as
    :func:`conversation` cuts), from the complete leading records of a ShareGPT-format file (the
    packaged one by default, which is truncated upstream). The records are shuffled with
    ``random.Random(seed)`` and taken in that order, so a seed draws the same conversations whatever
    ``n`` is (a smaller ``n`` draws a prefix of a larger one's); fewer come back when fewer qualify."""
    candidates, read = [], 0
    for rec in iter_json_array(path or sharegpt_path()):
        pairs = turn_pairs(rec.get("conversations") or [])
        if pairs is not None and len(pairs) >= min_turns:
            candidates.append((str(rec.get("id", read)), pairs))
        read += 1
    random.Random(seed).shuffle(candidates)
    out: list[Conversation] = []
    for cid, pairs in candidates:
        if len(out) == n:
            break
        conv = conversation(cid, pairs, encode, max_len)
        if len(conv.turns) >= min_turns:
            out.append(conv)
    return ConversationSet(DATASET if path is None else f"{DATASET}:{path}", out, read)


def is_conversations(name: str) -> bool:
    """Whether dataset ``name`` is a conversation workload (``sharegpt-conversations[:PATH]``)."""
    return name.split(":", 1)[0] == DATASET


def load_conversations(name: str, encode: Encode, n: int, max_len: int, seed: int = 0,
                       cache_dir: Path | None = None, tokenizer_id: str = "", min_turns: int = 2) -> ConversationSet:
    """Prepared conversations of ``sharegpt-conversations`` (the packaged ShareGPT file) or
    ``sharegpt-conversations:PATH``, from the cache when the same inputs were prepared before (a user
    file's size and modification time count as inputs: an edited file is prepared again)."""
    if not is_conversations(name):
        raise ValueError(f"{name!r} is not {DATASET} or {DATASET}:PATH")
    path = Path(name.split(":", 1)[1]) if ":" in name else None
    stamp = None if path is None else [str(path.resolve()), path.stat().st_size, path.stat().st_mtime_ns]
    cache = cache_file("conversations", name, [name, n, max_len, seed, tokenizer_id, min_turns, stamp, SEPARATOR],
                       cache_dir)
    if cache.exists():
        return ConversationSet.from_dict(json.loads(cache.read_text()))
    cs = sharegpt_conversations(encode, n, max_len, seed, path, min_turns)
    if not cs.conversations:
        raise ValueError(f"{name}: no conversation of {min_turns} or more turns fits the server's context "
                         f"of {max_len} tokens")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(cs.to_dict()))
    return cs


@dataclasses.dataclass
class Turn:
    """One request of a conversation replay: when to send it and what."""

    conversation: int  # index into the replay's conversations
    conversation_id: str
    index: int  # the turn's place in its conversation, from 0
    arrival: float  # seconds from the run's start
    prompt_ids: list[int]
    max_tokens: int
    shared_prefix: int  # leading prompt tokens that are the previous turn's prompt and reply: the best-case cache hit


class ConversationReplay:
    """The closed loop's rules, without its clock: first turns start as Poisson arrivals (gamma with
    ``burstiness``, as :func:`arrival_times` draws them) at ``start_rate`` conversations per second;
    each next turn arrives when the previous turn's reply has ended plus a think time, exponential
    with mean ``think_time_s``. Think times are drawn up front per (conversation, turn) from ``seed``,
    so they do not depend on the order in which turns finish."""

    def __init__(self, conversations: Sequence[Conversation], start_rate: float, think_time_s: float,
                 seed: int = 0, burstiness: float = 1.0):
        if think_time_s < 0:
            raise ValueError(f"think time must be >= 0, got {think_time_s}")
        self.conversations = list(conversations)
        self.starts = arrival_times(len(self.conversations), start_rate, burstiness, seed)
        rng = np.random.default_rng([1, seed])  # a stream apart from the arrivals' (default_rng(seed))
        self.think = [rng.exponential(think_time_s, max(0, len(c.turns) - 1)) for c in self.conversations]

    @property
    def total_turns(self) -> int:
        return sum(len(c.turns) for c in self.conversations)

    def first_turns(self) -> list[Turn]:
        """Every conversation's first turn, at its start time."""
        return [Turn(i, c.id, 0, float(self.starts[i]), c.appended(0), c.turns[0].reply_len, 0)
                for i, c in enumerate(self.conversations)]

    def finished(self, turn: Turn, end_time: float, output_ids: Sequence[int]) -> Turn | None:
        """The conversation's next turn once ``turn``'s reply (``output_ids``, what the server
        produced) ended at ``end_time`` (seconds from the run's start); None after its last turn."""
        conv = self.conversations[turn.conversation]
        k = turn.index + 1
        if k >= len(conv.turns):
            return None
        history = [*turn.prompt_ids, *output_ids]
        return Turn(turn.conversation, conv.id, k, end_time + float(self.think[turn.conversation][k - 1]),
                    history + conv.appended(k), conv.turns[k].reply_len, len(history))
