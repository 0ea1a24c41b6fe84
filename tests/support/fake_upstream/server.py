"""The fake's gevent server: one greenlet per connection, keep-alive, routing to the endpoint handlers, and the
command-line entry point (`python -m tests.support.fake_upstream`)."""

from __future__ import annotations

import argparse
import contextlib
import http
import os
import signal
import socket
import ssl
import traceback
from typing import Any

import gevent
import gevent.event
import gevent.pool
from gevent.server import StreamServer

from . import authorize
from .common import (
    READ_TIMEOUT,
    TLS_HANDSHAKE_TIMEOUT,
    ClientGone,
    DropConnection,
    HttpError,
    anthropic_error,
    dumps,
    log,
)
from .control import Control
from .messages import V1
from .oauth import OAuthApi, TokenEndpoint
from .state import Config, FakeState
from .wire import Connection, Exchange


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
        elif path.endswith("/oauth/authorize"):
            authorize.authorize(self.state, ex)
        elif path in ("/api/oauth/usage", "/api/oauth/profile"):
            OAuthApi(self.state, ex).handle()
        elif path.startswith("/v1/"):
            V1(self, ex).handle()
        else:
            ex.send_error(404, f"Not found: {ex.req.method} {path}")


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
