"""The project's checkpoint directory: an orbax PyTree of params plus JSON metadata.

Layout::

    CKPT/distllm.json     format version, ModelConfig, dtype, per-tensor shapes, source
    CKPT/params/          orbax checkpoint (OCDBT), nested {"embed": {"tokens": ...}, "layers": {"0": ...}}
    CKPT/config.json, tokenizer files   copied from the HF directory (or written for random models)

Writing goes through orbax's partial save, one tensor per call, so the converter never holds more than
one tensor; restoring asks orbax for each tensor already placed with its NamedSharding, so each device
reads only its shard.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Collection

import jax
import numpy as np

from distllm_jax.checkpoint.paths import user_path
from distllm_jax.checkpoint.safetensors_reader import CheckpointError
from distllm_jax.models.config import ModelConfig
from distllm_jax.models.params import Params, tensor_specs, unflatten

FORMAT_VERSION = 1
META_FILE = "distllm.json"
PARAMS_DIR = "params"


def _nested(name: str, value: Any) -> dict:
    parts = name.split(".")
    node: dict = {}
    root = node
    for p in parts[:-1]:
        node[p] = {}
        node = node[p]
    node[parts[-1]] = value
    return root


def _ocp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import orbax.checkpoint.experimental.v1 as ocp
    return ocp


class ParamWriter:
    """Streams tensors into ``CKPT/params`` one at a time; :meth:`finish` commits and writes metadata."""

    def __init__(self, out_dir: str | Path, cfg: ModelConfig, dtype: str, source: str):
        self.out = user_path(out_dir)
        self.cfg = cfg
        self.dtype = dtype
        self.source = source
        self.tensors: dict[str, list] = {}
        self._ocp = _ocp()
        self.out.mkdir(parents=True, exist_ok=True)

    def add(self, name: str, array: np.ndarray) -> None:
        self._ocp.partial.save(self.out / PARAMS_DIR, _nested(name, array))
        self.tensors[name] = [list(array.shape), np.dtype(array.dtype).name]

    def finish(self) -> Path:
        self._ocp.partial.finalize(self.out / PARAMS_DIR)
        meta = {
            "format": FORMAT_VERSION,
            "model_config": self.cfg.to_dict(),
            "dtype": self.dtype,
            "source": self.source,
            "tensors": self.tensors,
        }
        (self.out / META_FILE).write_text(json.dumps(meta, indent=1))
        return self.out


def read_meta(ckpt_dir: str | Path) -> dict:
    """The checkpoint's ``distllm.json``: format, ModelConfig, dtype, per-tensor shapes, source."""
    path = user_path(ckpt_dir) / META_FILE
    try:
        meta = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{path}: not a distllm checkpoint (no {META_FILE}; run `distllm convert`)") from e
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise CheckpointError(f"{path}: corrupt {META_FILE} ({type(e).__name__})") from e
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: corrupt {META_FILE} (a JSON object expected)")
    if meta.get("format") != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format {meta.get('format')} (expected {FORMAT_VERSION})")
    return meta


def read_config(ckpt_dir: str | Path) -> ModelConfig:
    """The checkpoint's ModelConfig, without reading any tensor."""
    return ModelConfig.from_dict(read_meta(ckpt_dir)["model_config"])


def restore_params(
    ckpt_dir: str | Path,
    mesh: jax.sharding.Mesh | None = None,
    dtype: Any = None,
    names: Collection[str] | None = None,
) -> tuple[ModelConfig, Params]:
    """Load params onto ``mesh`` (default: one device), each tensor with its NamedSharding.

    ``dtype`` casts on load (e.g. restore a bfloat16 checkpoint as float32 for parity checks).
    ``names`` restores only those tensors (a pipeline stage reads just its own layers); the other
    layers come back as empty dicts.
    """
    from distllm_jax.parallel import make_mesh, spec_partition

    ckpt_dir = user_path(ckpt_dir)  # orbax refuses relative paths
    meta = read_meta(ckpt_dir)
    cfg = ModelConfig.from_dict(meta["model_config"])
    mesh = mesh or make_mesh(jax.devices()[:1])
    abstract: dict = {}
    ocp = _ocp()
    # tensors not asked for are orbax placeholders (not read); older orbax without them reads all
    skip = getattr(ocp, "PLACEHOLDER", None)
    for spec in tensor_specs(cfg):
        if names is not None and spec.name not in names:
            if skip is not None:
                _merge(abstract, _nested(spec.name, skip))
            continue
        stored = meta["tensors"].get(spec.name)
        if stored is None:
            raise CheckpointError(f"{ckpt_dir}: tensor {spec.name!r} missing from the checkpoint")
        if tuple(stored[0]) != spec.shape:
            raise CheckpointError(
                f"{ckpt_dir}: tensor {spec.name!r} has shape {tuple(stored[0])}, config expects {spec.shape}"
            )
        sharding = jax.sharding.NamedSharding(mesh, spec_partition(spec, mesh))
        leaf = jax.ShapeDtypeStruct(spec.shape, np.dtype(dtype or stored[1]), sharding=sharding)
        _merge(abstract, _nested(spec.name, leaf))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tree = ocp.load_pytree(ckpt_dir / PARAMS_DIR, abstract)
    flat = {k: v for k, v in _flatten_nested(tree).items() if names is None or k in names}
    return cfg, unflatten(flat, cfg)


def _merge(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and k in dst:
            _merge(dst[k], v)
        else:
            dst[k] = v


def _flatten_nested(tree: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in tree.items():
        if isinstance(v, dict):
            out.update(_flatten_nested(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
