"""Outbounds: fetches through real SOCKS and HTTP proxies (tests/support/proxies.py) to a local upstream.

The upstream is an http.server in a thread on 127.0.0.1 (plain, and HTTPS with a trustme CA); it is
always addressed as `localhost`, so the proxies' logs show whether the name reached them unresolved.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import ssl
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import trustme
import urllib3
from urllib3.exceptions import HTTPError

from ccm_wsgi.config import DialOutbound, DirectOutbound, HttpOutbound, OutboundTLS, SocksOutbound
from ccm_wsgi.names import openssl_cipher_list
from ccm_wsgi.upstream.outbounds import Outbounds, ProxyRefused
from tests.support.proxies import Proxy, free_port, start_http_proxy, start_https_proxy, start_socks4, start_socks5

ROOT = Path(__file__).resolve().parent.parent
USER, PASSWORD = "ccm-user", "s3cret-pass-word"
TIMEOUT = urllib3.Timeout(connect=5.0, read=5.0)


# -- config objects with test defaults ----------------------------------------------------------------


def TLS(enabled: bool = True, **kw: Any) -> OutboundTLS:
    return OutboundTLS(enabled=enabled, **kw)


def Out(type: str, tag: str, server: str = "127.0.0.1", **kw: Any) -> DialOutbound:
    if type == "direct":
        return DirectOutbound(tag=tag, **kw)
    return {"socks": SocksOutbound, "http": HttpOutbound}[type](tag=tag, server=server, **kw)


def outbounds(*items: Out, **kwargs: Any) -> Outbounds:
    return Outbounds({o.tag: o for o in items}, **kwargs)


# -- upstream ---------------------------------------------------------------------------------------

class Upstream:
    """A threaded HTTP(S) server answering `hello <path>` and remembering what it was sent."""

    def __init__(self, context: ssl.SSLContext | None = None):
        seen = self.requests = []  # type: list[tuple[str, dict[str, str]]]

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
                body = f"hello {self.path}".encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        if context is not None:
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
        self.scheme = "https" if context is not None else "http"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def url(self, path: str = "/") -> str:
        return f"{self.scheme}://localhost:{self.server.server_address[1]}{path}"

    @property
    def hostport(self) -> str:
        return f"localhost:{self.server.server_address[1]}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture(scope="module")
def ca_file(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("ca") / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return str(path)


@pytest.fixture(scope="module")
def upstream() -> Iterator[Upstream]:
    server = Upstream()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def tls_upstream(ca: trustme.CA) -> Iterator[Upstream]:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost", "127.0.0.1").configure_cert(ctx)
    server = Upstream(ctx)
    yield server
    server.stop()


def _module_proxy(tmp_path_factory: pytest.TempPathFactory, start: Any, *args: Any, **kwargs: Any) -> Any:
    proxy = start(tmp_path_factory.mktemp(start.__name__), *args, **kwargs)
    return proxy


@pytest.fixture(scope="module")
def socks5(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with _module_proxy(tmp_path_factory, start_socks5, USER, PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def socks4(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with _module_proxy(tmp_path_factory, start_socks4) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def http_proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    with _module_proxy(tmp_path_factory, start_http_proxy, USER, PASSWORD) as proxy:
        yield proxy


@pytest.fixture(scope="module")
def https_proxy(ca: trustme.CA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Proxy]:
    directory = tmp_path_factory.mktemp("https-proxy-cert")
    cert = ca.issue_cert("proxy.test")
    cert.cert_chain_pems[0].write_to_path(str(directory / "cert.pem"))
    cert.private_key_pem.write_to_path(str(directory / "key.pem"))
    with _module_proxy(tmp_path_factory, start_https_proxy, directory / "cert.pem", directory / "key.pem",
                       USER, PASSWORD) as proxy:
        yield proxy


def get(out: Outbounds, tag: str, url: str) -> urllib3.BaseHTTPResponse:
    return out.pool(tag).request("GET", url, timeout=TIMEOUT, retries=False, redirect=False)


def failure(out: Outbounds, tag: str, url: str) -> str:
    """Fetch, expect a urllib3 error, and return describe_error's line (checked for secrets)."""
    with pytest.raises(HTTPError) as info:
        get(out, tag, url)
    message = out.describe_error(tag, info.value)
    assert PASSWORD not in message
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in message
    return message


# -- direct -----------------------------------------------------------------------------------------

def test_direct_pool_is_shared_and_unknown_tags_raise(upstream: Upstream) -> None:
    out = outbounds(Out("direct", "plain"), Out("direct", "slow", connect_timeout="3s"))
    assert out.pool("") is out.pool("plain")
    assert out.pool("slow") is not out.pool("")
    assert [out.route(tag, 9.0).connect_timeout for tag in ("slow", "plain", "")] == [3.0, 9.0, 9.0]
    assert get(out, "plain", upstream.url("/d")).data == b"hello /d"
    with pytest.raises(KeyError, match="outbound detour not found: nope"):
        out.pool("nope")


def test_upstream_tls_uses_the_given_ca_or_ccm_ca_bundle(tls_upstream: Upstream, ca_file: str,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CCM_CA_BUNDLE", raising=False)
    untrusting = outbounds()
    message = failure(untrusting, "", tls_upstream.url())
    assert message.startswith("direct connection: TLS certificate of upstream not trusted")
    assert get(outbounds(ca_certs=ca_file), "", tls_upstream.url("/ca")).data == b"hello /ca"
    monkeypatch.setenv("CCM_CA_BUNDLE", ca_file)
    assert get(outbounds(), "", tls_upstream.url("/env")).data == b"hello /env"


# -- SOCKS5 (microsocks) ----------------------------------------------------------------------------

def test_socks5_with_credentials_passes_the_name_unresolved(socks5: Proxy, upstream: Upstream,
                                                            tls_upstream: Upstream, ca_file: str) -> None:
    out = outbounds(Out("socks", "proxy-a", server_port=socks5.port, username=USER, password=PASSWORD),
                    ca_certs=ca_file)
    before = socks5.connections()
    assert get(out, "proxy-a", upstream.url("/s5")).data == b"hello /s5"
    assert get(out, "proxy-a", tls_upstream.url("/s5tls")).data == b"hello /s5tls"
    assert socks5.wait_connections(before + 2) == before + 2
    # socks5h: the proxy was handed "localhost", not an address resolved here
    assert socks5.destinations()[-2:] == [upstream.hostport, tls_upstream.hostport]


def test_socks5_wrong_or_missing_credentials(socks5: Proxy, upstream: Upstream) -> None:
    out = outbounds(Out("socks", "proxy-a", server_port=socks5.port, username=USER, password="wrong-" + PASSWORD),
                    Out("socks", "anon", server_port=socks5.port))
    before, requests = socks5.connections(), len(upstream.requests)
    message = failure(out, "proxy-a", upstream.url())
    assert message == f'outbound "proxy-a" (socks5 127.0.0.1:{socks5.port}): authentication failed'
    message = failure(out, "anon", upstream.url())
    assert message.startswith(f'outbound "anon" (socks5 127.0.0.1:{socks5.port}): authentication failed')
    assert (socks5.connections(), len(upstream.requests)) == (before, requests)


def test_proxy_down_is_connection_refused(upstream: Upstream) -> None:
    port = free_port()  # nothing listens there
    out = outbounds(Out("socks", "s", server_port=port), Out("http", "h", server_port=port))
    assert failure(out, "s", upstream.url()) == f'outbound "s" (socks5 127.0.0.1:{port}): connection refused'
    assert failure(out, "h", upstream.url()) == f'outbound "h" (http 127.0.0.1:{port}): connection refused'
    assert failure(out, "h", upstream.url().replace("http:", "https:")).endswith("connection refused")


def test_silent_proxy_times_out_within_connect_timeout(upstream: Upstream) -> None:
    with socket.socket() as listener:  # accepts TCP (backlog) but never answers the SOCKS greeting
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        port = listener.getsockname()[1]
        out = outbounds(Out("socks", "mute", server_port=port, connect_timeout="300ms"))
        with pytest.raises(HTTPError) as info:
            out.pool("mute").request("GET", upstream.url(), retries=False)
        assert out.describe_error("mute", info.value).endswith("connection timed out")


# -- SOCKS4 / 4a (v2ray) ----------------------------------------------------------------------------

def test_socks4a_resolves_at_the_proxy_and_socks4_locally(socks4: Proxy, upstream: Upstream) -> None:
    out = outbounds(Out("socks", "v4a", server_port=socks4.port, version="4a"),
                    Out("socks", "v4", server_port=socks4.port, version="4", username="ident"))
    before = socks4.connections()
    assert get(out, "v4a", upstream.url("/4a")).data == b"hello /4a"
    assert get(out, "v4", upstream.url("/4")).data == b"hello /4"
    assert socks4.wait_connections(before + 2) == before + 2
    port = upstream.server.server_address[1]
    assert socks4.destinations()[-2:] == [f"localhost:{port}", f"127.0.0.1:{port}"]
    assert out.describe("v4a") == f'outbound "v4a" (socks4a 127.0.0.1:{socks4.port})'


# -- HTTP proxy (tinyproxy) -------------------------------------------------------------------------

def test_http_proxy_with_basic_auth_forwards_and_tunnels(http_proxy: Proxy, upstream: Upstream,
                                                         tls_upstream: Upstream, ca_file: str) -> None:
    out = outbounds(Out("http", "corp", server_port=http_proxy.port, username=USER, password=PASSWORD,
                        headers={"X-Corp-Route": ("a", "b")}), ca_certs=ca_file)
    manager = out.pool("corp")
    assert isinstance(manager, urllib3.ProxyManager)
    assert manager.proxy_headers["X-Corp-Route"] == "a, b"
    before = http_proxy.connections()
    assert get(out, "corp", upstream.url("/fwd")).data == b"hello /fwd"  # absolute-URI forwarding
    assert get(out, "corp", tls_upstream.url("/tun")).data == b"hello /tun"  # CONNECT
    assert http_proxy.wait_connections(before + 2) >= before + 2
    path, headers = tls_upstream.requests[-1]
    assert path == "/tun" and "proxy-authorization" not in headers  # credentials only on the CONNECT


def test_http_proxy_wrong_credentials(http_proxy: Proxy, upstream: Upstream, tls_upstream: Upstream,
                                      ca_file: str) -> None:
    out = outbounds(Out("http", "corp", server_port=http_proxy.port, username=USER, password="bad-" + PASSWORD),
                    ca_certs=ca_file)
    requests = len(tls_upstream.requests) + len(upstream.requests)
    message = failure(out, "corp", tls_upstream.url())
    # tinyproxy 1.11 rejects with 401 where the RFC says 407
    assert message == (f'outbound "corp" (http 127.0.0.1:{http_proxy.port}): '
                       "proxy returned 401 Unauthorized (authentication failed)")
    # a forwarded plain-http request gets the proxy's answer as a response (ProxyRefused only for 407)
    assert get(out, "corp", upstream.url()).status == 401
    assert len(tls_upstream.requests) + len(upstream.requests) == requests


# -- HTTP proxy over TLS (v2ray) --------------------------------------------------------------------

def test_https_proxy_with_server_name_and_certificate(https_proxy: Proxy, ca: trustme.CA, upstream: Upstream,
                                                      tls_upstream: Upstream, ca_file: str) -> None:
    tls = TLS(server_name="proxy.test", certificate=ca.cert_pem.bytes().decode(), min_version="1.2",
              cipher_suites=("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
                             "TLS_AES_128_GCM_SHA256"))
    out = outbounds(Out("http", "tls", server_port=https_proxy.port, username=USER, password=PASSWORD, tls=tls),
                    ca_certs=ca_file)
    assert out.describe("tls") == f'outbound "tls" (https 127.0.0.1:{https_proxy.port})'
    before = https_proxy.connections()
    assert get(out, "tls", tls_upstream.url("/tls-in-tls")).data == b"hello /tls-in-tls"
    assert get(out, "tls", upstream.url("/over-tls")).data == b"hello /over-tls"
    assert https_proxy.wait_connections(before + 2) >= before + 2


def test_https_proxy_refusals(https_proxy: Proxy, upstream: Upstream, tls_upstream: Upstream,
                              ca: trustme.CA, ca_file: str) -> None:
    good = TLS(server_name="proxy.test", certificate=ca.cert_pem.bytes().decode())
    base = {"server_port": https_proxy.port, "username": USER}
    out = outbounds(
        Out("http", "bad-pass", password="nope-" + PASSWORD, tls=good, **base),
        Out("http", "untrusted", password=PASSWORD, tls=TLS(server_name="proxy.test"), **base),
        Out("http", "wrong-name", password=PASSWORD, tls=TLS(certificate=good.certificate), **base),
        Out("http", "no-sni", password=PASSWORD, tls=TLS(server_name="proxy.test", disable_sni=True,
                                                         certificate=good.certificate), **base),
        Out("http", "insecure", password=PASSWORD, tls=TLS(insecure=True), **base),
        Out("socks", "other", server_port=1, password=PASSWORD),
        ca_certs=ca_file,
    )
    label = f'outbound "bad-pass" (https 127.0.0.1:{https_proxy.port}): '
    refused = "proxy returned 407 Proxy Authentication Required (authentication failed)"
    assert failure(out, "bad-pass", tls_upstream.url()) == label + refused
    with pytest.raises(ProxyRefused) as info:  # forwarded request: the 407 response becomes an error
        get(out, "bad-pass", upstream.url())
    assert out.describe_error("bad-pass", info.value) == label + refused
    assert "TLS certificate of the proxy not trusted" in failure(out, "untrusted", tls_upstream.url())
    assert "TLS certificate of the proxy not trusted" in failure(out, "wrong-name", tls_upstream.url())
    assert get(out, "no-sni", tls_upstream.url("/no-sni")).status == 200
    assert get(out, "insecure", tls_upstream.url("/insecure")).status == 200


def test_tls_options_and_cipher_names() -> None:
    assert openssl_cipher_list(["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256",
                                "TLS_RSA_WITH_AES_256_GCM_SHA384"]) == "ECDHE-RSA-AES128-GCM-SHA256:AES256-GCM-SHA384"
    tls = TLS(min_version="1.2", max_version="1.2", cipher_suites=("TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",))
    manager = outbounds(Out("http", "t", server_port=1, tls=tls)).pool("t")
    ctx = manager.proxy_ssl_context
    assert ctx is not None
    assert (ctx.minimum_version, ctx.maximum_version) == (ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_2)
    assert {c["name"] for c in ctx.get_ciphers() if c["protocol"] == "TLSv1.2"} == {"ECDHE-RSA-AES256-GCM-SHA384"}


def test_clear_keeps_pools_usable(upstream: Upstream) -> None:
    out = outbounds(Out("direct", "d", connect_timeout="2s"))
    assert get(out, "d", upstream.url("/1")).status == 200
    out.clear()
    assert get(out, "d", upstream.url("/2")).status == 200


# -- gevent -----------------------------------------------------------------------------------------

GEVENT_SCRIPT = r"""
import json, sys
from gevent import monkey
if sys.argv[1] == "late":
    monkey.patch_all()
import socks  # noqa: F401  (the "early" case imports PySocks before patching)
if sys.argv[1] == "early":
    monkey.patch_all()
import gevent, urllib3
from ccm_wsgi.config import parse
from ccm_wsgi.upstream.outbounds import Outbounds

cfg = json.loads(sys.argv[2])
try:
    out = Outbounds(parse({"outbounds": cfg["outbounds"], "services": [{"type": "ccm"}]}).outbounds,
                    ca_certs=cfg["ca"])
except RuntimeError as exc:
    print("RuntimeError:", exc); sys.exit(0)
def fetch(tag, url):
    return out.pool(tag).request("GET", url, timeout=urllib3.Timeout(5, 5), retries=False).status
jobs = [gevent.spawn(fetch, tag, url) for tag in ("s", "h") for url in cfg["urls"] for _ in range(3)]
gevent.joinall(jobs, timeout=20)
print(json.dumps([j.value for j in jobs]))
"""


def run_gevent(mode: str, config: dict[str, Any]) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", GEVENT_SCRIPT, mode, json.dumps(config)], env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_pools_work_under_gevent(socks5: Proxy, http_proxy: Proxy, upstream: Upstream, tls_upstream: Upstream,
                                 ca_file: str) -> None:
    config = {"ca": ca_file, "urls": [upstream.url("/g"), tls_upstream.url("/g")], "outbounds": [
        {"type": "socks", "tag": "s", "server": "127.0.0.1", "server_port": socks5.port,
         "username": USER, "password": PASSWORD},
        {"type": "http", "tag": "h", "server": "127.0.0.1", "server_port": http_proxy.port,
         "username": USER, "password": PASSWORD},
    ]}
    assert json.loads(run_gevent("late", config)) == [200] * 12
    assert run_gevent("early", config).startswith("RuntimeError: PySocks was imported before gevent")
