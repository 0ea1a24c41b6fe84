"""`detour` end to end: a real `ccm-wsgi serve` reaching the fake upstream through real proxy servers.

The fake upstream speaks https (a trustme CA the proxy process trusts through `CCM_CA_BUNDLE`), so an
http proxy is used with CONNECT, as for api.anthropic.com. The service sends its API traffic to
`127.0.0.1` and its OAuth refreshes to `localhost` (the same fake): a proxy log that shows
`localhost` proves the refresh went through the detour too, with the name resolved by the proxy
(socks5, socks4a) or by ccm-wsgi (socks4). Every credential expires within the refresh margin, so
the first request refreshes it.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support.clients import ask
from tests.support.constants import ALICE, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, request, service_config, write_credentials
from tests.support.proxies import free_port, start_http_proxy, start_https_proxy, start_socks4, start_socks5

USER, PASSWORD = "ccm-user", "s3cret-pass-word"


@pytest.fixture
def ca(tmp_path: Path) -> trustme.CA:
    authority = trustme.CA()
    authority.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    return authority


@pytest.fixture
def tls_fake(tmp_path: Path, ca: trustme.CA) -> Iterator[FakeUpstream]:
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "fake-cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "fake-key.pem"))
    upstream = FakeUpstream.start(tmp_path, tls_cert=tmp_path / "fake-cert.pem", tls_key=tmp_path / "fake-key.pem")
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def serve(tmp_path: Path, start_proxy: Callable[..., Proxy]) -> Callable[..., Proxy]:
    """`ccm-wsgi serve` trusting the test CA."""

    def start(config: dict[str, Any], name: str = "proxy") -> Proxy:
        return start_proxy(config, name=name, env={"CCM_CA_BUNDLE": str(tmp_path / "ca.pem")})

    return start


def expiring_credential(tmp_path: Path, fake: FakeUpstream, name: str) -> Path:
    """A credential the fake knows, 30 s from expiry: the first request refreshes it."""
    access, refresh = f"sk-ant-oat01-{name}-access", f"sk-ant-ort01-{name}-refresh"
    fake.add_account(access_token=access, refresh_token=refresh, expires_in=30)
    return write_credentials(tmp_path / name / ".credentials.json", access, refresh, expires_in=30)


def fresh_credential(tmp_path: Path, fake: FakeUpstream, name: str) -> Path:
    access, refresh = f"sk-ant-oat01-{name}-access", f"sk-ant-ort01-{name}-refresh"
    fake.add_account(access_token=access, refresh_token=refresh, expires_in=3600)
    return write_credentials(tmp_path / name / ".credentials.json", access, refresh)


def detoured(fake: FakeUpstream, creds: Path, detour: str, **fields: Any) -> dict[str, Any]:
    """A service whose API traffic goes to 127.0.0.1 and whose refreshes go to localhost."""
    return service_config(fake.url, creds, users=USERS, detour=detour,
                          token_url=f"https://localhost:{fake.port}/v1/oauth/token", **fields)


def exchange(proxy: Proxy, url: str | None = None) -> None:
    """One non-streaming and one streaming message through the service."""
    assert ask(url or proxy).content[0].text
    assert ask(url or proxy, stream=True).content[0].text


def error_of(r: Any) -> dict[str, Any]:
    body = json.loads(r.data)
    assert body["type"] == "error", body
    return body["error"]


# -- socks --------------------------------------------------------------------------------------------

def test_socks5_with_password_carries_api_and_refresh(tmp_path, tls_fake, serve):
    socks = start_socks5(tmp_path / "socks", USER, PASSWORD)
    try:
        outbounds = [{"type": "socks", "tag": "via-socks", "server": "127.0.0.1", "server_port": socks.port,
                      "version": "5", "username": USER, "password": PASSWORD},
                     {"type": "direct", "tag": "direct"}]
        services = [
            detoured(tls_fake, expiring_credential(tmp_path, tls_fake, "a"), "via-socks", tag="socks"),
            detoured(tls_fake, fresh_credential(tmp_path, tls_fake, "b"), "direct", tag="direct"),
        ]
        proxy = serve({"outbounds": outbounds, "services": services})
        exchange(proxy, f"http://127.0.0.1:{proxy.ports['socks']}")
        exchange(proxy, f"http://127.0.0.1:{proxy.ports['socks']}")
        assert tls_fake.stats()["refreshes"] == 1
        socks.wait_connections(2)
        destinations = socks.destinations()
        # the refresh went through the proxy, which resolved the name itself (socks5h)
        assert f"localhost:{tls_fake.port}" in destinations, destinations
        # four API calls, one pooled connection: the tag's pool is built once and reused
        assert destinations.count(f"127.0.0.1:{tls_fake.port}") == 1, destinations
        # the service with the `direct` detour does not touch the proxy
        before = socks.connections()
        exchange(proxy, f"http://127.0.0.1:{proxy.ports['direct']}")
        assert socks.wait_connections(before + 1, timeout=1.0) == before
        assert tls_fake.stats()["refreshes"] == 1
        assert PASSWORD not in proxy.log()
    finally:
        socks.stop()


@pytest.mark.parametrize("version", ["4", "4a"])
def test_socks4_and_4a(tmp_path, tls_fake, serve, version):
    socks = start_socks4(tmp_path / "v2ray")
    try:
        outbounds = [{"type": "socks", "tag": "s4", "server": "127.0.0.1", "server_port": socks.port,
                      "version": version}]
        proxy = serve({"outbounds": outbounds,
                       "services": [detoured(tls_fake, expiring_credential(tmp_path, tls_fake, "a"), "s4")]})
        exchange(proxy)
        assert tls_fake.stats()["refreshes"] == 1
        socks.wait_connections(2)
        destinations = socks.destinations()
        assert f"127.0.0.1:{tls_fake.port}" in destinations, destinations
        # 4a hands the token endpoint's name to the proxy; plain 4 can only send an address
        assert (f"localhost:{tls_fake.port}" in destinations) == (version == "4a"), destinations
        assert len(destinations) == 2, destinations  # one connection each for refresh and API
    finally:
        socks.stop()


# -- http ---------------------------------------------------------------------------------------------

def test_http_connect_with_basic_auth_carries_api_and_refresh(tmp_path, tls_fake, serve):
    http = start_http_proxy(tmp_path / "tinyproxy", USER, PASSWORD)
    try:
        outbounds = [{"type": "http", "tag": "corp", "server": "127.0.0.1", "server_port": http.port,
                      "username": USER, "password": PASSWORD}]
        proxy = serve({"outbounds": outbounds,
                       "services": [detoured(tls_fake, expiring_credential(tmp_path, tls_fake, "a"), "corp")]})
        exchange(proxy)
        exchange(proxy)
        assert tls_fake.stats()["refreshes"] == 1
        http.wait_connections(2)
        assert sorted(http.destinations()) == ["127.0.0.1", "localhost"], http.destinations()
        log = http.log_text()
        assert "CONNECT" in log  # tunnelled: the proxy never saw the https requests themselves
        assert "/v1/messages" not in log
    finally:
        http.stop()


def test_https_proxy_with_its_own_tls(tmp_path, ca, tls_fake, serve):
    cert = ca.issue_cert("proxy.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "proxy-cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "proxy-key.pem"))
    https = start_https_proxy(tmp_path / "v2ray-https", tmp_path / "proxy-cert.pem", tmp_path / "proxy-key.pem",
                              USER, PASSWORD)
    try:
        outbounds = [{"type": "http", "tag": "tls-proxy", "server": "127.0.0.1", "server_port": https.port,
                      "username": USER, "password": PASSWORD,
                      "tls": {"enabled": True, "server_name": "proxy.test",
                              "certificate_path": str(tmp_path / "ca.pem")}}]
        proxy = serve({"outbounds": outbounds,
                       "services": [detoured(tls_fake, expiring_credential(tmp_path, tls_fake, "a"), "tls-proxy")]})
        exchange(proxy)
        assert tls_fake.stats()["refreshes"] == 1
        assert https.wait_connections(2) == 2, https.destinations()
        assert f"localhost:{tls_fake.port}" in https.destinations()
    finally:
        https.stop()


# -- failures -----------------------------------------------------------------------------------------

def test_refused_credentials_and_dead_proxy_are_502_naming_the_tag(tmp_path, ca, tls_fake, serve):
    socks = start_socks5(tmp_path / "socks", USER, PASSWORD)
    http = start_http_proxy(tmp_path / "tinyproxy", USER, PASSWORD)
    cert = ca.issue_cert("proxy.test")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "proxy-cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "proxy-key.pem"))
    https = start_https_proxy(tmp_path / "v2ray-https", tmp_path / "proxy-cert.pem", tmp_path / "proxy-key.pem",
                              USER, PASSWORD)
    wrong = "wrong-pass-word"
    try:
        outbounds = [
            {"type": "socks", "tag": "socks-bad", "server": "127.0.0.1", "server_port": socks.port,
             "username": USER, "password": wrong},
            {"type": "http", "tag": "http-bad", "server": "127.0.0.1", "server_port": http.port,
             "username": USER, "password": wrong},
            {"type": "http", "tag": "https-bad", "server": "127.0.0.1", "server_port": https.port,
             "username": USER, "password": wrong,
             "tls": {"enabled": True, "server_name": "proxy.test", "certificate_path": str(tmp_path / "ca.pem")}},
            {"type": "socks", "tag": "socks-down", "server": "127.0.0.1", "server_port": free_port()},
            {"type": "http", "tag": "http-down", "server": "127.0.0.1", "server_port": free_port()},
        ]
        fresh = fresh_credential(tmp_path, tls_fake, "fresh")
        services = [detoured(tls_fake, fresh, o["tag"], tag=o["tag"]) for o in outbounds]
        # a refresh through a proxy that refuses us fails the same way, naming the outbound
        services.append(detoured(tls_fake, expiring_credential(tmp_path, tls_fake, "old"), "socks-bad",
                                 tag="refresh-bad"))
        proxy = serve({"outbounds": outbounds, "services": services})
        expected = {"socks-bad": "authentication failed", "http-bad": "401", "https-bad": "407",
                    "socks-down": "connection refused", "http-down": "connection refused",
                    "refresh-bad": "authentication failed"}
        for tag, reason in expected.items():
            r = request("POST", f"http://127.0.0.1:{proxy.ports[tag]}/v1/messages",
                        body=b'{"model":"m","max_tokens":1,"messages":[]}',
                        headers={"Authorization": "Bearer " + ALICE, "Content-Type": "application/json"})
            assert r.status == 502, (tag, r.status, r.data)
            error = error_of(r)
            assert error["type"] == "api_error"
            outbound = "socks-bad" if tag == "refresh-bad" else tag
            assert f'outbound "{outbound}"' in error["message"], (tag, error)
            assert reason in error["message"], (tag, error)
            for secret in (wrong, base64.b64encode(f"{USER}:{wrong}".encode()).decode()):
                assert secret not in error["message"]
        stats = tls_fake.stats()
        assert stats["requests_by_path"].get("/v1/messages", 0) == 0 and stats["refreshes"] == 0
        for secret in (wrong, PASSWORD):
            assert secret not in proxy.log()
    finally:
        for p in (socks, http, https):
            p.stop()


def test_unknown_detour_is_a_config_error_naming_its_path(tmp_path, tls_fake):
    config = {"outbounds": [{"type": "direct", "tag": "direct"}],
              "services": [service_config(tls_fake.url, tmp_path / "c.json", detour="nope")]}
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(config))
    for command in (["check", "-c", str(path)], ["serve", "-c", str(path)]):
        out = subprocess.run([sys.executable, "-m", "ccm_wsgi", *command], capture_output=True, text=True,
                             timeout=30)
        assert out.returncode == 1, out
        lines = (out.stdout + out.stderr).strip().splitlines()
        assert any(line.startswith("services[0].detour: ") and "nope" in line for line in lines), lines
