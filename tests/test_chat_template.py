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


# A Mistral-style template (BOS written by the template, [INST] turns) and a Qwen-style one (no BOS,
# im_start turns; loop controls and tojson, which transformers' renderer provides): each saved by
# transformers beside a tokenizer whose post-processor adds a BOS, as Mistral's and LLaMA's do.
MISTRAL_LIKE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")
QWEN_LIKE = ("{%- for m in messages %}{%- if m.role == 'stop' %}{% break %}{% endif %}"
             "<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{%- endfor %}"
             "{{ {'note': '<&>'} | tojson }}{%- if add_generation_prompt %}<|im_start|>assistant\n{%- endif %}")
CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "and now?"}]


def _saved_by_transformers(tmp_path, template):
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    from distllm_jax.tokenizer import byte_level

    tok = byte_level()
    tok.add_special_tokens(["<s>", "</s>", "[INST]", "[/INST]", "<|im_start|>", "<|im_end|>"])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    hf.chat_template = template
    hf.save_pretrained(tmp_path)
    return hf


@pytest.mark.parametrize("template", [MISTRAL_LIKE, QWEN_LIKE], ids=["mistral-like", "qwen-like"])
def test_chat_ids_equal_transformers_apply_chat_template(tmp_path, template):
    """Read from the files transformers writes (``chat_template.jinja`` beside tokenizer.json), copied
    by the converter, rendered and tokenised to the ids ``apply_chat_template`` gives: one BOS, the
    template's, never a second from the tokenizer."""
    import asyncio

    from distllm_jax.checkpoint.convert import TOKENIZER_FILES
    from distllm_jax.tokenizer import load_tokenizer
    from serve.validation import encode

    hf = _saved_by_transformers(tmp_path, template)
    assert (tmp_path / "chat_template.jinja").exists() and "chat_template.jinja" in TOKENIZER_FILES
    t = load_chat_template(tmp_path)
    assert t.name == "checkpoint" and not t.add_special_tokens and t.bos == "<s>"
    msgs = CHAT[1:] if template is MISTRAL_LIKE else [*CHAT, {"role": "stop", "content": ""},
                                                       {"role": "user", "content": "never shown"}]
    text = t.render(msgs)
    assert text == hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    ids = asyncio.run(encode(load_tokenizer(tmp_path), text, t.add_special_tokens)).ids
    assert ids == list(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    assert ids.count(hf.bos_token_id) == (1 if template is MISTRAL_LIKE else 0)
    if template is QWEN_LIKE:  # transformers' tojson (no HTML escapes) and {% break %}
        assert '{"note": "<&>"}' in text and "never shown" not in text


def test_chat_template_file_wins_over_tokenizer_config(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": "old", "bos_token": "<s>"}))
    (tmp_path / "chat_template.jinja").write_text("{{ bos_token }}new")
    assert load_chat_template(tmp_path).render(MSGS) == "<s>new"


def test_http_chat_prompt_is_tokenised_without_a_second_bos(tmp_path):
    """The OpenAI frontend's chat path encodes a checkpoint template's text without the tokenizer's
    special tokens; its plain template and completions keep them."""
    import asyncio
    from types import SimpleNamespace

    from fastapi.testclient import TestClient

    from distllm_jax.tokenizer import load_tokenizer
    from serve.openai_http import OpenAIFrontend
    from serve.validation import Limits

    hf = _saved_by_transformers(tmp_path, MISTRAL_LIKE)
    tok = load_tokenizer(tmp_path)
    counter = SimpleNamespace(inc=lambda: None)
    service = SimpleNamespace(draining=False, ready=asyncio.Event(), tokenizer=tok,
                              limits=Limits(max_seq_len=64, vocab_size=tok.get_vocab_size(), max_prompt_chars=640),
                              metrics=SimpleNamespace(requests=SimpleNamespace(labels=lambda _: counter)))
    service.ready.set()
    seen = []

    def front_for(template):
        front = OpenAIFrontend(service, "m", None, 100_000, template, allowed_hosts=["testserver"])

        async def run(jobs, *args, **kw):
            seen.append(jobs[0].ids)
            return {}

        front._run = run
        return TestClient(front.app())

    msgs = [{"role": "user", "content": "hi"}]
    assert front_for(load_chat_template(tmp_path)).post("/v1/chat/completions", json={"messages": msgs}).status_code == 200
    assert seen[-1] == list(hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)["input_ids"])
    plain = front_for(ChatTemplate())
    assert plain.post("/v1/chat/completions", json={"messages": msgs}).status_code == 200
    assert seen[-1] == tok.encode("user: hi\nassistant:").ids and seen[-1][0] == hf.bos_token_id
    assert plain.post("/v1/completions", json={"prompt": "hi"}).status_code == 200
    assert seen[-1] == tok.encode("hi").ids == [hf.bos_token_id, *tok.encode("hi", add_special_tokens=False).ids]
