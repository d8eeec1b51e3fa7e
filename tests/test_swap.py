"""KV swapping for preemption: pages go to host memory and come back bit for bit into other pages
(across pipeline stages and tensor shards), even when their old pages are overwritten right after
the swap-out; misuse fails clearly; and after a ``preemption="swap"`` warm-up no swap compiles."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from distllm_jax.engine import EngineConfig, InstanceSpec, RandomSource
from distllm_jax.engine import compile_counter
from distllm_jax.engine.instance import Instance
from distllm_jax.engine.transfer import page_buckets
from distllm_jax.models.attention import REFERENCE
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.presets import preset

CFG = ModelConfig.from_hf_dict(preset("tiny-opt"))
SOURCE = RandomSource(CFG)


def make(spec: InstanceSpec, devices: slice, preemption: str = "recompute") -> Instance:
    """A decode instance whose sequences span 8 pages (page buckets 1, 2, 4, 8)."""
    ecfg = EngineConfig(page_size=4, num_pages=32, max_seq_len=32, max_decode_batch=2, preemption=preemption,
                        progress=False)
    return Instance("d", "decode", spec, jax.devices()[devices], SOURCE, ecfg, REFERENCE)


def fill_random(inst: Instance, seed: int) -> None:
    def fill(a: jax.Array, i: int) -> jax.Array:
        host = np.random.default_rng([seed, i]).standard_normal(a.shape).astype(a.dtype)
        return jax.device_put(host, a.sharding)

    inst.fill_pools(fill)


def same(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> bool:
    return all(x.shape == y.shape and x.tobytes() == y.tobytes() for x, y in zip(a, b))


@pytest.fixture(scope="module", params=[InstanceSpec(tp=1, pp=2), InstanceSpec(tp=2)], ids=["pp2", "tp2"])
def inst(request):
    return make(request.param, slice(0, 2))


@pytest.mark.parametrize("pages,dst", [([3, 7, 1, 12, 5], [20, 2, 30, 9, 17]),
                                       # more than the top bucket (8): moved in two chunks
                                       (list(range(1, 11)), list(range(31, 21, -1)))])
def test_pages_come_back_bit_for_bit_into_other_pages(inst, pages, dst):
    assert len(inst.stages) * inst.spec.tp == 2
    fill_random(inst, seed=len(pages))
    original = inst.host_pages(pages)
    others = [p for p in range(1, inst.num_pages) if p not in pages and p not in dst][: len(pages)]
    inst.swap_out("r", pages)
    inst.copy_pages(others, pages)  # the pages are reused at once: the gather must have read them first
    assert same(inst.host_pages(pages), inst.host_pages(others))
    inst.settle_swaps()
    inst.swap_in("r", dst)
    assert same(inst.host_pages(dst), original), "KV changed on its way through the host"
    assert inst.swapped_bytes() == 0


def test_swap_in_before_settling(inst):
    fill_random(inst, seed=1)
    original = inst.host_pages([4, 6])
    inst.swap_out("early", [4, 6])
    inst.swap_in("early", [8, 10])
    assert same(inst.host_pages([8, 10]), original)


def test_misuse_fails_clearly_and_drop_forgets(inst):
    per_page = 2 * CFG.num_layers * inst.page_size * CFG.num_kv_heads * CFG.head_dim * inst.dtype.itemsize
    inst.swap_out("a", [1, 2, 3])
    assert inst.swapped_bytes() == 3 * per_page
    with pytest.raises(ValueError, match=r"'a'.*3 pages.*2 pages"):
        inst.swap_in("a", [4, 5])
    with pytest.raises(ValueError, match="already swapped out"):
        inst.swap_out("a", [4])
    with pytest.raises(KeyError, match="nope"):
        inst.swap_in("nope", [4])
    inst.swap_out("b", [4])
    inst.settle_swaps()
    assert inst.swapped_bytes() == 4 * per_page
    inst.drop_swapped("a")
    inst.drop_swapped("a")  # unknown now: nothing happens
    assert inst.swapped_bytes() == per_page
    with pytest.raises(KeyError):
        inst.swap_in("a", [1, 2, 3])
    inst.swap_in("b", [9])
    assert inst.swapped_bytes() == 0


def test_swap_warmup_leaves_nothing_to_compile():
    inst = make(InstanceSpec(tp=1, pp=2), slice(2, 4), preemption="swap")
    steps = 2 * len(inst.shapes("decode"))  # a program per decode bucket and stage
    assert inst.num_programs() == steps + 2 * 2 * len(page_buckets(inst.width))  # gather, scatter
    assert make(InstanceSpec(tp=1, pp=2), slice(4, 6)).num_programs() == steps  # recompute: no swaps
    inst.warmup()
    assert inst.swapped_bytes() == 0
    before = compile_counter.compilations()
    for n in range(1, inst.width + 1):
        inst.swap_out(f"r{n}", list(range(1, n + 1)))
        if n % 2:
            inst.settle_swaps()
        inst.swap_in(f"r{n}", list(range(inst.num_pages - n, inst.num_pages)))
    jax.block_until_ready([st.pool for st in inst.stages])
    assert compile_counter.compilations() == before, "a swap compiled a new program"
