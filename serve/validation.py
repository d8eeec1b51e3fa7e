"""Turns a request into engine inputs, or says exactly which field is wrong and why.

Both frontends hand over a :class:`GenerationRequest`, the request in neutral terms (the gRPC
handler from its protobuf message, the OpenAI handlers from their JSON), so every check is written
once. Every check the engine would make is made here first, so a bad request ends with a 400 /
INVALID_ARGUMENT naming its field instead of an engine error.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
from typing import Any

from distllm_jax.engine import SamplingParams
from distllm_jax.engine.sampling import MAX_LOGPROBS
from serve.v1 import distllm_pb2 as pb

@dataclasses.dataclass(frozen=True)
class GenerationRequest:
    """One generation request as either frontend received it. ``prompt``: text, token ids, or None
    when none was given; a field left None was not set (its default may depend on the prompt)."""

    prompt: str | list[int] | None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    request_id: str | None = None
    n: int = 1
    logprobs: int | None = None  # alternatives per sampled token (None: no log-probabilities)
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (an echo)

    @classmethod
    def from_proto(cls, req: pb.GenerateRequest) -> "GenerationRequest":
        """The fields a client set, as set (an explicit ``n = 0`` stays 0, so it is refused by name
        rather than read as the default); unset ones stay None, or 1 for ``n``."""
        which = req.WhichOneof("prompt")
        opt = lambda name: getattr(req, name) if req.HasField(name) else None  # noqa: E731
        return cls(prompt=None if which is None else req.text if which == "text" else list(req.token_ids.ids),
                   max_tokens=opt("max_tokens"), temperature=opt("temperature"), top_p=opt("top_p"),
                   top_k=opt("top_k"), seed=opt("seed"), stop=tuple(req.stop),
                   stop_token_ids=tuple(req.stop_token_ids), ignore_eos=req.ignore_eos,
                   request_id=req.request_id or None, n=req.n if req.HasField("n") else 1,
                   logprobs=opt("logprobs"), prompt_logprobs=opt("prompt_logprobs"))


MAX_STOP_STRINGS = 16
MAX_STOP_LEN = 256


class InvalidArgument(ValueError):
    def __init__(self, field: str, why: str):
        super().__init__(f"{field}: {why}")
        self.field = field


@dataclasses.dataclass(frozen=True)
class Limits:
    max_seq_len: int
    vocab_size: int
    max_tokens_default: int = 16
    max_prompt_chars: int | None = None  # None: no tokenizer, text is refused anyway
    max_n: int = 1  # samples a request may ask for (the server's --max-n, within the engine's batches)

    @classmethod
    def for_engine(cls, engine: Any, tokenizer: Any, max_n: int = 8) -> "Limits":
        rows = min(engine.config.max_prefill_seqs, engine.config.max_decode_batch)
        return cls(max_seq_len=engine.max_len, vocab_size=engine.model.vocab_size,
                   max_prompt_chars=max_text_chars(tokenizer, engine.max_len), max_n=max(1, min(max_n, rows)))


def max_text_chars(tokenizer: Any, max_seq_len: int) -> int | None:
    """The longest text that could still fit the context: every token spells at most as many
    characters as the longest entry of the vocabulary, so a longer text needs more tokens than the
    context holds. Checking this before tokenising keeps a megabyte prompt from costing seconds of
    tokenizer time only to be refused."""
    if tokenizer is None:
        return None
    longest = max(map(len, tokenizer.get_vocab(with_added_tokens=True)), default=1)
    return max_seq_len * max(1, longest)


def check_text(field: str, text: str, limits: Limits) -> None:
    """Cheap checks on text before it reaches the tokenizer (length, valid UTF-8)."""
    if limits.max_prompt_chars is not None and len(text) > limits.max_prompt_chars:
        raise InvalidArgument(field, f"text of {len(text)} characters cannot fit the context of "
                                     f"{limits.max_seq_len} tokens (at most {limits.max_prompt_chars} characters)")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidArgument(field, f"not valid Unicode text ({e.reason} at character {e.start})") from None


async def encode(tokenizer: Any, text: str, add_special_tokens: bool = True) -> Any:
    """Tokenise on a worker thread: ``encode_batch`` releases the GIL (``encode`` holds it), so
    running streams keep their pace while a long prompt is tokenised."""
    loop = asyncio.get_running_loop()
    return (await loop.run_in_executor(None, tokenizer.encode_batch, [text], False, add_special_tokens))[0]


def unknown_fields(msg) -> list[int]:
    """Field numbers present on the wire but not in the schema (a client built for another API)."""
    from google.protobuf import unknown_fields as uf

    out = [f.field_number for f in uf.UnknownFieldSet(msg)]
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        repeated = fd.is_repeated if hasattr(fd, "is_repeated") else fd.label == fd.LABEL_REPEATED
        for sub in value if repeated else [value]:
            out += unknown_fields(sub)
    return out


def parse(raw: bytes, cls):
    from google.protobuf.message import DecodeError

    msg = cls()
    try:
        msg.ParseFromString(raw)
    except DecodeError as e:
        raise InvalidArgument("request", f"not a valid {cls.DESCRIPTOR.full_name} message ({e})") from None
    bad = unknown_fields(msg)
    if bad:
        raise InvalidArgument("request", f"unknown field number(s) {sorted(set(bad))} for {cls.DESCRIPTOR.full_name}")
    return msg


def sampling_params(req: GenerationRequest, limits: Limits, prompt_len: int) -> SamplingParams:
    """``max_tokens`` must fit what the context leaves after the prompt (a 400/INVALID_ARGUMENT
    saying the limit, rather than output cut short without a word); left unset it defaults to
    ``limits.max_tokens_default``, shortened to what is left."""
    room = limits.max_seq_len - prompt_len
    if req.max_tokens is not None:
        max_tokens = req.max_tokens
        low = 0 if req.prompt_logprobs is not None else 1  # 0: score the prompt only (an echo)
        if not low <= max_tokens <= room:
            raise InvalidArgument("max_tokens", f"must be in [{low}, {room}] (the context of {limits.max_seq_len} "
                                                f"tokens less the prompt's {prompt_len}), got {max_tokens}")
    else:
        max_tokens = min(limits.max_tokens_default, room)
    temperature = req.temperature if req.temperature is not None else 0.0
    if not (math.isfinite(temperature) and 0.0 <= temperature <= 100.0):
        raise InvalidArgument("temperature", f"must be in [0, 100], got {temperature}")
    top_p = req.top_p if req.top_p is not None else 1.0
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise InvalidArgument("top_p", f"must be in (0, 1], got {top_p}")
    top_k = req.top_k if req.top_k is not None else 0
    if not 0 <= top_k <= limits.vocab_size:
        raise InvalidArgument("top_k", f"must be in [0, {limits.vocab_size}], got {top_k}")
    seed = req.seed
    if seed is not None and not 0 <= seed < 2**32:
        raise InvalidArgument("seed", f"must be in [0, 2**32), got {seed}")
    if len(req.stop) > MAX_STOP_STRINGS or any(not s or len(s) > MAX_STOP_LEN for s in req.stop):
        raise InvalidArgument("stop", f"at most {MAX_STOP_STRINGS} non-empty strings of <= {MAX_STOP_LEN} characters")
    for s in req.stop:
        check_text("stop", s, limits)
    bad = [t for t in req.stop_token_ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidArgument("stop_token_ids", f"ids out of range [0, {limits.vocab_size}): {bad[:5]}")
    if not 1 <= req.n <= limits.max_n:
        raise InvalidArgument("n", f"must be in [1, {limits.max_n}] (the server's --max-n), got {req.n}")
    for name in ("logprobs", "prompt_logprobs"):
        k = getattr(req, name)
        if k is not None and not 0 <= k <= MAX_LOGPROBS:
            raise InvalidArgument(name, f"must be in [0, {MAX_LOGPROBS}], got {k}")
    return SamplingParams(
        temperature=float(temperature), top_k=int(top_k), top_p=float(top_p), seed=seed,
        max_tokens=int(max_tokens), stop_token_ids=tuple(int(t) for t in req.stop_token_ids),
        stop=tuple(req.stop), ignore_eos=req.ignore_eos, n=req.n, logprobs=req.logprobs,
        prompt_logprobs=req.prompt_logprobs,
    )


async def prompt_ids(req: GenerationRequest, limits: Limits, tokenizer, add_special_tokens: bool = True) -> list[int]:
    """The prompt's token ids, checked against the vocabulary and the context (text is tokenised
    off the event loop, after :func:`check_text`; without the tokenizer's special tokens for a chat
    template's text, which writes its own)."""
    if req.prompt is None:
        raise InvalidArgument("prompt", "give text or token_ids")
    if isinstance(req.prompt, str):
        if not req.prompt:
            raise InvalidArgument("text", "the prompt is empty")
        if tokenizer is None:
            raise InvalidArgument("text", "this server has no tokenizer; send token_ids")
        check_text("text", req.prompt, limits)
        ids = list((await encode(tokenizer, req.prompt, add_special_tokens)).ids)
        field = "text"
    else:
        ids = list(req.prompt)
        field = "token_ids"
    if not ids:
        raise InvalidArgument(field, "the prompt is empty")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise InvalidArgument(field, f"token ids out of the vocabulary [0, {limits.vocab_size}): {bad[:5]}")
    if len(ids) >= limits.max_seq_len:
        raise InvalidArgument(field, f"prompt of {len(ids)} tokens; the context allows at most {limits.max_seq_len - 1}")
    return ids
