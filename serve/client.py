"""Python clients for the distllm gRPC API (blocking and asyncio), and ``distllm generate``.

    from serve.client import Client
    with Client("127.0.0.1:50051") as c:
        for piece in c.stream_text("Once upon a time", max_tokens=32):
            print(piece, end="")
"""

from __future__ import annotations

import dataclasses
import os
from typing import AsyncIterator, Iterable, Iterator, Sequence

import grpc

from serve.auth import AUTH_ENV
from serve.v1 import distllm_pb2 as pb
from serve.v1 import distllm_pb2_grpc as pb_grpc


@dataclasses.dataclass
class Generation:
    """One sample's whole output. ``logprobs`` (one per token) and ``prompt_logprobs`` (one per
    prompt token, the first without a ``logprob``) are empty unless the request asked for them."""

    token_ids: list[int]
    text: str
    finished: pb.Finished | None
    index: int = 0
    logprobs: list[pb.TokenLogprob] = dataclasses.field(default_factory=list)
    prompt_logprobs: list[pb.TokenLogprob] = dataclasses.field(default_factory=list)


def collect(responses: Iterable[pb.GenerateResponse]) -> list[Generation]:
    """A Generate stream read to its end, as one :class:`Generation` per sample in index order
    (a request of n samples interleaves their messages; each names its sample's index)."""
    samples: dict[int, Generation] = {}
    for r in responses:
        part = r.chunk if r.HasField("chunk") else r.finished
        g = samples.setdefault(part.index, Generation([], "", None, part.index))
        if r.HasField("chunk"):
            g.token_ids += r.chunk.token_ids
            g.text += r.chunk.text
            g.logprobs += r.chunk.logprobs
            g.prompt_logprobs += r.chunk.prompt_logprobs
        else:
            g.finished = r.finished
    return [samples[i] for i in sorted(samples)]


def make_request(prompt: str | Sequence[int], **fields) -> pb.GenerateRequest:
    """``fields``: max_tokens, temperature, top_p, top_k, seed, stop, stop_token_ids, ignore_eos,
    request_id, n, logprobs, prompt_logprobs (None values are left unset, so the server's defaults
    apply: one sample, no log-probabilities)."""
    fields = {k: v for k, v in fields.items() if v is not None}
    if isinstance(prompt, str):
        return pb.GenerateRequest(text=prompt, **fields)
    return pb.GenerateRequest(token_ids=pb.TokenIds(ids=list(prompt)), **fields)


def _credentials(tls_ca: str | bytes | None):
    if tls_ca is None:
        return None
    pem = tls_ca if isinstance(tls_ca, bytes) else open(tls_ca, "rb").read()
    return grpc.ssl_channel_credentials(root_certificates=pem)


def _metadata(token: str | None):
    token = token if token is not None else os.environ.get(AUTH_ENV)
    return (("authorization", f"Bearer {token}"),) if token else ()


class Client:
    def __init__(self, address: str, token: str | None = None, tls_ca: str | bytes | None = None,
                 timeout: float | None = None, options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls_ca)
        self.channel = (grpc.secure_channel(address, creds, options=list(options)) if creds
                        else grpc.insecure_channel(address, options=list(options)))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(token)
        self.timeout = timeout

    def generate(self, prompt: str | Sequence[int], **fields) -> Iterator[pb.GenerateResponse]:
        """The raw response stream (cancel it with ``.cancel()`` on the returned call)."""
        return self.stub.Generate(make_request(prompt, **fields), metadata=self.metadata, timeout=self.timeout)

    def stream_text(self, prompt: str | Sequence[int], **fields) -> Iterator[str]:
        for r in self.generate(prompt, **fields):
            if r.HasField("chunk") and r.chunk.text:
                yield r.chunk.text

    def complete(self, prompt: str | Sequence[int], **fields) -> Generation:
        """The request's one sample; a request of n > 1 samples reads them with :meth:`complete_all`
        (refused here before anything is sent, rather than returning an arbitrary one)."""
        if fields.get("n") not in (None, 1):
            raise ValueError(f"complete() reads one sample; n = {fields['n']}: use complete_all()")
        return (self.complete_all(prompt, **fields) or [Generation([], "", None)])[0]

    def complete_all(self, prompt: str | Sequence[int], **fields) -> list[Generation]:
        """Every sample of the request (``n`` of them), in index order."""
        return collect(self.generate(prompt, **fields))

    def tokenize(self, text: str) -> list[int]:
        return list(self.stub.Tokenize(pb.TokenizeRequest(text=text), metadata=self.metadata).ids)

    def model_info(self) -> pb.ModelInfoResponse:
        return self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncClient:
    """The asyncio flavour (what a load driver uses: thousands of concurrent streams on one loop)."""

    def __init__(self, address: str, token: str | None = None, tls_ca: str | bytes | None = None,
                 options: Sequence[tuple[str, object]] = ()):
        creds = _credentials(tls_ca)
        self.channel = (grpc.aio.secure_channel(address, creds, options=list(options)) if creds
                        else grpc.aio.insecure_channel(address, options=list(options)))
        self.stub = pb_grpc.GenerationStub(self.channel)
        self.metadata = _metadata(token)

    def generate(self, prompt: str | Sequence[int], timeout: float | None = None,
                 **fields) -> AsyncIterator[pb.GenerateResponse]:
        return self.stub.Generate(make_request(prompt, **fields), metadata=self.metadata, timeout=timeout)

    async def model_info(self) -> pb.ModelInfoResponse:
        return await self.stub.ModelInfo(pb.ModelInfoRequest(), metadata=self.metadata)

    async def close(self) -> None:
        await self.channel.close()
