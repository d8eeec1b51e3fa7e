"""Chat prompts: the checkpoint's Jinja template when it has one, the documented plain one otherwise."""

from __future__ import annotations

import json

import pytest

from serve.chat_template import ChatTemplate, load_chat_template

MSGS = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]


def test_plain_template(tmp_path):
    t = load_chat_template(tmp_path)  # no tokenizer_config.json
    assert t.name == "plain"
    assert t.render(MSGS) == "system: be brief\nuser: hi\nassistant:"


def test_checkpoint_template(tmp_path):
    tpl = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}{% endfor %}"
           "{% if add_generation_prompt %}<|assistant|>{% endif %}")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": tpl, "bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    t = load_chat_template(tmp_path)
    assert t.name == "checkpoint"
    assert t.render(MSGS) == "<s><|system|>be brief</s><|user|>hi</s><|assistant|>"


def test_template_errors_surface():
    t = ChatTemplate("{{ raise_exception('roles must alternate') }}")
    with pytest.raises(ValueError, match="alternate"):
        t.render(MSGS)
