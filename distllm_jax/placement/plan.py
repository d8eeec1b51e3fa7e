"""A placement plan: the one type, and the one reader and writer, of the JSON document that
``distllm place`` (and ``bench/multi_gpu.py``) write and ``distllm serve --plan``, cluster mode and
``bench/multi_gpu.py`` read.

The file, one entry per instance (not per group: a plan may mix degrees)::

    {"mode": "disaggregated",                                   # or colocated / chunked (default disaggregated)
     "prefill": [{"tp": 2, "pp": 1, "node": "10.0.0.5"}, {"tp": 2, "pp": 1}],   # tp, pp default 1
     "decode": [{"tp": 1, "pp": 1}, {"tp": 1, "pp": 1}],
     "colocated": [{"tp": 2, "pp": 1}],                         # the instances of colocated / chunked
     "prefill_token_budget": 512, "max_decode_batch": 64,       # optional: override the server's flags
     "same_node": true,                                         # optional, cluster mode (see below)
     "algorithm": "algorithm1-high-affinity", "expected_goodput": 4.1, "detail": {...},  # what the search found
     "gpus": 6, "per_gpu_goodput": 0.68}                        # derived: written, ignored when read

``node`` (cluster mode) pins an instance to a Ray node id or a node's IP address. ``same_node`` (implied
by Algorithm 2's ``"algorithm": "algorithm2-low-affinity"``) places decode instance *i* on the node of
prefill instance *i*, so the KV never crosses nodes. Any other field is refused: a misspelt limit would
otherwise be ignored without a word.

Pure (no jax): the search writes plans and the benchmarks' parent processes read them without it;
:meth:`Plan.to_engine_config` imports the engine's config only when it is called.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from distllm_jax.instance_spec import InstanceSpec
from distllm_jax.placement.simulator import SimConfig
from distllm_jax.placement.systems import system_config

if TYPE_CHECKING:
    from distllm_jax.engine.config import EngineConfig

_GROUPS = ("prefill", "decode", "colocated")
# the instance lists each serving mode runs (the others may be present and are unused)
_MODE_GROUPS: dict[str, tuple[str, ...]] = {"disaggregated": ("prefill", "decode"), "colocated": ("colocated",),
                                            "chunked": ("colocated",)}
_LIMITS = ("prefill_token_budget", "max_decode_batch")
_DERIVED = ("gpus", "per_gpu_goodput")
_FIELDS = ("mode", *_GROUPS, *_LIMITS, "same_node", "algorithm", "expected_goodput", "detail", *_DERIVED)
_INSTANCE_FIELDS = ("tp", "pp", "node")


@dataclasses.dataclass(frozen=True)
class PlanInstance:
    """One instance of a plan: ``tp`` devices per pipeline stage, ``pp`` stages; ``node`` pins it to
    a Ray node (cluster mode; None: anywhere)."""

    tp: int = 1
    pp: int = 1
    node: str | None = None

    @property
    def gpus(self) -> int:
        return self.tp * self.pp

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tp": self.tp, "pp": self.pp}
        if self.node is not None:
            d["node"] = self.node
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str) -> "PlanInstance":
        """``where`` names the entry in errors, e.g. ``plan: prefill[1]``."""
        if not isinstance(d, dict):
            raise ValueError(f"{where} must be an object like {{\"tp\": 2, \"pp\": 1}}, got {d!r}")
        _refuse_unknown(d, _INSTANCE_FIELDS, where)
        tp, pp = (_positive_int(d.get(k, 1), f"{where}.{k}") for k in ("tp", "pp"))
        node = d.get("node")
        if node is not None and (not isinstance(node, str) or not node):
            raise ValueError(f"{where}.node must be a node id or IP address, got {node!r}")
        return cls(tp, pp, node)


@dataclasses.dataclass(frozen=True)
class Plan:
    """A placement: the serving mode, its instances, optional engine limits and node pairing, and what
    the search that made it expected (``algorithm``, ``expected_goodput`` in req/s, ``detail``).

    Built only valid: the mode is known, its instance lists are non-empty, and ``same_node`` pairs
    prefill and decode instances one to one on agreeing nodes."""

    mode: str = "disaggregated"
    prefill: tuple[PlanInstance, ...] = ()
    decode: tuple[PlanInstance, ...] = ()
    colocated: tuple[PlanInstance, ...] = ()
    prefill_token_budget: int | None = None  # None: the server's own (--prefill-token-budget)
    max_decode_batch: int | None = None  # None: the server's own (--max-decode-batch)
    same_node: bool | None = None  # None: as the algorithm implies (see pairs_on_same_node)
    algorithm: str | None = None
    expected_goodput: float | None = None
    detail: Mapping[str, Any] = dataclasses.field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        for k in _GROUPS:  # tuples whatever sequence was given: the plan is frozen and hashable
            object.__setattr__(self, k, tuple(getattr(self, k)))
        if not isinstance(self.mode, str) or self.mode not in _MODE_GROUPS:
            raise ValueError(f"plan: mode must be one of {tuple(_MODE_GROUPS)}, got {self.mode!r}")
        for k in _MODE_GROUPS[self.mode]:
            if not getattr(self, k):
                raise ValueError(f"plan: {self.mode} mode needs at least one instance in {k}")
        if self.pairs_on_same_node:
            if len(self.prefill) != len(self.decode):
                raise ValueError(f"plan: same_node pairs prefill i with decode i, but there are {len(self.prefill)} "
                                 f"prefill and {len(self.decode)} decode instances")
            for i, (a, b) in enumerate(zip(self.prefill, self.decode)):
                if a.node is not None and b.node is not None and a.node != b.node:
                    raise ValueError(f"plan: same_node, but prefill[{i}] is pinned to {a.node} and decode[{i}] "
                                     f"to {b.node}")

    # ---- what the plan says ---------------------------------------------------------------------

    @property
    def pairs_on_same_node(self) -> bool:
        """Decode instance i shares prefill instance i's node: as ``same_node`` says, else whenever the
        plan comes from the low-affinity search (Algorithm 2 pairs instances by node)."""
        if self.same_node is not None:
            return self.same_node
        return (self.algorithm or "").endswith("low-affinity")

    def instances(self) -> list[tuple[str, PlanInstance]]:
        """(role, instance) of the instances the mode runs, in the engine's device order."""
        return [(k, inst) for k in _MODE_GROUPS[self.mode] for inst in getattr(self, k)]

    @property
    def gpus(self) -> int:
        return sum(inst.gpus for _, inst in self.instances())

    @property
    def per_gpu_goodput(self) -> float | None:
        return None if self.expected_goodput is None else self.expected_goodput / max(1, self.gpus)

    def _limits(self) -> dict[str, int]:
        return {k: getattr(self, k) for k in _LIMITS if getattr(self, k) is not None}

    # ---- what reads it --------------------------------------------------------------------------

    def to_engine_config(self, **engine: Any) -> "EngineConfig":
        """The EngineConfig serving this plan: its mode and instances (``InstanceSpec`` per entry), over
        ``engine`` (the server's other fields: page_size, num_pages, ...). The plan's own limits win over
        those given, as a plan that says ``max_decode_batch`` was searched with it."""
        from distllm_jax.engine.config import EngineConfig

        layout = {k: tuple(InstanceSpec(i.tp, i.pp) for i in getattr(self, k)) for k in _GROUPS if getattr(self, k)}
        return EngineConfig(mode=self.mode, **layout, **{**engine, **self._limits()})

    def to_sim_config(self, system: str = "distllm", **sim: Any) -> SimConfig:
        """The SimConfig simulating this plan (an ``InstanceSpec`` per entry) under serving system ``system``'s
        policies (distllm_jax.placement.systems; ``distllm``: SimConfig's defaults), with ``sim``
        overriding fields. The plan's own limits win, as in :meth:`to_engine_config`."""
        layout = {k: tuple(InstanceSpec(i.tp, i.pp) for i in getattr(self, k)) for k in _GROUPS if getattr(self, k)}
        return system_config(system, self.mode, **layout, **{**sim, **self._limits()})

    # ---- the file -------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """The plan file's JSON object; unset optional fields are left out, derived ones written."""
        d: dict[str, Any] = {"mode": self.mode}
        if self.algorithm is not None:
            d["algorithm"] = self.algorithm
        if self.expected_goodput is not None:
            d["expected_goodput"] = self.expected_goodput
            d["per_gpu_goodput"] = self.per_gpu_goodput
        d["gpus"] = self.gpus
        if self.detail:
            d["detail"] = dict(self.detail)
        for k in _GROUPS:
            if getattr(self, k):
                d[k] = [inst.to_dict() for inst in getattr(self, k)]
        d.update(self._limits())
        if self.same_node is not None:
            d["same_node"] = self.same_node
        return d

    @classmethod
    def from_dict(cls, d: Any, source: str = "plan") -> "Plan":
        """Parse a plan file's object; a ValueError names ``source`` and the bad field."""
        if not isinstance(d, dict):
            raise ValueError(f"{source}: a plan is a JSON object, got {type(d).__name__}")
        _refuse_unknown(d, _FIELDS, source)
        mode = d.get("mode", "disaggregated")  # checked with the fields' agreement, by the constructor
        groups = {}
        for k in _GROUPS:
            entries = d.get(k)
            entries = [] if entries is None else entries
            if not isinstance(entries, list):
                raise ValueError(f"{source}: {k} must be a list of instances, got {entries!r}")
            groups[k] = tuple(PlanInstance.from_dict(e, f"{source}: {k}[{i}]") for i, e in enumerate(entries))
        limits = {k: _positive_int(d[k], f"{source}: {k}") for k in _LIMITS if k in d}
        same = d.get("same_node")
        if "same_node" in d and not isinstance(same, bool):
            raise ValueError(f"{source}: same_node must be true or false, got {same!r}")
        algorithm = d.get("algorithm")
        if algorithm is not None and not isinstance(algorithm, str):
            raise ValueError(f"{source}: algorithm must be a string, got {algorithm!r}")
        goodput = d.get("expected_goodput")
        if goodput is not None and (isinstance(goodput, bool) or not isinstance(goodput, (int, float))
                                    or not math.isfinite(goodput)):
            raise ValueError(f"{source}: expected_goodput must be a number (req/s), got {goodput!r}")
        detail = d.get("detail", {})
        if not isinstance(detail, dict):
            raise ValueError(f"{source}: detail must be an object, got {detail!r}")
        try:
            return cls(mode, **groups, **limits, same_node=same, algorithm=algorithm,
                       expected_goodput=None if goodput is None else float(goodput), detail=detail)
        except ValueError as e:  # the constructor's checks across fields say "plan:"; say which plan
            raise ValueError(str(e).replace("plan:", f"{source}:", 1)) from None

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        """Read a plan file; a ValueError names the file and the bad field (an OSError: no file)."""
        text = Path(path).read_text()
        try:
            d = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"plan {path}: not JSON ({e})") from None
        return cls.from_dict(d, f"plan {path}")

    def save(self, path: str | Path) -> None:
        """Write the plan file (indented, as ``distllm place`` always wrote it)."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def _refuse_unknown(d: Mapping[str, Any], known: tuple[str, ...], where: str) -> None:
    unknown = sorted(set(d) - set(known))
    if unknown:
        raise ValueError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                         f"(known: {', '.join(known)})")


def _positive_int(v: Any, where: str) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{where} must be a positive integer, got {v!r}")
    return v
