"""Every change ccm-wsgi makes to a library's private internals, in one place, each with its reason and the
library versions it was checked against. Nothing here acts on import: `install()` is called at start-up by
`ccm-wsgi serve` and by the gunicorn entry point, after gevent's monkey-patching.

* `http.client.parse_headers` (CPython 3.10-3.13, urllib3 2.x): the response header parser. http.client
  hands every response's header block to the `email` package's feed parser, which costs more than
  everything else urllib3 does for a small response. The replacement gives the same HTTPMessage (same
  header list, payload, defects) for the plain header blocks upstreams send, in a few regex matches, and
  leaves everything else to the original: obs-fold continuation lines, names the feed parser would not
  take as a header, a CR inside a line, a missing blank line, and multipart or message content types (the
  feed parser looks into those bodies). tests/unit/test_fast_paths.py checks it against the original.
* pywsgi's `WSGIHandler._write_with_headers` and `_sendall` (gevent 24-26): `FastWrites` sends a response
  head and a small first body part in one system call, with a plain send() instead of gevent's sendall.
* pywsgi's `Input._chunked_input_error` (gevent 24-26): `abandon()` makes pywsgi skip draining a request
  body ccm-wsgi gave up on, so a slow client cannot hold the connection while it is "discarded".
* prometheus_client's `values.Lock` (prometheus_client 0.2x, single-process values): each counter value
  takes a lock around every increment. Under gevent's monkey-patching that is gevent's lock, a Python-level
  acquire and release per increment, several per request; greenlets on one thread can never contend for a
  lock held across `+=` (no switch can happen inside it), so values get the thread module's own lock.
"""

from __future__ import annotations

import email.parser
import email.policy
import http.client
import re
from typing import Any

import gevent.monkey
import prometheus_client.values

COALESCE = 16 * 1024  # first body bytes sent in one write with the response head up to this size

_HEADER_LINE = re.compile(rb"([!-9;-~]+):[ \t]*([^\r\n\x0b\x0c\x1c-\x1e\x85]*)\r?\n")
_read_headers = http.client._read_headers  # type: ignore[attr-defined]
_original_parse_headers = http.client.parse_headers


def install() -> None:
    http.client.parse_headers = parse_headers  # type: ignore[assignment]
    prometheus_client.values.Lock = gevent.monkey.get_original("threading", "Lock")


def _email_parse(lines: list[bytes], message_class: type) -> http.client.HTTPMessage:
    """What http.client.parse_headers does with the lines it read."""
    message: http.client.HTTPMessage = email.parser.Parser(_class=message_class).parsestr(
        b"".join(lines).decode("iso-8859-1"))
    return message


def parse_header_lines(lines: list[bytes], message_class: type = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """`message_class` may be a subclass (gevent's pywsgi parses request headers with one)."""
    if not issubclass(message_class, http.client.HTTPMessage) or not lines or lines[-1] not in (b"\r\n", b"\n"):
        return _email_parse(lines, message_class)
    items = []
    match = _HEADER_LINE.fullmatch
    for i in range(len(lines) - 1):
        m = match(lines[i])
        if m is None:
            return _email_parse(lines, message_class)
        name = m.group(1).decode("iso-8859-1")
        value = m.group(2).decode("iso-8859-1")
        if len(name) == 12 and name.lower() == "content-type":
            kind = value.lower()
            if "multipart" in kind or "message" in kind:
                return _email_parse(lines, message_class)
        items.append((name, value))
    try:
        message = message_class(policy=email.policy.compat32)  # as the feed parser makes it
    except TypeError:
        return _email_parse(lines, message_class)
    message._headers = items  # type: ignore[attr-defined]
    message._payload = ""  # type: ignore[attr-defined]
    return message


def parse_headers(fp: Any, _class: type = http.client.HTTPMessage) -> http.client.HTTPMessage:
    """Drop-in for `http.client.parse_headers` (same limits and errors: it reads with the same code)."""
    return parse_header_lines(_read_headers(fp), _class)


def abandon(stream: Any) -> None:
    """Tell pywsgi not to drain the rest of a body we gave up on (a slow client would hold it again)."""
    if hasattr(stream, "_chunked_input_error"):
        stream._chunked_input_error = True


class FastWrites:
    """Mixed into pywsgi's WSGIHandler (see the module docstring)."""

    _head: bytearray | None = None  # a response head waiting to be sent with the first body bytes
    socket: Any
    status: Any
    code: Any
    response_length: int

    def _write_with_headers(self, data: Any) -> None:
        # pywsgi sends the response head and the first body bytes (a whole JSON reply, the first event of
        # a stream) with two send() calls; when the body part is small the head waits for it in _sendall
        # and both go in one (the same bytes, one system call less)
        if data and len(data) <= COALESCE:
            self._head = bytearray()
        try:
            super()._write_with_headers(data)  # type: ignore[misc]
        finally:
            head, self._head = self._head, None
        if head:  # the body was never written after it: send the head alone, as pywsgi would have
            self._sendall(head)

    def _sendall(self, data: Any) -> None:
        # gevent's sendall asks the kernel for SO_SNDBUF and reads the clock twice on every call; a reply
        # or an SSE event fits in the socket buffer, so a single send() is the common case
        head = self._head
        if head is not None:
            if not head:  # the response head: hold it for the body write that follows
                head += data
                return
            self._head = None
            head += data
            data = head
        sock = self.socket
        try:
            sent = sock.send(data)
            if sent < len(data):
                sock.sendall(memoryview(data)[sent:])
        except OSError as ex:  # what pywsgi's own _sendall records
            self.status = f"socket error: {ex}"
            if self.code > 0:
                self.code = -self.code
            raise
        self.response_length += len(data)

