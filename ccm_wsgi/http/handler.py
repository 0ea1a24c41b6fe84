"""The pywsgi connection handler of `ccm-wsgi serve`: request heads that cannot hold a connection, and a
graceful stop that starts nothing new.

Adds `RAW_URI` (the undecoded request target, as gunicorn does) so paths are forwarded verbatim. The whole
request head must arrive within client_timeout (the socket timeout alone only bounds silence, so a client
sending a byte at a time would hold the connection forever), its header lines are limited to MAX_HEAD,
framing that a front proxy could read differently (conflicting Content-Length values, Content-Length with
Transfer-Encoding, a Transfer-Encoding other than chunked) is refused, and malformed requests get an
Anthropic-shaped error that never repeats what was sent. Once a stop begins, a kept-alive connection takes
no new request and every response tells its client that the connection closes.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import socket
from typing import TYPE_CHECKING, Any, BinaryIO

import gevent
from gevent.pywsgi import WSGIHandler

from ..errors import error_body
from ..patches import FastWrites

if TYPE_CHECKING:
    from .server import Server

log = logging.getLogger("ccm_wsgi.server")

RFILE_BUFFER = 4096
MAX_HEAD = 64 * 1024  # all header lines of a request (the request line has pywsgi's own 8 KiB limit)


class HeadTimeout(OSError):
    """The request head did not arrive within client_timeout."""


class HeadTooLarge(ValueError):
    """The header lines of a request exceed MAX_HEAD."""


class _HeadReader:
    """The client stream as http.client reads the header lines from it, with a budget for all of them
    (on its own, http.client accepts 100 lines of 64 KiB each)."""

    __slots__ = ("fp", "left")

    def __init__(self, fp: BinaryIO, budget: int):
        self.fp = fp
        self.left = budget

    def readline(self, limit: int = -1) -> bytes:
        if self.left <= 0:
            raise HeadTooLarge("request header fields too large")
        line = self.fp.readline(self.left if limit < 0 else min(limit, self.left))
        self.left -= len(line)
        return line


def _client_error(status: int, kind: str, message: str) -> bytes:
    body = error_body(kind, message)
    reason = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large"}[status]
    head = f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return (head + "Connection: close\r\n\r\n").encode() + body


class Handler(FastWrites, WSGIHandler):
    """See the module docstring."""

    _head_timer: Any = None
    server: Server  # pywsgi's attribute: our own server class
    busy = False  # between a request's head and the end of its response; otherwise idle on keep-alive

    def __init__(self, sock: socket.socket, address: tuple[str, int], server: Server, rfile: BinaryIO | None = None):
        # pywsgi reads requests through an 8 KiB buffer that every connection keeps for its whole life
        # (an open stream included); 4 KiB holds a request head, and larger reads bypass the buffer
        super().__init__(sock, address, server, sock.makefile("rb", RFILE_BUFFER) if rfile is None else rfile)  # type: ignore[call-arg, arg-type]

    def handle(self) -> None:
        self.server.connections.add(self)
        try:
            super().handle()
        finally:
            self.server.connections.discard(self)

    def handle_one_request(self) -> Any:
        if self.server.drain.draining:
            return None  # stopping: no new request on a kept-alive connection
        self._head_timer = timer = gevent.Timeout.start_new(self.server.client_timeout, HeadTimeout)
        try:
            return super().handle_one_request()
        finally:
            timer.close()
            self.busy = False

    def start_response(self, status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if self.server.drain.draining and ("Connection", "close") not in headers:
            headers = [*headers, ("Connection", "close")]  # the connection ends with this response
        return super().start_response(status, headers, exc_info)

    def close_if_idle(self) -> None:
        """A stop began: a connection waiting for its next request is closed now."""
        if not self.busy and self.socket is not None:
            with contextlib.suppress(OSError):
                self.socket.shutdown(socket.SHUT_RDWR)

    def MessageClass(self, fp: Any, *args: Any) -> Any:  # pywsgi's name
        headers = super().MessageClass(_HeadReader(fp, MAX_HEAD), *args)  # type: ignore[arg-type]
        lengths = headers.get_all("content-length")
        codings = headers.get_all("transfer-encoding")
        if lengths and (codings or len({v.strip() for v in lengths}) > 1):
            raise ValueError("ambiguous request framing")
        if codings and (len(codings) > 1 or codings[0].strip().lower() != "chunked"):
            raise ValueError("unsupported Transfer-Encoding")
        return headers

    def _handle_client_error(self, ex: BaseException) -> tuple[str, bytes]:
        if isinstance(ex, HeadTimeout):
            status, message = 408, "the request head did not arrive in time"
        elif isinstance(ex, (HeadTooLarge, http.client.HTTPException)):  # or more than 100 header lines
            status, message = 431, f"request header fields exceed {MAX_HEAD} bytes"
        else:
            status, message = 400, "malformed HTTP request"
        log.debug("refused a request from %s: %s (%s)", self.client_address[0], status, type(ex).__name__)
        return str(status), _client_error(status, "invalid_request_error", message)

    def get_environ(self) -> dict[str, Any]:
        self.busy = True
        if self._head_timer is not None:
            self._head_timer.close()  # the head is in: the application takes as long as it needs
        env = super().get_environ()
        env["RAW_URI"] = self.path
        return env

    def log_request(self) -> None:
        # pywsgi formats an access line per request even when it has nowhere to write it (log=None);
        # ccm-wsgi writes its own access line (ccm_wsgi.access)
        if self.server.log_requests:
            super().log_request()
