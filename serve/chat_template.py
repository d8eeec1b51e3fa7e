"""Chat prompts: the checkpoint's own chat template (``chat_template`` in its tokenizer_config.json,
Jinja, as Hugging Face renders it) or, without one, a documented plain template:

    <role>: <content>\\n        (one line per message, roles as given)
    assistant:                 (the generation prompt)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

PLAIN = "plain"


class ChatTemplate:
    def __init__(self, template: str | None = None, bos: str = "", eos: str = ""):
        self.source = template
        self.bos, self.eos = bos, eos
        self._jinja = None
        if template:
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
            env.globals["raise_exception"] = _raise
            self._jinja = env.from_string(template)

    @property
    def name(self) -> str:
        return "checkpoint" if self._jinja else PLAIN

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        if self._jinja is not None:
            return self._jinja.render(messages=list(messages), add_generation_prompt=True,
                                      bos_token=self.bos, eos_token=self.eos)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"


def _raise(message: str):
    raise ValueError(message)


def _token_text(v: Any) -> str:
    return v.get("content", "") if isinstance(v, dict) else (v or "")


def load_chat_template(ckpt_dir: str | Path | None) -> ChatTemplate:
    if ckpt_dir is not None:
        p = Path(ckpt_dir) / "tokenizer_config.json"
        if p.exists():
            cfg = json.loads(p.read_text())
            tpl = cfg.get("chat_template")
            if isinstance(tpl, list):  # named templates: take the default one
                tpl = next((t["template"] for t in tpl if t.get("name") == "default"), None)
            if tpl:
                return ChatTemplate(tpl, _token_text(cfg.get("bos_token")), _token_text(cfg.get("eos_token")))
    return ChatTemplate()
