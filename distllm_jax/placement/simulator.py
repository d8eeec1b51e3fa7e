"""Discrete-event replay of a workload through prefill/decode (or colocated / chunked) instances,
timed by the latency model, with the engine's own scheduling policy.

The policy is not copied here: each stand-in instance runs the scheduler object the engine's worker
runs (:mod:`distllm_jax.scheduling`: FCFS prefill batches up to the token budget, the pull choice and
the decode room, prefill-first colocated, SplitFuse mixed steps). What this module adds is the
mechanism's timing, as the engine executes the plans:

- A prefill batch holds an instance for one stage's time and reaches its first token after ``pp``
  stages; a decode step is timed with the model's pipeline division, as DistServe's simulator does.
- A pull is offered as a prefill batch ends (its gather goes before that instance's next step) or
  chosen later by the decode side (its gather waits for the prefill step in flight); one pull at a
  time per decode instance moves ``kv_bytes / transfer bandwidth``; its scatter lands behind the
  decode steps already dispatched, and the request joins the next step dispatched after that.
- The decode lookahead: what follows a decode step is decided as it starts.
- Instances sharing one host's cores slow each other (processor sharing), per the measured contention.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
from typing import Callable, Sequence

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.latency import Profile
from distllm_jax.scheduling import (ChunkedScheduler, ColocatedScheduler, DecodePlan, DecodeScheduler, KVPolicy,
                                    KVManager, PrefillPlan, PrefillScheduler, Queues, RequestState, RoomPlan, keep_computed,
                                    release)
from distllm_jax.scheduling.pages import PageAllocator
from distllm_jax.scheduling.plans import StepRecord
from distllm_jax.shapes import StepKind, bucket

INF = float("inf")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    mode: str = "disaggregated"  # disaggregated | colocated | chunked
    prefill: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    decode: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    colocated: tuple[InstanceSpec, ...] = (InstanceSpec(),)
    prefill_token_budget: int = 512
    max_prefill_seqs: int = 64
    max_decode_batch: int = 256
    transfer_gbps: float = 100.0  # GB/s between a prefill and a decode instance (0: free)
    phase: str = "both"  # both | prefill (requests end at their first token) | decode (arrive prefilled)
    kv_tokens: int | None = None  # KV tokens per instance (an engine's pool); None: from GPU memory
    memory_utilization: float = 0.9  # the share of GPU memory weights and KV may use (vLLM's flag)
    # how every instance that decodes manages its pages (distllm_jax.scheduling.KVPolicy, as the engine's
    # EngineConfig.kv_admission / preemption / kv_watermark): "on-demand" admission by the pages needed
    # now, growth page by page and preemption ("recompute" or "swap") when a step would run short, or
    # "reserve" of a request's whole length when it joins
    kv_admission: str = "on-demand"
    preemption: str = "recompute"
    kv_watermark: float = 0.01
    swap_gbps: float = 25.0  # GB/s a swap moves KV between device and host memory at (0: free)
    # prompt instances keep prompts' full pages, named by SimRequest.prefix_hashes, as the engine's
    # EngineConfig.prefix_cache does; a prompt over cached pages prefills the rest as a mixed step
    prefix_cache: bool = False
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
    # counts (None: no padding, as on GPU systems that run exact shapes); an engine's are
    # CompiledShapes.sim_fields() (distllm_jax.shapes), and a step above the top one runs unpadded
    batch_buckets: tuple[int, ...] | None = None
    token_buckets: tuple[int, ...] | None = None
    # the engine's decode lookahead (EngineConfig.async_decode): what follows a decode step is decided
    # when that step starts, so a colocated instance's waiting prompt runs after the step in flight
    # *and* the one queued behind it, and a decode step's batch is fixed one step early
    decode_lookahead: bool = False
    # with the lookahead, a decode step dispatched when none is in flight (after a prefill step, or on
    # an idle instance) cannot hide its host packing and dispatch behind the step before: it takes
    # this much longer than the profile's steady decode step (measured on the idle engine)
    decode_restart_s: float = 0.0
    page_size: int = 16  # KV pages as the engine allocates them

    def prefill_s(self, fit, lengths, pp: int) -> float:
        t = fit.prefill_ms(lengths, pp)
        if self.token_buckets:
            total = sum(lengths)
            t += fit.prefill[1] * (bucket(self.token_buckets, total, above="exact") - total) / pp
        return t / 1e3

    def prompt_s(self, fit, batch: Sequence["SimRequest"], pp: int) -> float:
        """A prefill batch's time: a prefill of the prompts, or, when any starts after cached pages,
        a mixed step of chunks over their cached prefixes (what the engine runs then)."""
        if any(r.num_computed for r in batch):
            return self.mixed_s(fit, [(r.num_computed, r.num_prefill - r.num_computed) for r in batch], [], pp)
        return self.prefill_s(fit, [r.num_prefill for r in batch], pp)

    def kv_policy(self) -> KVPolicy:
        return KVPolicy.of(self.kv_admission, self.preemption, self.kv_watermark)

    def swap_s(self, profile: Profile, room: RoomPlan | None) -> float:
        """What the swap copies that made room for a step add to it (they run before it)."""
        if room is None or not room.swaps or not self.swap_gbps:
            return 0.0
        pages = sum(len(op.pages) for op in room.swaps)
        return profile.kv_bytes_per_token * pages * self.page_size / (self.swap_gbps * 1e9)

    def restart_s(self, chained: bool) -> float:
        """What a decode step adds for starting the lookahead anew (``chained``: it follows a decode
        step of the same instance at once, whose time hid its dispatch)."""
        return self.decode_restart_s if self.decode_lookahead and not chained else 0.0

    def decode_s(self, fit, n: int, ctx: int, pp: int) -> float:
        nb = bucket(self.batch_buckets, n, above="exact") if self.batch_buckets else n
        return fit.decode_ms(nb, ctx, pp) / 1e3

    def mixed_s(self, fit, chunks: Sequence[tuple[int, int]], decode_starts: Sequence[int], pp: int) -> float:
        """A chunked-prefill step: prompt chunks (start, length) and decode rows at these positions.
        The chunks cost a prefill batch, plus what the decode fit charges for context reads (the
        decode tokens' and the chunks' cached prefixes) and for the decode rows. An engine that pads
        the step's tokens (chunks and decode rows together) to a compiled count pays the padding at
        the prefill fit's per-token rate, as a padded prefill does."""
        n_dec, dec_ctx = len(decode_starts), sum(decode_starts) + len(decode_starts)
        if not chunks:
            return fit.decode_ms(n_dec, dec_ctx, pp) / 1e3
        _, b, c = fit.decode_small if n_dec < fit.threshold else fit.decode_large
        t = fit.prefill_ms([n for _, n in chunks], pp)
        if self.token_buckets:
            total = sum(n for _, n in chunks) + n_dec
            t += fit.prefill[1] * (bucket(self.token_buckets, total, above="exact") - total) / pp
        return (t + (b * (dec_ctx + sum(s for s, _ in chunks)) + c * n_dec) / pp) / 1e3

    def capacity(self, profile: Profile, par: InstanceSpec) -> int:
        if self.kv_tokens is not None:
            return self.kv_tokens
        return profile.kv_token_capacity(par.tp, par.pp, self.memory_utilization)

    def contended(self, now: float, seconds: float, others_end: float) -> float:
        """A step's time when other instances on the same host run until ``others_end``."""
        if self.host_contention == 1.0 or others_end <= now or seconds <= 0:
            return seconds
        return seconds * (1 + (self.host_contention - 1) * min(1.0, (others_end - now) / seconds))

    @property
    def gpus(self) -> int:
        if self.mode == "disaggregated":
            return sum(p.num_devices for p in self.prefill) + sum(p.num_devices for p in self.decode)
        return sum(p.num_devices for p in self.colocated)


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


@dataclasses.dataclass(eq=False)
class SimRequest:
    """A request as the simulator replays it; it is also what the schedulers read and write
    (:class:`distllm_jax.scheduling.SchedRequest`): the engine's policy runs on it unchanged."""

    arrival: float  # seconds
    prompt_len: int
    output_len: int
    prefill_start: float = INF
    first_token: float = INF
    migration_start: float = INF
    migration_end: float = INF
    finish: float = INF
    second_token: float = INF  # the end of its first decode step (where the engine's steps show)
    # what the schedulers own
    rid: str = ""
    state: RequestState = RequestState.WAITING
    holders: list = dataclasses.field(default_factory=list)
    siblings: list = dataclasses.field(default_factory=list)  # traces replay one sample a request
    # its full pages by name (scheduling.prefix_cache.page_hashes of its prompt's ids and, when the
    # workload knows them, its output's), for a simulation with SimConfig.prefix_cache; none for a
    # workload of lengths alone
    prefix_hashes: tuple = ()
    cached_prompt_tokens: int = 0  # prompt tokens its last prefill started from cached pages for
    route: str | None = None  # no router in the simulator: any prompt instance takes it
    num_computed: int = 0  # tokens whose K/V are cached
    generated: int = 0  # tokens produced
    prefill_instance: str | None = None
    decode_instance: str | None = None

    @property
    def num_prompt(self) -> int:
        return self.prompt_len

    @property
    def num_prefill(self) -> int:
        """A prefill computes the prompt and, after a preemption for recompute, the tokens produced."""
        return self.prompt_len + self.generated

    @property
    def max_cached(self) -> int:
        """The engine's reservation: the last sampled token is never fed back."""
        return self.prompt_len + max(1, self.output_len) - 1

    @property
    def timings(self) -> "SimRequest":
        return self  # the schedulers' stamps are fields of the request itself

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float:
        if self.finish == INF:
            return INF
        return 0.0 if self.output_len < 2 else (self.finish - self.first_token) / (self.output_len - 1)


@dataclasses.dataclass(eq=False)
class SimSlot:
    """A timed stand-in for an instance, as its scheduler sees it (:class:`distllm_jax.scheduling.Slot`):
    an allocator sized to the instance's KV capacity and the engine's batch limits."""

    name: str
    role: str
    alloc: PageAllocator
    max_batch: int
    max_prefill_seqs: int
    page_size: int
    par: InstanceSpec = InstanceSpec()


class Simulator:
    """The engine's own schedulers (:mod:`distllm_jax.scheduling`) on timed stand-in instances: the
    policy is the engine's, only the clock and the steps' durations (the latency model) are the
    simulator's. DistServe's simulator keeps its real schedulers and swaps the worker the same way."""

    def __init__(self, profile: Profile, cfg: SimConfig, record: bool = False):
        """``record``: keep every step in ``self.steps`` (a diagnostic; it costs memory per step)."""
        self.profile, self.cfg = profile, cfg
        self.steps: list[StepRecord] | None = [] if record else None
        self.kv: list[KVManager] = []  # after a run: each instance's page manager (preemptions, growth)
        if cfg.mode == "disaggregated":
            used = cfg.prefill if cfg.phase == "prefill" else cfg.decode if cfg.phase == "decode" else cfg.prefill + cfg.decode
        else:
            used = cfg.colocated
        for p in used:
            profile.fit(p.tp)  # fail early on a degree the profile lacks
            if cfg.capacity(profile, p) // cfg.page_size <= 0:
                raise ValueError(f"{profile.model}: weights do not fit tp={p.tp} pp={p.pp} on {profile.device}")

    def _slot(self, name: str, role: str, par: InstanceSpec) -> SimSlot:
        cfg = self.cfg
        n = cfg.capacity(self.profile, par) // cfg.page_size
        alloc = PageAllocator(n + 1, cfg.page_size, prefix_cache=cfg.prefix_cache and role != "decode")
        return SimSlot(name, role, alloc, cfg.max_decode_batch, cfg.max_prefill_seqs,
                       cfg.page_size, par)

    def run(self, requests: Sequence[SimRequest], follow: Follow | None = None) -> list[SimRequest]:
        """Replay ``requests``; returns them and, with ``follow``, every request it added. ``follow``
        makes the workload closed-loop (a chat's next turn is sent after the reply it answers): it is
        called with each request as it ends (its ``finish`` set) and returns the request that this
        end lets arrive (its ``arrival`` no earlier than that finish), or None."""
        reqs = list(requests)
        for k, r in enumerate(reqs):
            r.rid = r.rid or f"r{k}"
        runner = _Disaggregated(self) if self.cfg.mode == "disaggregated" else _Colocated(self)
        if follow is not None:
            runner.q.follow = _FollowUps(follow, reqs, runner.clock, self.cfg.admission_s)
        runner.run(reqs)
        self.kv = [s.kv for s in runner.schedulers()]  # what each instance's pages went through
        return reqs


Follow = Callable[[SimRequest], "SimRequest | None"]


class _FollowUps:
    """A closed-loop workload's next requests: each end may let one more arrive (``Simulator.run``)."""

    def __init__(self, follow: Follow, reqs: list[SimRequest], clock: "_Clock", admission_s: float):
        self.follow, self.reqs, self.clock, self.admission_s = follow, reqs, clock, admission_s

    def ended(self, r: SimRequest) -> None:
        nxt = self.follow(r)
        if nxt is None:
            return
        if nxt.arrival < r.finish:
            raise ValueError(f"a request that follows {r.rid!r} arrives at {nxt.arrival}, before it ended at {r.finish}")
        nxt.rid = nxt.rid or f"r{len(self.reqs)}"
        self.reqs.append(nxt)
        self.clock.push(nxt.arrival + self.admission_s, "arrive", nxt)


@dataclasses.dataclass
class _SimQueues(Queues):
    follow: _FollowUps | None = None  # a closed-loop workload's next requests


class _Clock:
    """Events in time order (ties in the order they were pushed)."""

    def __init__(self):
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = itertools.count()

    def push(self, t: float, kind: str, what: object = None) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, what))

    def pop(self) -> tuple[float, str, object]:
        t, _, kind, what = heapq.heappop(self.events)
        return t, kind, what


def _emit(r: SimRequest, now: float) -> bool:
    """One token of ``r`` is out at ``now``; True when that was its last."""
    r.generated += 1
    if r.generated == 1:
        r.first_token = now
    elif r.generated == 2:
        r.second_token = now
    if r.generated >= max(1, r.output_len):
        r.finish = now
        return True
    return False


def _end(queues: _SimQueues, r: SimRequest) -> None:
    keep_computed(r)
    release(queues, r)
    r.state = RequestState.DONE
    if queues.follow is not None:
        queues.follow.ended(r)


def _decoded(queues: Queues, running: list[SimRequest], batch: Sequence[SimRequest], now: float) -> None:
    """A decode step over ``batch`` ended at ``now``: a token each (``_emit`` inlined: this loop is
    the simulator's hot spot); the finished leave ``running``."""
    for r in batch:
        r.num_computed += 1
        r.generated += 1
        if r.generated == 2:
            r.second_token = now
        if r.generated >= r.output_len:
            r.finish = now
            running.remove(r)
            _end(queues, r)


class _Disaggregated:
    """Prefill and decode instances (the engine's PrefillWorker / DecodeWorker around their
    schedulers). The pull is timed as the engine runs it: offered as a prefill batch ends (its
    gather dispatched before that instance's next step) or chosen later by the decode side (its
    gather waits for the prefill step in flight), one pull at a time per decode instance, each
    scatter behind the decode steps already dispatched, and a pulled request in the next step
    dispatched after its pages land (with lookahead that batch was fixed when the step before began)."""

    def __init__(self, sim: Simulator):
        self.sim, self.cfg, self.prof = sim, sim.cfg, sim.profile
        cfg = self.cfg
        self.q = _SimQueues()
        self.p_slots = [sim._slot(f"prefill-{i}", "prefill", p) for i, p in enumerate(cfg.prefill)]
        self.d_slots = [sim._slot(f"decode-{j}", "decode", p) for j, p in enumerate(cfg.decode)]
        self.p_sched = [PrefillScheduler(self.q, s, cfg.prefill_token_budget) for s in self.p_slots]
        self.d_sched: list[DecodeScheduler] = []
        self.d_sched += [DecodeScheduler(self.q, s, self.d_sched, policy=cfg.kv_policy()) for s in self.d_slots]
        # requests of the decode phase alone arrive prefilled, their KV on a source without limits
        self.source = (SimSlot("source", "prefill", _Unbounded(cfg.page_size), cfg.max_decode_batch,
                               cfg.max_prefill_seqs, cfg.page_size) if cfg.phase == "decode" else None)
        self.p_index = {id(s): i for i, s in enumerate(self.p_slots)}
        n_p, n_d = len(self.p_slots), len(self.d_slots)
        self.p_busy = [False] * n_p
        self.p_free_at = [0.0] * n_p  # when each prefill instance's step in flight ends
        self.p_stage = [0.0] * n_p  # that step's stage time (later pipeline stages take as long)
        self.p_batch: list[list[SimRequest]] = [[] for _ in range(n_p)]
        self.d_busy = [False] * n_d
        self.d_start = [0.0] * n_d  # when each decode instance's current (or last) step started
        self.d_steps = [0] * n_d  # decode steps done
        self.d_end: dict[int, float] = {}  # when each decode instance's last step ended
        self.d_batch: list[list[SimRequest]] = [[] for _ in range(n_d)]
        self.landed: dict[str, float] = {}  # when each pulled request's pages were in place
        self.pull_q: list[collections.deque] = [collections.deque() for _ in range(n_d)]  # (plan, staged)
        self.pull_cur: list[object] = [None] * n_d
        self.scatter_wait: list[list] = [[] for _ in range(n_d)]  # (decode step it lands after, plan)
        self.host = _SharedHost({"p_free": cfg.host_contention, "d_step": cfg.host_contention_decode
                                 if cfg.host_contention_decode is not None else cfg.host_contention})
        self.token: dict[tuple[str, int], int] = collections.defaultdict(int)  # the live end event of a step
        self.started: dict[tuple[str, int], tuple[float, tuple[int, ...], int, tuple[str, ...]]] = {}
        self.clock = _Clock()

    def schedulers(self) -> list:
        return [*self.p_sched, *self.d_sched]

    def schedule(self, ends: dict[tuple[str, int], float]) -> None:
        """(Re)schedule the end of every running step (processor sharing moves them)."""
        for key, t in ends.items():
            self.token[key] += 1
            self.clock.push(t, key[0], (key[1], self.token[key]))
            if key[0] == "p_free":
                self.p_free_at[key[1]] = t

    def try_prefill(self, i: int, now: float) -> None:
        if self.p_busy[i]:
            return
        plan = self.p_sched[i].plan(now)
        if plan is None:
            return
        cfg, par = self.cfg, self.cfg.prefill[i]
        lengths = [r.num_prefill - r.num_computed for r in plan.batch]
        self.p_stage[i] = cfg.prompt_s(self.prof.fit(par.tp), plan.batch, par.pp) + cfg.step_overhead_s
        self.p_busy[i] = True
        self.p_batch[i] = plan.batch
        self.started[("p_free", i)] = (now, tuple(lengths), sum(r.num_prefill for r in plan.batch),
                                       tuple(r.rid for r in plan.batch))
        self.schedule(self.host.start(("p_free", i), self.p_stage[i], now))

    def next_pull(self, j: int, now: float) -> None:
        if self.pull_cur[j] is not None or not self.pull_q[j]:
            return
        plan, staged = self.pull_q[j].popleft()
        self.pull_cur[j] = plan
        t = now
        pi = self.p_index.get(id(plan.src))
        if not staged and pi is not None and self.p_busy[pi]:
            t = max(now, self.p_free_at[pi])  # the gather queues behind the prefill step in flight
        gbps = self.cfg.transfer_gbps
        t += self.prof.kv_bytes_per_token * plan.req.num_computed / (gbps * 1e9) if gbps else 0.0
        self.clock.push(t, "gathered", j)

    def land(self, j: int, plan, now: float) -> None:
        """The pull's pages are in place on decode instance ``j``; its pull thread takes the next."""
        r = plan.req
        if self.d_sched[j].pulled(r, plan.src):
            r.migration_end = now
            self.landed[r.rid] = now
        self.pull_cur[j] = None
        self.next_pull(j, now)

    def choose(self, j: int, now: float, staged: bool) -> None:
        for plan in self.d_sched[j].choose_pulls(now):
            self.pull_q[j].append((plan, staged))

    def try_decode(self, j: int, now: float) -> None:
        if self.d_busy[j]:
            return
        self.choose(j, now, staged=False)
        self.next_pull(j, now)
        room = self.d_sched[j].make_room(lambda r: r.num_computed + 1)
        plan = self.d_sched[j].plan()
        if plan is None:
            return
        cfg, par = self.cfg, self.cfg.decode[j]
        # with lookahead a step's batch was fixed when the step before it started (a request whose
        # pages land just then misses it: the pull thread hands it over after the worker dispatched)
        if cfg.decode_lookahead and self.d_steps[j] and any(r.generated > 1 for r in plan.batch):
            batch = [r for r in plan.batch if r.generated > 1 or self.landed[r.rid] < self.d_start[j]]
        else:
            batch = plan.batch
        if not batch:
            return
        ctx = sum(r.num_computed + 1 for r in batch)
        self.d_start[j] = now
        self.d_busy[j] = True
        self.d_batch[j] = batch
        step = (cfg.decode_s(self.prof.fit(par.tp), len(batch), ctx, par.pp) + cfg.step_overhead_s
                + cfg.restart_s(self.d_end.get(j) == now) + cfg.swap_s(self.prof, room))
        self.started[("d_step", j)] = (now, (1,) * len(batch), ctx, tuple(r.rid for r in batch))
        self.schedule(self.host.start(("d_step", j), step, now))

    def arrive(self, r: SimRequest, now: float) -> None:
        if self.source is None:
            self.q.waiting.append(r)
            return
        # Algorithm 1 sizes decode alone: the request arrives prefilled (its first token out)
        self.source.alloc.ensure(r.rid, r.prompt_len)
        r.holders.append(self.source)
        r.prefill_start = now
        if _emit(r, now):
            _end(self.q, r)
            return
        r.num_computed = r.prompt_len
        r.state = RequestState.HELD
        self.q.held.append(r)

    def prefilled(self, i: int, batch: list[SimRequest], now: float) -> None:
        for r in batch:
            self.p_sched[i].kv.prompt_cached(r)
            r.num_computed = r.num_prefill
            if _emit(r, now) or self.cfg.phase == "prefill":  # Algorithm 1 sizes prefill alone
                r.finish = now
                _end(self.q, r)
            else:
                self.p_sched[i].prefilled(r)
        for j in sorted(range(len(self.d_sched)), key=lambda k: self.d_sched[k].load):
            self.choose(j, now, staged=True)  # offered as the batch ends
            self.next_pull(j, now)

    def decoded(self, j: int, now: float) -> None:
        self.d_steps[j] += 1
        self.d_end[j] = now
        sched = self.d_sched[j]
        _decoded(self.q, sched.running, self.d_batch[j], now)
        # scatters due after this step land now (all of them once the batch has drained)
        due, self.scatter_wait[j] = self.scatter_wait[j], []
        for target, plan in due:
            if target <= self.d_steps[j] or not sched.running:
                self.land(j, plan, now)
            else:
                self.scatter_wait[j].append((target, plan))

    def run(self, reqs: Sequence[SimRequest]) -> None:
        cfg, clock = self.cfg, self.clock
        order = sorted(reqs, key=lambda r: r.arrival)
        for r in order:
            clock.push(r.arrival + cfg.admission_s, "arrive", r)
        prefill_pp = [p.pp for p in cfg.prefill]
        while clock.events:
            now, kind, what = clock.pop()
            if kind in ("p_free", "d_step"):
                i, tok = what
                if tok != self.token[(kind, i)]:
                    continue  # rescheduled: the step's end moved
                self.schedule(self.host.finish((kind, i), now))
                if self.sim.steps is not None:
                    t0, lengths, ctx, rids = self.started[(kind, i)]
                    step_kind = StepKind.PREFILL if kind == "p_free" else StepKind.DECODE
                    self.sim.steps.append(StepRecord(f"{step_kind}-{i}", step_kind, t0, now, lengths, ctx, rids))
            if kind == "arrive":
                self.arrive(what, now)
            elif kind == "p_free":
                # freed before its prompts are held: the engine's prefill worker dispatches its next
                # batch before a decode instance's pull can queue a gather behind the finished one
                self.p_busy[i] = False
                clock.push(now + self.p_stage[i] * (prefill_pp[i] - 1), "prefilled", (i, self.p_batch[i]))
            elif kind == "prefilled":
                self.prefilled(what[0], what[1], now)
            elif kind == "gathered":
                j, plan = what, self.pull_cur[what]
                if self.d_busy[j]:  # the scatter runs after the step in flight and, with lookahead, the next
                    self.scatter_wait[j].append((self.d_steps[j] + (2 if cfg.decode_lookahead else 1), plan))
                else:
                    self.land(j, plan, now)
            elif kind == "d_step":
                self.d_busy[i] = False
                self.decoded(i, now)
            for k in range(len(self.p_sched)):
                self.try_prefill(k, now)
            for k in range(len(self.d_sched)):
                self.try_decode(k, now)


class _Unbounded(PageAllocator):
    """A source of prefilled requests with no memory limit (the decode phase simulated alone)."""

    def __init__(self, page_size: int):
        super().__init__(2, page_size)
        self._next = itertools.count(1)

    @property
    def num_free(self) -> int:
        return 1 << 40

    def ensure(self, rid, num_tokens: int) -> list[int]:
        table = self._tables.setdefault(rid, [])
        table.extend(next(self._next) for _ in range(self.extra_pages_needed(rid, num_tokens)))
        return table

    def free(self, rid) -> int:
        return len(self._tables.pop(rid, []))


class _Colocated:
    """Colocated or chunked instances (the engine's ColocatedWorker / ChunkedWorker around their
    schedulers). With the decode lookahead, what follows a decode step is decided as it starts."""

    def __init__(self, sim: Simulator):
        self.sim, self.cfg, self.prof = sim, sim.cfg, sim.profile
        cfg = self.cfg
        self.chunked = cfg.mode == "chunked"
        self.q = _SimQueues()
        self.slots = [sim._slot(f"colocated-{i}", cfg.mode, p) for i, p in enumerate(cfg.colocated)]
        kind = ChunkedScheduler if self.chunked else ColocatedScheduler
        self.sched = [kind(self.q, s, cfg.prefill_token_budget, cfg.kv_policy()) for s in self.slots]
        n = len(self.slots)
        self.busy = [False] * n
        self.ends = [0.0] * n  # when each instance's current step ends (host contention)
        self.pending: dict[int, object] = {}
        self.pending_kind: dict[int, object] = {}  # the plan each instance ran last
        self.follow: dict[int, object] = {}  # lookahead: the plan decided to run after the step in flight
        self.clock = _Clock()

    def schedulers(self) -> list:
        return list(self.sched)

    def launch(self, i: int, now: float, seconds: float, plan) -> None:
        cfg = self.cfg
        others = max([e for k, e in enumerate(self.ends) if k != i], default=0.0)
        seconds = cfg.contended(now, seconds + cfg.step_overhead_s, others)
        if self.sim.steps is not None:
            if isinstance(plan, PrefillPlan):
                lengths = tuple(r.num_prefill for r in plan.batch)
                ctx, reqs = sum(lengths), plan.batch
            elif isinstance(plan, DecodePlan):
                lengths, ctx = (1,) * len(plan.batch), sum(r.num_computed + 1 for r in plan.batch)
                reqs = plan.batch
            else:
                lengths = tuple(row.length for row in plan.rows)
                ctx, reqs = sum(row.start + row.length for row in plan.rows), [row.req for row in plan.rows]
            self.sim.steps.append(StepRecord(f"colocated-{i}", plan.kind, now, now + seconds, lengths, ctx,
                                          tuple(r.rid for r in reqs)))
        self.pending[i] = plan
        self.pending_kind[i] = plan  # kept after the step ends: what ran last here
        self.busy[i] = True
        self.ends[i] = now + seconds
        self.clock.push(now + seconds, "done", i)

    def decode(self, i: int, now: float) -> None:
        """A decode step over the batch, its room made first (the pages its next tokens need)."""
        cfg, par, sched = self.cfg, self.cfg.colocated[i], self.sched[i]
        room = sched.make_room(lambda r: r.num_computed + 1)
        if not sched.running:
            return
        plan = DecodePlan(list(sched.running))
        ctx = sum(r.num_computed + 1 for r in plan.batch)
        chained = isinstance(self.pending_kind.get(i), DecodePlan) and self.ends[i] == now
        self.launch(i, now, cfg.decode_s(self.prof.fit(par.tp), len(plan.batch), ctx, par.pp)
                    + cfg.restart_s(chained) + cfg.swap_s(self.prof, room), plan)
        if cfg.decode_lookahead:  # the engine decides what follows this step as it starts
            self.follow[i] = self.sched[i].plan(now)

    def start(self, i: int, now: float) -> None:
        if self.busy[i]:
            return
        cfg, par = self.cfg, self.cfg.colocated[i]
        fit = self.prof.fit(par.tp)
        sched = self.sched[i]
        if not self.chunked:
            plan = self.follow.pop(i, None)
            if plan is None or (isinstance(plan, DecodePlan) and not (sched.running or sched.kv.swapped)):
                plan = sched.plan(now)
            if isinstance(plan, PrefillPlan):
                seconds = cfg.prompt_s(fit, plan.batch, par.pp) * par.pp
                self.launch(i, now, seconds, plan)
            elif plan is not None:
                self.decode(i, now)  # over the batch now: minus those that ended in the step before
            return
        room = sched.make_room(lambda r: r.num_computed + 1)
        plan = sched.plan(now)
        if plan is None:
            return
        chunks = [(row.start, row.length) for row in plan.rows if row.chunk]
        decode_starts = [row.start for row in plan.rows if not row.chunk]
        self.launch(i, now, cfg.mixed_s(fit, chunks, decode_starts, par.pp) + cfg.swap_s(self.prof, room), plan)

    def done(self, i: int, now: float) -> None:
        self.busy[i] = False
        plan, sched = self.pending.pop(i), self.sched[i]
        if isinstance(plan, PrefillPlan):
            for r in plan.batch:
                sched.kv.prompt_cached(r)
                r.num_computed = r.num_prefill
                if _emit(r, now):
                    _end(self.q, r)
                else:
                    sched.prefilled(r)
            return
        if isinstance(plan, DecodePlan):
            _decoded(self.q, sched.running, plan.batch, now)
            return
        _decoded(self.q, sched.running, [row.req for row in plan.rows if not row.chunk], now)
        for row in plan.rows:
            if row.chunk and sched.chunk_done(row.req, row.length):
                sched.kv.prompt_cached(row.req)
                if _emit(row.req, now):
                    _end(self.q, row.req)
                else:
                    sched.prefilled(row.req)

    def run(self, reqs: Sequence[SimRequest]) -> None:
        clock = self.clock
        for r in sorted(reqs, key=lambda r: r.arrival):
            clock.push(r.arrival + self.cfg.admission_s, "arrive", r)
        while clock.events:
            now, kind, what = clock.pop()
            if kind == "arrive":
                self.q.waiting.append(what)
            else:
                self.done(what, now)
            for k in range(len(self.sched)):
                self.start(k, now)


def attainment(reqs: Sequence[SimRequest], ttft: float, tpot: float) -> float:
    return sum(1 for r in reqs if r.ttft <= ttft and r.tpot <= tpot) / max(1, len(reqs))


def simulate(profile: Profile, cfg: SimConfig, lengths: Sequence[tuple[int, int]], arrivals: Sequence[float]) -> list[SimRequest]:
    reqs = [SimRequest(float(a), int(p), int(o)) for (p, o), a in zip(lengths, arrivals)]
    return Simulator(profile, cfg).run(reqs)
