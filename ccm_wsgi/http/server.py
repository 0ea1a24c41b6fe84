"""`ccm-wsgi serve`: every ccm service of the config on its own gevent WSGIServer, in one process.

Importing this module monkey-patches the standard library first, so that urllib3, ssl and socket
are cooperative before anything else imports them. Shutdown on SIGTERM/SIGINT is graceful: stop
accepting, let requests in flight (streams included) finish within the grace period, save usage,
exit 0.
"""

from gevent import monkey

monkey.patch_all()

import contextlib  # noqa: E402
import http.client  # noqa: E402
import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
import weakref  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
import gevent.pool  # noqa: E402
import gevent.socket  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

from .. import config as config_mod  # noqa: E402
from .. import logs  # noqa: E402
from ..accounting.store import UsageFileError  # noqa: E402
from ..errors import error_body  # noqa: E402
from ..service import Service  # noqa: E402
from ..upstream.outbounds import Outbounds  # noqa: E402
from . import tls  # noqa: E402
from .app import create_app  # noqa: E402
from .drain import Drain  # noqa: E402
from .sockets import KeepAlive  # noqa: E402

log = logging.getLogger("ccm_wsgi.server")

BACKLOG = 4096
RFILE_BUFFER = 4096
COALESCE = 16 * 1024  # first body bytes sent in one write with the response head up to this size
MAX_HEAD = 64 * 1024  # all header lines of a request (the request line has pywsgi's own 8 KiB limit)


class HeadTimeout(OSError):
    """The request head did not arrive within client_timeout."""


class HeadTooLarge(ValueError):
    """The header lines of a request exceed MAX_HEAD."""


class _HeadReader:
    """The client stream as http.client reads the header lines from it, with a budget for all of them
    (on its own, http.client accepts 100 lines of 64 KiB each)."""

    __slots__ = ("fp", "left")

    def __init__(self, fp: Any, budget: int):
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


class Handler(WSGIHandler):
    """Adds `RAW_URI` (the undecoded request target, as gunicorn does) so paths are forwarded verbatim.

    Hardening: the whole request head must arrive within client_timeout (the socket timeout alone only
    bounds silence, so a client sending a byte at a time would hold the connection forever), its header
    lines are limited to MAX_HEAD, framing that a front proxy could read differently (conflicting
    Content-Length values, Content-Length with Transfer-Encoding, a Transfer-Encoding other than chunked)
    is refused, and malformed requests get an Anthropic-shaped error that never repeats what was sent."""

    _head_timer: Any = None
    _head: bytearray | None = None  # a response head waiting to be sent with the first body bytes
    busy = False  # between a request's head and the end of its response; otherwise idle on keep-alive

    def __init__(self, sock: Any, address: Any, server: Any, rfile: Any = None):
        # pywsgi reads requests through an 8 KiB buffer that every connection keeps for its whole life
        # (an open stream included); 4 KiB holds a request head, and larger reads bypass the buffer
        super().__init__(sock, address, server, sock.makefile("rb", RFILE_BUFFER) if rfile is None else rfile)

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
        headers = super().MessageClass(_HeadReader(fp, MAX_HEAD), *args)
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

    def _write_with_headers(self, data: Any) -> None:
        # pywsgi sends the response head and the first body bytes (a whole JSON reply, the first event of
        # a stream) with two send() calls; when the body part is small the head waits for it in _sendall
        # and both go in one (the same bytes, one system call less)
        if data and len(data) <= COALESCE:
            self._head = bytearray()
        try:
            super()._write_with_headers(data)
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

    def log_request(self) -> None:
        # pywsgi formats an access line per request even when it has nowhere to write it (log=None);
        # ccm-wsgi writes its own access line (ccm_wsgi.access)
        if self.server.log_requests:
            super().log_request()


class Server(WSGIServer):
    """pywsgi with TCP_NODELAY (its header and body writes are separate: Nagle would add 40 ms), a client
    socket timeout (idle keep-alive connections and slow clients do not hold a greenlet forever), TCP
    keep-alive as configured, a deadline on the TLS handshake, and the connections it serves known, so
    that a graceful stop can close the idle ones."""

    handler_class = Handler

    def __init__(self, *args: Any, client_timeout: float, drain: Drain, keep_alive: KeepAlive, **kwargs: Any):
        super().__init__(*args, spawn=gevent.pool.Pool(), **kwargs)
        self.client_timeout = client_timeout
        self.drain = drain
        self.keep_alive = keep_alive
        self.connections: weakref.WeakSet[Handler] = weakref.WeakSet()
        self.log_requests = kwargs.get("log", "default") is not None
        self._handshake_failures = FailureLog("TLS handshake")

    def get_listener(self, address: Any, backlog: Any = None, family: Any = None) -> Any:  # type: ignore[override]
        """gevent's listener, plus SO_REUSEPORT when `reuse_addr` is set: as with sing-box, another process
        may then listen on the same port (a restart without a gap)."""
        sock = gevent.socket.socket(family=family or socket.AF_INET)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if self.keep_alive.reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            exc.strerror = f"{exc.strerror}: {address[0]} port {address[1]}"
            raise
        sock.listen(backlog or BACKLOG)
        sock.setblocking(False)
        return sock

    def wrap_socket_and_handle(self, client_socket: Any, address: Any) -> None:
        """The handshake has the whole request head's deadline (client_timeout): a client that connects
        and sends nothing, or half a ClientHello, cannot hold its socket. A failed handshake is one log
        line (debug, plus a rate-limited summary at info), never a traceback."""
        client_socket.settimeout(self.client_timeout)
        try:
            with gevent.Timeout(self.client_timeout, HandshakeTimeout):
                tls_socket = self.wrap_socket(client_socket, **self.ssl_args)
        except (HandshakeTimeout, OSError, ValueError) as exc:  # ssl.SSLError is an OSError
            self._handshake_failures.note(address, exc)
            with contextlib.suppress(OSError):
                client_socket.close()
            return
        try:
            self.handle(tls_socket, address)
        finally:
            with contextlib.suppress(OSError):
                tls_socket.close()

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.keep_alive.apply(sock)
        sock.settimeout(self.client_timeout)
        super().handle(sock, address)

    def close_idle(self) -> None:
        for handler in list(self.connections):
            handler.close_if_idle()


class HandshakeTimeout(Exception):
    """The TLS handshake did not finish within client_timeout."""


class FailureLog:
    """Failures a client can cause at will are logged at debug level one by one, and at info level at most
    once a minute as a count: a scanner cannot fill the disk through the log."""

    def __init__(self, what: str, every: float = 60.0):
        self.what = what
        self.every = every
        self.count = 0
        self.next = 0.0

    def note(self, address: Any, exc: BaseException) -> None:
        peer = address[0] if isinstance(address, tuple) else str(address)
        reason = "timed out" if isinstance(exc, HandshakeTimeout) else type(exc).__name__
        log.debug("%s with %s failed: %s", self.what, peer, reason)
        self.count += 1
        now = time.monotonic()
        if now >= self.next:
            log.info("%s failed %d time(s) in the last %gs (last: %s, %s)", self.what, self.count, self.every,
                     peer, reason)
            self.count, self.next = 0, now + self.every


class ErrorLog:
    """pywsgi's error log as a file-like object writing to our logger."""

    def write(self, text: str) -> None:
        text = text.rstrip()
        if text:
            log.debug("%s", text)

    def flush(self) -> None:
        pass


def build(cfg: config_mod.Config) -> list[tuple[Service, Server]]:
    outbounds = Outbounds(cfg.outbounds)
    pairs = []
    for service_cfg in cfg.services:
        service = Service(service_cfg, outbounds)
        kwargs: dict[str, Any] = {}
        if service_cfg.tls is not None:
            ctx = tls.server_context(service_cfg.tls)
            ctx.watch()
            kwargs["ssl_context"] = ctx
        server = Server(
            (service_cfg.listen, service_cfg.listen_port), create_app(service), backlog=BACKLOG,
            log=None, error_log=ErrorLog(), client_timeout=service_cfg.client_timeout, drain=service.drain,
            keep_alive=KeepAlive.of(service_cfg), **kwargs,
        )
        pairs.append((service, server))
    return pairs


def run(config_path: str | None) -> int:
    try:
        cfg = config_mod.load(config_path) if config_path else config_mod.default_config()
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    logs.setup(cfg.log)
    pairs = build(cfg)
    for service, server in pairs:
        try:
            service.start()
        except UsageFileError as exc:
            log.error("cannot start service %s: %s", service.tag, exc)
            return 1
        server.start()
        scheme = "https" if service.cfg.tls is not None else "http"
        host, port = server.address[:2]
        log.info("service %s listening on %s://%s:%d", service.tag, scheme, host, port)
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    stop.wait()
    shutdown(pairs)
    return 0


def shutdown(pairs: list[tuple[Service, Server]]) -> None:
    """Stop accepting and close idle connections; let the requests in flight finish within the grace
    period (no new request starts on a kept-alive connection); then cut and record what is left, save
    usage and leave."""
    log.info("shutting down: no new connections or requests, waiting for the requests in flight")
    for service, server in pairs:
        server.close()
        service.drain.begin()
        server.close_idle()
    grace = max(s.cfg.shutdown_grace for s, _ in pairs)
    deadline = time.monotonic() + grace
    while any(s.drain.active > 0 for s, _ in pairs) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    left = sum(s.drain.active for s, _ in pairs)
    if left:
        log.warning("grace period of %gs over: cutting %d request(s) still in flight", grace, left)
        for service, _ in pairs:
            service.drain.cut()
    for _, server in pairs:
        server.stop(timeout=1)
    for service, _ in pairs:
        service.close()
    log.info("stopped")
