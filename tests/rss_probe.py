"""Run in a subprocess by test_convert_streaming: peak RSS of a conversion, after a warm-up one.

ru_maxrss only grows, so (peak after the big conversion) - (peak after the warm-up) is what the big
conversion added beyond everything imports and a first conversion already needed.
"""

from __future__ import annotations

import json
import resource
import sys


def main(warm_hf: str, big_hf: str, out_root: str) -> None:
    from distllm_jax.checkpoint import convert

    convert(warm_hf, f"{out_root}/warm", dtype="bfloat16", progress=False)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    rep = convert(big_hf, f"{out_root}/big", dtype="bfloat16", progress=False)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps({"base": base, "peak": peak, "tensors": rep.tensors, "written": rep.bytes_written}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
