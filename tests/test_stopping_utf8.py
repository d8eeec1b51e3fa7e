"""Output that ends inside a UTF-8 character keeps the complete characters decoded before it."""

from __future__ import annotations

import pytest

from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import FinishReason, StopChecker

# token -> bytes; token 1 ends with the first byte of the three-byte "€" (e2 82 ac)
PIECES = {1: b"ab\xe2", 2: b"\x82", 3: b"\xac", 4: b"!"}
EOS = 0


def detok(ids):
    return b"".join(PIECES[i] for i in ids).decode("utf-8", errors="replace")


def run(tokens, **params):
    sc = StopChecker(SamplingParams(**{"max_tokens": 100, **params}), eos_ids=[EOS], detokenize=detok)
    deltas = []
    for t in tokens:
        deltas.append(sc.append(t))
        if deltas[-1].finished:
            break
    return "".join(d.text for d in deltas), deltas[-1].finished


@pytest.mark.parametrize("tokens,params,text,reason", [
    ([1], dict(max_tokens=1), "ab", FinishReason.LENGTH),  # max_tokens inside the character
    ([1, 2], dict(max_tokens=2), "ab", FinishReason.LENGTH),
    ([1, 2, EOS], {}, "ab", FinishReason.STOP),  # EOS inside the character
    ([1, 2, 3, 4], dict(max_tokens=4), "ab€!", FinishReason.LENGTH),  # completed: all of it
    ([1], dict(max_tokens=1, stop=["b"]), "a", FinishReason.STOP),  # a stop string in the held text
])
def test_held_back_complete_characters_are_kept(tokens, params, text, reason):
    assert run(tokens, **params) == (text, reason)


def test_end_from_outside_flushes_complete_characters():
    sc = StopChecker(SamplingParams(max_tokens=100), eos_ids=[EOS], detokenize=detok)
    assert sc.append(1).text == ""  # held: the character is incomplete
    d = sc.end(FinishReason.CANCELLED)
    assert (d.text, d.finished) == ("ab", FinishReason.CANCELLED)
