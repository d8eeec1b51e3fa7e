"""A local Ray cluster for a test module (2 CPUs; actors reserve none) and its clean shutdown."""

from __future__ import annotations

import contextlib
from typing import Iterator


@contextlib.contextmanager
def local_ray() -> Iterator[None]:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, namespace="distllm-tests")
    try:
        yield
    finally:
        ray.shutdown()
