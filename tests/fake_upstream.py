"""A scriptable fake Anthropic API (api.anthropic.com + the OAuth token endpoint) for the ccm-wsgi tests.

Run it as a script (the test helper below does this for you)::

    python tests/fake_upstream.py --port 0 [--host 127.0.0.1] [--tls-cert PEM --tls-key PEM]
                                  [--token-expires-in 3600] [--strict-tokens] [--parent-pid PID] [--verbose]

It prints exactly one line ``LISTENING <port>`` on stdout once it accepts connections and serves until SIGTERM or
SIGINT (exit status 0). It is a raw gevent ``StreamServer`` with its own small HTTP/1.1 parser (keep-alive,
Content-Length and chunked request bodies, ``Expect: 100-continue``) because the faults it injects need direct
control of the socket: resets with SO_LINGER 0, stalls, close-delimited bodies, incremental compression.

Upstream endpoints
    POST /v1/messages                JSON or SSE (``"stream": true``), like the Messages API
    POST /v1/messages/count_tokens   ``{"input_tokens": n}``
    GET  /v1/models                  a small model list
    POST /v1/oauth/token, /oauth/token   refresh_token grant with refresh-token rotation
    GET  /api/oauth/usage            5h / 7d utilisation (percent) of the caller's account
    GET  /api/oauth/profile          organisation type and rate-limit tier of the caller's account
    anything else                    404 with an Anthropic error body (``/ccm/v1/status`` included)

Per-request knobs for /v1/*: a request header ``x-fake-NAME`` or a query parameter ``fake_NAME`` (``-`` becomes
``_``; the query parameter wins). Unknown names are ignored, a malformed number gives a 400.
    events N                SSE: number of content_block_delta events (default 5); texts "Hello", " 1", " 2", ...
    delay-ms N              SSE: sleep before each delta (the peer closing meanwhile ends the stream)
    ttfb-ms N               sleep before the status line (every /v1 answer)
    delta-bytes N           pad each delta text to N characters
    input-tokens, output-tokens, cache-read-tokens, cache-creation-tokens, cache-5m-tokens, cache-1h-tokens
                            usage numbers (defaults 10; output = events when streaming else 5; cache 0;
                            creation = 5m + 1h, or 5m = creation when the split is not given)
    model NAME              model echoed in the answer instead of the request's
    status CODE             answer CODE with an Anthropic error body; 429/503/529 add retry-after
    retry-after S           retry-after value for status (default 30)
    drop-after N            SSE: TCP reset (SO_LINGER 0) after N deltas, chunked body unterminated;
                            JSON: 0 = reset before the status line, else after the headers and half the body
    stall-after N           like drop-after but go silent and keep the socket open (120 s or until the peer closes)
    stall-before-headers 1  read the request, never answer (120 s or until the peer closes)
    error-after N           SSE: after N deltas send ``event: error`` (overloaded_error) and end the body cleanly
    framing F               chunked (SSE default) | close (no length, body ends at close) | length (JSON default;
                            for SSE: the whole stream at once with a Content-Length, no delays or faults)
    encoding E              gzip | br | zstd | deflate, only if Accept-Encoding allows it; SSE is compressed
                            incrementally with a flush per event
    bytes N                 JSON: pad the text so the body is about N bytes
    invalid-json 1          200 application/json with a truncated body
    ratelimit JSON          extra/override response headers, e.g. '{"anthropic-ratelimit-unified-5h-reset": "x"}'
                            (a null value removes a header)
    wait-release KEY        SSE: send message_start, content_block_start, ping and the first delta, then block until
                            POST /_fake/release/KEY (at most 30 s); GET /_fake/sent/KEY reports progress

Rate-limit headers on every /v1 answer come from the account (``anthropic-ratelimit-unified-status``, ``-5h-status``,
``-5h-utilization``, ``-5h-reset``, ``-7d-status``, ``-7d-utilization``, ``-7d-reset``, ``-representative-claim``,
``-reset``), plus ``request-id: req_fake_<seq>`` and ``x-fake-account: <account id>``.

Accounts: every access token belongs to an account (id given at creation, default: the first access token).
Refreshing issues a new access token for the same account, so the account's scripted rate-limit state survives.
Unknown bearer tokens are auto-registered as their own account unless strict mode is on.

Control API (never recorded or counted, never rate-limited)
    GET  /_fake/health                       "ok"
    GET  /_fake/stats                        counters and gauges
    GET  /_fake/requests[?path=P&since=SEQ]  recorded upstream requests
    POST /_fake/reset                        clear records and counters (body {"accounts": true, "config": true}
                                             also drops accounts/tokens and restores the start-up config)
    GET|POST /_fake/config                   strict, token_expires_in, token_endpoint fault, usage_api fault
    GET|POST /_fake/accounts                 list / create (or extend) an account
    GET|POST /_fake/accounts/<ref>/state     read / script an account (ref = account id, access or refresh token)
    POST /_fake/revoke                       {"access_token": T} and/or {"refresh_token": R}
    POST /_fake/release/<key>                let a stream waiting on ``x-fake-wait-release: key`` continue
    GET  /_fake/sent/<key>                   {"events", "deltas", "waiting", "released", "done"} of that stream

Stats (GET /_fake/stats): requests_total, requests_by_path, responses_by_status, messages_by_account, unauthorized,
refreshes, refreshes_by_account, invalid_grant, token_requests (client_id, scope, grant_type, refresh_token,
content_type, status), usage_api_calls / profile_api_calls (by account), connections_total, streams_total,
streams_completed, dropped, closed_early (answers the client abandoned: a failed send, or the peer closing during a
delay, ttfb, stall or stall-before-headers), and the live gauges open_connections (client sockets, control
connections excluded), open_connections_all, active_streams, active_requests. Reset clears all but the gauges.

The ``FakeUpstream`` class at the bottom starts the script as a subprocess for tests; importing this module does
not monkey-patch anything (only running it as ``__main__`` does).
"""

from __future__ import annotations

if __name__ == "__main__":
    from gevent import monkey

    monkey.patch_all()

import argparse
import contextlib
import datetime as dt
import functools
import http
import itertools
import json
import os
import secrets
import select
import signal
import socket
import ssl
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer

READ_TIMEOUT = 120.0  # idle keep-alive and request-body read bound
TLS_HANDSHAKE_TIMEOUT = 10.0
MAX_STALL = 120.0  # stall-after / stall-before-headers
MAX_SLEEP = 120.0  # ttfb-ms / delay-ms / fault delays
RELEASE_TIMEOUT = 30.0  # wait-release
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


# --------------------------------------------------------------------------------------------- errors


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


# ---------------------------------------------------------------------------------------- HTTP layer


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


# ------------------------------------------------------------------------------------ compression


class Encoder(Protocol):
    name: str

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class ZlibEncoder:
    """gzip (wbits 31) or zlib-wrapped deflate (wbits 15); every feed ends with a sync flush."""

    def __init__(self, name: str, wbits: int) -> None:
        self.name = name
        self._c = zlib.compressobj(6, zlib.DEFLATED, wbits)

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH)


class BrotliEncoder:
    name = "br"

    def __init__(self) -> None:
        import brotli

        self._c = brotli.Compressor()

    def feed(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.flush()

    def finish(self) -> bytes:
        return self._c.finish()


class ZstdEncoder:
    name = "zstd"

    def __init__(self) -> None:
        import zstandard

        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._c = zstandard.ZstdCompressor().compressobj()

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(self._flush_block)

    def finish(self) -> bytes:
        return self._c.flush()


def make_encoder(name: str) -> Encoder:
    if name == "gzip":
        return ZlibEncoder("gzip", 31)
    if name == "deflate":
        return ZlibEncoder("deflate", 15)
    if name == "br":
        return BrotliEncoder()
    if name == "zstd":
        return ZstdEncoder()
    raise HttpError(400, f"unknown x-fake-encoding {name!r}; use one of {', '.join(ENCODINGS)}")


def accepts_encoding(accept_encoding: str | None, name: str) -> bool:
    """Whether an Accept-Encoding value allows `name` (q=0 forbids; `*` matches anything not listed)."""
    weights: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        token, _, params = item.strip().partition(";")
        if not token:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[token.strip().lower()] = q
    if name in weights:
        return weights[name] > 0
    return weights.get("*", 0.0) > 0


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


# ------------------------------------------------------------------------------------------ state


def _default_five_hour_reset() -> int:
    return int(time.time()) + FIVE_HOURS_DEFAULT_RESET


def _default_seven_day_reset() -> int:
    return int(time.time()) + SEVEN_DAY_DEFAULT_RESET


@dataclass
class Account:
    """Scripted per-account state. Utilisations are fractions (0.42); a string is sent verbatim (garbage tests)."""

    id: str
    five_hour_utilization: float | str = 0.1
    five_hour_reset: int | str = field(default_factory=_default_five_hour_reset)
    seven_day_utilization: float | str = 0.2
    seven_day_reset: int | str = field(default_factory=_default_seven_day_reset)
    status: str = "allowed"
    claim: str = "five_hour"
    quota_429: bool = False
    usage_api: dict[str, Any] | None = None  # a fault, same keys as the global usage_api fault
    organization_type: str = "claude_max"
    rate_limit_tier: str = "default_claude_max_20x"
    profile: dict[str, Any] | None = None  # replaces the whole /api/oauth/profile answer
    headers: dict[str, str | None] = field(default_factory=dict)  # extra / override headers on /v1 answers


STATE_FIELDS = {f.name for f in fields(Account)} - {"id"}


@dataclass
class AccessToken:
    account: str
    expires_at: float | None  # epoch seconds; None = never expires
    revoked: bool = False
    auto: bool = False  # auto-registered in lenient mode; strict mode does not accept it

    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at


@dataclass
class RefreshToken:
    account: str
    spent: bool = False


FAULT_KEYS = {"status", "delay_ms", "down", "reset", "retry_after", "times", "body"}


def validate_fault(value: Any, what: str) -> dict[str, Any] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise HttpError(400, f"{what} must be an object or null")
    unknown = set(value) - FAULT_KEYS
    if unknown:
        raise HttpError(400, f"{what}: unknown keys {sorted(unknown)}; allowed {sorted(FAULT_KEYS)}")
    return dict(value)


@dataclass
class Config:
    strict: bool = False
    token_expires_in: int = 3600
    token_endpoint: dict[str, Any] | None = None
    usage_api: dict[str, Any] | None = None

    def update(self, data: dict[str, Any]) -> None:
        unknown = set(data) - {f.name for f in fields(self)}
        if unknown:
            raise HttpError(400, f"unknown config keys {sorted(unknown)}")
        if "strict" in data:
            self.strict = bool(data["strict"])
        if "token_expires_in" in data:
            self.token_expires_in = int(data["token_expires_in"])
        if "token_endpoint" in data:
            self.token_endpoint = validate_fault(data["token_endpoint"], "token_endpoint")
        if "usage_api" in data:
            self.usage_api = validate_fault(data["usage_api"], "usage_api")


@dataclass
class Release:
    event: gevent.event.Event = field(default_factory=gevent.event.Event)
    events: int = 0
    deltas: int = 0
    waiting: bool = False
    done: bool = False

    def to_json(self, key: str) -> dict[str, Any]:
        return {"key": key, "events": self.events, "deltas": self.deltas, "waiting": self.waiting,
                "released": self.event.is_set(), "done": self.done}


@dataclass
class Stats:
    requests_total: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    responses_by_status: Counter[str] = field(default_factory=Counter)
    messages_by_account: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    refreshes: int = 0
    refreshes_by_account: Counter[str] = field(default_factory=Counter)
    invalid_grant: int = 0
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    usage_api_calls: Counter[str] = field(default_factory=Counter)
    profile_api_calls: Counter[str] = field(default_factory=Counter)
    connections_total: int = 0
    streams_total: int = 0
    streams_completed: int = 0
    closed_early: int = 0
    dropped: int = 0


class FakeState:
    """Everything the fake knows: config, accounts and tokens, counters, records, release keys."""

    def __init__(self, config: Config) -> None:
        self.initial_config = Config(**asdict(config))
        self.config = config
        self.accounts: dict[str, Account] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.stats = Stats()
        self.records: list[dict[str, Any]] = []
        self.releases: dict[str, Release] = {}
        self.seq = itertools.count(1)
        self.token_seq = itertools.count(1)
        self.active_streams = 0
        self.active_requests = 0

    # ----- accounts and tokens
    def new_token(self, kind: str) -> str:
        return f"sk-ant-{kind}01-fake-{next(self.token_seq)}-{secrets.token_urlsafe(12)}"

    def expiry(self, expires_in: Any) -> float | None:
        return None if expires_in is None else time.time() + float(expires_in)

    def add_account(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        access = data.pop("access_token", None)
        refresh = data.pop("refresh_token", None)
        expires_in = data.pop("expires_in", self.config.token_expires_in)
        account_id = data.pop("account", None) or access or self.new_token("acct")
        access = access or self.new_token("oat")
        account = self.accounts.get(account_id) or Account(id=account_id)
        self.apply_state(account, data)
        self.accounts[account_id] = account
        self.access[access] = AccessToken(account_id, self.expiry(expires_in))
        if refresh:
            self.refresh[refresh] = RefreshToken(account_id)
        return {"account": account_id, "access_token": access, "refresh_token": refresh,
                "expires_at": self.access[access].expires_at}

    def apply_state(self, account: Account, data: dict[str, Any]) -> None:
        unknown = set(data) - STATE_FIELDS
        if unknown:
            raise HttpError(400, f"unknown account state keys {sorted(unknown)}; allowed {sorted(STATE_FIELDS)}")
        for key, value in data.items():
            if key == "usage_api":
                value = validate_fault(value, "usage_api")
            setattr(account, key, value)

    def auto_register(self, token: str) -> AccessToken:
        """Lenient mode: an unknown bearer token becomes its own account (strict mode will not accept it)."""
        if token not in self.accounts:
            self.accounts[token] = Account(id=token)
        self.access[token] = AccessToken(token, None, auto=True)
        return self.access[token]

    def find_account(self, ref: str, create: bool = False) -> Account | None:
        """By account id, access token or refresh token; optionally create account `ref` with token `ref`."""
        if ref in self.accounts:
            return self.accounts[ref]
        if ref in self.access:
            return self.accounts[self.access[ref].account]
        if ref in self.refresh:
            return self.accounts[self.refresh[ref].account]
        if not create:
            return None
        self.accounts[ref] = Account(id=ref)
        self.access[ref] = AccessToken(ref, None)
        return self.accounts[ref]

    def tokens_of(self, account_id: str) -> dict[str, Any]:
        now = time.time()
        return {
            "access_tokens": [
                {"token": t, "expires_in": None if a.expires_at is None else round(a.expires_at - now, 3),
                 "revoked": a.revoked}
                for t, a in self.access.items() if a.account == account_id
            ],
            "refresh_tokens": [
                {"token": t, "spent": r.spent} for t, r in self.refresh.items() if r.account == account_id
            ],
        }

    def rotate(self, refresh_token: str) -> tuple[Account, str, str] | None:
        """Spend a valid refresh token and issue a new access + refresh token pair for its account."""
        entry = self.refresh.get(refresh_token)
        if entry is None or entry.spent:
            return None
        entry.spent = True
        access, refresh = self.new_token("oat"), self.new_token("ort")
        self.access[access] = AccessToken(entry.account, self.expiry(self.config.token_expires_in))
        self.refresh[refresh] = RefreshToken(entry.account)
        self.stats.refreshes += 1
        self.stats.refreshes_by_account[entry.account] += 1
        return self.accounts[entry.account], access, refresh

    def release(self, key: str) -> Release:
        if key not in self.releases:
            self.releases[key] = Release()
        return self.releases[key]

    # ----- records and stats
    def record(self, req: Request) -> dict[str, Any]:
        rec = {
            "seq": next(self.seq),
            "time": time.time(),
            "method": req.method,
            "path": req.target,
            "route": req.path,
            "headers": [[k, v] for k, v in req.headers],
            "body_length": len(req.body),
            "body": req.body[:RECORD_BODY_LIMIT].decode("utf-8", "replace"),
            "body_truncated": len(req.body) > RECORD_BODY_LIMIT,
            "account": None,
            "status": None,
        }
        self.records.append(rec)
        del self.records[:-MAX_RECORDS]
        self.stats.requests_total += 1
        self.stats.requests_by_path[req.path] += 1
        return rec

    def reset(self, accounts: bool = False, config: bool = False) -> None:
        self.stats = Stats()
        self.records.clear()
        for rel in self.releases.values():
            rel.event.set()  # never leave a stream blocked on a key nobody can see any more
        self.releases.clear()
        if accounts:
            self.accounts.clear()
            self.access.clear()
            self.refresh.clear()
        if config:
            self.config = Config(**asdict(self.initial_config))

    def stats_json(self, open_connections: int, open_all: int) -> dict[str, Any]:
        data = {f.name: getattr(self.stats, f.name) for f in fields(self.stats)}
        data = {k: dict(v) if isinstance(v, Counter) else v for k, v in data.items()}
        data["token_requests"] = [dict(t) for t in self.stats.token_requests]
        data.update(open_connections=open_connections, open_connections_all=open_all,
                    active_streams=self.active_streams, active_requests=self.active_requests)
        return data


# ------------------------------------------------------------------------------------- exchanges


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
        lines = [f"HTTP/1.1 {status} {reason}", f"date: {time.strftime('%a, %d %b %Y %H:%M:%S GMT', time.gmtime())}"]
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


# ------------------------------------------------------------------------------------ /v1 knobs


def knob(req: Request, name: str) -> str | None:
    """Query parameter fake_NAME (underscores) wins over header x-fake-NAME."""
    value = req.query.get("fake_" + name.replace("-", "_"))
    if value is None:
        value = req.header("x-fake-" + name)
    return value


def int_knob(req: Request, name: str, default: int | None = None) -> int | None:
    value = knob(req, name)
    if value is None or value == "":
        return default
    try:
        return int(float(value))
    except ValueError:
        raise HttpError(400, f"x-fake-{name} must be a number, got {value!r}") from None


def bool_knob(req: Request, name: str) -> bool:
    value = knob(req, name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class Plan:
    """How to answer one /v1/messages request."""

    stream: bool
    model: str
    events: int = 5
    delay: float = 0.0
    delta_bytes: int = 0
    input_tokens: int = 10
    output_tokens: int = 5
    cache_read: int = 0
    cache_creation: int = 0
    cache_5m: int = 0
    cache_1h: int = 0
    drop_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    framing: str = ""
    encoding: Encoder | None = None
    size: int | None = None
    invalid_json: bool = False
    release_key: str | None = None
    msg_id: str = field(default_factory=lambda: "msg_fake_" + secrets.token_hex(12))

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_5m,
                               "ephemeral_1h_input_tokens": self.cache_1h},
            "output_tokens": self.output_tokens,
            "service_tier": "standard",
        }


def plan_from_request(req: Request, body: dict[str, Any]) -> Plan:
    stream = bool(body.get("stream"))
    events = max(0, int_knob(req, "events", 5) or 0)
    plan = Plan(stream=stream, model=knob(req, "model") or str(body.get("model") or DEFAULT_MODEL), events=events)
    plan.delay = bounded((int_knob(req, "delay-ms", 0) or 0) / 1000)
    plan.delta_bytes = max(0, int_knob(req, "delta-bytes", 0) or 0)
    plan.input_tokens = int_knob(req, "input-tokens", 10) or 0
    plan.output_tokens = int_knob(req, "output-tokens", events if stream else 5) or 0
    plan.cache_read = int_knob(req, "cache-read-tokens", 0) or 0
    creation = int_knob(req, "cache-creation-tokens")
    c5, c1 = int_knob(req, "cache-5m-tokens"), int_knob(req, "cache-1h-tokens")
    if c5 is None and c1 is None:
        c5, c1 = creation or 0, 0
    plan.cache_5m, plan.cache_1h = c5 or 0, c1 or 0
    plan.cache_creation = creation if creation is not None else plan.cache_5m + plan.cache_1h
    plan.drop_after = int_knob(req, "drop-after")
    plan.stall_after = int_knob(req, "stall-after")
    plan.error_after = int_knob(req, "error-after")
    plan.framing = (knob(req, "framing") or ("chunked" if stream else "length")).lower()
    if plan.framing not in ("chunked", "close", "length"):
        raise HttpError(400, f"x-fake-framing must be chunked, close or length, got {plan.framing!r}")
    encoding = (knob(req, "encoding") or "").lower()
    if encoding and encoding != "identity" and accepts_encoding(req.header("accept-encoding"), encoding):
        plan.encoding = make_encoder(encoding)
    elif encoding and encoding != "identity":
        make_encoder(encoding)  # still validate the name
    plan.size = int_knob(req, "bytes")
    plan.invalid_json = bool_knob(req, "invalid-json")
    plan.release_key = knob(req, "wait-release") or None
    return plan


def ratelimit_override(req: Request) -> dict[str, str | None]:
    raw = knob(req, "ratelimit")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise HttpError(400, "x-fake-ratelimit must be a JSON object") from None
    if not isinstance(value, dict):
        raise HttpError(400, "x-fake-ratelimit must be a JSON object")
    return {str(k): None if v is None else str(v) for k, v in value.items()}


def stream_piece(i: int, delta_bytes: int) -> str:
    text = "Hello" if i == 0 else f" {i}"
    return text.ljust(delta_bytes, ".") if delta_bytes else text


def sse(event_type: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


# ------------------------------------------------------------------------------------------ server


def send_raw_error(conn: Connection, status: int, message: str) -> None:
    """An answer for a request that could not even be parsed; the connection is closed afterwards."""
    body = dumps(anthropic_error(status, message))
    head = (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n")
    with contextlib.suppress(ClientGone):
        conn.send(head.encode() + body)


class FakeServer:
    def __init__(self, state: FakeState, host: str, port: int, tls: ssl.SSLContext | None,
                 verbose: bool = False) -> None:
        self.state = state
        self.tls = tls
        self.verbose = verbose
        self.connections: set[Connection] = set()
        self.pool = gevent.pool.Pool()
        self.server = StreamServer((host, port), self.handle, backlog=1024, spawn=self.pool)

    @property
    def port(self) -> int:
        return int(self.server.server_port)

    def start(self) -> None:
        self.server.start()

    def stop(self) -> None:
        self.server.stop(timeout=1)

    # ----- connection loop
    def handle(self, sock: socket.socket, peer: Any) -> None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn: Connection | None = None
        try:
            if self.tls is not None:
                sock.settimeout(TLS_HANDSHAKE_TIMEOUT)
                sock = self.tls.wrap_socket(sock, server_side=True)
            sock.settimeout(READ_TIMEOUT)
            conn = Connection(sock, peer)
            self.connections.add(conn)
            self.state.stats.connections_total += 1
            self.serve_connection(conn)
        except (ClientGone, DropConnection, OSError):
            pass
        except Exception:
            log("connection handler crashed:\n" + traceback.format_exc())
        finally:
            if conn is not None:
                self.connections.discard(conn)
                conn.close()
            else:
                with contextlib.suppress(OSError):
                    sock.close()

    def serve_connection(self, conn: Connection) -> None:
        while not conn.closed:
            try:
                req = conn.read_request()
            except HttpError as exc:
                send_raw_error(conn, exc.status, exc.message)
                return
            if req is None:
                return
            ex = Exchange(conn, req, self.state)
            self.run_exchange(ex)
            if not ex.keep_alive or conn.closed:
                return

    def run_exchange(self, ex: Exchange) -> None:
        if self.verbose:
            log(f"{ex.req.method} {ex.req.target}")
        try:
            self.dispatch(ex)
        except HttpError as exc:
            if ex.started:
                raise DropConnection() from exc
            ex.keep_alive = ex.keep_alive and not exc.close
            headers = exc.headers
            if exc.body is not None:
                ex.send_json(exc.status, exc.body, headers)
            else:
                ex.send_error(exc.status, exc.message, headers=headers)
        except (ClientGone, DropConnection):
            raise
        except Exception as exc:
            log(f"handler for {ex.req.method} {ex.req.target} crashed:\n" + traceback.format_exc())
            if ex.started:
                raise DropConnection() from exc
            ex.keep_alive = False
            ex.send_error(500, f"fake upstream bug: {exc!r}")

    # ----- routing
    def dispatch(self, ex: Exchange) -> None:
        path = ex.req.path
        if path == "/_fake" or path.startswith("/_fake/"):
            ex.conn.is_control = True
            Control(self, ex).dispatch()
            return
        ex.record = self.state.record(ex.req)
        ex.request_id = f"req_fake_{ex.record['seq']}"
        self.state.active_requests += 1
        try:
            self.route(ex, path)
        finally:
            self.state.active_requests -= 1

    def route(self, ex: Exchange, path: str) -> None:
        if path in ("/v1/oauth/token", "/oauth/token"):
            TokenEndpoint(self.state, ex).handle()
        elif path in ("/api/oauth/usage", "/api/oauth/profile"):
            OAuthApi(self.state, ex).handle()
        elif path.startswith("/v1/"):
            V1(self, ex).handle()
        else:
            ex.send_error(404, f"Not found: {ex.req.method} {path}")


# --------------------------------------------------------------------------------- /v1 endpoints


class V1:
    """Messages, count_tokens, models; the shared knobs (stall, ttfb, auth, status) run first."""

    def __init__(self, server: FakeServer, ex: Exchange) -> None:
        self.server = server
        self.state = server.state
        self.ex = ex
        self.req = ex.req
        self.conn = ex.conn
        self.account: Account | None = None

    def handle(self) -> None:
        if bool_knob(self.req, "stall-before-headers"):
            self.stall_before_headers()
            return
        ttfb = int_knob(self.req, "ttfb-ms", 0) or 0
        if ttfb > 0 and self.conn.wait_peer_close(ttfb / 1000):
            self.state.stats.closed_early += 1
            raise DropConnection()
        self.authenticate()
        path, method = self.req.path, self.req.method
        if path == "/v1/messages":
            self.require(method, "POST")
            self.messages()
        elif path == "/v1/messages/count_tokens":
            self.require(method, "POST")
            self.apply_status_knob()
            self.ex.send_json(200, {"input_tokens": max(1, len(self.req.body) // 4)}, self.rl_headers())
        elif path == "/v1/models":
            self.require(method, "GET")
            self.apply_status_knob()
            self.ex.send_json(200, self.models_body(), self.rl_headers())
        else:
            self.ex.send_error(404, f"Not found: {method} {path}", headers=self.rl_headers())

    def require(self, method: str, expected: str) -> None:
        if method != expected:
            raise HttpError(405, f"Method {method} not allowed", headers=[("allow", expected)])

    def stall_before_headers(self) -> None:
        if self.conn.wait_peer_close(MAX_STALL):
            self.state.stats.closed_early += 1
        self.conn.close()
        raise DropConnection()

    # ----- auth and rate-limit headers
    def authenticate(self) -> None:
        auth = self.req.header("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else (self.req.header("x-api-key") or "")
        entry = self.state.access.get(token) if token else None
        problem = None
        if entry is not None and entry.revoked:
            problem = "OAuth token has been revoked. Please obtain a new token."
        elif self.state.config.strict and (entry is None or entry.auto):
            problem = "invalid x-api-key"
        elif self.state.config.strict and entry is not None and entry.expired():
            problem = "OAuth token has expired. Please obtain a new token or refresh your existing token."
        if problem:
            self.state.stats.unauthorized += 1
            raise HttpError(401, problem)
        if entry is None and token:
            entry = self.state.auto_register(token)
        if entry is not None:
            self.account = self.state.accounts[entry.account]
        if self.account is not None and self.ex.record is not None:
            self.ex.record["account"] = self.account.id

    def rl_headers(self, rejected: bool = False) -> list[tuple[str, str]]:
        acct = self.account or Account(id="")
        status = "rejected" if rejected else acct.status
        claim_is_7d = acct.claim in ("seven_day", "7d")
        headers = {
            RL + "status": status,
            RL + "5h-status": "rejected" if status == "rejected" and not claim_is_7d else "allowed",
            RL + "5h-utilization": str(acct.five_hour_utilization),
            RL + "5h-reset": str(acct.five_hour_reset),
            RL + "7d-status": "rejected" if status == "rejected" and claim_is_7d else "allowed",
            RL + "7d-utilization": str(acct.seven_day_utilization),
            RL + "7d-reset": str(acct.seven_day_reset),
            RL + "representative-claim": acct.claim,
            RL + "reset": str(acct.seven_day_reset if claim_is_7d else acct.five_hour_reset),
        }
        if acct.id:
            headers["x-fake-account"] = acct.id
        headers.update(acct.headers)
        headers.update(ratelimit_override(self.req))
        return [(k, v) for k, v in headers.items() if v is not None]

    def retry_after(self, default: int = 30) -> list[tuple[str, str]]:
        return [("retry-after", knob(self.req, "retry-after") or str(default))]

    def apply_status_knob(self) -> None:
        status = int_knob(self.req, "status")
        if status is None or status == 200:
            return
        headers = self.rl_headers()
        if status in RETRY_AFTER_STATUSES:
            headers += self.retry_after()
        raise HttpError(status, f"fake error {status} (x-fake-status)", headers=headers)

    def apply_quota(self) -> None:
        acct = self.account
        if acct is None or not acct.quota_429:
            return
        reset = acct.seven_day_reset if acct.claim in ("seven_day", "7d") else acct.five_hour_reset
        try:
            wait = max(1, int(float(reset) - time.time()))
        except ValueError:
            wait = 30
        raise HttpError(429, "This request would exceed your account's rate limit. Please try again later.",
                        headers=self.rl_headers(rejected=True) + self.retry_after(wait))

    @staticmethod
    def models_body() -> dict[str, Any]:
        data = [{"type": "model", "id": mid, "display_name": name, "created_at": "2025-08-05T00:00:00Z"}
                for mid, name in MODELS]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    # ----- messages
    def messages(self) -> None:
        try:
            body = self.req.json()
        except ValueError:
            raise HttpError(400, "messages: request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "messages: request body must be a JSON object")
        plan = plan_from_request(self.req, body)
        self.apply_quota()
        self.apply_status_knob()
        if self.account is not None:
            self.state.stats.messages_by_account[self.account.id] += 1
        headers = self.rl_headers()
        if plan.stream and not plan.invalid_json:
            self.stream(plan, headers)
        else:
            self.json_response(plan, headers)

    def message_body(self, plan: Plan) -> bytes:
        if plan.invalid_json:
            return b'{"id":"msg_broken","type":"message","content":[{"type":"text","text":"Hel'
        message = {
            "id": plan.msg_id, "type": "message", "role": "assistant", "model": plan.model,
            "content": [{"type": "text", "text": DEFAULT_TEXT}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": plan.usage(),
        }
        body = dumps(message)
        if plan.size and plan.size > len(body):
            message["content"][0]["text"] = DEFAULT_TEXT + " " + "x" * (plan.size - len(body) - 1)
            body = dumps(message)
        return body

    def json_response(self, plan: Plan, headers: list[tuple[str, str]]) -> None:
        body = self.message_body(plan)
        if plan.encoding is not None:
            body = plan.encoding.feed(body) + plan.encoding.finish()
            headers = [*headers, ("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        headers = [("content-type", "application/json"), *headers]
        if plan.drop_after == 0:
            self.drop()
        chunked = plan.framing == "chunked"
        self.ex.send_head(200, headers, length=len(body) if plan.framing == "length" else None, chunked=chunked)
        writer = BodyWriter(self.conn, chunked, None)
        try:
            if plan.drop_after is not None or plan.stall_after is not None:
                writer.write(body[: len(body) // 2])
                if plan.drop_after is not None:
                    self.drop()
                self.stall()
            for start in range(0, len(body), 256 * 1024):
                writer.write(body[start: start + 256 * 1024])
            writer.finish()
        except ClientGone:
            self.state.stats.closed_early += 1
            raise
        if plan.framing == "close":
            self.conn.close()

    def drop(self) -> None:
        self.state.stats.dropped += 1
        self.conn.reset()
        raise DropConnection()

    def stall(self) -> None:
        if self.conn.wait_peer_close(MAX_STALL):
            self.state.stats.closed_early += 1
        self.conn.close()
        raise DropConnection()

    def stream(self, plan: Plan, headers: list[tuple[str, str]]) -> None:
        events = sse_events(plan, self.ex.request_id)
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"), *headers]
        if plan.framing == "length":
            self.stream_with_length(plan, events, headers)
            return
        if plan.encoding is not None:
            headers += [("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        chunked = plan.framing == "chunked"
        self.ex.send_head(200, headers, chunked=chunked)
        writer = BodyWriter(self.conn, chunked, plan.encoding)
        rel = self.state.release(plan.release_key) if plan.release_key else None
        self.state.stats.streams_total += 1
        self.state.active_streams += 1
        try:
            self.send_events(plan, events, writer, rel)
            writer.finish()
            self.state.stats.streams_completed += 1
        except ClientGone:
            self.state.stats.closed_early += 1
            raise
        finally:
            self.state.active_streams -= 1
            if rel is not None:
                rel.done = True
                rel.waiting = False
        if not chunked:
            self.conn.close()

    def send_events(self, plan: Plan, events: list[tuple[str, dict[str, Any]]], writer: BodyWriter,
                    rel: Release | None) -> None:
        """Write the events one by one; faults, delays and the release hook act between them."""
        deltas = 0
        for name, payload in events:
            if name in ("content_block_delta", "content_block_stop"):
                self.interrupt(plan, deltas)
            if name == "content_block_delta" and plan.delay and self.conn.wait_peer_close(plan.delay):
                raise ClientGone("peer closed while the stream was sleeping")
            writer.write(sse(name, payload))
            deltas += name == "content_block_delta"
            if rel is not None:
                rel.events += 1
                rel.deltas = deltas
                if (name == "content_block_delta" and deltas == 1) or (name == "ping" and plan.events == 0):
                    self.wait_release(rel)

    def interrupt(self, plan: Plan, sent_deltas: int) -> None:
        """drop-after / stall-after once `sent_deltas` deltas are out."""
        if plan.drop_after == sent_deltas:
            self.drop()
        if plan.stall_after == sent_deltas:
            self.stall()

    @staticmethod
    def wait_release(rel: Release) -> None:
        rel.waiting = True
        rel.event.wait(RELEASE_TIMEOUT)
        rel.waiting = False

    def stream_with_length(self, plan: Plan, events: list[tuple[str, dict[str, Any]]],
                           headers: list[tuple[str, str]]) -> None:
        """framing=length on a stream: the whole SSE body at once with a Content-Length (no faults, no delays)."""
        body = b"".join(sse(name, payload) for name, payload in events)
        if plan.encoding is not None:
            body = plan.encoding.feed(body) + plan.encoding.finish()
            headers = [*headers, ("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        self.ex.send_head(200, headers, length=len(body))
        self.conn.send(body)


def sse_events(plan: Plan, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The event sequence of a streamed answer, cut short by an `error` event when error-after is set."""
    start = {"id": plan.msg_id, "type": "message", "role": "assistant", "model": plan.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {**plan.usage(), "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for i in range(plan.events):
        if plan.error_after == i:
            break
        delta = {"type": "text_delta", "text": stream_piece(i, plan.delta_bytes)}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    if plan.error_after is not None and plan.error_after <= plan.events:
        events.append(("error", anthropic_error(529, "Overloaded", "overloaded_error", request_id)))
        return events
    usage = {k: v for k, v in plan.usage().items() if k not in ("cache_creation", "service_tier")}
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events


# ---------------------------------------------------------------------------- OAuth token endpoint


class TokenEndpoint:
    def __init__(self, state: FakeState, ex: Exchange) -> None:
        self.state = state
        self.ex = ex

    def handle(self) -> None:
        if self.ex.req.method != "POST":
            raise HttpError(405, "use POST", body={"error": "invalid_request", "error_description": "use POST"})
        apply_fault(self.ex, self.state.config, "token_endpoint",
                    {"error": "server_error", "error_description": "fake token endpoint fault"})
        params = self.params()
        entry = {"client_id": params.get("client_id"), "scope": params.get("scope"),
                 "grant_type": params.get("grant_type"), "refresh_token": params.get("refresh_token"),
                 "content_type": self.ex.req.header("content-type"), "status": None}
        log_list = self.state.stats.token_requests
        log_list.append(entry)
        del log_list[:-MAX_TOKEN_LOG]
        if params.get("grant_type") != "refresh_token":
            entry["status"] = 400
            raise HttpError(400, "unsupported grant", body={
                "error": "unsupported_grant_type",
                "error_description": f"grant_type {params.get('grant_type')!r} is not supported by the fake"})
        rotated = self.state.rotate(str(params.get("refresh_token") or ""))
        if rotated is None:
            self.state.stats.invalid_grant += 1
            entry["status"] = 400
            raise HttpError(400, "invalid_grant", body={
                "error": "invalid_grant", "error_description": "Refresh token not found or invalid"})
        account, access, refresh = rotated
        entry["status"] = 200
        if self.ex.record is not None:
            self.ex.record["account"] = account.id
        self.ex.send_json(200, {
            "token_type": "Bearer",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.state.config.token_expires_in,
            "scope": params.get("scope") or DEFAULT_SCOPE,
            "account": {"uuid": f"acct-{account.id}", "email_address": f"{account.id}@fake.invalid"},
            "organization": {"uuid": f"org-{account.id}", "name": "Fake Org"},
        })

    def params(self) -> dict[str, Any]:
        """A JSON object or a form-encoded body (decided by the body itself, not the Content-Type)."""
        body = self.ex.req.body
        if body and not body.lstrip().startswith((b"{", b"[")):
            return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HttpError(400, "bad body", body={"error": "invalid_request",
                                                   "error_description": "body is not JSON"}) from None
        if not isinstance(data, dict):
            raise HttpError(400, "bad body", body={"error": "invalid_request",
                                                   "error_description": "body must be an object"})
        return data


def take_fault(holder: Any, attr: str) -> dict[str, Any] | None:
    """The fault stored in `holder.attr`, consuming one use when it has a `times` budget."""
    fault = getattr(holder, attr)
    if not fault:
        return None
    if "times" in fault:
        fault["times"] = int(fault["times"]) - 1
        if fault["times"] <= 0:
            setattr(holder, attr, None)
    return fault


def apply_fault(ex: Exchange, holder: Any, attr: str, error_body: Any) -> None:
    """delay_ms, then down (close) / reset (RST) / status (with optional retry_after and body)."""
    fault = take_fault(holder, attr)
    if not fault:
        return
    delay = float(fault.get("delay_ms") or 0) / 1000
    if delay > 0 and ex.conn.wait_peer_close(bounded(delay)):
        raise DropConnection()
    if fault.get("reset"):
        ex.conn.reset()
        raise DropConnection()
    if fault.get("down"):
        ex.conn.close()
        raise DropConnection()
    status = fault.get("status")
    if status and int(status) != 200:
        headers = [("retry-after", str(fault["retry_after"]))] if fault.get("retry_after") is not None else []
        raise HttpError(int(status), "fault", body=fault.get("body", error_body), headers=headers)


# ------------------------------------------------------------------------- usage and profile APIs


class OAuthApi:
    def __init__(self, state: FakeState, ex: Exchange) -> None:
        self.state = state
        self.ex = ex

    def handle(self) -> None:
        if self.ex.req.method != "GET":
            raise HttpError(405, "use GET")
        account = self.account()
        if self.ex.record is not None:
            self.ex.record["account"] = account.id
        if self.ex.req.path == "/api/oauth/usage":
            self.state.stats.usage_api_calls[account.id] += 1
            holder = account if account.usage_api else self.state.config
            apply_fault(self.ex, holder, "usage_api", anthropic_error(500, "fake usage API fault"))
            self.ex.send_json(200, self.usage(account))
        else:
            self.state.stats.profile_api_calls[account.id] += 1
            self.ex.send_json(200, self.profile(account))

    def account(self) -> Account:
        auth = self.ex.req.header("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        entry = self.state.access.get(token) if token else None
        strict = self.state.config.strict
        if not token or (entry is not None and entry.revoked) or (
                strict and (entry is None or entry.auto or entry.expired())):
            self.state.stats.unauthorized += 1
            raise HttpError(401, "OAuth authentication is required or the token is invalid")
        if entry is None:
            entry = self.state.auto_register(token)
        return self.state.accounts[entry.account]

    @staticmethod
    def window(utilization: Any, reset: Any) -> dict[str, Any]:
        try:
            percent: Any = round(float(utilization) * 100, 6)
        except (TypeError, ValueError):
            percent = utilization
        try:
            resets_at: Any = rfc3339(float(reset))
        except (TypeError, ValueError, OverflowError, OSError):
            resets_at = reset
        return {"utilization": percent, "resets_at": resets_at}

    def usage(self, account: Account) -> dict[str, Any]:
        return {
            "five_hour": self.window(account.five_hour_utilization, account.five_hour_reset),
            "seven_day": self.window(account.seven_day_utilization, account.seven_day_reset),
            "seven_day_oauth_apps": None,
            "seven_day_opus": None,
        }

    @staticmethod
    def profile(account: Account) -> dict[str, Any]:
        if account.profile is not None:
            return account.profile
        return {
            "account": {"uuid": f"acct-{account.id}", "email": f"{account.id}@fake.invalid",
                        "has_claude_max": account.organization_type == "claude_max"},
            "organization": {"uuid": f"org-{account.id}", "organization_type": account.organization_type,
                             "rate_limit_tier": account.rate_limit_tier},
        }


# ----------------------------------------------------------------------------------- control API


class Control:
    def __init__(self, server: FakeServer, ex: Exchange) -> None:
        self.server = server
        self.state = server.state
        self.ex = ex

    def body(self) -> dict[str, Any]:
        try:
            data = self.ex.req.json()
        except ValueError:
            raise HttpError(400, "control body is not JSON", body={"error": "control body is not JSON"}) from None
        if not isinstance(data, dict):
            raise HttpError(400, "control body must be an object", body={"error": "control body must be an object"})
        return data

    def dispatch(self) -> None:
        method = self.ex.req.method
        parts = [unquote(p) for p in self.ex.req.path.split("/")[2:]] or [""]
        route = (method, parts[0])
        try:
            self.route(route, parts)
        except HttpError as exc:
            if exc.body is None:
                exc.body = {"error": exc.message}
            raise

    def route(self, route: tuple[str, str], parts: list[str]) -> None:
        simple: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "health"): lambda: "ok",
            ("GET", "stats"): self.stats,
            ("GET", "requests"): self.requests,
            ("POST", "reset"): self.reset,
            ("GET", "config"): lambda: asdict(self.state.config),
            ("POST", "config"): self.config,
            ("POST", "revoke"): self.revoke,
        }
        if len(parts) == 1 and route in simple:
            self.ex.send_json(200, simple[route]())
        elif parts[0] == "accounts":
            self.accounts(parts[1:])
        elif parts[0] == "release" and len(parts) == 2 and route[0] == "POST":
            rel = self.state.release(parts[1])
            rel.event.set()
            self.ex.send_json(200, rel.to_json(parts[1]))
        elif parts[0] == "sent" and len(parts) == 2 and route[0] == "GET":
            self.ex.send_json(200, self.state.release(parts[1]).to_json(parts[1]))
        else:
            raise HttpError(404, f"no control endpoint {route[0]} {self.ex.req.path}")

    def stats(self) -> dict[str, Any]:
        conns = self.server.connections
        return self.state.stats_json(sum(1 for c in conns if not c.is_control), len(conns))

    def requests(self) -> list[dict[str, Any]]:
        query = self.ex.req.query
        since = int(query.get("since") or 0)
        path = query.get("path")
        return [r for r in self.state.records if r["seq"] > since and (path is None or r["route"] == path)]

    def reset(self) -> dict[str, Any]:
        data = self.body()
        self.state.reset(accounts=bool(data.get("accounts")), config=bool(data.get("config")))
        return {"ok": True}

    def config(self) -> dict[str, Any]:
        self.state.config.update(self.body())
        return asdict(self.state.config)

    def revoke(self) -> dict[str, Any]:
        data = self.body()
        result: dict[str, Any] = {}
        if data.get("access_token"):
            entry = self.state.access.get(data["access_token"])
            if entry is None:
                raise HttpError(404, "unknown access_token")
            entry.revoked = True
            result["access_token"] = "revoked"
        if data.get("refresh_token"):
            rentry = self.state.refresh.get(data["refresh_token"])
            if rentry is None:
                raise HttpError(404, "unknown refresh_token")
            rentry.spent = True
            result["refresh_token"] = "spent"
        if not result:
            raise HttpError(400, "give access_token and/or refresh_token")
        return result

    def account_json(self, account: Account) -> dict[str, Any]:
        return {**asdict(account), **self.state.tokens_of(account.id)}

    def accounts(self, rest: list[str]) -> None:
        method = self.ex.req.method
        if not rest and method == "GET":
            self.ex.send_json(200, [self.account_json(a) for a in self.state.accounts.values()])
        elif not rest and method == "POST":
            self.ex.send_json(200, self.state.add_account(self.body()))
        elif len(rest) == 2 and rest[1] == "state" and method in ("GET", "POST"):
            account = self.state.find_account(rest[0], create=method == "POST")
            if account is None:
                raise HttpError(404, f"unknown account {rest[0]!r}")
            if method == "POST":
                self.state.apply_state(account, self.body())
            self.ex.send_json(200, self.account_json(account))
        else:
            raise HttpError(404, f"no control endpoint {method} {self.ex.req.path}")


# ------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Fake Anthropic API for the ccm-wsgi tests.")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--tls-cert", help="PEM certificate chain; serve HTTPS")
    parser.add_argument("--tls-key", help="PEM private key (default: in --tls-cert)")
    parser.add_argument("--token-expires-in", type=int, default=3600,
                        help="expires_in (seconds) of issued tokens and default of created accounts")
    parser.add_argument("--strict-tokens", action="store_true",
                        help="/v1/* needs a known, unexpired, unrevoked access token")
    parser.add_argument("--parent-pid", type=int, default=0, help="exit when this process is gone")
    parser.add_argument("--verbose", action="store_true", help="log every request line to stderr")
    return parser.parse_args(argv)


def tls_context(cert: str | None, key: str | None) -> ssl.SSLContext | None:
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    context.set_alpn_protocols(["http/1.1"])
    return context


def watch_parent(parent_pid: int, stop: gevent.event.Event) -> None:
    while not stop.is_set():
        try:
            os.kill(parent_pid, 0)
        except ProcessLookupError:
            log(f"parent {parent_pid} is gone, exiting")
            stop.set()
            return
        except OSError:
            pass
        gevent.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    state = FakeState(Config(strict=args.strict_tokens, token_expires_in=args.token_expires_in))
    server = FakeServer(state, args.host, args.port, tls_context(args.tls_cert, args.tls_key), args.verbose)
    server.start()
    stop = gevent.event.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        gevent.signal_handler(sig, stop.set)
    if args.parent_pid:
        gevent.spawn(watch_parent, args.parent_pid, stop)
    print(f"LISTENING {server.port}", flush=True)
    while not stop.wait(1.0):
        pass
    server.stop()
    return 0


# ------------------------------------------------------------------------------------ test helper


START_TIMEOUT = 10.0
CLI_FLAGS = {"host", "tls_cert", "tls_key", "token_expires_in", "strict_tokens", "verbose"}


class _InstanceOrClass:
    """`FakeUpstream.start(...)` creates and starts an instance; `instance.start(...)` starts that instance."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        return functools.partial(self.func, obj if obj is not None else owner())


class FakeUpstream:
    """The fake as a subprocess, plus urllib3 wrappers for its control API. Usable as a context manager."""

    script = Path(__file__).resolve()
    _log_ids = itertools.count(1)

    def __init__(self) -> None:
        import urllib3

        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.scheme = "http"
        self.log_path: Path | None = None
        self.args: list[str] = []
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=START_TIMEOUT),
                                         cert_reqs="CERT_NONE", assert_hostname=False)

    @_InstanceOrClass
    def start(self, tmp_path: Path | str | None = None, **cli_opts: Any) -> FakeUpstream:
        """Launch `fake_upstream.py --port 0 ...`; cli_opts map to flags (strict_tokens=True, token_expires_in=5)."""
        unknown = set(cli_opts) - CLI_FLAGS
        if unknown:
            raise TypeError(f"unknown FakeUpstream options {sorted(unknown)}; known {sorted(CLI_FLAGS)}")
        self.args = [sys.executable, str(self.script), "--port", "0", "--parent-pid", str(os.getpid())]
        for name, value in cli_opts.items():
            if value is None or value is False:
                continue
            self.args.append("--" + name.replace("_", "-"))
            if value is not True:
                self.args.append(str(value))
        self.host = str(cli_opts.get("host") or "127.0.0.1")
        self.scheme = "https" if cli_opts.get("tls_cert") else "http"
        self.log_path = self._new_log_path(tmp_path)
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log_file,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.port = self._wait_listening()
        except Exception:
            self.kill()
            raise
        return self

    def _new_log_path(self, tmp_path: Path | str | None) -> Path:
        if tmp_path is None:
            fd, name = tempfile.mkstemp(prefix="fake_upstream-", suffix=".log")
            os.close(fd)
            return Path(name)
        directory = Path(tmp_path)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"fake_upstream-{next(self._log_ids)}.log"

    def _wait_listening(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        fd = self.proc.stdout.fileno()
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake upstream did not print LISTENING within {START_TIMEOUT}s:\n{self.log()}")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(2)
                    raise RuntimeError(f"fake upstream exited with {self.proc.returncode}:\n{self.log()}")
                data += chunk
        line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"unexpected first line from fake upstream: {line!r}\n{self.log()}")
        return int(line.split()[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----- control API
    def call(self, method: str, path: str, body: Any = None, timeout: float = START_TIMEOUT) -> Any:
        """One control call; returns the decoded JSON answer, raises RuntimeError on a non-2xx status."""
        kwargs: dict[str, Any] = {"timeout": timeout}
        if body is not None:
            kwargs.update(body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resp = self._http.request(method, self.url + path, **kwargs)
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"fake control {method} {path} -> {resp.status}: {resp.data[:500]!r}")
        return json.loads(resp.data) if resp.data else None

    def stats(self) -> dict[str, Any]:
        return self.call("GET", "/_fake/stats")

    def requests(self, path: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        query = f"?since={since}" + (f"&path={path}" if path else "")
        return self.call("GET", "/_fake/requests" + query)

    def configure(self, **kwargs: Any) -> dict[str, Any]:
        return self.call("POST", "/_fake/config", kwargs)

    def reset(self, accounts: bool = False, config: bool = False) -> None:
        self.call("POST", "/_fake/reset", {"accounts": accounts, "config": config})

    def add_account(self, access_token: str | None = None, refresh_token: str | None = None,
                    **fields_: Any) -> dict[str, Any]:
        """POST /_fake/accounts; extra keyword arguments: account, expires_in, and any account state field."""
        body = {k: v for k, v in (("access_token", access_token), ("refresh_token", refresh_token)) if v}
        return self.call("POST", "/_fake/accounts", {**body, **fields_})

    def accounts(self) -> list[dict[str, Any]]:
        return self.call("GET", "/_fake/accounts")

    def set_state(self, ref: str, **state: Any) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call("POST", f"/_fake/accounts/{quote(ref, safe='')}/state", state)

    def state(self, ref: str) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call("GET", f"/_fake/accounts/{quote(ref, safe='')}/state")

    def revoke(self, access_token: str | None = None, refresh_token: str | None = None) -> dict[str, Any]:
        return self.call("POST", "/_fake/revoke", {"access_token": access_token, "refresh_token": refresh_token})

    def release(self, key: str) -> dict[str, Any]:
        return self.call("POST", f"/_fake/release/{key}")

    def sent(self, key: str) -> int:
        """How many content_block_delta events the stream tagged `key` has written so far."""
        return int(self.sent_info(key)["deltas"])

    def sent_info(self, key: str) -> dict[str, Any]:
        """{"key", "events" (all SSE events), "deltas", "waiting", "released", "done"}."""
        return self.call("GET", f"/_fake/sent/{key}")

    def wait_stats(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = START_TIMEOUT,
                   what: str = "stats condition") -> dict[str, Any]:
        """Poll stats() until predicate(stats) is truthy; returns those stats or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.stats()
            if predicate(current):
                return current
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last stats: {current}")
            time.sleep(0.02)

    # ----- lifecycle
    def stop(self, timeout: float = START_TIMEOUT) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL as a last resort; returns the exit status."""
        self._http.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
