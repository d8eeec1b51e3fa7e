"""Tokenizers: the checkpoint's own (``tokenizer.json`` or GPT-2-style vocab/merges), or the bundled
GPT-2 BPE for random-weight models, all through the ``tokenizers`` library."""

from __future__ import annotations

import logging
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


def byte_level(vocab_size: int = 256) -> Tokenizer:
    """A byte-level tokenizer: token i is byte i (GPT-2's byte-to-unicode mapping, no merges). Any
    text round-trips; it suits small models whose vocabulary has at least 256 tokens."""
    if vocab_size < 256:
        raise ValueError(f"a byte-level tokenizer needs 256 tokens, the model has {vocab_size}")
    chars = pre_tokenizers.ByteLevel.alphabet()
    table = _bytes_to_unicode()
    vocab = {table[b]: b for b in range(256)}
    assert set(vocab) == set(chars)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def load_tokenizer(ckpt_dir: str | Path) -> Tokenizer:
    """The tokenizer stored beside a checkpoint; the bundled GPT-2 BPE when it has none, with a warning
    naming it (text would otherwise be tokenised differently from the model's training, silently)."""
    d = Path(ckpt_dir)
    if (d / "tokenizer.json").exists():
        return Tokenizer.from_file(str(d / "tokenizer.json"))
    if (d / "vocab.json").exists() and (d / "merges.txt").exists():
        tok = Tokenizer(models.BPE.from_file(str(d / "vocab.json"), str(d / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        return tok
    tok = bundled_gpt2()
    logging.getLogger(__name__).warning(
        "%s has no tokenizer files (tokenizer.json, or vocab.json + merges.txt); using the bundled GPT-2 "
        "byte-level BPE (%d tokens) instead", d, tok.get_vocab_size())
    return tok
