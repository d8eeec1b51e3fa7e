"""Tokenizers: the checkpoint's own (``tokenizer.json`` or GPT-2-style vocab/merges), or the bundled
GPT-2 BPE for random-weight models, all through the ``tokenizers`` library."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers


def bundled_gpt2() -> Tokenizer:
    """GPT-2's byte-level BPE shipped with the package (works offline)."""
    root = resources.files("distllm_jax") / "assets" / "gpt2-bpe"
    with resources.as_file(root / "encoder.json") as vocab, resources.as_file(root / "vocab.bpe") as merges:
        tok = Tokenizer(models.BPE.from_file(str(vocab), str(merges)))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer stored beside a checkpoint; the bundled GPT-2 BPE when it has none."""
    d = Path(ckpt_dir)
    if (d / "tokenizer.json").exists():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    return bundled_gpt2()
