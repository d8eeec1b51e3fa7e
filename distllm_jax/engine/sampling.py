"""Token sampling on the device: greedy, temperature, top-k, top-p, with per-request seeds.

Per-row parameters are arrays, so one compiled program serves any mix of requests. Randomness comes
from ``fold_in(fold_in(PRNGKey(seed), sample), position)``: a draw depends only on the request's
seed, which of its ``n`` samples it is, and the position of the token, never on which other
requests share the batch — same seed, same outputs, and ``n`` samples that differ from each other.
Only the sampled ids (and the log-probabilities a request asks for) leave the device.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np


MAX_LOGPROBS = 20  # alternatives a token's log-probability can come with (OpenAI's limit)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """What a request asks for. ``temperature == 0`` means greedy; ``top_k == 0`` and
    ``top_p == 1`` switch those filters off. Stop conditions are applied on the host.

    ``n``: completions of the one prompt; they share its prefill and its full KV pages.
    ``logprobs``: for each sampled token, its log-probability and the ``logprobs`` most likely
    alternatives (0 gives the token's own only); ``prompt_logprobs`` the same for every prompt token
    after the first. Both are the log-softmax of the raw logits, before temperature and top-k/top-p
    (as vLLM reports them). ``max_tokens == 0`` generates nothing and is only useful with
    ``prompt_logprobs`` (an ``echo`` that scores a prompt).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    n: int = 1
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 0 or (self.max_tokens == 0 and self.prompt_logprobs is None):
            raise ValueError(f"max_tokens must be >= 1 (0 only with prompt_logprobs), got {self.max_tokens}")
        if self.n < 1:
            raise ValueError(f"n must be >= 1, got {self.n}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not 0 <= k <= MAX_LOGPROBS:
                raise ValueError(f"{name} must be in [0, {MAX_LOGPROBS}], got {k}")
        if self.seed is not None and not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be in [0, 2**32), got {self.seed}")


class SamplingBatch(NamedTuple):
    temperature: jax.Array  # [B] float32
    top_k: jax.Array  # [B] int32
    top_p: jax.Array  # [B] float32
    seed: jax.Array  # [B] uint32
    position: jax.Array  # [B] int32, position of the token being sampled
    sample: jax.Array  # [B] int32, which of its request's n samples the row draws for


def make_sampling_batch(
    params: Sequence[SamplingParams], positions: Sequence[int], default_seeds: Sequence[int], pad_to: int,
    samples: Sequence[int] | None = None,
) -> SamplingBatch:
    """Host-side packing into numpy (padding rows are greedy); the caller places it on the device that
    samples. ``default_seeds`` fill in for requests without one; ``samples`` (default 0) says which
    of its request's samples each row draws for."""
    t = np.zeros(pad_to, np.float32)
    k = np.zeros(pad_to, np.int32)
    p = np.ones(pad_to, np.float32)
    s = np.zeros(pad_to, np.uint32)
    pos = np.zeros(pad_to, np.int32)
    n = np.zeros(pad_to, np.int32)
    for i, sp in enumerate(params):
        t[i], k[i], p[i] = sp.temperature, sp.top_k, sp.top_p
        s[i] = sp.seed if sp.seed is not None else default_seeds[i]
        pos[i] = positions[i]
        n[i] = samples[i] if samples is not None else 0
    return SamplingBatch(t, k, p, s, pos, n)


def _sample_random(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Top-k / top-p sampling by rejection, without sorting the vocabulary (as FlashInfer samples).

    A row draws a token from its distribution restricted to the tokens above a pivot (all of them at
    first). The token is kept when it is inside the row's top-k and top-p set: fewer than k tokens
    are more likely and their mass is below p. Otherwise no token as likely or less can be inside
    either, so the pivot moves up to it and the row draws again from what is left. The set is the
    top of the order, so every candidate set contains it, and each draw is proportional to the
    probabilities: what is kept has exactly the top-k/top-p distribution. A draw removes at least the
    rejected token, so the loop ends; a typical top-p row keeps its first or second draw. Each round
    costs a few passes over the vocabulary and one random number a row; a full sort costs far more.
    Greedy rows are never drawn for.
    """
    B, V = logits.shape
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)
    scaled = logits / temp[:, None]
    probs = jax.nn.softmax(scaled, axis=-1)
    k = jnp.where(sb.top_k > 0, sb.top_k, V)
    base = jax.vmap(lambda s, n, pos: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), n), pos))(
        sb.seed, sb.sample, sb.position)

    def draw(round_: jax.Array, pivot: jax.Array) -> jax.Array:
        # inverse CDF over the candidates in vocabulary order: one uniform number a row, not a
        # Gumbel draw per token (generating those cost more than the sort on a CPU)
        keys = jax.vmap(lambda key: jax.random.fold_in(key, round_))(base)
        u = jax.vmap(lambda key: jax.random.uniform(key, (), scaled.dtype))(keys)
        cdf = jnp.cumsum(jnp.where(scaled > pivot[:, None], probs, 0.0), axis=-1)
        return jnp.minimum(jnp.sum(cdf <= (u * cdf[:, -1])[:, None], axis=-1), V - 1)

    def check(tok: jax.Array) -> tuple[jax.Array, jax.Array]:
        value = jnp.take_along_axis(scaled, tok[:, None], axis=-1)
        above = scaled > value
        mass = jnp.sum(jnp.where(above, probs, 0.0), axis=-1)
        count = jnp.sum(above, axis=-1)
        inside = ((mass < sb.top_p) | (sb.top_p >= 1.0)) & (count < k)
        return inside, value[:, 0]

    def body(state):
        round_, pivot, tok, done = state
        new = draw(round_, pivot)
        tok = jnp.where(done, tok, new)
        inside, value = check(tok)
        pivot = jnp.where(done | inside, pivot, value)
        return round_ + 1, pivot, tok, done | inside

    start = (jnp.int32(0), jnp.full((B,), -jnp.inf, scaled.dtype), jnp.zeros((B,), jnp.int32), sb.temperature <= 0)
    _, _, tok, _ = jax.lax.while_loop(lambda st: ~jnp.all(st[3]), body, start)
    return tok.astype(jnp.int32)


def sample(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """logits [B, V] (float32) -> token ids [B] int32; rows with temperature 0 stay greedy.

    The engine runs this only for batches where some row samples: all-greedy batches use the argmax
    fused into the step and never pay for the draws.
    """
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(sb.temperature > 0, _sample_random(logits, sb), greedy)
