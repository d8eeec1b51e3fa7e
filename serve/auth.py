"""Bearer-token auth shared by the gRPC server, the HTTP frontend, the client and the command line:
the token's environment variable and the check of an ``authorization`` header. Imports no grpc, so
``distllm serve --help`` needs none."""

from __future__ import annotations

import hmac

AUTH_ENV = "DISTLLM_AUTH_TOKEN"  # where the server and the client read the token (it stays out of `ps`)


def bearer_error(values: list[str], token: str) -> str | None:
    """Why the ``authorization`` values do not carry the token (None when they do). The scheme is
    case-insensitive (RFC 7235); two values are refused, since proxies and frameworks disagree on
    which one counts."""
    if not values:
        return "missing bearer token"
    if len(values) > 1:
        return "more than one authorization value"
    scheme, _, given = values[0].strip().partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        return "missing or wrong bearer token"
    return None
