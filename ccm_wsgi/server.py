"""`ccm-wsgi serve`: every ccm service of the config on its own gevent WSGIServer, in one process.

Importing this module monkey-patches the standard library first, so that urllib3, ssl and socket
are cooperative before anything else imports them. Shutdown on SIGTERM/SIGINT is graceful: stop
accepting, let requests in flight (streams included) finish within the grace period, save usage,
exit 0.
"""

from gevent import monkey

monkey.patch_all()

import logging  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from typing import Any  # noqa: E402

import gevent  # noqa: E402
import gevent.event  # noqa: E402
from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

from . import config as config_mod  # noqa: E402
from . import logs, tls  # noqa: E402
from .app import create_app  # noqa: E402
from .outbounds import Outbounds  # noqa: E402
from .service import Service  # noqa: E402

log = logging.getLogger("ccm_wsgi.server")

BACKLOG = 4096


class Handler(WSGIHandler):
    """Adds `RAW_URI` (the undecoded request target, as gunicorn does) so paths are forwarded verbatim."""

    def get_environ(self) -> dict[str, Any]:
        env = super().get_environ()
        env["RAW_URI"] = self.path
        return env


class Server(WSGIServer):
    """pywsgi with TCP_NODELAY (its header and body writes are separate: Nagle would add 40 ms) and a
    client socket timeout (idle keep-alive connections and slow clients do not hold a greenlet forever)."""

    handler_class = Handler

    def __init__(self, *args: Any, client_timeout: float, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.client_timeout = client_timeout

    def handle(self, sock: socket.socket, address: Any) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self.client_timeout)
        super().handle(sock, address)


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
            tls.watch(ctx, service_cfg.tls)
            kwargs["ssl_context"] = ctx
        server = Server(
            (service_cfg.listen, service_cfg.listen_port), create_app(service), backlog=BACKLOG,
            log=None, error_log=ErrorLog(), client_timeout=service_cfg.client_timeout, **kwargs,
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
        service.start()
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
    """Stop accepting, wait for in-flight requests up to the grace period, then save and leave."""
    log.info("shutting down: no new connections, waiting for requests in flight")
    for _, server in pairs:
        server.close()
    grace = max(s.cfg.shutdown_grace for s, _ in pairs)
    deadline = time.monotonic() + grace
    while any(s.active > 0 for s, _ in pairs) and time.monotonic() < deadline:
        gevent.sleep(0.05)
    left = sum(s.active for s, _ in pairs)
    if left:
        log.warning("grace period of %gs over: cutting %d request(s) still in flight", grace, left)
    for _, server in pairs:
        server.stop(timeout=1)
    for service, _ in pairs:
        service.close()
    log.info("stopped")
