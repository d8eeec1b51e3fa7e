"""Log-probabilities in OpenAI's two shapes, from the engine's :class:`TokenLogprob` lists.

- ``/v1/completions`` (legacy): ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``, one
  entry per token; an echoed prompt's first token has ``null`` log-probability and alternatives.
  ``top_logprobs`` maps each alternative's text to its log-probability and, as vLLM does, also holds
  the chosen token, so a client can tell whether it was the most likely one.
- ``/v1/chat/completions``: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [...]}]}``.

Token text is the tokenizer's decoding of the one token; a server without a tokenizer names tokens
``token_id:<id>`` (vLLM's form for the same case). A token can be part of a UTF-8 character (its text
is then U+FFFD); the chat shape's ``bytes`` are the token's own bytes, read from a byte-level or
byte-fallback vocabulary, so a client can join them into the exact text. The legacy shape has no
bytes, so there such a token is named by them, ``bytes:\\xe2\\x80`` (as vLLM names it): distinct
tokens keep distinct keys in ``top_logprobs``.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, Sequence

from distllm_jax.engine.logprobs import TokenLogprob

TokenText = Callable[[int], str]


TokenBytes = Callable[[int], bytes]


def token_text(tokenizer: Any) -> TokenText:
    if tokenizer is None:
        return lambda t: f"token_id:{t}"
    return lambda t: tokenizer.decode([t], skip_special_tokens=False)


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (GPT-2's): printable Latin-1 bytes stand for themselves, every
    other byte for the code point 256 + its rank among them; inverted, character -> byte."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    chars = {b: chr(b) for b in printable}
    rest = [b for b in range(256) if b not in chars]
    chars.update({b: chr(256 + i) for i, b in enumerate(rest)})
    return {c: b for b, c in chars.items()}


_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def token_bytes(tokenizer: Any) -> TokenBytes:
    """A token's own bytes: through the byte-level alphabet when the vocabulary is byte-level, from a
    ``<0xNN>`` byte-fallback piece, else the UTF-8 of its text."""
    text = token_text(tokenizer)
    if tokenizer is None:
        return lambda t: text(t).encode()
    byte_level = type(tokenizer.decoder).__name__ == "ByteLevel"
    alphabet = _byte_level_alphabet()

    def get(t: int) -> bytes:
        piece = tokenizer.id_to_token(t) or ""
        if byte_level and piece and all(c in alphabet for c in piece):
            return bytes(alphabet[c] for c in piece)
        m = _FALLBACK.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else text(t).encode()

    return get


def legacy_text(tokenizer: Any) -> TokenText:
    """Token text for the legacy shape: its text, or ``bytes:...`` for part of a character."""
    text, raw = token_text(tokenizer), token_bytes(tokenizer)

    def get(t: int) -> str:
        s = text(t)
        return s if "\ufffd" not in s else "bytes:" + "".join(f"\\x{b:02x}" for b in raw(t))

    return get


def completion_logprobs(tokens: Sequence[int], lps: Sequence[TokenLogprob | None], text: TokenText,
                        offset: int = 0) -> dict:
    """The legacy shape for ``tokens`` and their ``lps`` (None: an echoed prompt's first token, which
    nothing predicts), text offsets counted from ``offset`` characters."""
    names: list[str] = []
    values: list[float | None] = []
    tops: list[dict[str, float] | None] = []
    offsets: list[int] = []
    for tid, lp in zip(tokens, lps):
        s = text(tid)
        names.append(s)
        offsets.append(offset)
        offset += len(s)
        if lp is None:
            values.append(None)
            tops.append(None)
            continue
        values.append(lp.logprob)
        top = {text(t): v for t, v in lp.top}
        top.setdefault(s, lp.logprob)
        tops.append(top)
    return {"tokens": names, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def chat_logprobs(lps: Sequence[TokenLogprob], text: TokenText, raw: TokenBytes) -> dict:
    """The chat shape: each token with its log-probability, its bytes and its alternatives."""
    def entry(t: int, v: float) -> dict:
        return {"token": text(t), "logprob": v, "bytes": list(raw(t))}

    return {"content": [{**entry(lp.token, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in lps]}
