"""Anthropic-shaped error bodies, so that the `claude` CLI and the SDKs show our errors like the API's own."""

from __future__ import annotations

import json

JSON_HEADERS = [("Content-Type", "application/json")]


def error_body(kind: str, message: str) -> bytes:
    """`{"type":"error","error":{"type":kind,"message":message}}` as compact JSON bytes."""
    return json.dumps(
        {"type": "error", "error": {"type": kind, "message": message}}, separators=(",", ":")
    ).encode()


def sse_error_event(kind: str, message: str) -> bytes:
    """An SSE `error` event, the way the API ends a stream that failed after it started."""
    return b"event: error\ndata: " + error_body(kind, message) + b"\n\n"


class ProxyError(Exception):
    """A failure we answer ourselves: HTTP status, Anthropic error type and a message safe to show."""

    def __init__(self, status: int, kind: str, message: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(message)
        self.status = status
        self.kind = kind
        self.message = message
        self.headers = headers or []

    def body(self) -> bytes:
        return error_body(self.kind, self.message)
