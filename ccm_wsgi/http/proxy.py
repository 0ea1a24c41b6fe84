"""The `/v1/*` handler: authenticate, read the body, pick a credential, forward, relay.

It is a plain WSGI callable rather than a Flask view: this is the hot path, and Werkzeug's request
and response objects would cost about a fifth of the CPU per request without adding anything here.
Its collaborators are given to it (who is calling, which credentials serve a user, prices, the drain of
a graceful stop, the metrics and the list of recent refusals); it reaches into nothing else.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import gevent
import urllib3
from gevent import GreenletExit
from urllib3.exceptions import HTTPError

from ..accounting.pricing import Pricing
from ..accounting.records import make_record
from ..accounting.sse import Usage
from ..anthropic import RATELIMIT_PREFIX
from ..credentials.errors import CredentialError
from ..errors import JSON_HEADERS, ProxyError
from ..limits.engine import Admission, Limits
from ..limits.refusals import Refusal
from ..observe.refusals import Recent, Refused
from ..patches import abandon
from ..pool.balancer import NoCredential
from ..pool.quota import is_quota_429
from ..upstream.request import header, request_headers, response_headers, send
from .auth import Authenticator
from .drain import SHUTDOWN, Drain
from .relay import Relay, body_usage, usage_tap
from .request import Facts, facts, session_header

if TYPE_CHECKING:
    from ..accounting.records import Record
    from ..config import Service as ServiceConfig
    from ..config import User
    from ..observe.metrics import Metrics
    from ..pool.providers import Account, Provider

log = logging.getLogger("ccm_wsgi.proxy")
access_log = logging.getLogger("ccm_wsgi.access")

SMALL_BODY = 1024 * 1024  # non-streaming bodies up to this size are sent in one write
BODY_MIN_RATE = 64 * 1024  # bytes/s: a body must keep arriving at this rate (after client_timeout)
BODY_PIECE = 64 * 1024
CLOSE = [("Connection", "close")]
WEEK_RESET = RATELIMIT_PREFIX + "7d-reset"
NO_FACTS = Facts()


def status_line(status: int, reason: str | None = None) -> str:
    if not reason:
        try:
            reason = HTTPStatus(status).phrase
        except ValueError:
            reason = "Unknown"
    return f"{status} {reason}"


@dataclass(frozen=True, slots=True)
class ProxySettings:
    """The service settings the handler acts on."""

    headers: Mapping[str, tuple[str, ...]]
    max_body: int
    response_timeout: float
    idle_timeout: float
    client_timeout: float

    @classmethod
    def of(cls, cfg: ServiceConfig) -> ProxySettings:
        return cls(cfg.headers, cfg.max_request_body_size, cfg.response_timeout, cfg.stream_idle_timeout,
                   cfg.client_timeout)


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
    body_read: bool = False
    account: Account | None = None
    facts: Facts = NO_FACTS
    beta: str = ""
    week_reset: str | None = None
    readings: tuple[float, ...] = ()
    usage: Usage | None = None
    cut: str = ""
    admission: Admission | None = None
    refused: str = ""  # the limit that refused the request


def raw_target(environ: dict[str, Any]) -> str:
    """The request target as the client wrote it (still percent-encoded), query included."""
    raw: str | None = environ.get("RAW_URI")
    if raw:
        return raw
    path: str = environ.get("PATH_INFO", "")
    query = environ.get("QUERY_STRING")
    return path + ("?" + query if query else "")


def safe_path(environ: dict[str, Any]) -> str:
    """The decoded path if it is a plain `/v1/...` path; dot segments and absolute forms are refused."""
    path: str = environ.get("PATH_INFO", "")
    target = raw_target(environ)
    if not path.startswith("/v1/") or not target.startswith("/v1/"):
        raise ProxyError(404, "not_found_error", "Not found")
    segments = path.split("/")
    if "." in segments or ".." in segments or "\\" in path:
        raise ProxyError(400, "invalid_request_error", "path must not contain dot segments")
    return path


def has_body(environ: dict[str, Any]) -> bool:
    length = environ.get("CONTENT_LENGTH")
    return bool(length and length != "0") or environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked"


class Proxy:
    def __init__(
        self,
        auth: Authenticator,
        provider_for: Callable[[User | None], Provider],
        pricing: Pricing,
        settings: ProxySettings,
        drain: Drain,
        limits: Limits,
        refusals: Recent,
        metrics: Metrics | None = None,
        starting: Callable[[], AbstractContextManager[None]] = contextlib.nullcontext,
    ):
        self.auth = auth
        self.provider_for = provider_for
        self.pricing = pricing
        self.settings = settings
        self.drain = drain
        self.limits = limits
        self.starting = starting  # shared state: what a request reads before it is forwarded, in one round trip
        self.refusals = refusals
        self.metrics = metrics

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Any:
        ex = Exchange(time.monotonic(), environ.get("REQUEST_METHOD", "GET"), environ.get("PATH_INFO", ""))
        self.drain.active += 1
        if self.metrics is not None:
            self.metrics.started()
        try:
            return self._proxy(environ, start_response, ex)
        except ProxyError as err:
            return self._fail(ex, err, environ, start_response)
        except CredentialError as err:
            headers = [] if err.retry_after is None else [("retry-after", str(max(1, round(err.retry_after))))]
            return self._fail(ex, ProxyError(err.status, "api_error", err.message, headers), environ, start_response)
        except NoCredential as err:
            return self._fail(ex, err.as_proxy_error(), environ, start_response)
        except GreenletExit:  # the grace period of a stop ended while this request waited for its upstream
            ex.cut = SHUTDOWN
            self._finish(ex)
            raise
        except Exception:
            log.exception("internal error while proxying %s %s", ex.method, printable(ex.path))
            internal = ProxyError(500, "api_error", "internal error in ccm-wsgi")
            return self._fail(ex, internal, environ, start_response)

    def _proxy(self, environ: dict[str, Any], start_response: Any, ex: Exchange) -> Any:
        if self.drain.draining:
            raise ProxyError(503, "api_error", "ccm-wsgi is shutting down; retry on a new connection", CLOSE)
        safe_path(environ)
        user = self.auth.authenticate(environ)
        ex.user = user.name if user is not None else ""
        body = self._read_body(environ)
        ex.body_read = True
        ex.facts = facts(body, session_header(environ))
        provider = self.provider_for(user)
        allow_external = user.allow_external_usage if user is not None else True
        with self.starting():
            provider.recall(ex.facts.session, ex.user)
            ex.admission = self.limits.admit(user, ex.facts.model)
            excluded, refusal = self.limits.screen(ex.admission, provider.accounts)
            if refusal is not None and len(excluded) >= len(provider.accounts):
                raise refusal
            account = provider.select(ex.facts.session, excluded, allow_external, ex.user)
        upstream, account = self._send(provider, account, ex, excluded, allow_external, environ, body)
        del body  # not held while the response is relayed
        ex.account, ex.status = account, upstream.status
        ex.beta = environ.get("HTTP_ANTHROPIC_BETA", "")
        headers = upstream.headers
        sse = (header(headers, "content-type") or "").startswith("text/event-stream")
        counted = account.usage is not None and upstream.status == 200  # its usage is recorded
        if counted:
            ex.week_reset = header(headers, WEEK_RESET)
        extra: list[tuple[str, str]] = CLOSE if self.drain.draining else []
        length = header(headers, "content-length")
        whole = not sse and length is not None and length.isdigit() and int(length) <= SMALL_BODY
        standing = self.limits.headers(ex.admission, allow_external, account, provider.accounts)
        answer = response_headers(upstream, keep_length=not sse and not whole, keep_limits=standing is None)
        if standing:
            answer += standing
        if whole:
            return self._whole(upstream, ex, counted, start_response, answer + extra)
        ex.streamed = True
        start_response(status_line(upstream.status, upstream.reason), answer + extra)
        tap = usage_tap(sse, header(headers, "content-encoding")) if counted else None
        relay = Relay(upstream, sse, tap, lambda relay: self._finish_relay(ex, relay), self.settings.idle_timeout)
        self.drain.track(relay)
        return relay

    def _send(
        self, provider: Provider, account: Account, ex: Exchange, excluded: frozenset[str], allow_external: bool,
        environ: dict[str, Any], body: bytes,
    ) -> tuple[urllib3.BaseHTTPResponse, Account]:
        """Forward, and in a pool move the request (and its session) on when an account's quota is spent."""
        tried: set[str] = set(excluded)
        metrics = self.metrics
        while True:
            sent = time.monotonic()
            try:
                upstream = self._forward(account, environ, body)
            except ProxyError as err:  # no answer came
                if metrics is not None:
                    metrics.unanswered(err.status)
                raise
            if metrics is not None:
                metrics.answered(time.monotonic() - sent, upstream.status)
            before = account.quota.windows()
            if account.quota.observe_headers(upstream.headers, time.time(), account.external):
                ex.readings = account.quota.readings(before)
            if upstream.status != 429 or not provider.pooled or not is_quota_429(upstream.headers):
                return upstream, account
            tried.add(account.tag)
            provider.on_rate_limited(account, upstream.headers, ex.facts.session, ex.user)
            upstream.drain_conn()
            upstream.release_conn()
            previous, account = account, provider.select(ex.facts.session, frozenset(tried), allow_external, ex.user)
            log.info("retrying with credential %s after a quota 429 from %s", account.tag, previous.tag)

    def _read_body(self, environ: dict[str, Any]) -> bytes:
        """The whole body. It must keep arriving: the socket timeout alone only bounds silence, so a client
        trickling a byte at a time (slowloris) is cut once it falls behind client_timeout plus its size at
        BODY_MIN_RATE; a chunked body is held to the same pace as it arrives."""
        stream = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH")
        max_body = self.settings.max_body
        if length:
            if not length.isdigit():
                raise ProxyError(400, "invalid_request_error", "invalid Content-Length")
            if int(length) > max_body:
                raise ProxyError(413, "request_too_large", f"request body exceeds {max_body} bytes", CLOSE)
            size: int | None = int(length)
        elif environ.get("HTTP_TRANSFER_ENCODING", "").lower() == "chunked":
            size = None
        else:
            return b""
        started = time.monotonic()
        parts: list[bytes] = []
        got = 0
        while size is None or got < size:
            want = BODY_PIECE if size is None else min(BODY_PIECE, size - got)
            allowed = self.settings.client_timeout + (got + want) / BODY_MIN_RATE - (time.monotonic() - started)
            piece = self._read_piece(stream, want, allowed)
            if not piece:
                if size is not None:
                    raise ProxyError(400, "invalid_request_error", "the request body was cut short", CLOSE)
                break
            parts.append(piece)
            got += len(piece)
            if got > max_body:
                abandon(stream)
                raise ProxyError(413, "request_too_large", f"request body exceeds {max_body} bytes", CLOSE)
        return b"".join(parts)

    @staticmethod
    def _read_piece(stream: Any, want: int, allowed: float) -> bytes:
        try:
            with gevent.Timeout(max(allowed, 0.001)):
                piece: bytes = stream.read(want)
                return piece
        except gevent.Timeout:
            abandon(stream)
            raise ProxyError(408, "invalid_request_error", "the request body did not arrive in time", CLOSE) \
                from None
        except Exception as exc:  # the client went away, stalled or sent a broken chunked body
            abandon(stream)
            status = 408 if isinstance(exc, TimeoutError) else 400
            raise ProxyError(status, "invalid_request_error", "the request body was cut short", CLOSE) from None

    def _forward(self, account: Account, environ: dict[str, Any], body: bytes) -> urllib3.BaseHTTPResponse:
        """Send upstream; on a 401 retry once with a renewed token when renewing can help."""
        headers = request_headers(environ, self.settings.headers)
        url = account.base_url + raw_target(environ)
        method = environ.get("REQUEST_METHOD", "GET")
        credential = account.credential
        token = credential.access_token()
        for attempt in range(2):
            headers["authorization"] = "Bearer " + token
            upstream = send(account.route, method, url, body, headers, self.settings.response_timeout)
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

    def _whole(self, upstream: urllib3.BaseHTTPResponse, ex: Exchange, counted: bool, start_response: Any,
               headers: list[tuple[str, str]]) -> Any:
        try:
            data = upstream.read(decode_content=False)
        except (HTTPError, OSError):
            upstream.close()
            upstream.release_conn()
            raise ProxyError(502, "api_error", "the upstream connection was lost while reading the response") from None
        upstream.release_conn()
        if counted:
            ex.usage = body_usage(data, header(upstream.headers, "content-encoding"))
        ex.sent = len(data)
        start_response(status_line(upstream.status, upstream.reason), [*headers, ("Content-Length", str(len(data)))])
        self._finish(ex)
        return [data]

    def _fail(self, ex: Exchange, err: ProxyError, environ: dict[str, Any], start_response: Any) -> list[bytes]:
        body = err.body()
        ex.status, ex.sent = err.status, len(body)
        if isinstance(err, Refusal):
            ex.refused = err.limit
        headers = [*JSON_HEADERS, ("Content-Length", str(len(body))), *err.headers]
        if (not ex.body_read and has_body(environ)) or self.drain.draining:
            # a body nobody will read is not waited for: the connection ends with this answer
            abandon(environ["wsgi.input"])
            if ("Connection", "close") not in headers:
                headers += CLOSE
        start_response(status_line(err.status), headers)
        self._finish(ex)
        return [body]

    def _finish_relay(self, ex: Exchange, relay: Relay) -> None:
        ex.sent, ex.cut = relay.sent, relay.cut
        ex.usage = relay.usage()
        self._finish(ex)

    def _finish(self, ex: Exchange) -> None:
        """Record usage and write the access line; runs exactly once per request."""
        self.drain.active -= 1
        if ex.admission is not None:
            ex.admission.release()
        cost = None
        record: Record | None = None
        if ex.usage is not None and ex.account is not None and ex.account.usage is not None:
            record = make_record(ex.user, ex.usage, ex.facts.model, ex.facts.messages_count, ex.beta,
                                 ex.week_reset)
            if record is not None:
                cost = record.cost = self.pricing.cost_of(record)
                record.readings = ex.readings
                ex.account.usage.record(record)
        if ex.refused:
            self.refusals.add(Refused(time.time(), ex.user, ex.refused, ex.status))
        if self.metrics is not None:
            self.metrics.finished(ex.user, ex.facts.model, ex.status, record, ex.refused, ex.cut)
        if access_log.isEnabledFor(logging.INFO):
            access_log.info(access_line(ex, cost))


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
    if usage is not None and usage.tokens.any:
        t = usage.tokens
        line = (f"{line} model={usage.model or ex.facts.model} in={t.input_tokens} out={t.output_tokens}"
                f" cache_read={t.cache_read_input_tokens} cache_write={t.cache_creation}")
        if cost is not None:
            line = f"{line} cost=${cost:.4f}"
    if ex.cut:
        line += f" partial({ex.cut})"
    if ex.refused:
        line += f" refused({ex.refused})"
    return printable(line)
