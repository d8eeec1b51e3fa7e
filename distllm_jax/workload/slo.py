"""SLO targets (TTFT, TPOT in seconds): the paper's presets by model and workload, or custom ones."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class SLO:
    ttft: float
    tpot: float

    def scaled(self, scale: float) -> "SLO":
        return SLO(self.ttft * scale, self.tpot * scale)


# DistServe (OSDI'24), final version: chatbot on ShareGPT, code completion on HumanEval,
# summarisation on LongBench. The artifact's Figure 11 ablation uses the first arXiv version's
# OPT-13B chatbot target (0.2 s, 0.1 s): preset "opt-13b-sharegpt-ablation".
PRESETS: dict[str, SLO] = {
    "opt-13b-sharegpt": SLO(0.25, 0.1),
    "opt-66b-sharegpt": SLO(2.5, 0.15),
    "opt-175b-sharegpt": SLO(4.0, 0.2),
    "opt-66b-humaneval": SLO(0.125, 0.2),
    "opt-66b-longbench": SLO(15.0, 0.15),
    "opt-13b-sharegpt-ablation": SLO(0.2, 0.1),
}


def resolve(spec: str) -> SLO:
    """A preset name, or ``TTFT,TPOT`` in seconds (e.g. ``0.25,0.1``)."""
    if spec in PRESETS:
        return PRESETS[spec]
    try:
        ttft, tpot = (float(x) for x in spec.split(","))
    except ValueError:
        raise ValueError(f"SLO {spec!r}: a preset ({', '.join(PRESETS)}) or 'TTFT,TPOT' in seconds") from None
    if ttft <= 0 or tpot <= 0:
        raise ValueError(f"SLO {spec!r}: both targets must be positive")
    return SLO(ttft, tpot)
