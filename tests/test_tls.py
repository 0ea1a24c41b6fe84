"""Inbound TLS end to end: `ccm-wsgi serve` with trustme certificates, the anthropic SDK over https,
raw handshakes for versions, ciphers, ALPN and SNI, and a certificate swapped on disk."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import anthropic
import pytest
import trustme

from tests.support.constants import ALICE, MODEL
from tests.support.procs import Proxy, service_config, write_pair

NAME = "ccm.test"


def client_context(*cas: trustme.CA, **options: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context()
    for ca in cas:
        ca.configure_trust(ctx)
    for name, value in options.items():
        if name == "ciphers":
            ctx.set_ciphers(value)
        else:
            setattr(ctx, name, value)
    return ctx


def handshake(port: int, ctx: ssl.SSLContext, server_hostname: str = "127.0.0.1") -> dict[str, Any]:
    """Connect, shake hands, report what was agreed; the TLS error propagates."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname=server_hostname) as tls:
        return {"version": tls.version(), "cipher": tls.cipher()[0], "alpn": tls.selected_alpn_protocol(),
                "cert": tls.getpeercert(binary_form=True)}


def der(cert: trustme.LeafCert) -> bytes:
    return ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())


def sdk(proxy: Proxy, ctx: ssl.SSLContext, port: int | None = None) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=f"https://127.0.0.1:{port or proxy.port}", auth_token=ALICE, max_retries=0,
                               http_client=anthropic.DefaultHttpxClient(verify=ctx))


@pytest.fixture
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def serve_tls(fake, creds, start_proxy) -> Callable[..., Proxy]:
    def start(*tls_objects: dict[str, Any]) -> Proxy:
        services = [service_config(fake.url, creds, tag=f"s{i}", users=[{"name": "alice", "token": ALICE}],
                                   tls={"enabled": True, **tls}) for i, tls in enumerate(tls_objects)]
        proxy = start_proxy({"services": services})
        assert proxy.scheme == "https"
        return proxy

    return start


def test_sdk_over_https_alpn_and_server_name(tmp_path, ca, serve_tls):
    cert = ca.issue_cert(NAME, "127.0.0.1")
    cert_path, key_path = write_pair(cert, tmp_path / "tls", "server")
    proxy = serve_tls({"server_name": NAME, "alpn": ["http/1.1"], "min_version": "1.2",
                       "certificate_path": str(cert_path), "key_path": str(key_path)})
    ctx = client_context(ca)
    c = sdk(proxy, ctx)
    assert c.messages.create(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]).content
    with c.messages.stream(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream)
        assert s.get_final_message().usage.output_tokens > 0
    # ALPN: only what is served; a client that offers h2 first still gets HTTP/1.1
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    agreed = handshake(proxy.port, ctx)
    assert agreed["alpn"] == "http/1.1" and agreed["cert"] == der(cert)
    ctx.set_alpn_protocols(["h2"])
    assert handshake(proxy.port, ctx)["alpn"] is None
    # SNI: the configured name is served, another one is refused
    assert handshake(proxy.port, client_context(ca), server_hostname=NAME)["cert"] == der(cert)
    with pytest.raises(ssl.SSLError, match="UNRECOGNIZED_NAME"):
        handshake(proxy.port, client_context(ca, check_hostname=False), server_hostname="other.test")
    # plain http on the TLS port is not served
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as raw:
        raw.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        try:
            answer = raw.recv(4096)
        except ConnectionResetError:
            answer = b""
        assert b'{"status":"ok"}' not in answer


def test_versions_and_cipher_suites(tmp_path, ca, serve_tls):
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(cert, tmp_path / "tls", "server")
    files = {"certificate_path": str(cert_path), "key_path": str(key_path)}
    proxy = serve_tls(
        {**files, "min_version": "1.2", "max_version": "1.2",
         "cipher_suites": ["TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384"]},
        {**files, "min_version": "1.3"},
    )
    only12, only13 = proxy.ports["s0"], proxy.ports["s1"]
    agreed = handshake(only12, client_context(ca))
    assert (agreed["version"], agreed["cipher"]) == ("TLSv1.2", "ECDHE-ECDSA-AES256-GCM-SHA384")
    with pytest.raises(ssl.SSLError):  # above max_version
        handshake(only12, client_context(ca, minimum_version=ssl.TLSVersion.TLSv1_3))
    with pytest.raises(ssl.SSLError):  # a suite that is not configured
        handshake(only12, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2,
                                         ciphers="ECDHE-ECDSA-AES128-GCM-SHA256"))
    assert handshake(only13, client_context(ca))["version"] == "TLSv1.3"
    with pytest.raises(ssl.SSLError):  # below min_version
        handshake(only13, client_context(ca, maximum_version=ssl.TLSVersion.TLSv1_2))


def test_inline_certificate_and_key(ca, serve_tls):
    cert = ca.issue_cert("127.0.0.1")
    lines = lambda blob: blob.bytes().decode().strip().splitlines()  # noqa: E731  (sing-box: PEM lines)
    proxy = serve_tls({"certificate": lines(cert.cert_chain_pems[0]), "key": lines(cert.private_key_pem)})
    assert handshake(proxy.port, client_context(ca))["cert"] == der(cert)
    count = sdk(proxy, client_context(ca)).messages.count_tokens(
        model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens > 0


def test_certificate_swapped_on_disk_is_served_without_restart(tmp_path, ca, serve_tls):
    old = ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(old, tmp_path / "tls", "server")
    proxy = serve_tls({"certificate_path": str(cert_path), "key_path": str(key_path)})
    other_ca = trustme.CA(key_type=trustme.KeyType.RSA)
    new = other_ca.issue_cert("127.0.0.1", key_type=trustme.KeyType.RSA)  # another CA and another key type
    ctx = client_context(ca, other_ca)
    assert handshake(proxy.port, ctx)["cert"] == der(old)
    staged_cert, staged_key = write_pair(new, tmp_path / "staged", "server")
    # the certificate lands first: for a couple of polls it does not match the key on disk, and the
    # old pair must go on being served (a half-loaded pair would break every handshake)
    staged_cert.replace(cert_path)
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert handshake(proxy.port, ctx)["cert"] == der(old)
        time.sleep(0.25)
    staged_key.replace(key_path)
    deadline = time.monotonic() + 10
    while handshake(proxy.port, ctx)["cert"] != der(new):
        assert time.monotonic() < deadline, "the new certificate was not picked up within 10 s:\n" + proxy.log()
        time.sleep(0.2)
    assert "TLS certificate reloaded" in proxy.log()
    c = sdk(proxy, client_context(other_ca))  # a client that trusts only the new CA
    assert c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}]).content


@pytest.mark.parametrize("field, value, says", [
    ("acme", {"domain": ["ccm.example.com"]}, "ACME"),
    ("ech", {"enabled": True}, "Encrypted Client Hello"),
    ("reality", {"enabled": True}, "REALITY"),
    ("kernel_tx", True, "kernel TLS"),
    ("kernel_rx", True, "kernel TLS"),
    ("alpn", ["h2", "http/1.1"], "HTTP/2 is not served"),
])
def test_unsupported_tls_fields_are_rejected(tmp_path, ca, field, value, says):
    cert_path, key_path = write_pair(ca.issue_cert("127.0.0.1"), tmp_path / "tls", "server")
    tls = {"enabled": True, "certificate_path": str(cert_path), "key_path": str(key_path), field: value}
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"services": [service_config("http://127.0.0.1:1", tmp_path / "c.json", tls=tls)]}))
    out = subprocess.run([sys.executable, "-m", "ccm_wsgi", "check", "-c", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 1
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"services[0].tls.{field}: "), lines
    assert says in lines[0]
