"""The compiled programs of an instance and the host-side packing of their inputs.

One pure function, :func:`stage_step`, covers every program: a step kind (``prefill`` over packed
prompts, ``decode`` over the running batch, ``mixed`` for chunked prefill) run on one pipeline stage.
The first stage embeds; the last applies the head and picks the greedy token (sampling, when a row
asks for it, is one more small program on the logits), so only token ids leave the device.
Inputs are padded to bucketed shapes; padding tokens write into the null page and padding rows are
ignored by the host.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from distllm_jax.engine.logprobs import LogprobArrays, TokenLogprob
from distllm_jax.engine.sampling import SamplingBatch, SamplingParams, make_sampling_batch, sample
from distllm_jax.kv_cache import NULL_PAGE, KVPool
from distllm_jax.models import decoder
from distllm_jax.models.attention import AttentionImpl
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.decoder import DecodeBatch, MixedBatch, PrefillBatch
from distllm_jax.shapes import StepKind, bucket

def stage_step(
    params: dict,
    x: jax.Array | None,
    batch: Any,
    kv: KVPool,
    *,
    kind: StepKind,
    cfg: ModelConfig,
    impl: AttentionImpl,
    first: bool,
    last: bool,
    feed: tuple[jax.Array, jax.Array] | None = None,
) -> tuple[Any, KVPool]:
    """-> (hidden states for the next stage, or on the last stage (greedy ids [rows] int32, float32
    logits [rows, vocab], the hidden states of every token, which prompt log-probabilities are
    computed from); the new pool).

    ``feed`` (decode on a one-stage instance) is ``(previous step's ids [R], src [B])``: a row with
    ``src >= 0`` takes its input token from the previous step's ids, still on the device, instead of
    ``batch.tokens``, so the host can dispatch step k+1 before it has read step k (see
    :meth:`Instance.dispatch_decode`); the greedy ids then come back padded to R rows, the shape the
    next step's feed expects, whatever this step's batch bucket.

    The greedy pick is fused here and sampling is a separate program (:data:`SAMPLE`) that the host
    runs on the logits only when a row asks for it: a data-dependent branch inside the step (the
    ``lax.cond`` it once had) makes the GPU runtime wait for the branch's predicate on the host,
    splitting the step's CUDA graph and exposing the whole forward pass (measured on an H100:
    6.2 -> 3.4 ms per back-to-back OPT-1.3B decode step without it).
    """
    if feed is not None:
        prev, src = feed
        batch = batch._replace(tokens=jnp.where(src >= 0, prev[jnp.maximum(src, 0)], batch.tokens))
    if first:
        x = decoder.embed(params, cfg, batch.tokens, batch.positions)
    x, kv = decoder.LAYERS[kind](params["layers"], cfg, x, batch, kv, impl)
    if not last:
        return x, kv
    logits = decoder.final(params, cfg, decoder.logit_rows(kind, batch, x))
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if feed is not None:
        greedy = pad_rows(greedy, feed[0].shape[0])
    return (greedy, logits, x), kv


def pad_rows(ids: jax.Array, rows: int) -> jax.Array:
    return jnp.pad(ids, (0, rows - ids.shape[0]))


def sample_rows(greedy: jax.Array, logits: jax.Array, sb: SamplingBatch, picks: jax.Array) -> jax.Array:
    """The step's greedy ids with the rows in ``picks`` sampled (:func:`sample`) instead.

    Only the picked rows' logits are read: one request sampling in a batch of greedy ones costs one
    row's work, not the batch's. ``picks`` is padded to a bucket (:func:`pick_buckets`) with indices
    past the batch, which read the last row and are dropped when written back."""
    n = logits.shape[0]
    at = jnp.minimum(picks, n - 1)
    ids = sample(logits[at], SamplingBatch(*(field[at] for field in sb)))
    return greedy.at[picks].set(ids, mode="drop")


def pick_buckets(rows: int) -> list[int]:
    """How many sampled rows a sampling program is compiled for: powers of four below the batch, and
    the batch (few programs; a picked row costs a few passes over the vocabulary)."""
    out, n = [], 1
    while n < rows:
        out.append(n)
        n *= 4
    return out + [rows]


def pack_picks(temperature: np.ndarray, rows: int, past: int) -> np.ndarray:
    """The sampled rows' indices among ``rows`` logits rows, padded to their bucket with ``past``
    (the length of the ids they are written into: out of range, so dropped)."""
    picks = np.flatnonzero(temperature[:rows] > 0).astype(np.int32)
    size = bucket(pick_buckets(rows), max(1, len(picks)))
    return np.concatenate([picks, np.full(size - len(picks), past, np.int32)])


STAGE_STEP = jax.jit(
    stage_step, static_argnames=("kind", "cfg", "impl", "first", "last"), donate_argnames=("kv",)
)
SAMPLE = jax.jit(sample_rows)


def copy_pages(kv: KVPool, src: jax.Array, dst: jax.Array) -> KVPool:
    """Pages ``src`` copied over pages ``dst`` in every layer (padding copies the null page onto itself)."""
    return KVPool(tuple(a.at[dst].set(a[src]) for a in kv.k), tuple(a.at[dst].set(a[src]) for a in kv.v))


COPY_PAGES = jax.jit(copy_pages, donate_argnums=0)


class Segment(NamedTuple):
    """A run of one sequence's tokens starting at ``start`` (a prompt, a chunk or one decode token),
    with the page table that covers it and what its sampled token needs.

    ``samples``: logits rows drawn from its last token (a prompt's ``n`` samples; 1 otherwise), for
    samples ``sample``, ``sample + 1``, ... ``prompt_targets``: the prompt tokens that follow its
    first ``len(prompt_targets)`` tokens, whose log-probabilities the step computes (prompt
    log-probabilities; empty when not asked)."""

    tokens: Sequence[int]
    start: int
    table: Sequence[int]
    params: SamplingParams
    seed: int
    samples: int = 1
    sample: int = 0
    prompt_targets: Sequence[int] = ()


def row_segments(segs: Sequence[Segment]) -> list[int]:
    """The segment of each logits row of a step (a segment has ``samples`` rows)."""
    return [i for i, s in enumerate(segs) for _ in range(s.samples)]


class HostStep(NamedTuple):
    """One micro-batch's results on the host. ``ids``: a sampled id per logits row (padding rows
    included). ``logprobs``: per row, the sampled token's log-probability when its request asks
    (None otherwise). ``prompt_logprobs``: per segment, its ``prompt_targets``' log-probabilities."""

    ids: np.ndarray
    logprobs: list[TokenLogprob | None]
    prompt_logprobs: list[list[TokenLogprob]]


class PromptSpan(NamedTuple):
    """A segment's rows among a step's prompt log-probability rows."""

    segment: int
    first: int
    rows: int
    targets: Sequence[int]
    k: int


@dataclasses.dataclass
class PendingStep:
    """One micro-batch dispatched and not read: its ids on the device (a lookahead step feeds on
    them) and the log-probability arrays its rows asked for, with what is needed to read them."""

    ids: jax.Array
    num_segments: int
    row_lp: LogprobArrays | None = None
    row_picks: Sequence[int] = ()  # rows of row_lp, in order
    row_ks: Sequence[int] = ()  # alternatives each of those rows asked for
    prompt_lp: LogprobArrays | None = None
    prompt_spans: Sequence[PromptSpan] = ()

    def host(self) -> HostStep:
        """Wait for the step and read what it produced (the step's only device-to-host copies)."""
        ids = np.asarray(self.ids)
        rows: list[TokenLogprob | None] = [None] * len(ids)
        if self.row_lp is not None:
            chosen, values, top = (np.asarray(a) for a in self.row_lp)
            for j, (r, k) in enumerate(zip(self.row_picks, self.row_ks)):
                rows[r] = _logprob(int(ids[r]), chosen[j], values[j], top[j], k)
        prompt: list[list[TokenLogprob]] = [[] for _ in range(self.num_segments)]
        if self.prompt_lp is not None:
            chosen, values, top = (np.asarray(a) for a in self.prompt_lp)
            for seg, first, n, targets, k in self.prompt_spans:
                prompt[seg] = [_logprob(int(targets[j]), chosen[first + j], values[first + j], top[first + j], k)
                               for j in range(n)]
        return HostStep(ids, rows, prompt)


def _logprob(token: int, chosen: Any, values: np.ndarray, ids: np.ndarray, k: int) -> TokenLogprob:
    return TokenLogprob(token, float(chosen), tuple((int(ids[j]), float(values[j])) for j in range(k)))


def logprob_picks(segs: Sequence[Segment]) -> tuple[list[int], list[int]]:
    """The logits rows whose sampled token's log-probability is asked for, and each one's k."""
    rows = row_segments(segs)
    picks = [j for j, i in enumerate(rows) if segs[i].params.logprobs is not None]
    return picks, [segs[rows[j]].params.logprobs for j in picks]  # type: ignore[misc]


def prompt_rows(segs: Sequence[Segment]) -> tuple[list[int], list[int], list[PromptSpan]]:
    """The packed token rows whose next prompt token is scored, their targets, and where each
    asking segment's rows are among them."""
    rows: list[int] = []
    targets: list[int] = []
    spans: list[PromptSpan] = []
    off = 0
    for i, s in enumerate(segs):
        if s.prompt_targets:
            n = len(s.prompt_targets)
            spans.append(PromptSpan(i, len(rows), n, list(s.prompt_targets), s.params.prompt_logprobs or 0))
            rows += range(off, off + n)
            targets += s.prompt_targets
        off += len(s.tokens)
    return rows, targets, spans


def _slots(table: Sequence[int], start: int, n: int, ps: int) -> np.ndarray:
    pos = np.arange(start, start + n)
    return np.asarray(table, np.int32)[pos // ps] * ps + pos % ps


def _sampling(segs: Sequence[Segment], rows: int) -> SamplingBatch:
    per_row = [(s, j) for s in segs for j in range(s.samples)]
    if len(per_row) > rows:
        raise ValueError(f"{len(per_row)} logits rows for a step of {rows}")
    return make_sampling_batch([s.params for s, _ in per_row], [s.start + len(s.tokens) for s, _ in per_row],
                               [s.seed for s, _ in per_row], rows, [s.sample + j for s, j in per_row])


def _tables(segs: Sequence[Segment], rows: int, width: int) -> np.ndarray:
    out = np.full((rows, width), NULL_PAGE, np.int32)
    for i, s in enumerate(segs):
        out[i, : len(s.table)] = s.table
    return out


def _packed(segs: Sequence[Segment], T: int, ps: int):
    tokens = np.zeros(T, np.int32)
    positions = np.zeros(T, np.int32)
    seg_ids = np.full(T, -1, np.int32)
    slots = np.full(T, NULL_PAGE * ps, np.int32)
    ends = []
    off = 0
    for i, s in enumerate(segs):
        n = len(s.tokens)
        tokens[off : off + n] = s.tokens
        positions[off : off + n] = np.arange(s.start, s.start + n)
        seg_ids[off : off + n] = i
        slots[off : off + n] = _slots(s.table, s.start, n, ps)
        off += n
        ends += [off - 1] * s.samples
    return tokens, positions, seg_ids, slots, ends


def pack_prefill(segs: Sequence[Segment], T: int, N: int, ps: int) -> tuple[PrefillBatch, SamplingBatch]:
    """Whole prompts (each segment starts at 0) packed into T tokens, logits for N rows."""
    tokens, positions, seg_ids, slots, ends = _packed(segs, T, ps)
    idx = np.zeros(N, np.int32)
    idx[: len(ends)] = ends
    return PrefillBatch(tokens, positions, seg_ids, slots, idx), _sampling(segs, N)


def pack_decode(segs: Sequence[Segment], B: int, W: int) -> tuple[DecodeBatch, SamplingBatch]:
    tokens = np.zeros(B, np.int32)
    positions = np.zeros(B, np.int32)
    if any(s.samples != 1 for s in segs):
        raise ValueError("a decode row draws one sample")
    for i, s in enumerate(segs):
        tokens[i] = s.tokens[0]
        positions[i] = s.start
    return DecodeBatch(tokens, positions, _tables(segs, B, W)), _sampling(segs, B)


def pack_mixed(segs: Sequence[Segment], T: int, S: int, W: int, ps: int) -> tuple[MixedBatch, SamplingBatch]:
    tokens, positions, seg_ids, slots, ends = _packed(segs, T, ps)
    idx = np.zeros(S, np.int32)
    idx[: len(ends)] = ends
    return MixedBatch(tokens, positions, seg_ids, slots, _tables(segs, S, W), idx), _sampling(segs, S)
