"""`ccm-wsgi serve`: every ccm service of the config on its own gevent WSGIServer, in one process.

The `serve` command monkey-patches the standard library before it imports this module, so that urllib3,
ssl and socket are cooperative. Shutdown on SIGTERM/SIGINT is graceful (see `shutdown`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import signal
import socket
import ssl
import time
import weakref
from typing import TYPE_CHECKING, Any, cast

import gevent
import gevent.event
import gevent.pool
import gevent.socket
from gevent.pywsgi import WSGIServer

from .. import assemble, logs
from .. import config as config_mod
from ..accounting.reading import UsageFileError
from ..service import ReloadRefused, Service
from ..upstream.outbounds import Outbounds
from . import tls
from .drain import Drain
from .handler import Handler
from .sockets import KeepAlive

if TYPE_CHECKING:
    from flask import Flask

    from ..config import Service as ServiceConfig

log = logging.getLogger("ccm_wsgi.server")

BACKLOG = 4096


class Server(WSGIServer):
    """pywsgi with TCP_NODELAY (its header and body writes are separate: Nagle would add 40 ms), a client
    socket timeout (idle keep-alive connections and slow clients do not hold a greenlet forever), TCP
    keep-alive as configured, a deadline on the TLS handshake, and the connections it serves known, so
    that a graceful stop can close the idle ones."""

    handler_class = Handler

    def __init__(self, address: tuple[str, int], app: Flask, drain: Drain, cfg: ServiceConfig,
                 ssl_context: tls.ServerContext | None = None):
        common: dict[str, Any] = {"backlog": BACKLOG, "spawn": gevent.pool.Pool(), "log": None,
                                  "error_log": ErrorLog()}
        if ssl_context is None:
            super().__init__(address, app, **common)
        else:  # gevent only calls the context's wrap_socket
            super().__init__(address, app, ssl_context=cast(ssl.SSLContext, ssl_context), **common)
        self.client_timeout = cfg.client_timeout
        self.drain = drain
        self.keep_alive = KeepAlive.of(cfg)
        self.connections: weakref.WeakSet[Handler] = weakref.WeakSet()
        self.log_requests = False  # ccm-wsgi writes its own access line (ccm_wsgi.access)
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
                # gevent sets wrap_socket and ssl_args per instance, from the ssl_context given
                tls_socket = self.wrap_socket(client_socket, **self.ssl_args)  # type: ignore[misc, arg-type]
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
        service, app = assemble.service(cfg, service_cfg, outbounds)
        server = Server((service_cfg.listen, service_cfg.listen_port), app, service.drain, service_cfg, service.tls)
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
        log.info("service %s listening on %s://%s:%d", service.tag, scheme, server.server_host, server.server_port)
    gc.freeze()  # what startup built lasts as long as the process: full collections need not go through it again
    stop = gevent.event.Event()
    gevent.signal_handler(signal.SIGTERM, stop.set)
    gevent.signal_handler(signal.SIGINT, stop.set)
    gevent.signal_handler(signal.SIGHUP, lambda: gevent.spawn(reload, config_path, cfg, pairs))
    stop.wait()
    shutdown(pairs)
    return 0


def reload(config_path: str | None, running: config_mod.Config, pairs: list[tuple[Service, Server]]) -> None:
    """SIGHUP: re-read the config file and give every running service its new users, limits and the other
    settings that apply at once (`service.LIVE`); new requests see them, requests in flight go on as they
    started. A config that fails `check`, or that a running service cannot take, is refused as a whole
    and logged; the running config stays. Changes that need a restart are named in the log."""
    if config_path is None:
        log.warning("reload: serving the embedded default config, there is no file to re-read")
        return
    try:
        new = config_mod.load(config_path)
    except config_mod.ConfigError as exc:
        for problem in exc.problems:
            log.error("reload refused, the running config stays: %s", problem)
        return
    fresh = {s.tag: (index, s) for index, s in enumerate(new.services)}
    changes: list[tuple[Service, config_mod.Service, str]] = []
    for service, _ in pairs:
        if service.tag in fresh:
            index, service_cfg = fresh[service.tag]
            changes.append((service, service_cfg, f"services[{index}]"))
    later = [f"service {tag} added" for tag in fresh.keys() - {s.tag for s, _ in pairs}]
    later += [f"service {s.tag} removed" for s, _ in pairs if s.tag not in fresh]
    if new.outbounds != running.outbounds:
        later.append("outbounds")
    if new.log != running.log:
        later.append("log")
    try:
        for service, service_cfg, where in changes:  # every service checked before any changes
            service.check_reload(service_cfg, where)
    except ReloadRefused as exc:
        for problem in exc.problems:
            log.error("reload refused, the running config stays: %s", problem)
        return
    for service, service_cfg, where in changes:
        later += [f"service {service.tag} {name}" for name in service.reload(service_cfg, where)]
    users = sum(len(service.cfg.users) for service, _ in pairs)
    log.info("reloaded %s: %d user(s)", config_path, users)
    if later:
        log.warning("reload: these changes take effect at the next restart: %s", ", ".join(later))


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
