"""Outbounds: one urllib3 pool manager per sing-box outbound tag (the "proxy pool keyed by detour tag").

Why it is built this way:

* One manager per tag, built once in `Outbounds.__init__`, so a bad outbound (unreadable CA file,
  impossible cipher list) fails at start-up, and every request on a tag reuses its keep-alive
  connections. `""` and every `direct` outbound without its own `connect_timeout` share one direct pool.
* `maxsize` connections per upstream host, `block=False` (a burst opens extra connections instead of
  queueing), `retries=False` (a retried POST could bill a completion twice; the relay decides).
* Every manager verifies upstream TLS with one shared `ssl.SSLContext` from
  `ssl.create_default_context(cafile=...)`: `ca_certs`, else `$CCM_CA_BUNDLE` (tests), else the system
  roots, which is what sing-box does for api.anthropic.com.
* `socks` outbounds use urllib3's `SOCKSProxyManager` (PySocks). sing-box hands the upstream *name* to
  the outbound unresolved, so version 5 is `socks5h://` and 4a is `socks4a://`; plain 4 can only carry
  an IPv4 address, so `socks4://` resolves locally. The SOCKS4 user id is the `username`.
* `http` outbounds use urllib3's `ProxyManager`: CONNECT (what sing-box always does) for https
  upstreams, which is the real case; plain-http upstreams (tests) are forwarded with an absolute URI.
  A 407 on a forwarded request is turned into `ProxyRefused`, so a proxy that rejects the credentials
  fails the same way whether it answered a CONNECT or a forwarded request. `username` (even with an
  empty password) adds `Proxy-Authorization: Basic`, `headers` go on the CONNECT. The outbound's `tls`
  makes it an `https://` proxy with its own `SSLContext` (`certificate` replaces the roots, as in Go;
  `server_name` sets SNI and the verified name; `disable_sni` sends none; `insecure` skips checks).
  The outbound's `path` cannot be put on urllib3's CONNECT line and is ignored with a warning.
* gevent: nothing here blocks by itself, but PySocks subclasses `socket.socket` when it is first
  imported, so `urllib3.contrib.socks` is imported lazily (when a socks outbound is built) and we
  refuse to run with a PySocks imported before monkey-patching (it would block the whole hub).
* `describe_error` turns a urllib3/PySocks/ssl exception into one short line naming the tag and the
  proxy address, for a 502 body and the log; configured passwords never appear in it.
"""

from __future__ import annotations

import base64
import logging
import os
import re
import socket
import ssl
import sys
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import urllib3
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError, ProtocolError, ReadTimeoutError
from urllib3.exceptions import ProxyError as UrllibProxyError

from ..config import DialOutbound, DirectOutbound, HttpOutbound, OutboundTLS, SocksOutbound
from ..names import TLS_VERSIONS, openssl_cipher_list

log = logging.getLogger("ccm_wsgi.outbounds")

SOCKS_SCHEMES = {"4": "socks4", "4a": "socks4a", "5": "socks5h"}
_TUNNEL_STATUS = re.compile(r"Tunnel connection failed: (\d{3}) ?(.*)")


@dataclass(frozen=True, slots=True)
class Route:
    """How requests reach their upstream through one detour: its connection pool, the connect timeout that
    applies (the outbound's own, else the service's), and how its failures are worded for a 502."""

    tag: str
    pool: urllib3.PoolManager
    connect_timeout: float
    describe: Callable[[BaseException], str]


class ProxyRefused(UrllibProxyError):
    """An HTTP proxy answered a forwarded (plain-http) request with 407 instead of forwarding it."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"Tunnel connection failed: {status} {reason}", OSError(status, reason))
        self.status, self.reason = status, reason


class _HTTPProxyManager(urllib3.ProxyManager):
    # the signature of urllib3's own ProxyManager.urlopen, which narrows RequestMethods' the same way
    def urlopen(  # type: ignore[override]
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        response = super().urlopen(method, url, redirect=redirect, **kw)
        # Only a proxy sends 407. A refused CONNECT (https upstream) is already an exception.
        if response.status == 407 and not url.lower().startswith("https:"):
            reason = response.reason or "Proxy Authentication Required"
            response.drain_conn()
            response.release_conn()
            raise ProxyRefused(407, reason)
        return response


def hostport(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _upstream_context(ca_certs: str | None) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=ca_certs or os.environ.get("CCM_CA_BUNDLE") or None)


def _sni_context_class(base: type[ssl.SSLContext]) -> type[ssl.SSLContext]:
    # Built at run time on the *current* ssl.SSLContext, which under gevent is gevent's.
    class SNIContext(base):  # type: ignore[valid-type,misc]
        sni: str | None = None

        def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
            kwargs["server_hostname"] = self.sni
            return super().wrap_socket(sock, *args, **kwargs)

    return SNIContext


def _proxy_context(tls: OutboundTLS, server: str) -> tuple[ssl.SSLContext, str | None]:
    """The SSLContext for TLS to an http proxy, and the name urllib3 must check itself (or None)."""
    sni: str | None = tls.server_name or None
    assert_hostname = None
    if tls.disable_sni or sni:
        ctx = _sni_context_class(ssl.SSLContext)(ssl.PROTOCOL_TLS_CLIENT)
        ctx.sni = None if tls.disable_sni else sni  # type: ignore[attr-defined]
        if tls.disable_sni:  # no name sent, so Python cannot check it: urllib3 checks after the handshake
            ctx.check_hostname = False
            assert_hostname = tls.server_name or server
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cafile, cadata = tls.certificate_path or None, tls.certificate or None
    if cafile or cadata:
        ctx.load_verify_locations(cafile=cafile, cadata=cadata)
    else:
        ctx.load_default_certs()
    if tls.min_version:
        ctx.minimum_version = ssl.TLSVersion[TLS_VERSIONS[tls.min_version]]
    if tls.max_version:
        ctx.maximum_version = ssl.TLSVersion[TLS_VERSIONS[tls.max_version]]
    ciphers = openssl_cipher_list(tls.cipher_suites)
    if ciphers:
        ctx.set_ciphers(ciphers)
    if tls.insecure:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        assert_hostname = None
    return ctx, assert_hostname


def _socks_module() -> Any:
    import socks  # PySocks, imported late on purpose (see module docstring)
    import urllib3.contrib.socks

    monkey = sys.modules.get("gevent.monkey")
    patched = monkey is not None and monkey.is_module_patched("socket")
    if patched and not issubclass(socks.socksocket, socket.socket):
        raise RuntimeError("PySocks was imported before gevent monkey-patching; its sockets would block "
                           "every greenlet. Import ccm_wsgi.server (which patches) before anything else.")
    return urllib3.contrib.socks


class Outbounds:
    """One urllib3 pool manager per outbound tag, built once and reused."""

    def __init__(
        self,
        outbounds: Mapping[str, DialOutbound],
        *,
        maxsize: int = 1024,
        connect_timeout: float = 10.0,
        ca_certs: str | None = None,
    ):
        self.outbounds = dict(outbounds)
        self.ssl_context = _upstream_context(ca_certs)
        self._maxsize = maxsize
        self._connect_timeout = connect_timeout
        self._secrets = _secrets(self.outbounds.values())
        self._direct = self._manager(urllib3.PoolManager, connect_timeout)
        self._pools: dict[str, urllib3.PoolManager] = {"": self._direct}
        for tag, outbound in self.outbounds.items():
            self._pools[tag] = self._build(tag, outbound)

    def pool(self, tag: str) -> urllib3.PoolManager:
        """The manager for a detour tag; "" and `direct` outbounds mean no proxy."""
        try:
            return self._pools[tag]
        except KeyError:
            raise KeyError(f"outbound detour not found: {tag}") from None

    def route(self, tag: str, connect_timeout: float) -> Route:
        """The route of a detour tag; the outbound's own `connect_timeout` wins over `connect_timeout`."""
        outbound = self.outbounds.get(tag)
        own = outbound.connect_timeout if outbound is not None else None
        return Route(tag, self.pool(tag), own or connect_timeout, lambda exc: self.describe_error(tag, exc))

    def clear(self) -> None:
        """Close every idle connection; the managers stay usable and reconnect on demand."""
        for manager in {id(m): m for m in self._pools.values()}.values():
            manager.clear()

    def describe(self, tag: str) -> str:
        """`outbound "tag" (socks5 host:port)`, or `direct connection` for no detour."""
        outbound = self.outbounds.get(tag)
        if not tag:
            return "direct connection"
        if outbound is None:
            return f'outbound "{tag}" (not configured)'
        match outbound:
            case DirectOutbound():
                return f'outbound "{tag}" (direct)'
            case SocksOutbound():
                kind = "socks" + outbound.version
            case HttpOutbound():
                kind = "https" if outbound.tls is not None else "http"
        return f'outbound "{tag}" ({kind} {hostport(outbound.server, outbound.server_port)})'

    def describe_error(self, tag: str, exc: BaseException) -> str:
        """One short, secret-free line for a 502 body: where it failed and why."""
        message = f"{self.describe(tag)}: {_reason(exc)}"
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message

    # -- building ----------------------------------------------------------------------------------------

    def _manager(self, cls: Any, connect_timeout: float, *args: Any, **kwargs: Any) -> Any:
        return cls(
            *args, num_pools=32, maxsize=self._maxsize, block=False, retries=False,
            timeout=urllib3.Timeout(connect=connect_timeout, read=None), ssl_context=self.ssl_context, **kwargs,
        )

    def _build(self, tag: str, outbound: DialOutbound) -> urllib3.PoolManager:
        timeout = outbound.connect_timeout or self._connect_timeout
        match outbound:
            case DirectOutbound():
                if outbound.connect_timeout is None:
                    return self._direct
                return self._manager(urllib3.PoolManager, timeout)
            case SocksOutbound():
                address = hostport(outbound.server, outbound.server_port)
                return self._manager(
                    _socks_module().SOCKSProxyManager, timeout, f"{SOCKS_SCHEMES[outbound.version]}://{address}",
                    username=outbound.username or None, password=outbound.password or None,
                )
            case HttpOutbound():
                return self._http(tag, outbound, hostport(outbound.server, outbound.server_port), timeout)

    def _http(self, tag: str, outbound: HttpOutbound, address: str, timeout: float) -> urllib3.ProxyManager:
        headers = {name: ", ".join(values) for name, values in outbound.headers.items()}
        if outbound.username:
            headers = {k: v for k, v in headers.items() if k.lower() != "proxy-authorization"}
            headers.update(urllib3.make_headers(proxy_basic_auth=f"{outbound.username}:{outbound.password}"))
        if outbound.path:
            log.warning('outbound "%s": path %r is not supported by ccm-wsgi and is ignored', tag, outbound.path)
        tls = outbound.tls
        kwargs: dict[str, Any] = {}
        if tls is not None:
            kwargs["proxy_ssl_context"], kwargs["proxy_assert_hostname"] = _proxy_context(tls, outbound.server)
        scheme = "https" if tls is not None else "http"
        return self._manager(_HTTPProxyManager, timeout, f"{scheme}://{address}",
                             proxy_headers=headers, **kwargs)


def _secrets(outbounds: Iterable[DialOutbound]) -> list[str]:
    """Strings that must never appear in an error message: passwords and Basic tokens."""
    found: set[str] = set()
    for outbound in outbounds:
        if not isinstance(outbound, DirectOutbound) and outbound.password:
            found.add(outbound.password)
            found.add(base64.b64encode(f"{outbound.username}:{outbound.password}".encode()).decode())
    return sorted(found, key=len, reverse=True)


def _chain(exc: BaseException) -> list[BaseException]:
    """The exception and everything it wraps (cause, context, urllib3 reasons, PySocks socket_err)."""
    seen: list[BaseException] = []
    todo = [exc]
    while todo and len(seen) < 16:
        current = todo.pop(0)
        if any(current is s for s in seen):
            continue
        seen.append(current)
        for inner in (getattr(current, "reason", None), getattr(current, "original_error", None),
                      getattr(current, "socket_err", None), current.__cause__, current.__context__,
                      *current.args):
            if isinstance(inner, BaseException):
                todo.append(inner)
    return seen


def _first(chain: list[BaseException], *types: type[BaseException]) -> Any:
    return next((e for e in chain if isinstance(e, types)), None)


def _reason(exc: BaseException) -> str:
    """Why it failed, most specific cause first (urllib3 wraps PySocks and ssl errors in its own)."""
    chain = _chain(exc)
    by_name = {type(e).__name__: e for e in reversed(chain)}
    at_proxy = _first(chain, UrllibProxyError) is not None or any(n.startswith("SOCKS") for n in by_name)
    if "SOCKS5AuthError" in by_name:
        if "rejected" in str(by_name["SOCKS5AuthError"]):
            return "authentication failed (the proxy accepted none of the offered methods)"
        return "authentication failed"
    for name in ("SOCKS5Error", "SOCKS4Error"):
        if name in by_name:
            return f"the proxy could not open the connection ({getattr(by_name[name], 'msg', '')})"
    refused = _first(chain, ProxyRefused)
    if refused is not None:
        return f"proxy returned {refused.status} {refused.reason} (authentication failed)"
    for e in chain:
        match = _TUNNEL_STATUS.search(str(e)) if isinstance(e, OSError) else None
        if match:  # urllib3's CONNECT failure: OSError("Tunnel connection failed: 407 ...")
            status, text = int(match.group(1)), match.group(2).strip()
            auth = " (authentication failed)" if status in (401, 407) else ""
            return f"proxy returned {status} {text}".rstrip() + auth
    hop = "the proxy" if at_proxy else "upstream"
    checks: list[tuple[tuple[type[BaseException], ...], Any]] = [
        ((ssl.SSLCertVerificationError,), lambda e: f"TLS certificate of {hop} not trusted ({e.verify_message})"),
        ((ssl.SSLError,), lambda e: f"TLS handshake with {hop} failed ({e.reason or e.strerror or e})"),
        ((ConnectionRefusedError,), lambda e: "connection refused"),
        ((socket.gaierror,), lambda e: f"cannot resolve host name ({e.strerror})"),
        ((ConnectionResetError,), lambda e: "connection reset"),
        ((ReadTimeoutError,), lambda e: "timed out waiting for the response"),
        ((socket.timeout, TimeoutError, ConnectTimeoutError), lambda e: "connection timed out"),
    ]
    for types, text in checks:
        found = _first(chain, *types)
        if found is not None and not (types[-1] is ConnectTimeoutError and isinstance(found, NewConnectionError)):
            return str(text(found))
    general = by_name.get("GeneralProxyError")
    if general is not None:
        return f"proxy error ({getattr(general, 'msg', '')})"
    os_error = next((e for e in chain if isinstance(e, OSError) and e.strerror), None)
    if os_error is not None:
        return str(os_error.strerror).lower()
    if _first(chain, ProtocolError) is not None:
        return "connection closed unexpectedly"
    text = str(chain[-1]) or type(chain[-1]).__name__
    return text if len(text) <= 160 else text[:157] + "..."
