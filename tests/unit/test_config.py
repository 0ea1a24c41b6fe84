"""Config loading and validation (ccm_wsgi.config); `ccm-wsgi check` on top of it: tests/test_config_check.py."""

from __future__ import annotations

import copy
import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccm_wsgi import config
from ccm_wsgi.config import ConfigError, parse, parse_duration
from ccm_wsgi.config import tls as config_tls
from ccm_wsgi.config.jsonc import object_pairs
from ccm_wsgi.names import OPENSSL_CIPHERS

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "conf"
EXAMPLES = sorted(p for p in CONF.glob("*.json") if p.name != "grafana-dashboard.json")  # that one is Grafana's

# The server example of sing-box's docs/configuration/service/ccm.md, verbatim.
SINGBOX_DOCS_EXAMPLE = (ROOT / "tests" / "fixtures" / "singbox-docs-example.json").read_text()

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
SECRETS = ("ak-ccm-secret-alice", "proxy-password-1", "external-token-1", "admin-secret-1")


def service(**fields: Any) -> dict[str, Any]:
    """A config with one ccm service carrying `fields`."""
    return {"services": [{"type": "ccm", **fields}]}


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    assert info.value.problems, "ConfigError without problems"
    return info.value.problems


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    cert, key = tmp_path / "fullchain.pem", tmp_path / "privkey.pem"
    cert.write_text(PEM)
    key.write_text(KEY)
    return str(cert), str(key)


# --------------------------------------------------------------------------------------------------
# Whole configs that must load
# --------------------------------------------------------------------------------------------------


def test_singbox_docs_example_loads_unchanged() -> None:
    cfg = parse(json.loads(SINGBOX_DOCS_EXAMPLE))
    (svc,) = cfg.services
    assert (svc.tag, svc.listen, svc.listen_port, svc.usages_path) == ("ccm", "0.0.0.0", 8080, "./claude-usages.json")
    assert [(u.name, u.token) for u in svc.users] == [("alice", "ak-ccm-hello-world"), ("bob", "ak-ccm-hello-bob")]
    assert svc.tls is None and svc.detour == "" and svc.credentials == ()


PLACEHOLDER_TOKEN = re.compile(r'"(ak-ccm-change-me-[a-z]+)"')


def example(path: Path, directory: Path, tls_files: tuple[str, str], *, tokens: bool) -> Path:
    """An example config as an operator would use it; `tokens`: with its placeholder tokens replaced."""
    text = path.read_text()
    # tls.json points at /etc/ccm-wsgi/tls/; certificates must exist at load time, so use temporary ones
    text = text.replace("/etc/ccm-wsgi/tls/fullchain.pem", tls_files[0])
    text = text.replace("/etc/ccm-wsgi/tls/privkey.pem", tls_files[1])
    if tokens:  # what `ccm-wsgi token` prints, one per placeholder
        text = PLACEHOLDER_TOKEN.sub(lambda m: '"ak-ccm-' + hashlib.sha256(m.group(1).encode()).hexdigest() + '"', text)
    copy_path = directory / path.name
    copy_path.write_text(text)
    return copy_path


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_configs_are_valid(path: Path, tmp_path: Path, tls_files: tuple[str, str]) -> None:
    cfg = config.load(str(example(path, tmp_path, tls_files, tokens=True)))
    assert cfg.services


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_placeholders_are_refused(path: Path, tmp_path: Path, tls_files: tuple[str, str]) -> None:
    """An example used as shipped fails `check` at each placeholder token, and only there."""
    copy_path = example(path, tmp_path, tls_files, tokens=False)
    placeholders = len(PLACEHOLDER_TOKEN.findall(copy_path.read_text()))
    if not placeholders:
        assert config.load(str(copy_path)).services
        return
    with pytest.raises(ConfigError) as info:
        config.load(str(copy_path))
    assert len(info.value.problems) == placeholders
    for line in info.value.problems:
        assert re.match(r"services\[0\]\.(users\[\d+\]\.token|admin_tokens\[\d+\]): ", line), line
        assert "generate a token with `ccm-wsgi token`" in line and "change-me" not in line


def test_expected_example_configs_exist() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"default.json", "multi-user.json", "socks-detour.json", "http-detour.json", "tls.json",
            "pool.json"} <= names


def test_default_config() -> None:
    cfg = config.default_config()
    (svc,) = cfg.services
    assert (svc.tag, svc.listen, svc.listen_port) == ("ccm", "127.0.0.1", 8080)
    assert (svc.credential_path, svc.usages_path, svc.users, svc.tls) == ("", "", (), None)
    assert parse(service()) == cfg


def test_full_singbox_config_with_other_sections() -> None:
    cfg = parse({
        "log": {"level": "debug", "timestamp": False, "output": "box.log", "disabled": False},
        "dns": {"servers": [{"type": "local"}]},
        "inbounds": [{"type": "mixed", "listen_port": 2080}],
        "route": {"rules": []},
        "experimental": {"cache_file": {"enabled": True}},
        "outbounds": [
            {"type": "direct"},
            {"type": "shadowsocks", "tag": "ss", "method": "aes-128-gcm", "password": "x"},
            {"type": "socks", "tag": "proxy-a", "server": "10.0.0.1", "server_port": 1080, "version": 4,
             "username": "u", "bind_interface": "eth0", "routing_mark": "0x10", "tcp_fast_open": True,
             "connect_timeout": "5s", "network": "tcp", "domain_strategy": "prefer_ipv4"},
            {"type": "http", "tag": "corp", "server": "proxy", "server_port": 3128, "path": "/connect",
             "headers": {"X-A": "1", "X-B": ["2", "3"]},
             "tls": {"enabled": True, "server_name": "proxy", "insecure": True, "alpn": "http/1.1",
                     "utls": {"enabled": False}, "curve_preferences": ["X25519"]}},
        ],
        "services": [
            {"type": "derp", "tag": "derp", "anything": 1},
            {"type": "ccm", "tag": "a", "listen": "::1", "listen_port": 8080, "detour": "corp",
             "sniff": True, "tcp_keep_alive": "1m", "reuse_addr": True, "tcp_keep_alive_interval": "30s",
             "headers": {"anthropic-beta": "x"}, "tls": {}},
            {"type": "ccm", "tag": "b", "listen_port": 8081, "detour": "proxy-a", "tls": {"enabled": False}},
        ],
    })
    assert cfg.log == config.LogConfig(level="debug", disabled=False, output="box.log", timestamp=False)
    assert set(cfg.outbounds) == {"0", "proxy-a", "corp"}  # untagged: named by index, as in sing-box
    assert cfg.outbounds["0"].type == "direct"
    socks = cfg.outbounds["proxy-a"]
    assert (socks.version, socks.username, socks.connect_timeout) == ("4", "u", 5.0)
    corp = cfg.outbounds["corp"]
    assert corp.headers == {"X-A": ("1",), "X-B": ("2", "3")}
    assert corp.tls == config.OutboundTLS(enabled=True, server_name="proxy", insecure=True, alpn=("http/1.1",),
                                          curve_preferences=("X25519",))
    a, b = cfg.services
    assert (a.tag, a.listen, a.detour, a.tcp_keep_alive, a.reuse_addr, a.tls) == ("a", "::1", "corp", 60.0, True, None)
    assert a.headers == {"anthropic-beta": ("x",)}
    assert (b.tag, b.listen, b.detour, b.tls) == ("b", "127.0.0.1", "proxy-a", None)


def test_load_accepts_comments_like_singbox(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('// top\n{ # hash\n "services": [ /* block\n */ {"type": "ccm", "tag": "a//b#c"} ]\n}\n')
    assert config.load(str(path)).services[0].tag == "a//b#c"


# --------------------------------------------------------------------------------------------------
# Values: defaults and normalisation
# --------------------------------------------------------------------------------------------------


def test_service_extensions_and_timeouts() -> None:
    (svc,) = parse(service(
        upstream_url="http://127.0.0.1:9999/prefix/", token_url="http://127.0.0.1:9999/v1/oauth/token",
        admin_tokens=["admin-secret-1"], max_request_body_size=1024, connect_timeout="2s",
        response_timeout="1.5h", stream_idle_timeout="2m30s", shutdown_grace="0s", client_timeout="300ms",
        users=[{"name": "alice", "token_sha256": "AB" * 32}],
    )).services
    assert svc.upstream_url == "http://127.0.0.1:9999/prefix"
    assert svc.token_url == "http://127.0.0.1:9999/v1/oauth/token"
    assert svc.admin_tokens == ("admin-secret-1",)
    assert svc.users[0].token_sha256 == "ab" * 32
    assert (svc.max_request_body_size, svc.connect_timeout, svc.response_timeout, svc.stream_idle_timeout,
            svc.shutdown_grace, svc.client_timeout) == (1024, 2.0, 5400.0, 150.0, 0.0, 0.3)


def test_pricing_defaults_cache_prices_from_input() -> None:
    (svc,) = parse(service(pricing=[
        {"model": "^claude-x(-|$)", "input": 3, "output": 15,
         "premium": {"input": 6, "output": 22.5, "cache_read": 0.6}},
        {"model": "^claude-y", "input": 1, "output": 5, "cache_read": 0, "cache_write_5m": 1, "cache_write_1h": 3},
    ])).services
    x, y = svc.pricing
    assert (x.model, x.input, x.output, x.cache_read, x.cache_write_5m, x.cache_write_1h) == (
        "^claude-x(-|$)", 3.0, 15.0, 0.3, 3.75, 6.0)
    assert x.premium is not None
    assert (x.premium.input, x.premium.cache_read, x.premium.cache_write_5m, x.premium.cache_write_1h) == (
        6.0, 0.6, 7.5, 12.0)
    assert (y.cache_read, y.cache_write_5m, y.cache_write_1h, y.premium) == (0.0, 1.0, 3.0, None)


def test_inbound_tls(tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    (svc,) = parse(service(tls={
        "enabled": True, "server_name": "ccm.example.com", "alpn": ["http/1.1"], "min_version": "1.2",
        "max_version": "1.3", "cipher_suites": "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "certificate": PEM.splitlines(), "key_path": key, "client_authentication": "require-and-verify",
        "client_certificate_path": cert, "curve_preferences": ["X25519"], "acme": {}, "kernel_tx": False,
    })).services
    assert svc.tls == config.InboundTLS(
        enabled=True, server_name="ccm.example.com", alpn=("http/1.1",), min_version="1.2", max_version="1.3",
        cipher_suites=("TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",), certificate=PEM.rstrip("\n"), key_path=key,
        client_authentication="require-and-verify", client_certificate_path=(cert,), curve_preferences=("X25519",),
    )


def test_disabled_tls_does_not_need_files() -> None:
    (svc,) = parse(service(tls={"enabled": False, "certificate_path": "/nonexistent", "key_path": ""})).services
    assert svc.tls is None


@pytest.mark.parametrize(("fields", "expected"), [
    ({"type": "balancer"}, ("balancer", "least_used")),
    ({"type": "balancer", "strategy": "least-used"}, ("balancer", "least_used")),
    ({"type": "balancer", "strategy": "round-robin"}, ("balancer", "round_robin")),
    ({"type": "balancer", "strategy": "round_robin"}, ("balancer", "round_robin")),
    ({"type": "balancer", "strategy": "random"}, ("balancer", "random")),
    ({"type": "balancer", "strategy": "fallback"}, ("balancer", "fallback")),
    ({"type": "fallback"}, ("fallback", "fallback")),
])
def test_balancer_types_and_strategy_spellings(fields: dict[str, Any], expected: tuple[str, str]) -> None:
    (svc,) = parse(service(credentials=[
        {"tag": "a"}, {"tag": "b", "type": "default"}, {"tag": "pool", "credentials": ["a", "b"], **fields},
    ])).services
    pool = svc.credentials[2]
    assert (pool.type, pool.strategy, pool.credentials, pool.poll_interval) == (*expected, ("a", "b"), 60.0)


def test_multi_credential_config() -> None:
    (svc,) = parse({
        "outbounds": [{"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1080}],
        "services": [{"type": "ccm", "credentials": [
            {"tag": "a", "credential_path": "/x/a.json", "usages_path": "/x/a-usage.json", "detour": "proxy-a",
             "reserve_5h": 20, "limit_weekly": 100},
            {"tag": "peer", "type": "external", "url": "https://peer.example.com/ccm/", "token": "external-token-1",
             "server": "10.0.0.2", "server_port": 8443, "poll_interval": "30m"},
            {"tag": "pool", "type": "balancer", "credentials": "a", "poll_interval": "0s",
             "rebalance_threshold": 12.5},
        ], "users": [
            {"name": "alice", "token": "ak-ccm-secret-alice", "credential": "pool"},
            {"name": "peer", "token": "ak-ccm-peer-token", "credential": "peer", "external_credential": "peer",
             "allow_external_usage": True},
        ]}],
    }).services
    a, peer, pool = svc.credentials
    assert (a.type, a.detour, a.reserve_5h, a.limit_weekly, a.usages_path) == (
        "default", "proxy-a", 20, 100, "/x/a-usage.json")
    assert (peer.type, peer.url, peer.server, peer.server_port, peer.poll_interval) == (
        "external", "https://peer.example.com/ccm", "10.0.0.2", 8443, 1800.0)
    assert (pool.credentials, pool.poll_interval, pool.rebalance_threshold) == (("a",), 60.0, 12.5)
    assert svc.users[1].external_credential == "peer" and svc.users[1].allow_external_usage


@pytest.mark.parametrize(("text", "seconds"), [
    ("300ms", 0.3), ("1.5h", 5400.0), ("2h45m", 9900.0), ("10s", 10.0), ("1d", 86400.0), ("0", 0.0),
    ("1m30s", 90.0), (".5s", 0.5), ("1us", 1e-6), ("1\u00b5s", 1e-6), ("100ns", 1e-7), ("-1s", -1.0),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text", ["90", "", "s", "1", "1.5.h", "1x", "1 s", "h1", ".s", "-", "1e3s", "1s ", "9" * 30 + "h"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


# --------------------------------------------------------------------------------------------------
# Validation rules: each bad config yields (at least) the expected problem line
# --------------------------------------------------------------------------------------------------

SOCKS = {"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1080}
ALICE = {"name": "alice", "token": "ak-ccm-secret-alice"}
BOB = {"name": "bob", "token": "ak-ccm-bob-token"}


def with_outbounds(*outbounds: dict[str, Any], **fields: Any) -> dict[str, Any]:
    return {"outbounds": list(outbounds), **service(**fields)}


def multi(credentials: list[dict[str, Any]], users: list[dict[str, Any]] | None = None,
          **fields: Any) -> dict[str, Any]:
    return service(credentials=credentials, users=users or [], **fields)


INVALID: list[tuple[str, Any, str]] = [
    # top level
    ("not an object", [1], "$: must be an object"),
    ("unknown top key", {"bogus": 1, **service()}, "bogus: unknown key"),
    ("no ccm service", {"services": [{"type": "derp"}]}, 'services: no service of type "ccm"'),
    ("no services", {}, 'services: no service of type "ccm"'),
    ("service without type", {"services": [{"tag": "x"}]}, "services[0].type: required"),
    ("log level", {"log": {"level": "loud"}, **service()}, 'log.level: unknown level "loud"'),
    ("log key", {"log": {"color": True}, **service()}, "log.color: unknown key"),
    # service fields
    ("unknown service key", service(foo=1), "services[0].foo: unknown key"),
    ("listen host name", service(listen="localhost"), "services[0].listen: must be an IP address (not a host name)"),
    ("listen_port range", service(listen_port=65536), "services[0].listen_port: must be an integer 0-65535"),
    ("listen_port bool", service(listen_port=True), "services[0].listen_port: must be an integer 0-65535"),
    ("listen_port string", service(listen_port="80"), "services[0].listen_port: must be an integer 0-65535"),
    ("usages_path type", service(usages_path=1), "services[0].usages_path: must be a string"),
    ("reuse_addr type", service(reuse_addr="yes"), "services[0].reuse_addr: must be true or false"),
    ("ignored field still typed", service(tcp_fast_open="yes"), "services[0].tcp_fast_open: must be true or false"),
    ("duration needs unit", service(connect_timeout="90"), "services[0].connect_timeout: must be a duration > 0"),
    ("duration zero", service(response_timeout="0s"), "services[0].response_timeout: must be a duration > 0"),
    ("duration negative", service(shutdown_grace="-1s"), "services[0].shutdown_grace: must be a duration >= 0"),
    ("duration number", service(client_timeout=60), "services[0].client_timeout: must be a duration > 0"),
    ("body size", service(max_request_body_size=0), "services[0].max_request_body_size: must be an integer 1-"),
    ("upstream scheme", service(upstream_url="ftp://x"), "services[0].upstream_url: must be an http:// or https://"),
    ("upstream query", service(upstream_url="https://x/?a=1"), "services[0].upstream_url: must not have a query"),
    ("token_url fragment", service(token_url="https://x/t#f"), "services[0].token_url: must not have a query"),
    ("url user info", service(upstream_url="https://u:p@x"), "services[0].upstream_url: must not contain user info"),
    ("url bad port", service(upstream_url="https://x:99999"), "services[0].upstream_url: must be an http://"),
    ("duplicate service tag", {"services": [{"type": "ccm"}, {"type": "ccm", "listen_port": 8081}]},
     'services[1].tag: duplicate tag "ccm" (same as services[0])'),
    ("same listener", {"services": [{"type": "ccm", "tag": "a"}, {"type": "ccm", "tag": "b"}]},
     "services[1].listen_port: 127.0.0.1 port 8080 clashes with the listener of services[0]"),
    ("wildcard listener", {"services": [{"type": "ccm", "tag": "a", "listen": "::"},
                                        {"type": "ccm", "tag": "b", "listen": "127.0.0.1"}]},
     "services[1].listen_port: 127.0.0.1 port 8080 clashes with the listener of services[0]"),
    ("duplicate JSON key", {"services": [object_pairs([("type", "ccm"), ("tag", "a"), ("tag", "b")])]},
     "services[0].tag: duplicate key"),
    # headers
    ("header authorization", service(headers={"Authorization": "x"}),
     "services[0].headers.Authorization: cannot be configured: ccm-wsgi sets it"),
    ("header api key", service(headers={"X-Api-Key": "x"}), "services[0].headers.X-Api-Key: cannot be configured"),
    ("header host", service(headers={"host": "x"}), "services[0].headers.host: cannot be configured"),
    ("header hop-by-hop", service(headers={"Transfer-Encoding": "chunked"}),
     "services[0].headers.Transfer-Encoding: cannot be configured: hop-by-hop"),
    ("header name", service(headers={"Bad Name": "x"}), 'services[0].headers["Bad Name"]: not a valid header name'),
    ("header CRLF", service(headers={"X-A": ["ok", "a\r\nb"]}), "services[0].headers.X-A: header values must not"),
    ("header value type", service(headers={"X-A": 1}), "services[0].headers.X-A: must be a string or a list"),
    ("header duplicate case", service(headers={"X-A": "1", "x-a": "2"}),
     "services[0].headers.x-a: duplicate header (same as services[0].headers.X-A)"),
    ("headers type", service(headers=["X-A"]), "services[0].headers: must be an object"),
    # users
    ("users type", service(users={}), "services[0].users: must be a list"),
    ("user key", service(users=[{**ALICE, "password": "x"}]), "services[0].users[0].password: unknown key"),
    ("user no name", service(users=[{"token": "ak-ccm-secret-alice"}]), "services[0].users[0].name: required"),
    ("user empty name", service(users=[{"name": " ", "token": "ak-ccm-secret-alice"}]),
     "services[0].users[0].name: must not be empty"),
    ("user duplicate name", service(users=[ALICE, {"name": "alice", "token": "ak-ccm-other"}]),
     'services[0].users[1].name: duplicate name "alice" (same as services[0].users[0])'),
    ("user empty token", service(users=[{"name": "alice", "token": ""}]),
     "services[0].users[0].token: must not be empty"),
    ("user short token", service(users=[{"name": "alice", "token": "short"}]),
     "services[0].users[0].token: must be at least 8 characters long"),
    ("user token space", service(users=[{"name": "alice", "token": "ak ccm secret"}]),
     "services[0].users[0].token: must be printable ASCII without spaces"),
    ("user no token", service(users=[{"name": "alice"}]),
     "services[0].users[0]: needs exactly one of token or token_sha256"),
    ("user both tokens", service(users=[{**ALICE, "token_sha256": "0" * 64}]),
     "services[0].users[0]: needs exactly one of token or token_sha256"),
    ("user bad sha256", service(users=[{"name": "alice", "token_sha256": "xyz"}]),
     "services[0].users[0].token_sha256: must be 64 hexadecimal characters"),
    ("duplicate token", service(users=[ALICE, {"name": "bob", "token": "ak-ccm-secret-alice"}]),
     "services[0].users[1].token: duplicate token (same as services[0].users[0])"),
    ("duplicate token by hash", service(users=[
        ALICE, {"name": "bob", "token_sha256": hashlib.sha256(b"ak-ccm-secret-alice").hexdigest().upper()}]),
     "services[0].users[1].token_sha256: duplicate token (same as services[0].users[0])"),
    ("credential in legacy mode", service(users=[{**ALICE, "credential": "a"}]),
     "services[0].users[0].credential: only valid with credentials"),
    # admin tokens
    ("admin token equals user", service(users=[ALICE], admin_tokens=["ak-ccm-secret-alice"]),
     "services[0].admin_tokens[0]: same as the token of services[0].users[0]"),
    ("admin token empty", service(admin_tokens=[""]), "services[0].admin_tokens[0]: must not be empty"),
    ("admin token type", service(admin_tokens="admin-secret-1"), "services[0].admin_tokens: must be a list"),
    ("admin token duplicate", service(admin_tokens=["admin-secret-1", "admin-secret-1"]),
     "services[0].admin_tokens[1]: duplicate admin token (same as services[0].admin_tokens[0])"),
    # pricing
    ("price regex", service(pricing=[{"model": "(", "input": 1, "output": 1}]),
     "services[0].pricing[0].model: invalid regular expression"),
    ("price negative", service(pricing=[{"model": "x", "input": -1, "output": 1}]),
     "services[0].pricing[0].input: must be a number >= 0"),
    ("price missing output", service(pricing=[{"model": "x", "input": 1}]), "services[0].pricing[0].output: required"),
    ("price bool", service(pricing=[{"model": "x", "input": True, "output": 1}]),
     "services[0].pricing[0].input: must be a number >= 0"),
    ("price NaN", service(pricing=[{"model": "x", "input": float("nan"), "output": 1}]),
     "services[0].pricing[0].input: must be a number >= 0"),
    ("premium key", service(pricing=[{"model": "x", "input": 1, "output": 1, "premium": {"model": "y"}}]),
     "services[0].pricing[0].premium.model: unknown key"),
    # inbound TLS
    ("tls needs certificate", service(tls={"enabled": True}),
     "services[0].tls.certificate_path: required (or certificate) when TLS is enabled"),
    ("tls missing file", service(tls={"enabled": True, "certificate_path": "/nonexistent/c.pem", "key": KEY}),
     'services[0].tls.certificate_path: cannot read "/nonexistent/c.pem"'),
    ("tls both sources", service(tls={"enabled": True, "key": KEY, "key_path": "/x", "certificate": PEM}),
     "services[0].tls.key_path: key and key_path are mutually exclusive"),
    ("tls not PEM", service(tls={"enabled": True, "certificate": "abc", "key": KEY}),
     "services[0].tls.certificate: must be PEM text"),
    ("tls h2", service(tls={"alpn": ["h2", "http/1.1"]}), "services[0].tls.alpn: HTTP/2 is not served"),
    ("tls other alpn", service(tls={"alpn": "spdy/3"}), 'services[0].tls.alpn: unsupported protocol "spdy/3"'),
    ("tls version", service(tls={"min_version": "1.4"}), "services[0].tls.min_version: must be one of"),
    ("tls version order", service(tls={"min_version": "1.3", "max_version": "1.2"}),
     "services[0].tls.min_version: must not be above max_version"),
    ("tls cipher", service(tls={"cipher_suites": ["ECDHE-RSA-AES128-GCM-SHA256"]}),
     'services[0].tls.cipher_suites: unknown cipher suite "ECDHE-RSA-AES128-GCM-SHA256"'),
    ("tls acme", service(tls={"acme": {"domain": "x"}}), "services[0].tls.acme: not supported by ccm-wsgi ("),
    ("tls ech", service(tls={"ech": {"enabled": True}}), "services[0].tls.ech: not supported by ccm-wsgi ("),
    ("tls reality", service(tls={"reality": {"enabled": True}}), "services[0].tls.reality: not supported"),
    ("tls kernel", service(tls={"kernel_tx": True}), "services[0].tls.kernel_tx: not supported by ccm-wsgi ("),
    ("tls client auth value", service(tls={"client_authentication": "maybe"}),
     "services[0].tls.client_authentication: must be one of"),
    ("tls client auth unverified", service(tls={"client_authentication": "require-any"}),
     'services[0].tls.client_authentication: "require-any" is not supported by ccm-wsgi'),
    ("tls client auth no CA", service(tls={"enabled": True, "certificate": PEM, "key": KEY,
                                           "client_authentication": "verify-if-given"}),
     "services[0].tls.client_certificate_path: required (or client_certificate)"),
    ("tls unknown key", service(tls={"insecure": True}), "services[0].tls.insecure: unknown key"),
    # outbounds and detour
    ("unknown detour", service(detour="nope"), 'services[0].detour: unknown outbound "nope"'),
    ("unusable detour", with_outbounds({"type": "shadowsocks", "tag": "ss", "method": "x"}, detour="ss"),
     'services[0].detour: outbound "ss" has type "shadowsocks", which ccm-wsgi cannot use '
     "(socks, http or direct only)"),
    ("duplicate outbound tag", with_outbounds(SOCKS, {**SOCKS, "server_port": 1081}),
     'outbounds[1].tag: duplicate tag "proxy-a" (same as outbounds[0])'),
    ("outbound without type", with_outbounds({"tag": "x"}), "outbounds[0].type: required"),
    ("socks no server", with_outbounds({"type": "socks", "tag": "s", "server_port": 1}),
     "outbounds[0].server: required"),
    ("socks empty server", with_outbounds({**SOCKS, "server": ""}), "outbounds[0].server: must not be empty"),
    ("socks port zero", with_outbounds({**SOCKS, "server_port": 0}),
     "outbounds[0].server_port: must be an integer 1-65535"),
    ("socks version", with_outbounds({**SOCKS, "version": "6"}), 'outbounds[0].version: must be "4", "4a" or "5"'),
    ("socks4 password", with_outbounds({**SOCKS, "version": "4a", "username": "u", "password": "proxy-password-1"}),
     "outbounds[0].password: only valid with socks version 5"),
    ("socks unknown key", with_outbounds({**SOCKS, "path": "/"}), "outbounds[0].path: unknown key"),
    ("outbound chain", with_outbounds({**SOCKS, "detour": "other"}), "outbounds[0].detour: not supported by ccm-wsgi"),
    ("dial timeout", with_outbounds({**SOCKS, "connect_timeout": "5"}), "outbounds[0].connect_timeout: must be a"),
    ("direct key", with_outbounds({"type": "direct", "tag": "d", "server": "x"}), "outbounds[0].server: unknown key"),
    ("http tls utls", with_outbounds({"type": "http", "tag": "h", "server": "p", "server_port": 1,
                                      "tls": {"enabled": True, "utls": {"enabled": True}}}),
     "outbounds[0].tls.utls: not supported by ccm-wsgi ("),
    ("http tls h2", with_outbounds({"type": "http", "tag": "h", "server": "p", "server_port": 1,
                                    "tls": {"enabled": True, "alpn": "h2"}}),
     "outbounds[0].tls.alpn: HTTP/2 is not served"),
    ("http header", with_outbounds({"type": "http", "tag": "h", "server": "p", "server_port": 1,
                                    "headers": {"X-A": "a\nb"}}),
     "outbounds[0].headers.X-A: header values must not contain CR, LF or NUL"),
    # usage files
    ("shared usages_path", {"services": [{"type": "ccm", "tag": "a", "usages_path": "/tmp/u.json"},
                                         {"type": "ccm", "tag": "b", "listen_port": 8081,
                                          "usages_path": "/tmp/x/../u.json"}]},
     "services[1].usages_path: same file as services[0].usages_path"),
    ("usages_path is a credential file", multi([{"tag": "a", "credential_path": "/x/c.json"},
                                                {"tag": "b", "credential_path": "/x/b.json",
                                                 "usages_path": "/x/c.json"}]),
     "services[0].credentials[1].usages_path: same file as services[0].credentials[0].credential_path"),
    # multi-credential mode
    ("credentials with credential_path", multi([{"tag": "a"}], credential_path="/x"),
     "services[0].credential_path: mutually exclusive with credentials"),
    ("credentials with usages_path", multi([{"tag": "a"}], usages_path="/x"),
     "services[0].usages_path: mutually exclusive with credentials"),
    ("credentials with detour", with_outbounds(SOCKS, credentials=[{"tag": "a"}], detour="proxy-a"),
     "services[0].detour: mutually exclusive with credentials"),
    ("credential without tag", multi([{"type": "default"}]), "services[0].credentials[0].tag: required"),
    ("duplicate credential tag", multi([{"tag": "a"}, {"tag": "a"}]),
     'services[0].credentials[1].tag: duplicate tag "a" (same as services[0].credentials[0])'),
    ("credential type", multi([{"tag": "a", "type": "oauth"}]),
     'services[0].credentials[0].type: unknown credential type "oauth"'),
    ("reserve range", multi([{"tag": "a", "reserve_5h": 100}]),
     "services[0].credentials[0].reserve_5h: must be an integer 0-99"),
    ("limit range", multi([{"tag": "a", "limit_weekly": 101}]),
     "services[0].credentials[0].limit_weekly: must be an integer 0-100"),
    ("reserve and limit", multi([{"tag": "a", "reserve_weekly": 5, "limit_weekly": 90}]),
     "services[0].credentials[0].limit_weekly: mutually exclusive with reserve_weekly"),
    ("key of another type", multi([{"tag": "a", "strategy": "random"}]),
     "services[0].credentials[0].strategy: only valid for balancer credentials"),
    ("unknown credential key", multi([{"tag": "a", "foo": 1}]), "services[0].credentials[0].foo: unknown key"),
    ("credential detour", multi([{"tag": "a", "detour": "nope"}]),
     'services[0].credentials[0].detour: unknown outbound "nope"'),
    ("external without token", multi([{"tag": "e", "type": "external", "url": "https://peer"}]),
     "services[0].credentials[0].token: required"),
    ("external without url", multi([{"tag": "e", "type": "external", "token": "external-token-1"}]),
     "services[0].credentials[0].url: required"),
    ("external reverse", multi([{"tag": "e", "type": "external", "url": "https://peer", "token": "external-token-1",
                                 "reverse": True}]),
     "services[0].credentials[0].reverse: reverse tunnels are not supported by ccm-wsgi"),
    ("external url", multi([{"tag": "e", "type": "external", "url": "peer:8080", "token": "external-token-1"}]),
     "services[0].credentials[0].url: must be an http:// or https:// URL"),
    ("strategy", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "strategy": "best", "credentials": ["a"]}]),
     'services[0].credentials[1].strategy: unknown strategy "best"'),
    ("fallback type with strategy", multi([{"tag": "a"}, {"tag": "p", "type": "fallback", "strategy": "random",
                                                         "credentials": ["a"]}]),
     'services[0].credentials[1].strategy: conflicts with type "fallback"'),
    ("rebalance negative", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"],
                                                 "rebalance_threshold": -1}]),
     "services[0].credentials[1].rebalance_threshold: must be a number 0-100"),
    ("rebalance not least used", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "strategy": "random",
                                                       "credentials": ["a"], "rebalance_threshold": 5}]),
     "services[0].credentials[1].rebalance_threshold: only used by the least_used strategy"),
    ("balancer no members", multi([{"tag": "p", "type": "balancer", "credentials": []}]),
     "services[0].credentials[0].credentials: must name at least one credential"),
    ("balancer members missing", multi([{"tag": "p", "type": "balancer"}]),
     "services[0].credentials[0].credentials: required"),
    ("balancer unknown member", multi([{"tag": "p", "type": "balancer", "credentials": ["a"]}]),
     'services[0].credentials[0].credentials[0]: unknown credential "a"'),
    ("balancer unknown scalar member", multi([{"tag": "p", "type": "balancer", "credentials": "a"}]),
     'services[0].credentials[0].credentials: unknown credential "a"'),
    ("nested balancer", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"]},
                               {"tag": "q", "type": "fallback", "credentials": ["a", "p"]}]),
     'services[0].credentials[2].credentials[1]: "p" is a balancer; balancers cannot be nested'),
    ("balancer duplicate member", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a", "a"]}]),
     'services[0].credentials[1].credentials[1]: "a" is listed twice'),
    ("poll interval", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"],
                                            "poll_interval": "60"}]),
     "services[0].credentials[1].poll_interval: must be a duration >= 0"),
    ("user without credential", multi([{"tag": "a"}], [ALICE]),
     "services[0].users[0].credential: required in multi-credential mode"),
    ("user unknown credential", multi([{"tag": "a"}], [{**ALICE, "credential": "b"}]),
     'services[0].users[0].credential: unknown credential "b"'),
    ("user unknown external", multi([{"tag": "a"}], [{**ALICE, "credential": "a", "external_credential": "x"}]),
     'services[0].users[0].external_credential: unknown credential "x"'),
    ("user external not external", multi([{"tag": "a"}], [{**ALICE, "credential": "a", "external_credential": "a"}]),
     'services[0].users[0].external_credential: must name an external credential ("a" has type "default")'),
    ("user external only", multi([{"tag": "e", "type": "external", "url": "https://peer", "token": "external-token-1"}],
                                 [{**ALICE, "credential": "e"}]),
     'services[0].users[0].credential: credential "e" only reaches external credentials'),
]


@pytest.mark.parametrize(("data", "expected"), [case[1:] for case in INVALID], ids=[case[0] for case in INVALID])
def test_invalid_config(data: Any, expected: str) -> None:
    found = problems(copy.deepcopy(data))
    assert any(line.startswith(expected) for line in found), found


def test_problems_are_all_collected_in_file_order() -> None:
    found = problems(service(listen="x", listen_port=-1, users=[{"name": ""}], tls={"acme": {"domain": "x"}}))
    assert [line.split(":")[0] for line in found] == [
        "services[0].listen", "services[0].listen_port", "services[0].users[0]", "services[0].users[0].name",
        "services[0].tls.acme",
    ]


def test_messages_never_contain_secrets() -> None:
    bad_secret_uses = {
        "outbounds": [{**SOCKS, "version": "4", "password": "proxy-password-1"}],
        "services": [
            {"type": "ccm", "tag": "a", "users": [ALICE, {**ALICE, "name": "bob"}],
             "admin_tokens": ["ak-ccm-secret-alice", "admin-secret-1", "admin-secret-1"],
             "upstream_url": "https://user:proxy-password-1@x/?q=admin-secret-1"},
            {"type": "ccm", "tag": "b", "listen_port": 8081, "users": [{**ALICE, "name": "c", "token_sha256": "z"}],
             "credentials": [{"tag": "e", "type": "external", "url": "https://external-token-1", "reverse": True,
                              "token": "external-token-1 "}]},
        ],
    }
    found = "\n".join(problems(bad_secret_uses))
    assert len(found.splitlines()) >= 6
    for secret in SECRETS:
        assert secret not in found


def test_error_paths_quote_odd_keys() -> None:
    found = problems(service(**{"we\nird": 1}))
    assert found == ['services[0]["we\\nird"]: unknown key']


def test_load_rejects_nan_and_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    path.write_text('{"services": [{"type": "ccm", "listen_port": NaN}]}')
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert info.value.problems == ["$: invalid JSON: NaN is not valid JSON"]
    path.write_text('{"services": [{"type": "ccm", "listen_port": 1, "listen_port": 2}]}')
    with pytest.raises(ConfigError) as info:
        config.load(str(path))
    assert info.value.problems == ["services[0].listen_port: duplicate key"]


def test_cipher_suites_are_go_names_that_openssl_has(monkeypatch: pytest.MonkeyPatch) -> None:
    suites = ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256", "TLS_AES_128_GCM_SHA256"]
    (svc,) = parse(service(tls={"cipher_suites": suites, "enabled": True, "certificate": PEM, "key": KEY})).services
    assert svc.tls is not None and svc.tls.cipher_suites == tuple(suites)
    assert [OPENSSL_CIPHERS[s] for s in suites] == ["ECDHE-RSA-AES128-GCM-SHA256", ""]
    monkeypatch.setattr(config_tls, "openssl_has", lambda cipher: False)
    assert problems(service(tls={"cipher_suites": suites[0]})) == [
        'services[0].tls.cipher_suites: cipher suite "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256" is not available in '
        "this Python's OpenSSL"]


def test_tls_certificate_path_is_checked_at_load_time(tls_files: tuple[str, str], tmp_path: Path) -> None:
    cert, _ = tls_files
    found = problems(service(tls={"enabled": True, "certificate_path": cert, "key_path": str(tmp_path)}))
    assert found == [f'services[0].tls.key_path: cannot read "{tmp_path}": Is a directory']


# --------------------------------------------------------------------------------------------------
# Fuzzing: parse() returns a Config or raises ConfigError, nothing else
# --------------------------------------------------------------------------------------------------

SERVICE_KEYS = ["type", "tag", "listen", "listen_port", "users", "headers", "detour", "tls", "credentials",
                "usages_path", "pricing", "admin_tokens", "connect_timeout", "upstream_url", "name", "token",
                "token_sha256", "credential", "strategy", "enabled", "certificate", "alpn", "model", "input"]

json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12) | st.sampled_from(
    ["ccm", "socks", "external", "balancer", "fallback", "1s", "0", "127.0.0.1", "h2", "ak-ccm-secret-alice",
     "https://x", "proxy-a", "a", "-----BEGIN X-----", "\ud800", "/tmp/\0"])
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(SERVICE_KEYS) | st.text(max_size=6),
                                                                 inner, max_size=5),
    max_leaves=25,
)
documents = json_values | st.fixed_dictionaries(
    {"services": st.lists(st.dictionaries(st.sampled_from(SERVICE_KEYS), json_values, max_size=8).map(
        lambda d: {**d, "type": "ccm"}), min_size=1, max_size=2)},
    optional={"outbounds": st.lists(json_values, max_size=3), "log": json_values},
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(documents)
def test_parse_never_raises_anything_but_config_error(data: Any) -> None:
    try:
        result = parse(data)
    except ConfigError as exc:
        assert exc.problems and all(isinstance(p, str) and ": " in p for p in exc.problems)
    else:
        assert isinstance(result, config.Config)
