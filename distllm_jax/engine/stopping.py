"""Host-side end-of-request logic: incremental detokenisation and the stop conditions.

Runs once per generated token on the host (the device only hands over token ids). Text is streamed
in deltas that never split a UTF-8 character and never show a piece of a stop string: text that could
still turn out to start a stop string is held back until it cannot (as vLLM and TGI stream it).
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Callable, Sequence

from distllm_jax.engine.sampling import SamplingParams

Detokenize = Callable[[Sequence[int]], str]


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, a stop token id or a stop string
    LENGTH = "length"  # max_tokens reached (or the model's context)
    CANCELLED = "cancelled"
    DEADLINE = "deadline"
    ERROR = "error"


@dataclasses.dataclass
class Delta:
    """What one token adds to the stream: its id (None when it is a stop token, not output), the
    text that became final, and the finish reason if the request ended here."""

    token: int | None
    text: str
    finished: FinishReason | None = None


class StopChecker:
    """Per-request state: output ids, detokenisation offsets, held-back text."""

    def __init__(self, params: SamplingParams, eos_ids: Sequence[int], detokenize: Detokenize | None):
        self.params = params
        self.eos = frozenset(() if params.ignore_eos else eos_ids)
        self.stop_ids = frozenset(params.stop_token_ids)
        self.detok = detokenize
        self.ids: list[int] = []
        self.text = ""  # all final text so far (emitted + held back)
        self.emitted = 0  # characters of self.text already streamed
        self._prefix = 0
        self._read = 0
        self._hold = max((len(s) for s in params.stop), default=1) - 1
        self.finished: FinishReason | None = None

    def fresh(self) -> "StopChecker":
        """A checker for another sample of the same request (same rules, nothing seen yet)."""
        return StopChecker(self.params, self.eos, self.detok)

    def _decode_step(self) -> str:
        """New complete text for the ids appended since the last call (TGI/vLLM offset scheme)."""
        if self.detok is None:
            return ""
        new = self.detok(self.ids[self._prefix :])
        if new.endswith("\ufffd"):
            return ""  # an incomplete UTF-8 sequence: wait for the next token
        prev = self.detok(self.ids[self._prefix : self._read])
        self._prefix, self._read = self._read, len(self.ids)
        return new[len(prev) :]

    def append(self, token: int) -> Delta:
        if self.finished is not None:
            raise RuntimeError("append after the request finished")
        if token in self.eos or token in self.stop_ids:
            return self._finish(None, FinishReason.STOP)
        self.ids.append(token)
        start = max(0, len(self.text) - self._hold)
        self.text += self._decode_step()
        if self._cut_at_stop(start):
            return self._finish(token, FinishReason.STOP, flush=False)
        if len(self.ids) >= self.params.max_tokens:
            return self._finish(token, FinishReason.LENGTH)
        safe = len(self.text) - self._hold if self.params.stop else len(self.text)
        return Delta(token, self._emit(safe))

    def _cut_at_stop(self, start: int) -> bool:
        """Cut the text at the first stop string found from ``start``; True if one was."""
        for s in self.params.stop:
            at = self.text.find(s, start)
            if at >= 0:
                self.text = self.text[:at]
                return True
        return False

    def _pending(self) -> str:
        """The complete characters that :meth:`_decode_step` holds back while a UTF-8 character is
        incomplete. At the end no later token can complete it, so they are final; only the incomplete
        character itself is dropped."""
        if self.detok is None or self._read >= len(self.ids):
            return ""
        new = self.detok(self.ids[self._prefix :])
        prev = self.detok(self.ids[self._prefix : self._read])
        self._prefix = self._read = len(self.ids)
        return new[len(prev) :].rstrip("\ufffd")

    def end(self, reason: FinishReason) -> Delta:
        """End from outside (cancellation, deadline, error, context limit): flush what is final."""
        return self._finish(None, reason)

    def _emit(self, upto: int) -> str:
        upto = max(upto, self.emitted)
        out = self.text[self.emitted : upto]
        self.emitted = upto
        return out

    def _finish(self, token: int | None, reason: FinishReason, flush: bool = True) -> Delta:
        if flush:
            start = max(0, len(self.text) - self._hold)
            self.text += self._pending()
            if self._cut_at_stop(start):
                reason = FinishReason.STOP
        self.finished = reason
        return Delta(token, self._emit(len(self.text)), reason)
