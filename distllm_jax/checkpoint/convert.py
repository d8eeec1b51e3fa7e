"""Hugging Face -> distllm checkpoint conversion, streamed tensor by tensor.

Every tensor is read, checked (shape, dtype), rearranged into the project's layout, cast, written and
dropped before the next one is read: peak memory is a small multiple of the largest tensor, whatever
the size of the model. All checks that need no tensor data (architecture, missing tensors, shapes,
dtypes, truncation) run before anything is written, so a bad checkpoint fails fast and leaves no
half-written output behind.
"""

from __future__ import annotations

import dataclasses
import json
import math
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import ml_dtypes
import numpy as np

from distllm_jax.checkpoint.hf_source import HFSource
from distllm_jax.checkpoint.orbax_store import ParamWriter
from distllm_jax.checkpoint.paths import confined, staged_output, user_path
from distllm_jax.checkpoint.safetensors_reader import CheckpointError
from distllm_jax.models.config import ConfigError, ModelConfig
from distllm_jax.models.params import TensorSpec, random_tensor, tensor_specs

TARGET_DTYPES = {
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float16": np.dtype(np.float16),
    "float32": np.dtype(np.float32),
}
CONVERTIBLE = {"F64", "F32", "F16", "BF16"}
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "chat_template.jinja",
    "generation_config.json",
)
GPT2_VOCAB = 50257  # random models this large get the bundled GPT-2 BPE as their tokenizer
# Buffers some checkpoints carry that are recomputed, not loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclasses.dataclass
class ConvertReport:
    out_dir: Path
    config: ModelConfig
    dtype: str
    tensors: int
    bytes_written: int
    seconds: float
    unused: list[str]


def _target_dtype(dtype: str) -> np.dtype:
    try:
        return TARGET_DTYPES[dtype]
    except KeyError:
        raise CheckpointError(f"unsupported --dtype {dtype!r}; choose one of {sorted(TARGET_DTYPES)}") from None


def _progress(total_bytes: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc=desc, disable=not enabled)


def _stream(
    writer: ParamWriter,
    specs: list[TensorSpec],
    load: Callable[[TensorSpec], np.ndarray],
    target: np.dtype,
    desc: str,
    progress: bool,
) -> int:
    """Write each tensor as soon as it is produced, holding one at a time; returns bytes written."""
    total = sum(math.prod(s.shape) * target.itemsize for s in specs)
    written = 0
    with _progress(total, desc, progress) as bar:
        for s in specs:
            bar.set_postfix_str(s.name, refresh=False)
            a = load(s)
            writer.add(s.name, a)
            written += a.nbytes
            bar.update(a.nbytes)
            del a
    writer.finish()
    return written


def _resolve_names(src: HFSource, specs: list[TensorSpec]) -> dict[str, str]:
    """Map each spec to the HF tensor name actually present (with or without the ``model.`` prefix)."""
    names = src.names()
    prefix = None
    for cand in ("model.", ""):
        if cand + specs[0].hf_name in names:
            prefix = cand
            break
    if prefix is None:
        raise CheckpointError(
            f"{src.dir}: missing tensor 'model.{specs[0].hf_name}' (looked in {', '.join(map(str, src.files()))})"
        )
    out = {}
    for s in specs:
        hf = s.hf_name if s.name == "lm_head" else prefix + s.hf_name
        if hf not in names:
            raise CheckpointError(
                f"{src.dir}: missing tensor {hf!r} (needed for {s.name}; looked in "
                f"{', '.join(p.name for p in src.files())})"
            )
        out[s.name] = hf
    return out


def _check(src: HFSource, spec: TensorSpec, hf: str, target: np.dtype) -> None:
    f = src.file(hf)
    if src.shape(hf) != spec.hf_shape:
        raise CheckpointError(
            f"{f}: tensor {hf!r} has shape {src.shape(hf)}, config.json implies {spec.hf_shape}"
        )
    if src.dtype(hf) not in CONVERTIBLE:
        raise CheckpointError(
            f"{f}: tensor {hf!r} has dtype {src.dtype(hf)}, which cannot be converted to {target.name} "
            f"(convertible: {sorted(CONVERTIBLE)})"
        )


def convert(
    hf_dir: str | Path,
    out_dir: str | Path,
    dtype: str = "bfloat16",
    overwrite: bool = False,
    progress: bool = True,
) -> ConvertReport:
    """Convert a HF directory into a distllm (orbax) checkpoint; see the module docstring."""
    t0 = time.perf_counter()
    hf_dir, out_dir = user_path(hf_dir), user_path(out_dir)
    target = _target_dtype(dtype)
    side_files = _side_files(hf_dir, ("config.json", *TOKENIZER_FILES))
    try:
        cfg = ModelConfig.from_hf_file(hf_dir)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e
    src = HFSource(hf_dir)
    specs = tensor_specs(cfg)
    hf_names = _resolve_names(src, specs)
    for s in specs:
        _check(src, s, hf_names[s.name], target)
    used = set(hf_names.values())
    unused = sorted(
        n for n in src.names() - used if not n.endswith(IGNORED_SUFFIXES) and not (n == "lm_head.weight")
    )

    def load(s: TensorSpec) -> np.ndarray:
        return np.ascontiguousarray(s.from_hf(src.read(hf_names[s.name])).astype(target, copy=False))

    with staged_output(out_dir, overwrite) as tmp:
        writer = ParamWriter(tmp, cfg, dtype, source=str(hf_dir.resolve()))
        written = _stream(writer, specs, load, target, f"convert {hf_dir.name}", progress)
        _copy(side_files, tmp)
    return ConvertReport(out_dir, cfg, dtype, len(specs), written, time.perf_counter() - t0, unused)


def _side_files(src_dir: Path, names: tuple[str, ...] = TOKENIZER_FILES) -> list[Path]:
    """The files among ``names`` present in ``src_dir``, each confined to it (checked before writing)."""
    return [confined(src_dir, n, "side file") for n in names if (src_dir / n).exists()]


def _copy(files: list[Path], out_dir: Path) -> None:
    for f in files:
        shutil.copyfile(f, out_dir / f.name)


def write_random(
    hf_config: dict,
    out_dir: str | Path,
    dtype: str = "float32",
    seed: int = 0,
    overwrite: bool = False,
    progress: bool = True,
    tokenizer_dir: str | Path | None = None,
) -> ConvertReport:
    """A random-initialised checkpoint from a HF config dict (the embedded default, or real shapes for
    performance work), streamed the same way as a conversion."""
    t0 = time.perf_counter()
    out_dir = user_path(out_dir)
    target = _target_dtype(dtype)
    cfg = ModelConfig.from_hf_dict(hf_config, source="preset")
    specs = tensor_specs(cfg)
    side_files = _side_files(user_path(tokenizer_dir)) if tokenizer_dir is not None else []
    with staged_output(out_dir, overwrite) as tmp:
        writer = ParamWriter(tmp, cfg, dtype, source=f"random(seed={seed})")
        written = _stream(writer, specs, lambda s: random_tensor(s, seed, target), target, "random init", progress)
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=1))
        _copy(side_files, tmp)
        if tokenizer_dir is None and cfg.vocab_size >= GPT2_VOCAB:
            from distllm_jax.tokenizer import bundled_gpt2

            bundled_gpt2().save(str(tmp / "tokenizer.json"))
    return ConvertReport(out_dir, cfg, dtype, len(specs), written, time.perf_counter() - t0, [])


