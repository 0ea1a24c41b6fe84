"""The `/v1/*` handler: authenticate, read the body, pick a credential, forward, relay.

It is a plain WSGI callable rather than a Flask view: this is the hot path, and Werkzeug's request
and response objects would cost about a fifth of the CPU per request without adding anything here.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import gevent
import urllib3
from urllib3.exceptions import HTTPError

from ..accounting.sse import SSETap, Usage, decoder_for, parse_request, request_fields
from ..accounting.usage import make_record
from ..credentials.oauth import CredentialError
from ..errors import JSON_HEADERS, ProxyError
from ..pool.balancer import NoCredential, session_id
from ..pool.quota import is_quota_429
from ..upstream.request import request_headers, response_headers, send
from .relay import DecodingTap, JSONTap, Relay, Tap

if TYPE_CHECKING:
    from ..pool.providers import Account, PoolProvider, SingleProvider
    from ..service import Service

log = logging.getLogger("ccm_wsgi.proxy")
access_log = logging.getLogger("ccm_wsgi.access")

SMALL_BODY = 1024 * 1024  # non-streaming bodies up to this size are sent in one write
BODY_MIN_RATE = 64 * 1024  # bytes/s: a body must arrive within client_timeout + its size at this rate
CLOSE = [("Connection", "close")]


def status_line(status: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return f"{status} {reason}"


@dataclass(slots=True)  # one per request or open stream: no per-instance dict
class Exchange:
    """One request, from arrival to its access-log line."""

    start: float
    method: str
    path: str
    user: str = ""
    status: int = 0
    sent: int = 0
    streamed: bool = False
    account: Account | None = None
    request_model: str = ""
    messages_count: int = 0
    beta: str = ""
    week_reset: str | None = None
    usage: Usage | None = None
    cut: str = ""


def raw_target(environ: dict[str, Any]) -> str:
    """The request target as the client wrote it (still percent-encoded), query included."""
    raw = environ.get("RAW_URI")
    if raw:
        return raw
    path = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING")
    return path + ("?" + query if query else "")


def header_getter(environ: dict[str, Any]) -> Any:
    return lambda name: environ.get("HTTP_" + name.upper().replace("-", "_"))


def safe_path(environ: dict[str, Any]) -> str:
    """The decoded path if it is a plain `/v1/...` path; dot segments and absolute forms are refused."""
    path = environ.get("PATH_INFO", "")
    target = raw_target(environ)
    if not path.startswith("/v1/") or not target.startswith("/v1/"):
        raise ProxyError(404, "not_found_error", "Not found")
    segments = path.split("/")
    if "." in segments or ".." in segments or "\\" in path:
        raise ProxyError(400, "invalid_request_error", "path must not contain dot segments")
    return path


class Proxy:
    def __init__(self, service: Service):
        self.service = service
        cfg = service.cfg
        self.configured_headers = cfg.headers
        self.max_body = cfg.max_request_body_size
        self.connect_timeout = cfg.connect_timeout
        self.response_timeout = cfg.response_timeout
        self.idle_timeout = cfg.stream_idle_timeout
        self.client_timeout = cfg.client_timeout

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        ex = Exchange(time.monotonic(), environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""))
        self.service.active += 1
        try:
            return self._proxy(environ, start_response, ex)
        except ProxyError as err:
            return self._fail(ex, err, start_response)
        except CredentialError as err:
            headers = [] if err.retry_after is None else [("retry-after", str(max(1, round(err.retry_after))))]
            return self._fail(ex, ProxyError(err.status, "api_error", err.message, headers), start_response)
        except NoCredential as err:
            return self._fail(ex, err.as_proxy_error(), start_response)
        except Exception:
            log.exception("internal error while proxying %s %s", ex.method, printable(ex.path))
            return self._fail(ex, ProxyError(500, "api_error", "internal error in ccm-wsgi"), start_response)

    def _proxy(self, environ: dict[str, Any], start_response: Any, ex: Exchange) -> Any:
        safe_path(environ)
        user = self.service.auth.authenticate(environ)
        ex.user = user.name if user is not None else ""
        body = self._read_body(environ)
        provider = self.service.provider_for(user)
        request = parse_request(body) if provider.pooled else None
        session = session_id(header_getter(environ), request) if provider.pooled else ""
        allow_external = user.allow_external_usage if user is not None else True
        account = provider.select(session, allow_external=allow_external)
        upstream, account = self._send(provider, account, session, allow_external, environ, body)
        ex.account, ex.status = account, upstream.status
        if account.usage is not None:
            ex.request_model, ex.messages_count = request_fields(parse_request(body) if request is None else request)
            ex.beta = environ.get("HTTP_ANTHROPIC_BETA", "")
        headers = upstream.headers
        ctype = headers.get("content-type", "")
        sse = ctype.startswith("text/event-stream")
        tap = self._tap(account, upstream, sse)
        if tap is not None:
            ex.week_reset = headers.get("anthropic-ratelimit-unified-7d-reset")
        length = headers.get("content-length")
        if not sse and length is not None and length.isdigit() and int(length) <= SMALL_BODY:
            return self._whole(upstream, ex, tap, start_response)
        ex.streamed = True
        start_response(status_line(upstream.status, upstream.reason), response_headers(upstream, keep_length=not sse))
        return Relay(upstream, sse, tap, lambda relay: self._finish_relay(ex, relay), self.idle_timeout)

    def _send(
        self, provider: SingleProvider | PoolProvider, account: Account, session: str, allow_external: bool,
        environ: dict[str, Any], body: bytes,
    ) -> tuple[urllib3.BaseHTTPResponse, Account]:
        """Forward, and in a pool move the request (and its session) on when an account's quota is spent."""
        tried: set[str] = set()
        while True:
            upstream = self._forward(account, environ, body)
            account.quota.observe_headers(upstream.headers, time.time(), account.external)
            if upstream.status != 429 or not provider.pooled or not is_quota_429(upstream.headers):
                return upstream, account
            tried.add(account.tag)
            provider.on_rate_limited(account, upstream.headers, session)
            upstream.drain_conn()
            upstream.release_conn()
            previous, account = account, provider.select(session, frozenset(tried), allow_external)
            log.info("retrying with credential %s after a quota 429 from %s", account.tag, previous.tag)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        if length:
            if not length.isdigit():
                raise ProxyError(400, "invalid_request_error", "invalid Content-Length")
            if int(length) > self.max_body:
                abandon(stream)  # not read, not waited for
                raise ProxyError(413, "request_too_large", f"request body exceeds {self.max_body} bytes", CLOSE)
            size = int(length)
        elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            size = self.max_body + 1
        else:
            return b""
        # The socket timeout only bounds silence: a client trickling a byte at a time (slowloris) is
        # bounded by this deadline instead. Either way the rest of the body is not waited for.
        with gevent.Timeout(self.client_timeout + size / BODY_MIN_RATE) as deadline:
            try:
                body = stream.read(size)
            except gevent.Timeout as exc:
                if exc is not deadline:
                    raise
                abandon(stream)
                raise ProxyError(408, "invalid_request_error", "the request body did not arrive in time", CLOSE) \
                    from None
            except Exception as exc:  # the client went away, stalled or sent a broken chunked body
                abandon(stream)
                status = 408 if isinstance(exc, TimeoutError) else 400
                raise ProxyError(status, "invalid_request_error", "the request body was cut short", CLOSE) from None
        if len(body) > self.max_body:
            abandon(stream)
            raise ProxyError(413, "request_too_large", f"request body exceeds {self.max_body} bytes", CLOSE)
        return body

    def _forward(self, account: Account, environ: dict[str, Any], body: bytes) -> urllib3.BaseHTTPResponse:
        """Send upstream; on a 401 adopt or refresh the token once and send once more."""
        headers = request_headers(environ, self.configured_headers)
        url = account.base_url + raw_target(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        credential = account.credential
        token = credential.access_token()
        for attempt in range(2):
            headers["authorization"] = "Bearer " + token
            upstream = send(
                account.pool, method, url, body, headers, self.connect_timeout, self.response_timeout,
                lambda exc: self.service.outbounds.describe_error(account.outbound, exc),
            )
            if upstream.status != 401 or attempt or account.external:
                return upstream
            renewed = credential.renew(token)
            if renewed is None:  # refreshed less than a minute ago: another refresh would not help
                return upstream
            upstream.drain_conn()
            upstream.release_conn()
            log.warning("credential %s: upstream answered 401, retrying with a renewed access token", account.tag)
            token = renewed
        raise AssertionError("unreachable")

    def _tap(self, account: Account, upstream: urllib3.BaseHTTPResponse, sse: bool) -> Tap | None:
        if account.usage is None or upstream.status != 200:
            return None
        tap: Tap = SSETap() if sse else JSONTap()
        decoder = decoder_for(upstream.headers.get("content-encoding"))
        return DecodingTap(tap, decoder) if decoder is not None else tap

    def _whole(self, upstream: urllib3.BaseHTTPResponse, ex: Exchange, tap: Tap | None, start_response: Any) -> Any:
        try:
            data = upstream.read(decode_content=False)
        except (HTTPError, OSError):
            upstream.close()
            upstream.release_conn()
            raise ProxyError(502, "api_error", "the upstream connection was lost while reading the response") from None
        upstream.release_conn()
        if tap is not None:
            tap.feed(data)
            ex.usage = tap.finish()
        ex.sent = len(data)
        start_response(status_line(upstream.status, upstream.reason), response_headers(upstream, keep_length=True))
        self._finish(ex)
        return [data]

    def _fail(self, ex: Exchange, err: ProxyError, start_response: Any) -> list[bytes]:
        body = err.body()
        ex.status, ex.sent = err.status, len(body)
        headers = [*JSON_HEADERS, ("Content-Length", str(len(body))), *err.headers]
        start_response(status_line(err.status), headers)
        self._finish(ex)
        return [body]

    def _finish_relay(self, ex: Exchange, relay: Relay) -> None:
        ex.sent, ex.cut = relay.sent, relay.cut
        ex.usage = relay.usage()
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        """Record usage and write the access line; runs exactly once per request."""
        self.service.active -= 1
        cost = None
        if ex.usage is not None and ex.account is not None and ex.account.usage is not None:
            record = make_record(ex.user, ex.usage, ex.request_model, ex.messages_count, ex.beta, ex.week_reset)
            if record is not None:
                ex.account.usage.record(record)
                cost = self.service.pricing.cost(
                    record.model, record.context_window, record.input_tokens, record.output_tokens,
                    record.cache_read_input_tokens, record.cache_creation_input_tokens,
                    record.cache_creation_5m_input_tokens, record.cache_creation_1h_input_tokens,
                )
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(access_line(ex, cost))


def abandon(stream: Any) -> None:
    """Tell pywsgi not to drain the rest of a body we gave up on (a slow client would hold it again)."""
    if hasattr(stream, "_chunked_input_error"):
        stream._chunked_input_error = True


def printable(text: str) -> str:
    """`text` safe for one log line: control characters (CR, LF from a percent-encoded path) escaped."""
    return text if text.isprintable() else text.encode("unicode_escape").decode("ascii")


def access_line(ex: Exchange, cost: float | None) -> str:
    """`user method path status bytes duration mode [model tokens cost] [cut]`, one line per request."""
    duration = (time.monotonic() - ex.start) * 1000
    line = (
        f"{ex.user or '-'} {ex.method} {ex.path} {ex.status} {ex.sent}B {duration:.0f}ms "
        f"{'stream' if ex.streamed else 'whole'}"
    )
    usage = ex.usage
    if usage is not None and (usage.input_tokens or usage.output_tokens):
        line += (
            f" model={usage.model or ex.request_model} in={usage.input_tokens} out={usage.output_tokens}"
            f" cache_read={usage.cache_read_input_tokens} cache_write={usage.cache_creation_input_tokens}"
        )
        if cost is not None:
            line += f" cost=${cost:.4f}"
    if ex.cut:
        line += f" partial({ex.cut})"
    return printable(line)
