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


def _row_keys(sb: SamplingBatch) -> jax.Array:
    return jax.vmap(lambda s, n, pos: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(s), n), pos))(
        sb.seed, sb.sample, sb.position)


SEARCH_WAYS = 16  # thresholds tried per pass of sample_threshold's search
SEARCH_PASSES = 9  # enough to pin any float32 in [0, 1] to one value: 2**30 values, /16 a pass, rounded up
DRAW_BLOCK = 1024  # vocabulary entries a block of sample_threshold's two-level inverse CDF


def _above(bits: jax.Array, probs: jax.Array, cand: jax.Array) -> tuple[jax.Array, jax.Array]:
    """For each row's candidate thresholds ``cand`` [B, C]: how many tokens lie strictly above each,
    and their mass. One variadic reduction over the vocabulary, so each row is read once for all
    ``2 C`` sums (a broadcast ``[B, V, C]`` comparison reduced over V made XLA stream the rows
    once a candidate, or materialise the comparison)."""
    ops, inits = [], []
    for j in range(cand.shape[1]):
        above = bits > cand[:, j:j + 1]
        ops += [above.astype(jnp.int32), jnp.where(above, probs, 0.0)]
        inits += [np.int32(0), np.float32(0)]
    sums = jax.lax.reduce(tuple(ops), tuple(inits), lambda a, b: tuple(x + y for x, y in zip(a, b)), (1,))
    return jnp.stack(sums[0::2], axis=-1), jnp.stack(sums[1::2], axis=-1)


def _draw_from(weights: jax.Array, u: jax.Array) -> jax.Array:
    """Inverse CDF of each row of ``weights`` [B, V] (>= 0, some > 0) at ``u`` [B] in [0, 1), in two
    levels: block masses, then the one block the draw falls in. A cumulative sum over the whole
    vocabulary is a scan of log2(V) passes on a GPU; this reads the row once."""
    B, V = weights.shape
    nb = -(-V // DRAW_BLOCK)
    blocks = jnp.pad(weights, ((0, 0), (0, nb * DRAW_BLOCK - V))).reshape(B, nb, DRAW_BLOCK)
    cdf = jnp.cumsum(blocks.sum(axis=-1), axis=-1)  # [B, nb]
    target = u * cdf[:, -1]
    blk = jnp.minimum(jnp.sum(cdf <= target[:, None], axis=-1), nb - 1)
    before = jnp.where(blk > 0, jnp.take_along_axis(cdf, jnp.maximum(blk - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    row = jnp.take_along_axis(blocks, blk[:, None, None], axis=1)[:, 0]  # [B, DRAW_BLOCK]
    idx = jnp.sum(before[:, None] + jnp.cumsum(row, axis=-1) <= target[:, None], axis=-1)
    # rounding can carry the target past the block's last weighted entry: stop at that entry
    last = DRAW_BLOCK - 1 - jnp.argmax((row > 0)[:, ::-1], axis=-1)
    return blk * DRAW_BLOCK + jnp.minimum(idx, last)


def sample_threshold(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Top-k / top-p sampling through a threshold found by a search of fixed length, without a sort
    and without a loop whose length depends on the data (nothing for a GPU to wait on its host for).

    A token is in the row's set exactly when fewer than k tokens are more likely and their mass is
    below p (the definition :func:`sample_rejection` keeps too). Both conditions only get easier
    as the token gets more likely, so the set is every token at or above one probability: the
    smallest value ``x`` with fewer than k tokens, and less than p of mass, strictly above ``x``.
    The search runs over the bit patterns of the float32 probabilities (ordered as the values are,
    for values >= 0), trying :data:`SEARCH_WAYS` thresholds a pass, each pass one read of the row
    (:func:`_above`), so after :data:`SEARCH_PASSES` passes it has the exact value. A draw from
    the set is one uniform number a row through the set's inverse CDF (:func:`_draw_from`).
    """
    B, V = logits.shape
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)
    probs = jax.nn.softmax(logits / temp[:, None], axis=-1)
    bits = jax.lax.bitcast_convert_type(probs, jnp.int32)
    k = jnp.where(sb.top_k > 0, sb.top_k, V)
    top_p = jnp.where(sb.top_p >= 1.0, jnp.inf, sb.top_p)  # 1: every token (a float sum may fall short of 1)
    ways = jnp.arange(1, SEARCH_WAYS, dtype=jnp.int32)
    # the condition fails at lo (every token, V of them, is above it; k <= V) and holds at hi (none is)
    lo = jnp.full((B,), -1, jnp.int32)
    hi = jnp.max(bits, axis=-1)
    for _ in range(SEARCH_PASSES):
        step = (hi - lo) // SEARCH_WAYS + 1
        cand = jnp.minimum(lo[:, None] + step[:, None] * ways, hi[:, None])  # [B, ways - 1]
        count, mass = _above(bits, probs, cand)
        ok = (count < k[:, None]) & (mass < top_p[:, None])
        lo = jnp.max(jnp.where(ok, lo[:, None], cand), axis=-1)
        hi = jnp.min(jnp.where(ok, cand, hi[:, None]), axis=-1)
    u = jax.vmap(lambda key: jax.random.uniform(key, (), probs.dtype))(_row_keys(sb))
    tok = _draw_from(jnp.where(bits >= hi[:, None], probs, 0.0), u)
    return tok.astype(jnp.int32)


def sample_rejection(logits: jax.Array, sb: SamplingBatch) -> jax.Array:
    """Top-k / top-p sampling by rejection, without sorting the vocabulary (as FlashInfer samples).

    A row draws a token from its distribution restricted to the tokens above a pivot (all of them at
    first). The token is kept when it is inside the row's top-k and top-p set: fewer than k tokens
    are more likely and their mass is below p. Otherwise no token as likely or less can be inside
    either, so the pivot moves up to it and the row draws again from what is left. The set is the
    top of the order, so every candidate set contains it, and each draw is proportional to the
    probabilities: what is kept has exactly the top-k/top-p distribution. A draw removes at least the
    rejected token, so the loop ends; a typical top-p row keeps its first or second draw. Each round
    costs a few passes over the vocabulary and one random number a row; a full sort costs far more.
    Greedy rows are never drawn for. The loop's rounds depend on the draws: a device that returns
    to its host to test a loop's condition (a GPU) stalls the host for each round, so there
    :func:`sample_threshold` is used instead.
    """
    B, V = logits.shape
    temp = jnp.where(sb.temperature > 0, sb.temperature, 1.0)
    scaled = logits / temp[:, None]
    probs = jax.nn.softmax(scaled, axis=-1)
    k = jnp.where(sb.top_k > 0, sb.top_k, V)
    base = _row_keys(sb)

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


SAMPLERS = {"threshold": sample_threshold, "rejection": sample_rejection}


def sampler_for(backend: str) -> str:
    """The fastest exact sampler on a backend: the fixed-length search on a GPU (whose while loops
    return to the host at every round), rejection elsewhere (a CPU loops without leaving the device,
    and most rows end in one or two rounds, where the search always makes all its passes)."""
    return "threshold" if backend == "gpu" else "rejection"


def sample(logits: jax.Array, sb: SamplingBatch, method: str | None = None) -> jax.Array:
    """logits [B, V] (float32) -> token ids [B] int32; rows with temperature 0 stay greedy.
    ``method``: a key of :data:`SAMPLERS` (default: :func:`sampler_for` this backend); both draw
    from the same distribution.

    The engine runs this only for batches where some row samples: all-greedy batches use the argmax
    fused into the step and never pay for the draws.
    """
    draw = SAMPLERS[method or sampler_for(jax.default_backend())]
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jnp.where(sb.temperature > 0, draw(logits, sb), greedy)
