"""Stop conditions and streamed text: deltas add up to the final text, stop strings never leak."""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st

from distllm_jax.engine.sampling import SamplingParams
from distllm_jax.engine.stopping import FinishReason, StopChecker
from distllm_jax.tokenizer import bundled_gpt2

TOK = bundled_gpt2()


def detok(ids):
    return TOK.decode(list(ids))


def run(text, **kw):
    ids = TOK.encode(text).ids
    sc = StopChecker(SamplingParams(max_tokens=kw.pop("max_tokens", 1000), **kw), eos_ids=[50256],
                     detokenize=detok)
    deltas = []
    for t in ids + [50256]:
        d = sc.append(t)
        deltas.append(d)
        if d.finished:
            break
    return sc, deltas


def test_eos_and_deltas_concatenate():
    sc, deltas = run("Hello world, this is a test.")
    assert deltas[-1].finished == FinishReason.STOP and deltas[-1].token is None
    assert "".join(d.text for d in deltas) == "Hello world, this is a test."
    assert sc.ids[-1] != 50256


def test_ignore_eos_runs_to_max_tokens():
    sc = StopChecker(SamplingParams(max_tokens=3, ignore_eos=True), eos_ids=[50256], detokenize=detok)
    assert [sc.append(50256).finished for _ in range(3)] == [None, None, FinishReason.LENGTH]
    with pytest.raises(RuntimeError):
        sc.append(1)


def test_stop_string_across_tokens_is_cut_and_never_streamed():
    sc, deltas = run("The answer is 42. END OF STORY and more", stop=("END OF",))
    assert deltas[-1].finished == FinishReason.STOP
    streamed = "".join(d.text for d in deltas)
    assert streamed == "The answer is 42. "
    assert all("END" not in d.text for d in deltas)


def test_stop_token_id():
    ids = TOK.encode("one two three").ids
    sc = StopChecker(SamplingParams(max_tokens=10, stop_token_ids=(ids[1],)), eos_ids=[], detokenize=detok)
    assert sc.append(ids[0]).finished is None
    d = sc.append(ids[1])
    assert d.finished == FinishReason.STOP and d.token is None and sc.ids == [ids[0]]


def test_multibyte_characters_never_split():
    sc, deltas = run("naïve café 🤖 done")
    assert all("\ufffd" not in d.text for d in deltas)
    assert "".join(d.text for d in deltas) == "naïve café 🤖 done"


def test_external_end_flushes_held_text():
    sc = StopChecker(SamplingParams(max_tokens=50, stop=("xyz-never",)), eos_ids=[], detokenize=detok)
    out = "".join(sc.append(t).text for t in TOK.encode("abc def").ids)
    d = sc.end(FinishReason.CANCELLED)
    assert d.finished == FinishReason.CANCELLED and out + d.text == "abc def"


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=40),
       stop=st.text(alphabet="abc ", min_size=1, max_size=4))
def test_streamed_text_is_prefix_and_stop_free(text, stop):
    sc, deltas = run(text, stop=(stop,))
    streamed = "".join(d.text for d in deltas)
    assert stop not in streamed
    full = TOK.decode(TOK.encode(text).ids)
    cut = full.find(stop)
    assert streamed == (full if cut < 0 else full[:cut])
