"""Limits, Anthropic vocabulary and the exceptions every part of the fake upstream shares."""

from __future__ import annotations

import datetime as dt
import json
import sys
from collections.abc import Iterable
from typing import Any

READ_TIMEOUT = 120.0  # idle keep-alive and request-body read bound
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_STALL = 120.0  # stall-after / stall-before-headers
MAX_SLEEP = 120.0  # ttfb-ms / delay-ms / fault delays
JSON_PIECE = 256 * 1024  # a JSON body is written in pieces of this size (wait-release: after the first)
RELEASE_TIMEOUT = 10.0  # wait-release: a stream nobody releases fails (reset) after this long
HOLD_TIMEOUT = 30.0  # a token-endpoint `hold` fault nobody releases fails (reset) after this long
OAUTH_BETA = "oauth-2025-04-20"  # Anthropic refuses an OAuth bearer token without this anthropic-beta flag
OAUTH_BETA_MISSING = "OAuth authentication is currently not supported."  # what it says then
MAX_HEAD = 64 * 1024
MAX_BODY = 256 * 1024 * 1024
MAX_RECORDS = 10_000
RECORD_BODY_LIMIT = 64 * 1024
MAX_TOKEN_LOG = 1_000

DEFAULT_TEXT = "Hello from fake upstream"
DEFAULT_MODEL = "claude-sonnet-4-6"
DEFAULT_SCOPE = "user:inference user:profile"
FIVE_HOURS_DEFAULT_RESET = 3 * 3600
SEVEN_DAY_DEFAULT_RESET = 5 * 86400

ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    502: "api_error",
    503: "api_error",
    504: "api_error",
    529: "overloaded_error",
}
RETRY_AFTER_STATUSES = {429, 503, 529}
ENCODINGS = ("gzip", "br", "zstd", "deflate")
RL = "anthropic-ratelimit-unified-"

MODELS = [
    ("claude-opus-4-7", "Claude Opus 4.7"),
    ("claude-sonnet-4-6", "Claude Sonnet 4.6"),
    ("claude-haiku-4-5-20251001", "Claude Haiku 4.5"),
]


def log(message: str) -> None:
    print(f"fake_upstream: {message}", file=sys.stderr, flush=True)


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def rfc3339(epoch: float) -> str:
    return dt.datetime.fromtimestamp(epoch, tz=dt.timezone.utc).isoformat()


def bounded(seconds: float, limit: float = MAX_SLEEP) -> float:
    return max(0.0, min(seconds, limit))


def has_oauth_beta(anthropic_beta: str | None) -> bool:
    """Whether an `anthropic-beta` value (all its lines joined) carries the OAuth flag."""
    return OAUTH_BETA in {item.strip() for item in (anthropic_beta or "").split(",")}


class HttpError(Exception):
    """Answer the current request with an Anthropic-shaped error (or a plain JSON body) and go on."""

    def __init__(self, status: int, message: str, *, body: Any = None, headers: Iterable[tuple[str, str]] = (),
                 close: bool = False) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.body = body
        self.headers = list(headers)
        self.close = close


class ClientGone(Exception):
    """The client closed or reset the connection while we were answering."""


class DropConnection(Exception):
    """A handler already closed (or reset) the socket on purpose; stop serving this connection."""


def anthropic_error(status: int, message: str, error_type: str | None = None,
                    request_id: str | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {
        "type": "error",
        "error": {"type": error_type or ERROR_TYPES.get(status, "api_error"), "message": message},
    }
    if request_id:
        body["request_id"] = request_id
    return body
