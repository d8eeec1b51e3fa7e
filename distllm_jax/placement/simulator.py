"""Discrete-event replay of a workload through prefill/decode (or colocated / chunked) instances with
the engine's own policies, timed by the latency model. Fast enough for 10,000 requests in seconds:
decode finishes are tracked in a heap by step count instead of per token.

Policies (as ``distllm_jax.engine`` runs them):
- FCFS everywhere; a prefill batch packs waiting prompts up to the token budget (a longer prompt runs
  alone) and up to ``max_prefill_seqs``; a prompt waits while prefill memory is full of requests held
  for decode (prefill memory is the queue that absorbs bursts).
- Decode instances pull held requests FCFS when they have a batch slot and KV room for the request's
  whole length (prompt + output: the engine reserves it), the least-loaded instance first; the KV moves
  in ``kv_bytes / transfer bandwidth`` before the request joins the batch. As in the engine, pulls are
  offered as a prefill batch ends (their gathers go first; a pull chosen later waits for the prefill
  step in flight), one pull at a time per decode instance, each scatter behind the decode steps
  already dispatched, and a pulled request joins the next step dispatched after its pages land.
- Colocated: prefill first whenever a waiting prompt fits, else one decode step (vLLM). Chunked: each
  step carries one token of every running request plus prompt chunks up to the budget (SplitFuse).

Pipelines: a prefill batch holds an instance for one stage's time and reaches its first token after
``pp`` stages; a decode step is timed with the model's pipeline division, as DistServe's simulator does.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from typing import NamedTuple, Sequence

from distllm_jax.placement.latency import Profile

INF = float("inf")


def _bucket(buckets, n: int) -> int:
    return next((b for b in buckets if b >= n), buckets[-1] if n <= buckets[-1] else n)


@dataclasses.dataclass(frozen=True)
class Par:
    tp: int = 1
    pp: int = 1

    @property
    def gpus(self) -> int:
        return self.tp * self.pp


@dataclasses.dataclass(frozen=True)
class SimConfig:
    mode: str = "disaggregated"  # disaggregated | colocated | chunked
    prefill: tuple[Par, ...] = (Par(),)
    decode: tuple[Par, ...] = (Par(),)
    colocated: tuple[Par, ...] = (Par(),)
    prefill_token_budget: int = 512
    max_prefill_seqs: int = 64
    max_decode_batch: int = 256
    transfer_gbps: float = 100.0  # GB/s between a prefill and a decode instance (0: free)
    phase: str = "both"  # both | prefill (requests end at their first token) | decode (arrive prefilled)
    kv_tokens: int | None = None  # KV tokens per instance (an engine's pool); None: from GPU memory
    admission_s: float = 0.0  # host time from a request's arrival to when a scheduler can take it
    # host bookkeeping an engine adds to every step beyond its program (scheduling, streaming)
    step_overhead_s: float = 0.0
    # instances sharing one host's cores (virtual CPU devices; 1.0 for disjoint GPUs): a prefill step
    # alongside another instance's takes this factor longer, a decode step host_contention_decode
    # (None: the same). Disaggregated, steps share the host as processor sharing (their ends move as
    # others start and end); colocated instances scale a step by its overlap
    host_contention: float = 1.0
    host_contention_decode: float | None = None
    # the engine pads a step to a compiled shape: decode batches to these sizes, prefill tokens to these
    # counts (None: no padding, as on GPU systems that run exact shapes)
    batch_buckets: tuple[int, ...] | None = None
    token_buckets: tuple[int, ...] | None = None
    # the engine's decode lookahead (EngineConfig.async_decode): what follows a decode step is decided
    # when that step starts, so a colocated instance's waiting prompt runs after the step in flight
    # *and* the one queued behind it, and a decode step's batch is fixed one step early
    decode_lookahead: bool = False

    def prefill_s(self, fit, lengths, pp: int) -> float:
        t = fit.prefill_ms(lengths, pp)
        if self.token_buckets:
            total = sum(lengths)
            t += fit.prefill[1] * (_bucket(self.token_buckets, total) - total) / pp
        return t / 1e3

    def decode_s(self, fit, n: int, ctx: int, pp: int) -> float:
        nb = _bucket(self.batch_buckets, n) if self.batch_buckets else n
        return fit.decode_ms(nb, ctx, pp) / 1e3

    def capacity(self, profile: Profile, par: Par) -> int:
        return self.kv_tokens if self.kv_tokens is not None else profile.kv_token_capacity(par.tp, par.pp)

    def contended(self, now: float, seconds: float, others_end: float) -> float:
        """A step's time when other instances on the same host run until ``others_end``."""
        if self.host_contention == 1.0 or others_end <= now or seconds <= 0:
            return seconds
        return seconds * (1 + (self.host_contention - 1) * min(1.0, (others_end - now) / seconds))

    @property
    def gpus(self) -> int:
        if self.mode == "disaggregated":
            return sum(p.gpus for p in self.prefill) + sum(p.gpus for p in self.decode)
        return sum(p.gpus for p in self.colocated)


@dataclasses.dataclass
class SimRequest:
    arrival: float  # seconds
    prompt_len: int
    output_len: int
    prefill_start: float = INF
    first_token: float = INF
    migration_start: float = INF
    migration_end: float = INF
    finish: float = INF
    second_token: float = INF  # the end of its first decode step (where the engine's steps show)
    computed: int = 0  # prompt tokens prefilled (chunked mode)

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        if self.finish == INF:
            return INF
        return 0.0 if self.output_len < 2 else (self.finish - self.first_token) / (self.output_len - 1)


class _Decoder:
    """A running batch: requests finish after a known number of steps, so steps cost O(log n)."""

    def __init__(self):
        self.step = 0
        self.n = 0
        self.ctx = 0  # Σ tokens in the cache
        self.heap: list[tuple[int, int, SimRequest, int]] = []
        self.ends: list[float] = []  # each step's end time (for the requests' second tokens)
        self._ids = itertools.count()

    def join(self, r: SimRequest, ctx: int, steps_left: int) -> None:
        heapq.heappush(self.heap, (self.step + steps_left, next(self._ids), r, self.step))
        self.n += 1
        self.ctx += ctx

    def advance(self, t_end: float) -> list[SimRequest]:
        """One step done at ``t_end``: every running request got a token; return those finished."""
        self.step += 1
        self.ctx += self.n
        self.ends.append(t_end)
        done = []
        while self.heap and self.heap[0][0] <= self.step:
            _, _, r, joined = heapq.heappop(self.heap)
            r.finish = t_end
            r.second_token = self.ends[joined]
            self.n -= 1
            self.ctx -= r.prompt_len + r.output_len - 1
            done.append(r)
        return done


class _SharedHost:
    """Steps of instances that share one host's cores, under processor sharing: while k steps run,
    one of kind ``x`` goes at 1 / (1 + (c_x - 1)(k - 1)) of its speed alone, c_x being the slowdown
    of such a step with one other running (measured: ``profiler.host_contention``). All c = 1
    (disjoint devices): each step takes its own time."""

    def __init__(self, contention: dict[str, float]):
        self.c = contention  # by step kind (the first element of a key)
        self.shared = any(c != 1.0 for c in contention.values())
        self.work: dict[tuple[str, int], float] = {}  # seconds of each running step left, at full speed
        self.last = 0.0

    def _speed(self, key: tuple[str, int]) -> float:
        return 1.0 / (1.0 + (self.c[key[0]] - 1.0) * max(0, len(self.work) - 1))

    def _advance(self, now: float) -> None:
        for k in self.work:
            self.work[k] -= (now - self.last) * self._speed(k)
        self.last = now

    def start(self, key: tuple[str, int], seconds: float, now: float) -> dict[tuple[str, int], float]:
        """Start a step; returns the ends of the steps whose end this moves (all, or the new one)."""
        self._advance(now)
        self.work[key] = seconds
        return self._ends(now) if self.shared else {key: now + seconds}

    def finish(self, key: tuple[str, int], now: float) -> dict[tuple[str, int], float]:
        self._advance(now)
        self.work.pop(key, None)
        return self._ends(now) if self.shared else {}

    def _ends(self, now: float) -> dict[tuple[str, int], float]:
        return {k: now + max(0.0, w) / self._speed(k) for k, w in self.work.items()}


class SimStep(NamedTuple):
    """A simulated step, in the fields of the engine's step log (``Engine.step_log``), so the two
    can be compared with the same code."""

    instance: str
    kind: str  # prefill | decode | mixed
    start: float
    end: float
    lengths: tuple[int, ...]  # tokens per segment (1 per decode row)
    context: int  # Σ positions + tokens its attention read

    @property
    def seconds(self) -> float:
        return self.end - self.start


class Simulator:
    def __init__(self, profile: Profile, cfg: SimConfig, record: bool = False):
        """``record``: keep every step in ``self.steps`` (a diagnostic; it costs memory per step)."""
        self.profile, self.cfg = profile, cfg
        self.steps: list[SimStep] | None = [] if record else None
        if cfg.mode == "disaggregated":
            used = cfg.prefill if cfg.phase == "prefill" else cfg.decode if cfg.phase == "decode" else cfg.prefill + cfg.decode
        else:
            used = cfg.colocated
        for p in used:
            profile.fit(p.tp)  # fail early on a degree the profile lacks
            if cfg.capacity(profile, p) <= 0:
                raise ValueError(f"{profile.model}: weights do not fit tp={p.tp} pp={p.pp} on {profile.device}")

    def run(self, requests: Sequence[SimRequest]) -> list[SimRequest]:
        if self.cfg.mode == "disaggregated":
            self._disaggregated(requests)
        else:
            self._colocated(requests, chunked=self.cfg.mode == "chunked")
        return list(requests)

    # ---- disaggregated ---------------------------------------------------------------------------

    def _disaggregated(self, reqs: Sequence[SimRequest]) -> None:
        cfg, prof = self.cfg, self.profile
        order = sorted(reqs, key=lambda r: r.arrival)
        n_p, n_d = len(cfg.prefill), len(cfg.decode)
        waiting: collections.deque[SimRequest] = collections.deque()
        held: collections.deque[tuple[float, SimRequest, int]] = collections.deque()  # (ready, req, prefill idx)
        p_cap = [cfg.capacity(prof, p) for p in cfg.prefill]
        p_used = [0] * n_p
        p_busy = [False] * n_p
        p_free_at = [0.0] * n_p  # when each prefill instance's step in flight ends
        p_stage = [0.0] * n_p  # that step's stage time alone (later pipeline stages take as long)
        p_batch: list[list[SimRequest]] = [[] for _ in range(n_p)]
        d_cap = [cfg.capacity(prof, p) for p in cfg.decode]
        d_used = [0] * n_d
        d_busy = [False] * n_d
        d_start = [0.0] * n_d  # when each decode instance's current (or last) step started
        dec = [_Decoder() for _ in cfg.decode]
        # a pull moves through: chosen (queued on the instance's one pull thread), gathered (a
        # gather dispatched as its prefill ended runs at once, one dispatched later waits for the
        # prefill step in flight), scattered (behind the decode steps already dispatched), joining
        # (its pages in place; it enters the next step dispatched)
        pull_q: list[collections.deque[tuple[SimRequest, int]]] = [collections.deque() for _ in range(n_d)]
        pull_cur: list[SimRequest | None] = [None] * n_d
        scatter_wait: list[list[tuple[int, SimRequest]]] = [[] for _ in range(n_d)]  # (decode step, req)
        pulling = [0] * n_d
        joining: list[list[tuple[float, SimRequest]]] = [[] for _ in range(n_d)]
        host = _SharedHost({"p_free": cfg.host_contention, "d_step": cfg.host_contention_decode
                            if cfg.host_contention_decode is not None else cfg.host_contention})
        token: dict[tuple[str, int], int] = collections.defaultdict(int)  # the live end event of a step
        started: dict[tuple[str, int], tuple[float, tuple[int, ...], int]] = {}  # for self.steps
        events: list[tuple[float, int, str, int, int]] = []
        seq = itertools.count()

        def push(t: float, kind: str, i: int, tok: int = 0) -> None:
            heapq.heappush(events, (t, next(seq), kind, i, tok))

        def schedule(ends: dict[tuple[str, int], float]) -> None:
            """(Re)schedule the end of every running step (processor sharing moves them)."""
            for key, t in ends.items():
                token[key] += 1
                push(t, key[0], key[1], token[key])
                if key[0] == "p_free":
                    p_free_at[key[1]] = t

        for k, r in enumerate(order):
            push(r.arrival + cfg.admission_s, "arrive", k)

        def load(j: int) -> int:
            return dec[j].n + len(joining[j]) + pulling[j]

        def try_prefill(i: int, now: float) -> None:
            if p_busy[i] or not waiting:
                return
            batch, tokens = [], 0
            while waiting and len(batch) < cfg.max_prefill_seqs:
                r = waiting[0]
                if batch and tokens + r.prompt_len > cfg.prefill_token_budget:
                    break
                if p_used[i] + r.prompt_len > p_cap[i]:
                    break
                waiting.popleft()
                batch.append(r)
                tokens += r.prompt_len
                p_used[i] += r.prompt_len
            if not batch:
                return
            par = cfg.prefill[i]
            p_stage[i] = cfg.prefill_s(prof.fit(par.tp), [r.prompt_len for r in batch], par.pp) + cfg.step_overhead_s
            for r in batch:
                r.prefill_start = now
            p_busy[i] = True
            p_batch[i] = batch
            started[("p_free", i)] = (now, tuple(r.prompt_len for r in batch), tokens)
            schedule(host.start(("p_free", i), p_stage[i], now))

        def next_pull(j: int, now: float) -> None:
            if pull_cur[j] is not None or not pull_q[j]:
                return
            r, pi = pull_q[j].popleft()
            pull_cur[j] = r
            # the gather queues behind the prefill instance's step in flight on its pool
            t = max(now, p_free_at[pi]) if pi >= 0 and p_busy[pi] else now
            t += prof.kv_bytes_per_token * r.prompt_len / (cfg.transfer_gbps * 1e9) if cfg.transfer_gbps else 0.0
            push(t, "gathered", j)

        def land(j: int, r: SimRequest, now: float) -> None:
            """``r``'s pages are in place on decode instance ``j``; its pull thread takes the next."""
            r.migration_end = now
            joining[j].append((now, r))
            pulling[j] -= 1
            pull_cur[j] = None
            next_pull(j, now)

        def choose(j: int, now: float, staged: bool) -> None:
            """Pull held requests onto decode instance ``j``: FCFS, the least-loaded instance with room
            first. ``staged``: chosen as a prefill batch ends, whose worker dispatches the gathers
            before its next step (else a gather queues behind the prefill step in flight)."""
            while held and held[0][0] <= now:
                _, r, pi = held[0]
                need = r.prompt_len + r.output_len
                if load(j) >= cfg.max_decode_batch or d_used[j] + need > d_cap[j]:
                    break
                loads = [load(k) for k in range(n_d) if k != j and (staged or not d_busy[k])
                         and d_used[k] + need <= d_cap[k] and load(k) < cfg.max_decode_batch]
                if loads and load(j) > min(loads):
                    break
                held.popleft()
                d_used[j] += need
                if pi >= 0:
                    p_used[pi] -= r.prompt_len
                r.migration_start = now
                pulling[j] += 1
                pull_q[j].append((r, -1 if staged else pi))
                for i in range(n_p):
                    try_prefill(i, now)

        def try_decode(j: int, now: float) -> None:
            if d_busy[j]:
                return
            par = cfg.decode[j]
            choose(j, now, staged=False)
            next_pull(j, now)
            # with lookahead a step's batch was fixed when the step before it started (a request whose
            # pages land just then misses it: the pull thread hands it over after the worker dispatched)
            ahead = cfg.decode_lookahead and dec[j].n
            cut = d_start[j] if ahead else now
            ready = [(t, r) for t, r in joining[j] if (t < cut if ahead else t <= cut)]
            if ready:
                joining[j] = [(t, r) for t, r in joining[j] if (t >= cut if ahead else t > cut)]
                for _, r in ready:
                    dec[j].join(r, r.prompt_len, r.output_len - 1)
            if not dec[j].n:
                return
            d_start[j] = now
            d_busy[j] = True
            step = cfg.decode_s(prof.fit(par.tp), dec[j].n, dec[j].ctx + dec[j].n, par.pp) + cfg.step_overhead_s
            started[("d_step", j)] = (now, (1,) * dec[j].n, dec[j].ctx + dec[j].n)
            schedule(host.start(("d_step", j), step, now))

        prefilled: list[tuple[int, list[SimRequest]]] = []
        while events:
            now, _, kind, i, tok = heapq.heappop(events)
            if kind in ("p_free", "d_step"):
                if tok != token[(kind, i)]:
                    continue  # rescheduled: the step's end moved
                schedule(host.finish((kind, i), now))
                if self.steps is not None:
                    t0, lengths, ctx = started[(kind, i)]
                    step_kind = "prefill" if kind == "p_free" else "decode"
                    self.steps.append(SimStep(f"{step_kind}-{i}", step_kind, t0, now, lengths, ctx))
            if kind == "arrive":
                r = order[i]
                if cfg.phase == "decode":  # Algorithm 1 sizes decode alone: requests arrive prefilled
                    r.prefill_start = r.first_token = now
                    held.append((now, r, -1))
                else:
                    waiting.append(r)
            elif kind == "p_free":
                # freed before its prompts are held: the engine's prefill worker dispatches its next
                # batch before a decode instance's pull can queue a gather behind the finished one
                p_busy[i] = False
                push(now + p_stage[i] * (cfg.prefill[i].pp - 1), "prefilled", len(prefilled))
                prefilled.append((i, p_batch[i]))
            elif kind == "prefilled":
                pi, batch = prefilled[i]
                for r in batch:
                    r.first_token = now
                    if cfg.phase == "prefill":  # Algorithm 1 sizes prefill alone
                        r.finish = now
                        p_used[pi] -= r.prompt_len
                    elif r.output_len <= 1:
                        r.finish = now
                        p_used[pi] -= r.prompt_len
                    else:
                        held.append((now, r, pi))
                for j in sorted(range(n_d), key=load):  # offered as the batch ends (see choose)
                    choose(j, now, staged=True)
                    next_pull(j, now)
            elif kind == "gathered":
                r = pull_cur[i]
                if d_busy[i]:  # the scatter runs after the step in flight and, with lookahead, the next
                    scatter_wait[i].append((dec[i].step + (2 if cfg.decode_lookahead else 1), r))
                else:
                    land(i, r, now)
            elif kind == "d_step":
                d_busy[i] = False
                for r in dec[i].advance(now):
                    d_used[i] -= r.prompt_len + r.output_len
                # scatters due after this step land now (all of them once the batch has drained)
                waiting_scatters, scatter_wait[i] = scatter_wait[i], []
                for target, r in waiting_scatters:
                    if target <= dec[i].step or not dec[i].n:
                        land(i, r, now)
                    else:
                        scatter_wait[i].append((target, r))
            for k in range(n_p):
                try_prefill(k, now)
            for k in range(n_d):
                try_decode(k, now)

    # ---- colocated / chunked ---------------------------------------------------------------------

    def _colocated(self, reqs: Sequence[SimRequest], chunked: bool) -> None:
        cfg, prof = self.cfg, self.profile
        order = sorted(reqs, key=lambda r: r.arrival)
        n_inst = len(cfg.colocated)
        waiting: collections.deque[SimRequest] = collections.deque()
        cap = [cfg.capacity(prof, p) for p in cfg.colocated]
        used = [0] * n_inst
        dec = [_Decoder() for _ in range(n_inst)]
        partial: list[list[SimRequest]] = [[] for _ in range(n_inst)]
        busy = [False] * n_inst
        ends = [0.0] * n_inst  # when each instance's current step ends (host contention)
        pending: dict[int, tuple] = {}
        events: list[tuple[float, int, str, int]] = []
        seq = itertools.count()
        push = lambda t, kind, i: heapq.heappush(events, (t, next(seq), kind, i))  # noqa: E731
        for k, r in enumerate(order):
            push(r.arrival + cfg.admission_s, "arrive", k)

        def admit(i: int, r: SimRequest) -> bool:
            need = r.prompt_len + r.output_len
            if used[i] + need > cap[i] or dec[i].n + len(partial[i]) >= cfg.max_decode_batch:
                return False
            used[i] += need
            return True

        def launch(i: int, now: float, seconds: float, what: tuple) -> None:
            seconds = cfg.contended(now, seconds + cfg.step_overhead_s, max([e for k, e in enumerate(ends) if k != i], default=0.0))
            if self.steps is not None:
                kind, payload = what
                lengths = (tuple(r.prompt_len for r in payload) if kind == "prefill" else
                           (1,) * dec[i].n + tuple(n for _, n in payload or ()))
                ctx = (sum(lengths) if kind == "prefill" else
                       dec[i].ctx + dec[i].n + sum(r.computed + n for r, n in payload or ()))
                self.steps.append(SimStep(f"colocated-{i}", kind, now, now + seconds, lengths, ctx))
            pending[i] = what
            busy[i] = True
            ends[i] = now + seconds
            push(now + seconds, "done", i)

        follow: dict[int, tuple] = {}  # lookahead: what was decided to run after the step in flight

        def take(i: int, now: float) -> list[SimRequest]:
            batch, tokens = [], 0
            while waiting and len(batch) < cfg.max_prefill_seqs:
                r = waiting[0]
                if batch and tokens + r.prompt_len > cfg.prefill_token_budget:
                    break
                if not admit(i, r):
                    break
                waiting.popleft()
                batch.append(r)
                tokens += r.prompt_len
                r.prefill_start = now
            return batch

        def decode(i: int, now: float, fit, par: Par) -> None:
            launch(i, now, cfg.decode_s(fit, dec[i].n, dec[i].ctx + dec[i].n, par.pp), ("decode", None))
            if cfg.decode_lookahead:  # the engine decides what follows this step as it starts
                batch = take(i, now)
                follow[i] = ("prefill", batch) if batch else ("decode", None)

        def start(i: int, now: float) -> None:
            if busy[i]:
                return
            par = cfg.colocated[i]
            fit = prof.fit(par.tp)
            if not chunked:
                nxt, batch = follow.pop(i, (None, None))
                if nxt == "decode" and dec[i].n:
                    decode(i, now, fit, par)
                    return
                batch = batch if nxt == "prefill" else take(i, now)
                if batch:
                    launch(i, now, cfg.prefill_s(fit, [r.prompt_len for r in batch], par.pp) * par.pp, ("prefill", batch))
                    return
                if dec[i].n:
                    decode(i, now, fit, par)
                return
            # chunked: one token per running request plus prompt chunks up to the budget
            left = cfg.prefill_token_budget - dec[i].n
            chunks = []
            k = 0
            while left > 0:
                if k == len(partial[i]):
                    if not waiting or not admit(i, waiting[0]):
                        break
                    r = waiting.popleft()
                    r.prefill_start = now
                    partial[i].append(r)
                r = partial[i][k]
                n = min(left, r.prompt_len - r.computed)
                chunks.append((r, n))
                left -= n
                k += 1
            if not chunks and not dec[i].n:
                return
            if chunks:
                # the chunks as a prefill batch, plus what the decode fit charges for context reads
                # (the decode tokens' and the chunks' cached prefixes) and for the decode rows
                _, b, c = fit.decode_small if dec[i].n < fit.threshold else fit.decode_large
                t = fit.prefill_ms([n for _, n in chunks], par.pp)
                t += (b * (dec[i].ctx + dec[i].n + sum(r.computed for r, _ in chunks)) + c * dec[i].n) / par.pp
            else:
                t = fit.decode_ms(dec[i].n, dec[i].ctx + dec[i].n, par.pp)
            launch(i, now, t / 1e3, ("mixed", chunks))

        def first_token(i: int, r: SimRequest, now: float) -> None:
            r.first_token = now
            if r.output_len <= 1:
                r.finish = now
                used[i] -= r.prompt_len + r.output_len
            else:
                dec[i].join(r, r.prompt_len, r.output_len - 1)

        while events:
            now, _, kind, i = heapq.heappop(events)
            if kind == "arrive":
                waiting.append(order[i])
            else:
                busy[i] = False
                what, payload = pending.pop(i)
                if what == "prefill":
                    for r in payload:
                        first_token(i, r, now)
                else:
                    if dec[i].n:
                        for r in dec[i].advance(now):
                            used[i] -= r.prompt_len + r.output_len
                    for r, n in payload or ():
                        r.computed += n
                        if r.computed == r.prompt_len:
                            partial[i].remove(r)
                            first_token(i, r, now)
            for k in range(n_inst):
                start(k, now)


def attainment(reqs: Sequence[SimRequest], ttft: float, tpot: float) -> float:
    return sum(1 for r in reqs if r.ttft <= ttft and r.tpot <= tpot) / max(1, len(reqs))


def simulate(profile: Profile, cfg: SimConfig, lengths: Sequence[tuple[int, int]], arrivals: Sequence[float]) -> list[SimRequest]:
    reqs = [SimRequest(float(a), int(p), int(o)) for (p, o), a in zip(lengths, arrivals)]
    return Simulator(profile, cfg).run(reqs)
