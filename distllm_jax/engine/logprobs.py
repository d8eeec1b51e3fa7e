"""Log-probabilities of tokens, computed on the device for the rows that ask, read on the host.

Two programs, each run only when a row of the step asks (a batch without logprob requests pays
nothing, as with sampling):

- :func:`row_logprobs`: for the sampled token of each picked logits row, its log-probability and
  the :data:`~distllm_jax.engine.sampling.MAX_LOGPROBS` most likely tokens with theirs.
- :func:`prompt_logprobs`: the same for prompt tokens: the head is applied to the hidden states of
  the picked prompt positions (each predicts the token after it), which the step keeps on the device.

Values are the log-softmax of the float32 logits before temperature and top-k/top-p. Only the
picked rows' ``[rows, MAX_LOGPROBS]`` results cross to the host, never a vocabulary-wide row.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from distllm_jax.engine.sampling import MAX_LOGPROBS
from distllm_jax.models import decoder
from distllm_jax.models.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    """A token's log-probability and the most likely tokens at its position (best first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class LogprobArrays(NamedTuple):
    """On the device: per picked row, the chosen token's log-probability [P] and the top
    ``MAX_LOGPROBS`` log-probabilities [P, K] with their token ids [P, K]."""

    chosen: jax.Array
    top_values: jax.Array
    top_ids: jax.Array


def _logprobs(logits: jax.Array, targets: jax.Array) -> LogprobArrays:
    lp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    chosen = jnp.take_along_axis(lp, targets[:, None], axis=-1)[:, 0]
    values, ids = jax.lax.top_k(lp, MAX_LOGPROBS)
    return LogprobArrays(chosen, values, ids.astype(jnp.int32))


def row_logprobs(logits: jax.Array, ids: jax.Array, picks: jax.Array) -> LogprobArrays:
    """``logits`` [R, V], the step's sampled ``ids`` (at least R of them), ``picks`` [P] row indices
    (padding past R reads the last row and is ignored)."""
    at = jnp.minimum(picks, logits.shape[0] - 1)
    return _logprobs(logits[at], ids[at])


def prompt_logprobs(params: dict, hidden: jax.Array, rows: jax.Array, targets: jax.Array, *,
                    cfg: ModelConfig) -> LogprobArrays:
    """``hidden`` [T, D]: the last stage's hidden states of a packed step; ``rows`` [P] the packed
    positions whose next token ``targets`` [P] is scored (padding rows are ignored)."""
    return _logprobs(decoder.final(params, cfg, hidden[rows]), targets)


ROW_LOGPROBS = jax.jit(row_logprobs)
PROMPT_LOGPROBS = jax.jit(prompt_logprobs, static_argnames=("cfg",))
