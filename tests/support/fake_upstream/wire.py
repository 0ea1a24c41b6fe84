"""The fake's own small HTTP/1.1 layer: request parsing, one client socket with its raw fault operations
(reset with SO_LINGER 0, waiting for the peer to close), response framing and one request/response exchange.

It is hand-written instead of a server library because the faults need direct control of the socket.
"""

from __future__ import annotations

import contextlib
import http
import json
import socket
import struct
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit

from .common import MAX_BODY, MAX_HEAD, MAX_STALL, READ_TIMEOUT, ClientGone, HttpError, anthropic_error, bounded, dumps
from .encoding import Encoder

if TYPE_CHECKING:
    from .state import FakeState

@dataclass
class Request:
    method: str
    target: str
    path: str
    query: dict[str, str]
    version: str
    headers: list[tuple[str, str]]
    lower: dict[str, str]
    body: bytes = b""

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.lower.get(name.lower(), default)

    @property
    def keep_alive(self) -> bool:
        tokens = {t.strip().lower() for t in (self.header("connection") or "").split(",")}
        if self.version == "HTTP/1.0":
            return "keep-alive" in tokens
        return "close" not in tokens

    def json(self) -> Any:
        if not self.body.strip():
            return {}
        return json.loads(self.body)


def parse_head(head: bytes) -> Request:
    """Request line and header fields; names keep their original case."""
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
        raise HttpError(400, f"malformed request line {lines[0][:100]!r}", close=True)
    method, target, version = parts
    headers: list[tuple[str, str]] = []
    lower: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip():
            raise HttpError(400, f"malformed header line {line[:100]!r}", close=True)
        value = value.strip()
        headers.append((name, value))
        key = name.lower()
        lower[key] = f"{lower[key]}, {value}" if key in lower else value
    split = urlsplit(target)
    query = dict(parse_qsl(split.query, keep_blank_values=True))
    return Request(method, target, split.path or "/", query, version, headers, lower)


class Connection:
    """One client socket: buffered reads, framed writes, and the raw fault operations."""

    def __init__(self, sock: socket.socket, peer: Any) -> None:
        self.sock = sock
        self.peer = peer
        self.buf = bytearray()
        self.closed = False
        self.is_control = False

    # ----- reading
    def _fill(self) -> bool:
        try:
            data = self.sock.recv(65536)
        except (TimeoutError, OSError):
            return False
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        """The bytes before the blank line, or None when the peer closed between requests."""
        while True:
            # Tolerate stray CRLFs between pipelined requests (RFC 9112 section 2.2).
            while self.buf[:2] == b"\r\n":
                del self.buf[:2]
            end = self.buf.find(b"\r\n\r\n")
            if end >= 0:
                head = bytes(self.buf[:end])
                del self.buf[: end + 4]
                return head
            if len(self.buf) > MAX_HEAD:
                raise HttpError(431, "request header too large", close=True)
            if not self._fill():
                if self.buf:
                    raise HttpError(400, "connection closed inside the request head", close=True)
                return None

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ClientGone("connection closed inside the request body")
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_line(self) -> bytes:
        while True:
            end = self.buf.find(b"\r\n")
            if end >= 0:
                line = bytes(self.buf[:end])
                del self.buf[: end + 2]
                return line
            if len(self.buf) > MAX_HEAD:
                raise HttpError(400, "chunk line too long", close=True)
            if not self._fill():
                raise ClientGone("connection closed inside a chunked body")

    def read_chunked(self) -> bytes:
        body = bytearray()
        while True:
            size_text = self.read_line().split(b";", 1)[0].strip()
            try:
                size = int(size_text, 16)
            except ValueError:
                raise HttpError(400, f"bad chunk size {size_text[:20]!r}", close=True) from None
            if size == 0:
                while self.read_line():  # trailer fields
                    pass
                return bytes(body)
            if len(body) + size > MAX_BODY:
                raise HttpError(413, "request body too large", close=True)
            body += self.read_exact(size)
            if self.read_exact(2) != b"\r\n":
                raise HttpError(400, "chunk not followed by CRLF", close=True)

    def read_request(self) -> Request | None:
        head = self.read_head()
        if head is None:
            return None
        req = parse_head(head)
        if (req.header("expect") or "").lower() == "100-continue":
            self.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        if "chunked" in (req.header("transfer-encoding") or "").lower():
            req.body = self.read_chunked()
        elif req.header("content-length") is not None:
            try:
                length = int(req.header("content-length") or "")
            except ValueError:
                raise HttpError(400, "bad Content-Length", close=True) from None
            if length < 0 or length > MAX_BODY:
                raise HttpError(413, "request body too large", close=True)
            req.body = self.read_exact(length)
        return req

    # ----- writing
    def send(self, data: bytes) -> None:
        if self.closed:
            raise ClientGone("connection already closed")
        try:
            self.sock.sendall(data)
        except (TimeoutError, OSError) as exc:
            raise ClientGone(str(exc)) from exc

    def wait_peer_close(self, seconds: float) -> bool:
        """Sleep up to `seconds`; True as soon as the peer closes (bytes it sends meanwhile are kept)."""
        deadline = time.monotonic() + bounded(seconds, MAX_STALL)
        try:
            while (remaining := deadline - time.monotonic()) > 0:
                self.sock.settimeout(remaining)
                data = self.sock.recv(65536)
                if not data:
                    return True
                if len(self.buf) < MAX_HEAD:
                    self.buf += data
        except TimeoutError:
            return False
        except OSError:
            return True
        finally:
            with contextlib.suppress(OSError):
                self.sock.settimeout(READ_TIMEOUT)
        return False

    def reset(self) -> None:
        """Abort with a TCP RST: SO_LINGER on with a zero timeout, then close."""
        with contextlib.suppress(OSError):
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.close()

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            with contextlib.suppress(OSError):
                self.sock.close()


class BodyWriter:
    """Writes a response body: chunked or close-delimited, optionally compressed with a flush per write."""

    def __init__(self, conn: Connection, chunked: bool, encoder: Encoder | None) -> None:
        self.conn = conn
        self.chunked = chunked
        self.encoder = encoder

    def _frame(self, data: bytes) -> None:
        if not data:
            return
        if self.chunked:
            self.conn.send(b"%x\r\n" % len(data) + data + b"\r\n")
        else:
            self.conn.send(data)

    def write(self, data: bytes) -> None:
        self._frame(self.encoder.feed(data) if self.encoder else data)

    def finish(self) -> None:
        if self.encoder:
            self._frame(self.encoder.finish())
        if self.chunked:
            self.conn.send(b"0\r\n\r\n")


def http_date(epoch: float) -> str:
    return time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(epoch))


class Exchange:
    """One request/response on a connection."""

    def __init__(self, conn: Connection, req: Request, state: FakeState) -> None:
        self.conn = conn
        self.req = req
        self.state = state
        self.keep_alive = req.keep_alive
        self.started = False
        self.record: dict[str, Any] | None = None
        self.request_id = ""

    def send_head(self, status: int, headers: Iterable[tuple[str, str]], *, length: int | None = None,
                  chunked: bool = False) -> None:
        """Status line and headers. Neither a length nor chunked means the body ends at close."""
        if length is None and not chunked:
            self.keep_alive = False
        try:
            reason = http.HTTPStatus(status).phrase
        except ValueError:
            reason = "Overloaded" if status == 529 else "Unknown"
        lines = [f"HTTP/1.1 {status} {reason}", f"date: {http_date(time.time() + self.state.config.date_skew)}"]
        if self.request_id:
            lines.append(f"request-id: {self.request_id}")
        lines.extend(f"{k}: {v}" for k, v in headers)
        if length is not None:
            lines.append(f"content-length: {length}")
        if chunked:
            lines.append("transfer-encoding: chunked")
        lines.append("connection: " + ("keep-alive" if self.keep_alive else "close"))
        self.started = True
        if self.record is not None:
            self.record["status"] = status
        if not self.conn.is_control:
            self.state.stats.responses_by_status[str(status)] += 1
        self.conn.send(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send_bytes(self, status: int, body: bytes, content_type: str = "application/json",
                   headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_head(status, [("content-type", content_type), *headers], length=len(body))
        if self.req.method != "HEAD":
            self.conn.send(body)

    def send_json(self, status: int, obj: Any, headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_bytes(status, dumps(obj), "application/json", headers)

    def send_error(self, status: int, message: str, error_type: str | None = None,
                   headers: Iterable[tuple[str, str]] = ()) -> None:
        self.send_json(status, anthropic_error(status, message, error_type, self.request_id or None), headers)
