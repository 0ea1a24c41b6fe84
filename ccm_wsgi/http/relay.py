"""Relay an upstream response body to the client as it arrives, with a usage tap on the side.

The relay is the WSGI response iterable: pywsgi writes each yielded chunk at once (chunked
encoding), so an SSE event reaches the client when the upstream sends it. The tap sees a chunk only
after it was handed to the server, so accounting never delays the client, and never changes a byte.
`close()` is the single exit: a fully read upstream connection goes back to the pool, anything else
(client gone, upstream dropped, idle timeout) is closed so the half-read connection is never reused,
and the exchange is finished (usage recorded, access line written) exactly once. The iterator calls
it itself once the upstream body has ended, before the server writes the end of the response (the
last chunk of a Content-Length body, or the terminating chunk), so a client that received the whole
response can rely on its usage being on disk; pywsgi's own `close()` call is then a no-op.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import logging
import re
import socket
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import urllib3
from urllib3.exceptions import HTTPError, ReadTimeoutError

from ..accounting.decoding import Decoder, decoder_for
from ..accounting.sse import SSETap, Usage, parse_json_usage
from ..errors import sse_error_event

log = logging.getLogger("ccm_wsgi.relay")

CHUNK = 65536
JSON_TAP_LIMIT = 8 * 1024 * 1024
JSON_TAP_EDGE = 64 * 1024  # of a larger body only the head (its `model`) and the tail (its `usage`) are kept
_MODEL_KEY = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')
_USAGE_KEY = re.compile(rb'"usage"\s*:\s*(?=\{)')


_CUT_MESSAGES = {
    "idle timeout": "upstream sent nothing for {0.idle_timeout:g}s",
    "upstream dropped": "the upstream connection was lost mid-stream",
    "shutdown": "ccm-wsgi is shutting down; the response was cut short",
}


class Tap(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> Usage: ...


class JSONTap:
    """Keeps a (bounded) copy of a non-streaming body to read its `usage` at the end."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0
        self.tail = b""

    def feed(self, chunk: bytes) -> None:
        if self.size <= JSON_TAP_LIMIT:
            self.parts.append(chunk)
            self.size += len(chunk)
            if self.size > JSON_TAP_LIMIT:  # too large to keep: its head and, from now on, its tail
                data = b"".join(self.parts)
                self.parts, self.tail = [data[:JSON_TAP_EDGE]], data[-JSON_TAP_EDGE:]
        else:
            self.tail = (self.tail + chunk)[-JSON_TAP_EDGE:]

    def finish(self) -> Usage:
        if self.size <= JSON_TAP_LIMIT:
            return parse_json_usage(b"".join(self.parts))
        return edges_usage(self.parts[0], self.tail)


def edges_usage(head: bytes, tail: bytes) -> Usage:
    """Usage of a Messages response too large to keep whole: `model` is one of its first keys, `usage` its last."""
    message: dict[str, Any] = {}
    model = _MODEL_KEY.search(head)
    usage = None
    for usage in _USAGE_KEY.finditer(tail):  # noqa: B007 (the last one)
        pass
    try:
        if model is not None:
            message["model"] = json.loads(model.group(1))
        if usage is not None:
            message["usage"] = json.JSONDecoder().raw_decode(tail[usage.end():].decode("utf-8", "replace"))[0]
    except ValueError:
        pass
    return parse_json_usage(json.dumps(message).encode()) if "usage" in message else Usage()


class DecodingTap:
    """Feeds the decompressed bytes of a `Content-Encoding` body to another tap; the client gets the raw ones."""

    def __init__(self, inner: Tap, decoder: Decoder):
        self.inner = inner
        self.decoder = decoder

    def feed(self, chunk: bytes) -> None:
        data = self.decoder.decompress(chunk)
        if data:
            self.inner.feed(data)

    def finish(self) -> Usage:
        return self.inner.finish()


def usage_tap(sse: bool, encoding: str | None) -> Tap:
    """The tap for a relayed body: SSE events, or a copy of a JSON body, decompressed first if need be."""
    tap: Tap = SSETap() if sse else JSONTap()
    decoder = decoder_for(encoding)
    return DecodingTap(tap, decoder) if decoder is not None else tap


def body_usage(data: bytes, encoding: str | None) -> Usage:
    """The usage of a whole JSON body read at once (the usual case needs no copy and no decoder)."""
    if not encoding and len(data) <= JSON_TAP_LIMIT:
        return parse_json_usage(data)
    tap = usage_tap(False, encoding)
    tap.feed(data)
    return tap.finish()


class Relay:
    """Iterable WSGI body over an urllib3 response; `finish(relay)` is called once from `close()`."""

    __slots__ = ("__weakref__", "_closed", "_pending", "complete", "cut", "finish", "idle_timeout", "sent", "sse",
                 "tap", "upstream")

    def __init__(
        self,
        upstream: urllib3.BaseHTTPResponse,
        sse: bool,
        tap: Tap | None,
        finish: Callable[[Relay], None],
        idle_timeout: float,
    ):
        self.upstream = upstream
        self.sse = sse
        self.tap = tap
        self.finish = finish
        self.idle_timeout = idle_timeout
        self.sent = 0
        self.complete = False
        self.cut = ""  # why the body ended early: "client gone", "upstream dropped", "idle timeout"
        self._pending: bytes | None = None
        self._closed = False

    def __iter__(self) -> Iterator[bytes]:
        self._set_idle_timeout()
        upstream = self.upstream
        chunks: Iterator[bytes]
        if upstream.chunked and isinstance(upstream, urllib3.HTTPResponse) and upstream.supports_chunked_reads():
            # Each HTTP chunk (an SSE event) as soon as it is complete: read_chunked wraps the whole body
            # once, where read1 pays urllib3's and http.client's per-call checks on every event.
            chunks = upstream.read_chunked(CHUNK, decode_content=False)
        else:
            chunks = iter(functools.partial(upstream.read1, CHUNK, decode_content=False), b"")
        tail = b""
        try:
            for chunk in chunks:
                if not chunk:
                    break
                if getattr(upstream, "length_remaining", None) == 0:
                    # The last bytes of a body with a Content-Length: the client has the whole response
                    # as soon as they are written, so the exchange is recorded first.
                    self._pending = chunk
                    self.complete = True
                    self.close()
                    yield chunk
                    return
                self._pending = chunk
                yield chunk
                self._consume()
            self.complete = True
        except ReadTimeoutError:
            self.cut = self.cut or "idle timeout"
        except (HTTPError, OSError):
            self.cut = self.cut or "upstream dropped"
        if self.cut and self.sse:
            tail = sse_error_event("api_error", _CUT_MESSAGES.get(self.cut, self.cut).format(self))
        if tail:
            yield tail
        # Finish (usage journaled, access line) before the server writes the end of the chunked body:
        # a client that has the complete response never outlives its record, even across a SIGKILL.
        self.close()
        if self.cut and not self.sse:
            # A JSON body cannot say it is incomplete: drop the client connection short of its Content-Length
            # or terminating chunk, so the client sees a cut response (pywsgi and gunicorn close quietly on this).
            raise ConnectionResetError(errno.ECONNRESET, f"response cut short: {self.cut}")

    def _set_idle_timeout(self) -> None:
        """The response-headers wait is long (non-streaming answers); silence inside a body is shorter."""
        conn = self.upstream.connection
        sock = getattr(conn, "sock", None)
        if sock is not None:
            sock.settimeout(self.idle_timeout)

    def _consume(self) -> None:
        chunk, self._pending = self._pending, None
        if chunk:
            self.sent += len(chunk)
            if self.tap is not None:
                self.tap.feed(chunk)

    def usage(self) -> Usage | None:
        return self.tap.finish() if self.tap is not None else None

    def cut_short(self, reason: str) -> None:
        """End the response now (a graceful stop ran out of time): recorded as partial, like any cut stream.

        Called from another greenlet: the upstream socket is shut down, so that the greenlet relaying this
        response sees its upstream end, sends the client an SSE `error` event and records the exchange."""
        if self._closed:
            return
        self.cut = reason
        sock = getattr(self.upstream.connection, "sock", None)
        if sock is None:
            self.close()
            return
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._pending is not None:
            self._consume()  # written to the socket buffer before the client went away
        if self.complete:
            self.upstream.release_conn()
        else:
            if not self.cut:
                self.cut = "client gone"
            self.upstream.close()
            self.upstream.release_conn()
        try:
            self.finish(self)
        except Exception:  # close() may run inside the iterator: never let accounting break a response
            log.exception("finishing a relayed response failed")
