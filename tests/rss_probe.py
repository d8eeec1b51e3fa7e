"""Run in a subprocess by test_convert_streaming: peak RSS of a conversion, after a warm-up one.

The peak only grows, so (peak after the big conversion) - (peak after the warm-up) is what the big
conversion added beyond everything imports and a first conversion already needed. The peak is this
process's own (``VmHWM``, its address space's high-water mark) where Linux reports it: ``ru_maxrss``
also carries the peak of the parent it was forked from over ``exec`` (the test process, which may
already hold more than any conversion needs), so it can read no growth at all.
"""

from __future__ import annotations

import json
import resource
import sys


def peak_rss() -> int:
    """Bytes: this process's peak resident set (VmHWM), else ru_maxrss where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(warm_hf: str, big_hf: str, out_root: str) -> None:
    from distllm_jax.checkpoint import convert

    convert(warm_hf, f"{out_root}/warm", dtype="bfloat16", progress=False)
    base = peak_rss()
    rep = convert(big_hf, f"{out_root}/big", dtype="bfloat16", progress=False)
    peak = peak_rss()
    print(json.dumps({"base": base, "peak": peak, "tensors": rep.tensors, "written": rep.bytes_written}))


if __name__ == "__main__":
    main(*sys.argv[1:4])
