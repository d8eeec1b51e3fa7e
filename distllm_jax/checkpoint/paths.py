"""Paths the user gives and files read from checkpoint directories.

Every path a command receives is made absolute against the working directory first: orbax refuses
relative paths, and a server started from a bench run must see the same file as the user typed.

A checkpoint directory is untrusted input: an index may name ``../../etc/passwd`` as a shard and a
tokenizer file may be a symlink to anything, so every file read from one must resolve inside it. The
one exception is the Hugging Face hub cache, whose ``snapshots/<revision>/`` entries are symlinks into
the repository's ``blobs/``: pointing ``--hf`` at a snapshot is the usual way to convert a download.

Output goes through a temporary directory inside ``--out``, moved into place only once everything is
written, so a failed conversion leaves ``--out`` as it was (or absent, if it did not exist) and nothing
outside it is ever touched.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from distllm_jax.checkpoint.safetensors_reader import CheckpointError

TMP_PREFIX = ".distllm-write-"


def user_path(path: str | Path) -> Path:
    """``path`` with ``~`` expanded, absolute against the working directory (symlinks kept as given)."""
    return Path(path).expanduser().absolute()


def _allowed_roots(root: Path) -> list[Path]:
    real = root.resolve()
    roots = [real]
    if real.parent.name == "snapshots":  # HF hub cache: snapshots/<rev>/<file> -> ../../blobs/<sha>
        roots.append(real.parent.parent / "blobs")
    return roots


def confined(root: Path, name: str | Path, what: str) -> Path:
    """``root / name``, refused unless it resolves (symlinks followed) inside ``root``; ``what`` says
    where the name came from, for the error."""
    path = Path(root) / name
    real = path.resolve()
    if not any(real.is_relative_to(r) for r in _allowed_roots(Path(root))):
        raise CheckpointError(f"{path}: {what} resolves to {real}, outside {Path(root).resolve()}; refused")
    return path


def _check_out(out: Path, overwrite: bool) -> None:
    if out.is_symlink():
        raise CheckpointError(
            f"{out}: output path is a symbolic link (to {out.resolve()}); give the real directory"
        )
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: output path exists and is not a directory")
    if out.is_dir() and any(p for p in out.iterdir() if not p.name.startswith(TMP_PREFIX)) and not overwrite:
        raise CheckpointError(f"{out}: output directory is not empty (pass --overwrite to replace it)")


@contextlib.contextmanager
def staged_output(out_dir: str | Path, overwrite: bool) -> Iterator[Path]:
    """Yield a temporary directory inside ``out_dir`` to write into; on success its entries replace
    ``out_dir``'s (``overwrite``), on failure it is removed along with any directory created here."""
    out = user_path(out_dir)
    _check_out(out, overwrite)
    created = [p for p in (out, *out.parents) if not p.exists()]
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=TMP_PREFIX, dir=out))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        for d in created:  # innermost first; only directories this call made, and only if empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    for old in out.iterdir():
        if old != tmp:
            if old.is_dir() and not old.is_symlink():
                shutil.rmtree(old)
            else:
                old.unlink()
    for entry in tmp.iterdir():
        entry.rename(out / entry.name)
    tmp.rmdir()
