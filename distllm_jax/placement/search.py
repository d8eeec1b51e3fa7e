"""The paper's placement algorithms over the simulator.

- **Algorithm 1 (high node affinity)**: prefill and decode instances may sit on any nodes (a fast
  cross-node network moves the KV). Choose the prefill (tp, pp) with the best per-GPU goodput judged on
  TTFT alone, and the decode (tp, pp) with the best per-GPU goodput judged on TPOT alone, each simulated
  on its own; then replicate each to reach the target rate.
- **Algorithm 2 (low node affinity)**: the KV must not cross nodes, so a prefill stage and the decode
  stage of the same layer segment share a node: for each pipeline degree (segments across nodes) and
  each split of a node's GPUs between one prefill and one decode tensor group, simulate the coupled pair
  (both SLOs) and keep the best per-GPU goodput; replicate the pair.
- The colocated baselines: vLLM (pipeline degree 1) and vLLM++ (any degrees), searched the same way.

Goodput of a configuration = the highest rate whose simulated SLO attainment is >= 90%, by bisection.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Sequence

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.workload.arrivals import arrival_times
from distllm_jax.workload.goodput import goodput
from distllm_jax.placement.latency import Profile
from distllm_jax.placement.plan import Plan, PlanInstance
from distllm_jax.placement.simulator import SimConfig, Simulator, SimRequest


@dataclasses.dataclass(frozen=True)
class Workload:
    lengths: tuple[tuple[int, int], ...]  # (prompt, output)
    num_requests: int = 400
    seed: int = 0


@dataclasses.dataclass(frozen=True)
class Cluster:
    nodes: int = 1
    gpus_per_node: int = 8
    cross_node_gbps: float = 3.125  # 25 Gbps between nodes (the paper's testbed)
    intra_node_gbps: float = 300.0  # NVLink


def sim_attainment(profile: Profile, cfg: SimConfig, wl: Workload, rate: float, slo: tuple[float, float],
                   scale: float = 1.0) -> float:
    n = wl.num_requests
    lens = [wl.lengths[i % len(wl.lengths)] for i in range(n)]
    arr = arrival_times(n, rate, seed=wl.seed)
    reqs = Simulator(profile, cfg).run([SimRequest(float(a), p, o) for (p, o), a in zip(lens, arr)])
    ttft, tpot = slo[0] * scale, slo[1] * scale
    if cfg.phase == "prefill":
        ok = sum(r.ttft <= ttft for r in reqs)
    elif cfg.phase == "decode":
        ok = sum(r.tpot <= tpot for r in reqs)
    else:
        ok = sum(r.ttft <= ttft and r.tpot <= tpot for r in reqs)
    return ok / n


def config_goodput(profile: Profile, cfg: SimConfig, wl: Workload, slo: tuple[float, float],
                   hi: float = 64.0) -> float:
    """Highest rate (req/s) with >= 90% simulated attainment for this configuration."""
    rate, _ = goodput(lambda r: sim_attainment(profile, cfg, wl, r, slo), 0.05, hi, 0.9, 0.02, 16)
    return rate


def _degrees(profile: Profile, max_tp: int, max_pp: int) -> list[InstanceSpec]:
    out = []
    for tp in sorted(profile.fits):
        for pp in range(1, max_pp + 1):
            if tp <= max_tp and profile.num_layers % pp == 0 and profile.fits_memory(tp, pp):
                out.append(InstanceSpec(tp, pp))
    return out


def algorithm1(profile: Profile, wl: Workload, slo: tuple[float, float], cluster: Cluster, rate: float,
               **sim: object) -> Plan:
    tried = {}
    best_p = best_d = None
    for par in _degrees(profile, cluster.gpus_per_node, cluster.nodes * cluster.gpus_per_node):
        gp = config_goodput(profile, SimConfig("disaggregated", (par,), (par,), phase="prefill", **sim), wl, slo)
        gd = config_goodput(profile, SimConfig("disaggregated", (par,), (par,), phase="decode", **sim), wl, slo)
        tried[f"tp{par.tp}pp{par.pp}"] = {"prefill_goodput": gp, "decode_goodput": gd}
        if best_p is None or gp / par.num_devices > best_p[1] / best_p[0].num_devices:
            best_p = (par, gp)
        if best_d is None or gd / par.num_devices > best_d[1] / best_d[0].num_devices:
            best_d = (par, gd)
    if not best_p or best_p[1] <= 0 or best_d[1] <= 0:
        raise ValueError("no configuration meets the SLO at any rate (Algorithm 1)")
    n, m = math.ceil(rate / best_p[1]), math.ceil(rate / best_d[1])
    good = min(n * best_p[1], m * best_d[1])
    return Plan("disaggregated", _insts(best_p[0], n), _insts(best_d[0], m), algorithm="algorithm1-high-affinity",
                expected_goodput=good, detail={"per_config": tried, "prefill": f"tp{best_p[0].tp}pp{best_p[0].pp}",
                                               "decode": f"tp{best_d[0].tp}pp{best_d[0].pp}"})


def low_affinity_units(profile: Profile, cluster: Cluster) -> list[tuple[InstanceSpec, InstanceSpec]]:
    """Algorithm 2's candidates: (prefill, decode) pairs of one pipeline degree pp (segments across
    up to ``nodes`` nodes) whose tensor groups share a node (tp_p + tp_d <= GPUs per node), so each
    layer segment's KV moves over NVLink; the degrees the profile can time and the memory holds."""
    units = []
    for pp in range(1, cluster.nodes + 1):
        if profile.num_layers % pp:
            continue
        for tp_p in sorted(profile.fits):
            for tp_d in sorted(profile.fits):
                if tp_p + tp_d <= cluster.gpus_per_node and profile.fits_memory(tp_p, pp) \
                        and profile.fits_memory(tp_d, pp):
                    units.append((InstanceSpec(tp_p, pp), InstanceSpec(tp_d, pp)))
    return units


def algorithm2(profile: Profile, wl: Workload, slo: tuple[float, float], cluster: Cluster, rate: float,
               **sim: object) -> Plan:
    best = None
    tried = {}
    for p, d in low_affinity_units(profile, cluster):
        cfg = SimConfig("disaggregated", (p,), (d,), transfer_gbps=cluster.intra_node_gbps, **sim)
        g = config_goodput(profile, cfg, wl, slo)
        gpus = p.num_devices + d.num_devices
        tried[f"P-tp{p.tp}/D-tp{d.tp}/pp{p.pp}"] = g
        if best is None or g / gpus > best[0] / best[1]:
            best = (g, gpus, p, d)
    if best is None or best[0] <= 0:
        raise ValueError("no configuration meets the SLO at any rate (Algorithm 2)")
    g, _, p, d = best
    k = math.ceil(rate / g)
    return Plan("disaggregated", _insts(p, k), _insts(d, k), algorithm="algorithm2-low-affinity",
                expected_goodput=k * g, detail={"per_config": tried, "unit": f"P-tp{p.tp}/D-tp{d.tp}/pp{p.pp}"})


def colocated_search(profile: Profile, wl: Workload, slo: tuple[float, float], cluster: Cluster, rate: float,
                     max_pp: int = 1, mode: str = "colocated", **sim: object) -> Plan:
    best, tried = None, {}
    for par in _degrees(profile, cluster.gpus_per_node, max_pp):
        g = config_goodput(profile, SimConfig(mode, colocated=(par,), **sim), wl, slo)
        tried[f"tp{par.tp}pp{par.pp}"] = g
        if best is None or g / par.num_devices > best[1] / best[0].num_devices:
            best = (par, g)
    if best is None or best[1] <= 0:
        raise ValueError(f"no {mode} configuration meets the SLO at any rate")
    k = math.ceil(rate / best[1])
    name = "vllm" if max_pp == 1 else "vllm++"
    return Plan(mode, colocated=_insts(best[0], k), algorithm=name, expected_goodput=k * best[1],
                detail={"per_config": tried})


def _insts(par: InstanceSpec, count: int) -> tuple[PlanInstance, ...]:
    """``count`` plan instances of the simulated degrees ``par``."""
    return (PlanInstance(par.tp, par.pp),) * count


def workload_from(lengths: Sequence[tuple[int, int]], n: int = 400, seed: int = 0) -> Workload:
    return Workload(tuple((int(p), int(o)) for p, o in lengths), n, seed)
