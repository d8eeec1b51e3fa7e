"""The converter streams: its peak memory is bounded by the largest tensor, not the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from distllm_jax.checkpoint import restore_params

MB = 1 << 20


LAYERS = 8


def _write_big_llama(out: Path, layers: int = LAYERS, hidden: int = 1536, inter: int = 1536, vocab: int = 1536):
    """A sharded LLaMA-shaped HF checkpoint (one shard per 4 layers), written without holding it all.

    Every matrix is hidden x hidden, so each is as large as the largest: the most bytes for the
    fewest tensors. The converter's orbax writes cost more per tensor the more are already written,
    so few large tensors (75, 522 MiB) convert several times faster than many small ones of the
    same total, and the checkpoint is still over 4x the test's bound."""
    out.mkdir(parents=True)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 8,
        "num_key_value_heads": 8, "intermediate_size": inter, "max_position_embeddings": 256,
        "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
    }
    (out / "config.json").write_text(json.dumps(cfg))
    rng = np.random.default_rng(0)

    def rnd(*shape):
        return rng.standard_normal(shape, dtype=np.float32)

    groups = [list(range(i, min(i + 4, layers))) for i in range(0, layers, 4)]
    n_files = len(groups) + 1
    weight_map: dict[str, str] = {}
    sizes: list[int] = []

    def write_shard(index: int, t: dict) -> None:
        fname = f"model-{index:05d}-of-{n_files:05d}.safetensors"
        save_file(t, out / fname)
        weight_map.update({k: fname for k in t})
        sizes.extend(v.nbytes for v in t.values())

    for gi, group in enumerate(groups):
        t = {}
        for i in group:
            p = f"model.layers.{i}."
            t[p + "input_layernorm.weight"] = np.ones(hidden, np.float32)
            t[p + "post_attention_layernorm.weight"] = np.ones(hidden, np.float32)
            for n in "qkvo":
                t[p + f"self_attn.{n}_proj.weight"] = rnd(hidden, hidden)
            t[p + "mlp.gate_proj.weight"] = rnd(inter, hidden)
            t[p + "mlp.up_proj.weight"] = rnd(inter, hidden)
            t[p + "mlp.down_proj.weight"] = rnd(hidden, inter)
        write_shard(gi + 1, t)
        del t
    write_shard(n_files, {"model.embed_tokens.weight": rnd(vocab, hidden),
                          "model.norm.weight": np.ones(hidden, np.float32), "lm_head.weight": rnd(vocab, hidden)})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return sum(sizes), max(sizes)


@pytest.mark.slow
def test_peak_rss_bounded_by_largest_tensor(tmp_path, hf_checkpoints):
    warm_hf, _ = hf_checkpoints("llama-tied")
    total, largest = _write_big_llama(tmp_path / "big")
    bound = 8 * largest + 48 * MB
    assert total > 4 * bound, "the checkpoint must be much larger than the bound for the test to mean anything"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    probe = Path(__file__).with_name("rss_probe.py")
    res = subprocess.run(
        [sys.executable, str(probe), str(warm_hf), str(tmp_path / "big"), str(tmp_path / "out")],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    m = json.loads(res.stdout.strip().splitlines()[-1])
    grew = m["peak"] - m["base"]
    print(f"checkpoint {total / MB:.0f} MiB, largest tensor {largest / MB:.1f} MiB, "
          f"peak RSS grew {grew / MB:.1f} MiB (bound {bound / MB:.0f} MiB)")
    assert grew < bound, f"conversion grew peak RSS by {grew / MB:.1f} MiB (> {bound / MB:.0f} MiB)"

    # and the result restores with the right values (spot check one tensor against the source)
    cfg, params = restore_params(tmp_path / "out" / "big")
    assert cfg.num_layers == LAYERS
    from distllm_jax.checkpoint.hf_source import HFSource

    src = HFSource(tmp_path / "big")
    last = LAYERS - 1
    w_down = params["layers"][last]["mlp"]["w_down"]
    ref = src.read(f"model.layers.{last}.mlp.down_proj.weight").T.astype(np.dtype(w_down.dtype))
    np.testing.assert_array_equal(np.asarray(w_down), ref)
