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

import logging
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import urllib3
from urllib3.exceptions import HTTPError, ReadTimeoutError

from .errors import sse_error_event
from .sse import Usage, parse_json_usage

log = logging.getLogger("ccm_wsgi.relay")

CHUNK = 65536
JSON_TAP_LIMIT = 8 * 1024 * 1024


class Tap(Protocol):
    def feed(self, chunk: bytes) -> None: ...
    def finish(self) -> Usage: ...


class JSONTap:
    """Keeps a (bounded) copy of a non-streaming body to read its `usage` at the end."""

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.size = 0

    def feed(self, chunk: bytes) -> None:
        if self.size <= JSON_TAP_LIMIT:
            self.parts.append(chunk)
            self.size += len(chunk)

    def finish(self) -> Usage:
        return parse_json_usage(b"".join(self.parts)) if self.size <= JSON_TAP_LIMIT else Usage()


class DecodingTap:
    """Feeds the decompressed bytes of a `Content-Encoding` body to another tap; the client gets the raw ones."""

    def __init__(self, inner: Tap, decoder: Any):
        self.inner = inner
        self.decoder = decoder

    def feed(self, chunk: bytes) -> None:
        data = self.decoder.decompress(chunk)
        if data:
            self.inner.feed(data)

    def finish(self) -> Usage:
        return self.inner.finish()


class Relay:
    """Iterable WSGI body over an urllib3 response; `finish(relay)` is called once from `close()`."""

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
        read1 = upstream.read1
        tail = b""
        try:
            while True:
                chunk = read1(CHUNK, decode_content=False)
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
            self.cut = "idle timeout"
            if self.sse:
                tail = sse_error_event("api_error", f"upstream sent nothing for {self.idle_timeout:g}s")
        except (HTTPError, OSError):
            self.cut = "upstream dropped"
            if self.sse:
                tail = sse_error_event("api_error", "the upstream connection was lost mid-stream")
        if tail:
            yield tail
        # Finish (usage journaled, access line) before the server writes the end of the chunked body:
        # a client that has the complete response never outlives its record, even across a SIGKILL.
        self.close()

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
