"""The engine and the simulator make the same scheduling decisions, step by step, in every mode.

The engine side is the real thing above the devices: its Controller, Request objects, stop checks
and the PrefillWorker / DecodeWorker / ColocatedWorker / ChunkedWorker step code, with stand-in
instances whose steps take the latency model's time on a virtual clock. Each worker's step runs in a
thread of its own, but only one runs at a time: a step blocks inside its instance's ``run`` until
the clock reaches the step's end, so the workers interleave exactly as the simulator's events do.
Pulls follow the engine's documented mechanism (one at a time per decode instance; an offered pull's
gather at once, a pull chosen by the decode side behind the prefill step in flight; the scatter
behind the decode step in flight). Both sides must run the same steps, over the same requests, at
the same times.
"""

from __future__ import annotations

import heapq
import itertools
import threading
import types

import numpy as np
import pytest

from distllm_jax.engine import colocated as colocated_mod
from distllm_jax.engine import controller as controller_mod
from distllm_jax.engine import decode as decode_mod
from distllm_jax.engine import prefill as prefill_mod
from distllm_jax.engine import request as request_mod
from distllm_jax.engine.programs import HostStep
from distllm_jax.engine import worker as worker_mod
from distllm_jax.engine.colocated import ChunkedWorker, ColocatedWorker
from distllm_jax.engine.controller import Controller
from distllm_jax.engine.decode import DecodeWorker
from distllm_jax.engine.prefill import PrefillWorker
from distllm_jax.engine.request import Request, RequestState, RequestStream
from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import StopChecker
from distllm_jax.placement.latency import load_profile
from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig, SimRequest, Simulator

TIMEOUT_S = 60.0  # a step thread that neither blocks nor returns in this long is a bug


class VirtualClock:
    def __init__(self):
        self.t = 0.0

    def perf_counter(self) -> float:
        return self.t


class Turn:
    """One worker step on its own thread, run to its next block point (or its end) on request."""

    def __init__(self, fn):
        self.fn, self.result, self.error, self.done = fn, None, None, False
        self.wake_at: float | None = None
        self._go, self._paused = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._body, daemon=True)

    def _body(self):
        _local.turn = self
        try:
            self.result = self.fn()
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            self.error = e
        self.done = True
        self._paused.set()

    def _wait_paused(self):
        assert self._paused.wait(TIMEOUT_S), "a worker step neither blocked nor returned"
        self._paused.clear()
        if self.error is not None:
            raise self.error

    def start(self):
        self.thread.start()
        self._wait_paused()

    def block_until(self, t: float):  # on the step's thread
        self.wake_at = t
        self._paused.set()
        self._go.wait()
        self._go.clear()

    def resume(self):
        self._go.set()
        self._wait_paused()


_local = threading.local()


class StandIn:
    """An instance as the workers see it, without devices: its step takes the latency model's time."""

    def __init__(self, name, role, slot, cfg: SimConfig, prof, par: InstanceSpec, clock: VirtualClock, log, ctrl):
        self.name, self.role = name, role
        self.alloc, self.max_batch, self.max_prefill_seqs = slot.alloc, slot.max_batch, slot.max_prefill_seqs
        self.page_size = slot.page_size
        self.spec = types.SimpleNamespace(pp=par.pp, tp=par.tp)
        self.lookahead = False
        self.cfg, self.fit, self.par, self.clock, self.log, self.ctrl = cfg, prof.fit(par.tp), par, clock, log, ctrl
        self.busy_until = 0.0

    def _rid(self, seg) -> str:
        return next(rid for rid in self.alloc.requests() if self.alloc.table(rid)[:1] == list(seg.table[:1]))

    def run(self, kind, groups):
        segs = [s for g in groups for s in g]
        rids = [self._rid(s) for s in segs]
        cfg, pp = self.cfg, self.par.pp
        if kind == "prefill":
            lengths = [len(s.tokens) for s in segs]
            seconds = cfg.prefill_s(self.fit, lengths, pp) * (pp if self.role == "colocated" else 1) + cfg.step_overhead_s
        elif kind == "decode":
            seconds = cfg.decode_s(self.fit, len(segs), sum(s.start + 1 for s in segs), pp) + cfg.step_overhead_s
        else:
            chunk = [self.ctrl.requests[rid].state is RequestState.PREFILLING for rid in rids]
            seconds = cfg.mixed_s(self.fit, [(s.start, len(s.tokens)) for s, c in zip(segs, chunk) if c],
                                  [s.start for s, c in zip(segs, chunk) if not c], pp) + cfg.step_overhead_s
        start = self.clock.t
        self.busy_until = start + seconds
        self.log.append((self.name, kind, start, tuple(rids)))
        _local.turn.block_until(start + seconds)
        return [HostStep(np.full(len(g), 7, np.int32), [None] * len(g), [[] for _ in g]) for g in groups]

    def pools_ok(self) -> bool:
        return True


class StandInPuller:
    kind = "stand-in"
    staged = True
    buckets: list[int] = []

    def stage(self, src, src_pages, dst):
        return ("staged", src)

    def put(self, staged, dst, dst_pages):
        return None

    def pull(self, src, src_pages, dst, dst_pages):
        return None

    def warmup(self, src, dst, tick):
        pass


def engine_steps(cfg: SimConfig, prof, work, monkeypatch):
    """Run ``work`` (arrival, prompt, output) through the engine's workers on stand-ins."""
    clock = VirtualClock()
    fake_time = types.SimpleNamespace(perf_counter=clock.perf_counter)
    for mod in (worker_mod, prefill_mod, decode_mod, colocated_mod, controller_mod, request_mod):
        monkeypatch.setattr(mod, "time", fake_time)
    sim = Simulator(prof, cfg)
    ctrl, log = Controller(), []

    def stand_in(name, role, par):
        return StandIn(name, role, sim._slot(name, role, par), cfg, prof, par, clock, log, ctrl)

    budget = cfg.prefill_token_budget
    if cfg.mode == "disaggregated":
        p_inst = [stand_in(f"prefill-{i}", "prefill", p) for i, p in enumerate(cfg.prefill)]
        d_inst = [stand_in(f"decode-{j}", "decode", p) for j, p in enumerate(cfg.decode)]
        puller, peers = StandInPuller(), []
        decoders = [DecodeWorker(ctrl, inst, puller, peers) for inst in d_inst]
        peers += decoders
        workers = [PrefillWorker(ctrl, inst, budget, decoders) for inst in p_inst] + decoders
    else:
        kind = ColocatedWorker if cfg.mode == "colocated" else ChunkedWorker
        workers = [kind(ctrl, stand_in(f"colocated-{i}", "colocated", p), budget) for i, p in enumerate(cfg.colocated)]
        decoders = []
    requests = {}
    events, seq = [], itertools.count()
    push = lambda t, kind, what: heapq.heappush(events, (t, next(seq), kind, what))  # noqa: E731
    for k, (arrival, p, o) in enumerate(work):
        push(arrival, "arrive", (f"r{k}", p, o))
    turns: dict[int, Turn] = {}
    # the decode side's pull thread, as a queue of chosen pulls and the one moving
    pull_q = {id(w): [] for w in decoders}
    pull_cur: dict[int, object] = {}
    scatter_wait = {id(w): [] for w in decoders}
    steps_done = {id(w): 0 for w in decoders}

    def collect_pulls(w):
        while not w._pulls.empty():
            pull_q[id(w)].append(w._pulls.get())
        next_pull(w)

    def next_pull(w):
        if id(w) in pull_cur or not pull_q[id(w)]:
            return
        job = pull_q[id(w)].pop(0)
        pull_cur[id(w)] = job
        t = clock.t
        src_turn = next((turns[id(x)] for x in workers if x.inst is job.src and id(x) in turns), None)
        if job.staged is None and src_turn is not None:
            t = max(t, src_turn.wake_at)  # the gather waits for the prefill step in flight
        push(t, "gathered", w)

    def land(w):
        job = pull_cur.pop(id(w))
        w._pull(job)
        next_pull(w)

    def start_idle():
        for w in workers:
            while id(w) not in turns:
                turn = Turn(w.step)
                turn.start()
                for d in decoders:
                    collect_pulls(d)
                if turn.done:
                    if not turn.result:
                        break
                    continue
                turns[id(w)] = turn
                push(turn.wake_at, "step", w)

    while True:
        start_idle()
        if not events:
            break
        clock.t, _, kind, what = heapq.heappop(events)
        if kind == "arrive":
            rid, p, o = what
            params = SamplingParams(max_tokens=o, ignore_eos=True)
            req = Request(rid, [5] * p, params, StopChecker(params, (2,), None), 0, RequestStream(rid), 1 << 20, None)
            requests[rid] = req
            with ctrl.lock:
                ctrl.admit(req)
        elif kind == "step":
            turns.pop(id(what)).resume()
            for d in decoders:
                collect_pulls(d)
            if what in decoders:
                steps_done[id(what)] += 1
                due, scatter_wait[id(what)] = scatter_wait[id(what)], []
                for target in due:
                    if target <= steps_done[id(what)] or not what.running:
                        land(what)
                    else:
                        scatter_wait[id(what)].append(target)
        elif kind == "gathered":
            if id(what) in turns:  # the scatter runs after the decode step in flight
                scatter_wait[id(what)].append(steps_done[id(what)] + 1)
            else:
                land(what)
    assert not ctrl.requests, "requests left in the engine"
    return log, requests


def sim_steps(cfg: SimConfig, prof, work):
    sim = Simulator(prof, cfg, record=True)
    reqs = sim.run([SimRequest(a, p, o, rid=f"r{k}") for k, (a, p, o) in enumerate(work)])
    return sorted([(s.instance, s.kind, s.start, s.rids) for s in sim.steps], key=_order), reqs


def _order(step):
    return round(step[2], 9), step[0]  # steps that start together, by instance


def workload(n: int, rate: float, seed: int):
    rng = np.random.default_rng(seed)
    arrivals = np.cumsum(rng.exponential(1 / rate, n))
    return [(float(a), int(rng.integers(16, 600)), int(rng.integers(1, 60))) for a in arrivals]


CONFIGS = {
    "colocated": SimConfig("colocated", colocated=(InstanceSpec(1, 1),), max_decode_batch=12, kv_tokens=6000),
    "colocated-2": SimConfig("colocated", colocated=(InstanceSpec(1, 1), InstanceSpec(2, 1)), max_decode_batch=8,
                             kv_tokens=5000),
    "chunked": SimConfig("chunked", colocated=(InstanceSpec(1, 1),), max_decode_batch=12, kv_tokens=6000),
    "disaggregated": SimConfig("disaggregated", prefill=(InstanceSpec(2, 1),), decode=(InstanceSpec(1, 1),),
                               transfer_gbps=0, max_decode_batch=10, kv_tokens=7000, max_prefill_seqs=4),
    "disaggregated-2x2": SimConfig("disaggregated", prefill=(InstanceSpec(1, 1), InstanceSpec(2, 1)),
                                   decode=(InstanceSpec(1, 1), InstanceSpec(1, 1)), transfer_gbps=0,
                                   max_decode_batch=6, kv_tokens=6000),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_engine_and_simulator_decide_alike(name, monkeypatch):
    cfg, prof = CONFIGS[name], load_profile("a100-opt-13b")
    work = workload(80, 24.0 if name.endswith("2") else 12.0, seed=len(name))
    eng_log, eng_reqs = engine_steps(cfg, prof, work, monkeypatch)
    sim_log, sim_reqs = sim_steps(cfg, prof, work)
    eng_log.sort(key=_order)
    assert len(eng_log) == len(sim_log) > 50
    for e, s in zip(eng_log, sim_log):
        assert (e[0], e[1], e[3]) == (s[0], s[1], s[3]), f"engine {e} vs simulator {s}"
        assert e[2] == pytest.approx(s[2], abs=1e-9)
    for r in sim_reqs:
        t = eng_reqs[r.rid].timings
        assert t.first_token == pytest.approx(r.first_token, abs=1e-9)
        assert t.token_times[-1] == pytest.approx(r.finish, abs=1e-9)
    # the workload exercised the policy: queues built up and memory or the batch limit bound
    assert max(r.prefill_start - r.arrival for r in sim_reqs) > 0.05
