"""Chat prompts: the checkpoint's own chat template (Jinja, rendered as Hugging Face renders it: its
``chat_template.jinja``, else ``chat_template`` in its tokenizer_config.json) or, without one, a
documented plain template:

    <role>: <content>\\n        (one line per message, roles as given)
    assistant:                 (the generation prompt)

A checkpoint's template writes the special tokens it wants (Mistral's and LLaMA's a BOS, Qwen's none),
so its text is tokenised without the tokenizer's own (``add_special_tokens``), as transformers'
``apply_chat_template`` does; the plain text gets them, like any other prompt.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any, Sequence

PLAIN = "plain"
TEMPLATE_FILE = "chat_template.jinja"  # where transformers >= 4.47 saves a tokenizer's template


class ChatTemplate:
    def __init__(self, template: str | None = None, bos: str = "", eos: str = ""):
        self.source = template
        self.bos, self.eos = bos, eos
        self._jinja = None
        if template:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            # the environment transformers renders templates in: {% break %}, a tojson that does not
            # escape HTML, strftime_now (LLaMA 3.x's date line), raise_exception
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
            self._jinja = env.from_string(template)

    @property
    def name(self) -> str:
        return "checkpoint" if self._jinja else PLAIN

    @property
    def add_special_tokens(self) -> bool:
        """Whether the rendered text still needs the tokenizer's special tokens (BOS)."""
        return self._jinja is None

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        if self._jinja is not None:
            return self._jinja.render(messages=list(messages), add_generation_prompt=True,
                                      bos_token=self.bos, eos_token=self.eos)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _raise(message: str):
    raise ValueError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _token_text(v: Any) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def load_chat_template(ckpt_dir: str | Path | None) -> ChatTemplate:
    if ckpt_dir is None:
        return ChatTemplate()
    d = Path(ckpt_dir)
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text()) if p.exists() else {}
    tpl = cfg.get("chat_template")
    if isinstance(tpl, list):  # named templates: take the default one
        tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
    if (d / TEMPLATE_FILE).exists():  # takes precedence, as in transformers
        tpl = (d / TEMPLATE_FILE).read_text(encoding="utf-8")
    if tpl:
        return ChatTemplate(tpl, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
    return ChatTemplate()
