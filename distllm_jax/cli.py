"""The ``distllm`` command line: one entry point, one subcommand per job."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from distllm_jax.checkpoint.safetensors_reader import CheckpointError
from distllm_jax.models.config import ConfigError


def _cmd_convert(args: argparse.Namespace) -> int:
    from distllm_jax.checkpoint.convert import convert, write_random
    from distllm_jax.models.presets import DEFAULT_PRESET, preset

    if args.hf and args.preset:
        raise CheckpointError("give either --hf DIR or --preset NAME, not both")
    if args.hf:
        rep = convert(args.hf, args.out, dtype=args.dtype, overwrite=args.overwrite, progress=not args.quiet)
    else:
        name = args.preset or DEFAULT_PRESET
        rep = write_random(
            preset(name), args.out, dtype=args.dtype, seed=args.seed, overwrite=args.overwrite,
            progress=not args.quiet,
        )
    gb = rep.bytes_written / 1e9
    print(
        f"wrote {rep.out_dir}: {rep.config.family} {rep.config.param_count() / 1e6:.1f}M params, "
        f"{rep.tensors} tensors, {gb:.3f} GB {rep.dtype} in {rep.seconds:.1f}s"
    )
    if rep.unused:
        print(f"warning: {len(rep.unused)} tensors in the HF checkpoint were not used: {rep.unused[:5]}",
              file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from distllm_jax.checkpoint.orbax_store import read_meta
    from distllm_jax.models.config import ModelConfig
    from distllm_jax.models.params import bytes_per_dtype

    meta = read_meta(args.ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    per_dtype = bytes_per_dtype({k: (tuple(v[0]), v[1]) for k, v in meta["tensors"].items()})
    n_params = sum(math.prod(v[0]) for v in meta["tensors"].values())
    if args.json:
        print(json.dumps({"config": cfg.to_dict(), "params": n_params, "bytes_per_dtype": per_dtype,
                          "source": meta.get("source"), "tensors": len(meta["tensors"])}, indent=1))
        return 0
    print(f"checkpoint   {Path(args.ckpt).resolve()}")
    print(f"source       {meta.get('source')}")
    print(f"parameters   {n_params:,} ({n_params / 1e9:.3f} B) in {len(meta['tensors'])} tensors")
    for dt, b in sorted(per_dtype.items()):
        print(f"bytes        {dt}: {b:,} ({b / 2**30:.3f} GiB)")
    print("config")
    for k, v in cfg.to_dict().items():
        print(f"  {k:<26}{v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="distllm", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert",
        help="HF checkpoint -> distllm (orbax) checkpoint; without --hf, a random-weight built-in model",
    )
    c.add_argument("--hf", help="Hugging Face model directory (config.json + safetensors)")
    c.add_argument("--preset", help="built-in config to random-initialise (default: tiny-opt)")
    c.add_argument("--out", required=True, help="output checkpoint directory")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    c.add_argument("--seed", type=int, default=0, help="seed for random initialisation")
    c.add_argument("--overwrite", action="store_true", help="replace a non-empty output directory")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_convert)

    i = sub.add_parser("info", help="print a checkpoint's config, parameter count and bytes per dtype")
    i.add_argument("ckpt")
    i.add_argument("--json", action="store_true")
    i.set_defaults(fn=_cmd_info)

    from serve import cli as serve_cli

    sv = sub.add_parser("serve", help="start the gRPC server (no arguments: the embedded default model)",
                        description=serve_cli.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    serve_cli.add_serve_arguments(sv)
    sv.set_defaults(fn=serve_cli.run_serve)
    g = sub.add_parser("generate", help="stream a completion from a running server to the terminal")
    serve_cli.add_generate_arguments(g)
    g.set_defaults(fn=serve_cli.run_generate)

    from distllm_jax.placement.cli import add_commands as add_placement_commands

    add_placement_commands(sub)

    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    from bench.cli import add_bench_commands

    add_bench_commands(bsub)
    return p


def _virtual_cpu_devices(n: int = 8) -> None:
    """On a CPU, give JAX n virtual devices so the disaggregated layout has disjoint meshes (read when
    the backend starts; no effect on GPU platforms or once JAX has started)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None) -> int:
    _virtual_cpu_devices()
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (CheckpointError, ConfigError, ValueError, ConnectionError, FileNotFoundError, KeyError) as e:
        print(f"distllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
