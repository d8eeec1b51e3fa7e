"""The distllm command line: one entry point, one subcommand per job.

The library's own commands (convert, info, and placement's) are built here; the server's (serve,
generate) and the benchmarks' (bench) live in their packages, which sit above the library, and are
mounted through the entry-point group ``distllm.commands`` (pyproject.toml), so that this module
imports neither."""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable, Sequence

from distllm_jax.checkpoint.safetensors_reader import CheckpointError
from distllm_jax.models.config import ConfigError, ModelConfig


def _cmd_convert(args: argparse.Namespace) -> int:
    from distllm_jax.checkpoint.convert import convert, write_random
    from distllm_jax.models.params import param_count
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
        f"wrote {rep.out_dir}: {rep.config.name} {si_count(param_count(rep.config))} params, "
        f"{rep.tensors} tensors, {gb:.3f} GB {rep.dtype} in {rep.seconds:.1f}s"
    )
    if rep.unused:
        print(f"warning: {len(rep.unused)} tensors in the HF checkpoint were not used: {rep.unused[:5]}",
              file=sys.stderr)
    return 0


def _cmd_info(args: argparse.Namespace) -> int:
    from distllm_jax.checkpoint.orbax_store import read_meta
    from distllm_jax.models.params import bytes_per_dtype

    meta = read_meta(args.ckpt)
    cfg = ModelConfig.from_dict(meta["model_config"])
    per_dtype = bytes_per_dtype({k: (tuple(v[0]), v[1]) for k, v in meta["tensors"].items()})
    n_params = sum(math.prod(v[0]) for v in meta["tensors"].values())
    config = _shown_config(cfg, meta["tensors"])
    if args.json:
        print(json.dumps({"config": config, "params": n_params, "bytes_per_dtype": per_dtype,
                          "source": meta.get("source"), "tensors": len(meta["tensors"])}, indent=1))
        return 0
    print(f"checkpoint   {Path(args.ckpt).resolve()}")
    print(f"source       {meta.get('source')}")
    print(f"parameters   {n_params:,} ({si_count(n_params)}) in {len(meta['tensors'])} tensors")
    for dt, b in sorted(per_dtype.items()):
        print(f"bytes        {dt}: {b:,} ({b / 2**30:.3f} GiB)")
    print("config")
    for k, v in config.items():
        print(f"  {k:<26}{v}")
    return 0


def si_count(n: int) -> str:
    """A count with three significant digits and a K/M/B suffix: 262,272 reads as 262K, not 0.000 B."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.3g}{suffix}"
    return str(n)


def _shown_config(cfg: ModelConfig, tensors: dict) -> dict:
    """The config as ``info`` shows it, with the bias flags read from the tensors actually stored: the
    config's ``attention_bias``/``qkv_bias``/``mlp_bias`` describe the llama layout's optional biases,
    while OPT (whose HF config says ``enable_bias``) always has them."""
    layer = [n for n in tensors if n.startswith("layers.")]
    return {**cfg.to_dict(),
            "attention_bias": any(n.endswith(".attn.bo") for n in layer),
            "qkv_bias": any(n.endswith(".attn.bq") for n in layer),
            "mlp_bias": any(".mlp.b_" in n for n in layer)}


def plain_text(text: str) -> str:
    """Docstrings used as descriptions are written in reST; a terminal would show its markup literally."""
    text = re.sub(r"``([^`]*)``", r"\1", text)
    return re.sub(r"::$", ":", text, flags=re.M)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Every flag's default after its help (unless the help already says it, or there is none to show);
    descriptions keep their line breaks, without reST markup."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        nothing = action.default is None or action.default is False or action.default == []
        if nothing or action.default == argparse.SUPPRESS or "default" in text.lower():
            return text
        return super()._get_help_string(action)

    def _format_text(self, text: str) -> str:
        return super()._format_text(plain_text(text))


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose subcommands (created with its class) all use :class:`HelpFormatter`."""

    def __init__(self, *args: object, formatter_class: type = HelpFormatter, **kwargs: object) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    import distllm_jax

    try:
        return version("distllm-jax")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return distllm_jax.__version__


def build_parser(commands: Sequence[AddCommand] | None = None) -> argparse.ArgumentParser:
    """The whole command tree: the library's own commands, then ``commands`` (each adds its
    subcommand; None: :func:`installed_commands`, the entry points of group ``distllm.commands``)."""
    p = Parser(prog="distllm", description=__doc__)
    p.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser(
        "convert",
        help="HF checkpoint -> distllm (orbax) checkpoint; without --hf, a random-weight built-in model",
        description="Convert a Hugging Face checkpoint, or write a built-in config with random weights,\n"
                    "into a distllm checkpoint directory (paths may be relative to the working directory).",
    )
    c.add_argument("--hf", help="Hugging Face model directory (config.json + safetensors)")
    c.add_argument("--preset", help="built-in config to random-initialise (default: tiny-opt)")
    c.add_argument("--out", required=True, help="output checkpoint directory (created; must be empty)")
    c.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype the tensors are stored in")
    c.add_argument("--seed", type=int, default=0, help="seed for random initialisation")
    c.add_argument("--overwrite", action="store_true",
                   help="replace a non-empty output directory (once the new checkpoint is complete)")
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    c.set_defaults(fn=_cmd_convert)

    i = sub.add_parser("info", help="print a checkpoint's config, parameter count and bytes per dtype",
                       description="Print a distllm checkpoint's config, parameter count and bytes per dtype.")
    i.add_argument("ckpt", help="a distllm checkpoint directory")
    i.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    i.set_defaults(fn=_cmd_info)

    from distllm_jax.placement.cli import add_commands as add_placement_commands

    add_placement_commands(sub)
    for add in installed_commands() if commands is None else commands:
        add(sub)
    return p


# ---- commands from other packages ---------------------------------------------------------------

COMMANDS_GROUP = "distllm.commands"
# this repository's commands outside the library (pyproject.toml declares their entry points): in an
# environment that lacks one, its command is still listed, and says how to get it
REPOSITORY_COMMANDS = ("serve", "generate", "bench")

AddCommand = Callable[[Any], None]


def installed_commands() -> list[AddCommand]:
    """What mounts each command of the entry-point group ``distllm.commands``: an entry point ``name``
    names a function that adds the subcommand ``name`` to the ``distllm`` command's subparsers (so the
    library never imports the packages that serve or benchmark it). A command of
    :data:`REPOSITORY_COMMANDS` that is not installed, or fails to import, is mounted as a stub that
    says so; the repository's commands come first, in that order, then any other by name."""
    from importlib.metadata import entry_points

    found = {}
    for ep in entry_points(group=COMMANDS_GROUP):
        found.setdefault(ep.name, ep)  # the first of two distributions declaring one name
    order = [*REPOSITORY_COMMANDS, *sorted(set(found) - set(REPOSITORY_COMMANDS))]
    out = []
    for name in order:
        if name not in found:
            out.append(functools.partial(_unavailable, name, f"no entry point of group {COMMANDS_GROUP} names it "
                                         "here (python3 -m pip install -e . registers the repository's)"))
            continue
        try:
            out.append(found[name].load())
        except ImportError as e:  # a missing optional dependency: the other commands still work
            out.append(functools.partial(_unavailable, name, f"{found[name].value} does not import ({e})"))
    return out


def _unavailable(name: str, why: str, sub: Any) -> None:
    """A command that cannot run here: it takes any arguments and fails with ``why`` (exit status 2)."""
    # no options (prefix_chars): ``--help`` and the rest are taken as they come, and answered with ``why``
    p = sub.add_parser(name, help=f"(not available here: distllm {name} says why)", add_help=False,
                       prefix_chars="\0")
    p.add_argument("args", nargs=argparse.REMAINDER, help="ignored")

    def fail(args: argparse.Namespace) -> int:
        print(f"distllm {name}: error: the {name} command is not available: {why}", file=sys.stderr)
        return 2

    p.set_defaults(fn=fail)


def _virtual_cpu_devices(n: int = 8) -> None:
    """On a CPU, give JAX n virtual devices so the disaggregated layout has disjoint meshes (read when
    the backend starts; no effect on GPU platforms or once JAX has started)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


def main(argv: list[str] | None = None, commands: Sequence[AddCommand] | None = None) -> int:
    """Run one command (``commands``: as :func:`build_parser`); errors the user can act on end in one
    line and exit status 2."""
    _virtual_cpu_devices()
    args = build_parser(commands).parse_args(argv)
    try:
        code = args.fn(args)
        sys.stdout.flush()  # inside the try: a reader that went away (`| head`) surfaces here
        return code
    except BrokenPipeError:
        # the reader closed the pipe: stop quietly, and keep the interpreter's own final flush quiet too
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except (CheckpointError, ConfigError, ValueError, ConnectionError, FileNotFoundError, KeyError) as e:
        print(f"distllm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
