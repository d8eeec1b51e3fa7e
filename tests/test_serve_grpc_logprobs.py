"""Log-probabilities, prompt log-probabilities and n > 1 samples through the gRPC API, on the real
server (a subprocess, as in test_serve.py) with the tiny float32 OPT checkpoint.

Values are checked against ``transformers``' log-softmax; a request without the new fields must get
exactly the messages it got before they existed (what keeps old clients working)."""

from __future__ import annotations

import grpc
import numpy as np
import pytest
import torch

from engine_workload import hf_greedy
from serve.client import Client, collect
from serve.v1 import distllm_pb2 as pb
from server_proc import ServerProc, checkpoint_with_tokenizer
from test_logprobs import hf_logprobs

MAX_N = 3
PROMPT = [5, 9, 23, 7, 1, 100, 42, 17]
# field numbers of distllm.v1 before logprobs and n: all an old client can decode
OLD_CHUNK_FIELDS = {1, 2}
OLD_FINISHED_FIELDS = {1, 2, 3, 4, 5}
OLD_REQUEST_FIELDS = set(range(1, 12))


@pytest.fixture(scope="module")
def hf_model(converted):
    return converted("opt-pre-ln")[0]


@pytest.fixture(scope="module")
def server(converted, tmp_path_factory):
    _, ckpt = converted("opt-pre-ln")
    ckpt = checkpoint_with_tokenizer(ckpt, tmp_path_factory.mktemp("serve-logprobs") / "ckpt")
    srv = ServerProc(ckpt, "--max-n", str(MAX_N))
    yield srv
    assert srv.stop() == 0, "".join(srv.log[-20:])


@pytest.fixture(scope="module")
def client(server):
    with Client(server.address, timeout=60) as c:
        yield c


def numbers(msg) -> set[int]:
    """Field numbers present in ``msg`` (what goes on the wire in proto3)."""
    return {fd.number for fd, _ in msg.ListFields()}


def assert_matches(lp: pb.TokenLogprob, token: int, row: torch.Tensor, k: int) -> None:
    """``lp`` scores ``token`` as ``row`` (a reference log-softmax row) does, with its top ``k``."""
    assert lp.token_id == token and lp.HasField("logprob")
    assert abs(lp.logprob - row[token].item()) < 1e-4, (lp.logprob, row[token].item())
    top = torch.topk(row, k)
    assert [t.token_id for t in lp.top] == top.indices.tolist()
    np.testing.assert_allclose([t.logprob for t in lp.top], top.values.numpy(), atol=1e-4)


def test_logprobs_equal_transformers(client, hf_model):
    responses = list(client.generate(PROMPT, max_tokens=5, logprobs=4, prompt_logprobs=3, ignore_eos=True))
    chunks = [r.chunk for r in responses if r.HasField("chunk")]
    assert [r.HasField("finished") for r in responses] == [False] * len(chunks) + [True]
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert [bool(c.prompt_logprobs) for c in chunks] == [True] + [False] * (len(chunks) - 1)  # on the first only
    (g,) = collect(responses)
    assert g.token_ids == hf_greedy(hf_model, PROMPT, 5)
    ref = hf_logprobs(hf_model, PROMPT + g.token_ids)
    for j, (tok, lp) in enumerate(zip(g.token_ids, g.logprobs, strict=True)):
        assert_matches(lp, tok, ref[len(PROMPT) - 1 + j], 4)
    assert g.finished.HasField("cumulative_logprob")
    assert g.finished.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in g.logprobs), abs=1e-4)
    first, *rest = g.prompt_logprobs
    assert first.token_id == PROMPT[0] and not first.HasField("logprob") and not first.top
    assert len(rest) == len(PROMPT) - 1
    for j, lp in enumerate(rest, start=1):
        assert_matches(lp, PROMPT[j], ref[j - 1], 3)


def test_prompt_logprobs_alone_with_max_tokens_0(client, hf_model):
    responses = list(client.generate(PROMPT, max_tokens=0, prompt_logprobs=0))
    assert [r.WhichOneof("kind") for r in responses] == ["chunk", "finished"]
    chunk, fin = responses[0].chunk, responses[1].finished
    assert not chunk.token_ids and not chunk.text and not chunk.logprobs
    assert fin.output_tokens == 0 and fin.finish_reason == "length" and not fin.HasField("cumulative_logprob")
    ref = hf_logprobs(hf_model, PROMPT)
    assert [lp.token_id for lp in chunk.prompt_logprobs] == PROMPT
    assert [lp.HasField("logprob") for lp in chunk.prompt_logprobs] == [False] + [True] * (len(PROMPT) - 1)
    for j, lp in enumerate(chunk.prompt_logprobs[1:], start=1):
        assert abs(lp.logprob - ref[j - 1, PROMPT[j]].item()) < 1e-4 and not lp.top


def test_n_greedy_samples_each_end_with_their_index(client, hf_model):
    responses = list(client.generate(PROMPT, n=3, max_tokens=4, logprobs=0, ignore_eos=True))
    finals = [r.finished for r in responses if r.HasField("finished")]
    assert sorted(f.index for f in finals) == [0, 1, 2]
    assert responses[-1].HasField("finished")  # the stream ends with the last sample's final
    assert {r.chunk.index for r in responses if r.HasField("chunk")} == {0, 1, 2}
    samples = collect(responses)
    expected = hf_greedy(hf_model, PROMPT, 4)
    assert [s.token_ids for s in samples] == [expected] * 3
    for s in samples:
        assert s.finished.index == s.index and s.finished.output_tokens == 4
        assert s.finished.cumulative_logprob == pytest.approx(sum(lp.logprob for lp in s.logprobs), abs=1e-4)
    with pytest.raises(ValueError, match="complete_all"):
        client.complete(PROMPT, n=3)


def test_seeded_n_samples_are_reproducible(client):
    def run() -> list[list[int]]:
        samples = client.complete_all(PROMPT, n=3, temperature=1.0, seed=7, max_tokens=6, ignore_eos=True)
        assert [s.index for s in samples] == [0, 1, 2]
        return [s.token_ids for s in samples]

    first = run()
    assert run() == first
    assert len({tuple(t) for t in first}) == 3  # each sample draws its own tokens


BAD = [
    (dict(logprobs=21), "logprobs", "[0, 20]"),
    (dict(logprobs=-1), "logprobs", "[0, 20]"),
    (dict(prompt_logprobs=-1), "prompt_logprobs", "[0, 20]"),
    (dict(prompt_logprobs=21), "prompt_logprobs", "[0, 20]"),
    (dict(n=MAX_N + 1), "n", f"[1, {MAX_N}]"),
    (dict(n=0), "n", f"[1, {MAX_N}]"),
    (dict(max_tokens=0, logprobs=2), "max_tokens", "[1, "),  # 0 only with prompt_logprobs
]


@pytest.mark.parametrize("fields,field,limit", BAD, ids=[",".join(f"{k}={v}" for k, v in d.items()) for d, _, _ in BAD])
def test_out_of_range_names_the_field(client, fields, field, limit):
    with pytest.raises(grpc.RpcError) as e:
        list(client.generate(PROMPT, **fields))
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert e.value.details().startswith(f"{field}: must be in {limit}"), e.value.details()


def test_old_style_request_gets_the_old_messages(server, client, hf_model):
    """A request without n, logprobs or prompt_logprobs gets messages holding only the fields that
    existed before them: nothing an old client would find unknown."""
    req = pb.GenerateRequest(token_ids=pb.TokenIds(ids=PROMPT), max_tokens=4, ignore_eos=True)
    assert numbers(req) <= OLD_REQUEST_FIELDS
    responses = list(client.stub.Generate(req, timeout=60))
    assert [r.WhichOneof("kind") for r in responses] == ["chunk"] * 4 + ["finished"]
    for r in responses[:-1]:  # token_ids always; text when the tokens complete some (byte-level tokens)
        assert 1 in numbers(r.chunk) and numbers(r.chunk) <= OLD_CHUNK_FIELDS
    assert numbers(responses[-1].finished) == OLD_FINISHED_FIELDS
    assert [t for r in responses[:-1] for t in r.chunk.token_ids] == hf_greedy(hf_model, PROMPT, 4)
