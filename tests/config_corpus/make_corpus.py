"""Write the corpus of config cases that pins what `ccm-wsgi check` finds, and where.

    python tests/config_corpus/make_corpus.py            # write the cases that are not there yet
    python tests/config_corpus/make_corpus.py --force    # rewrite every case (review the diff!)

Each case is one file, `<name>.json`: `{"note", "config" | "config_text", "problems": [[path, message], ...]}`.
`config` is the decoded document given to `parse()`; `config_text` is a file's text given to `load()`
(comments, duplicate keys, broken JSON). The recorded problems are what the validator said when the
case was written: the first set was recorded from the hand-written validator that the typed model
replaced, so a case's paths are the contract (`tests/test_config_corpus.py`) and its messages show
the wording of the time. Existing files are kept unless `--force`: add a case, run the script, read
the new file before committing it. Cases named `new-*` (and `ok-new-keys`) cover keys the typed model
added; they were recorded from it.
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
import tempfile
from pathlib import Path
from typing import Any

from ccm_wsgi.config import ConfigError, load, parse

HERE = Path(__file__).resolve().parent

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
KEY = "-----BEGIN PRIVATE KEY-----\nMIIE\n-----END PRIVATE KEY-----\n"
SOCKS = {"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1080}
HTTP = {"type": "http", "tag": "h", "server": "p", "server_port": 1}
ALICE = {"name": "alice", "token": "ak-ccm-secret-alice"}
ALICE_SHA256 = hashlib.sha256(b"ak-ccm-secret-alice").hexdigest()
EXTERNAL = {"tag": "e", "type": "external", "url": "https://peer", "token": "external-token-1"}
# One problem path, as the validator writes it: `$`, bare keys joined by dots, [index], ["odd key"].
_QUOTED = r'\["(?:[^"\\]|\\.)*"\]'
PATH = re.compile(rf"(\$|(?:[A-Za-z0-9_-]+|\${_QUOTED})(?:\.[A-Za-z0-9_-]+|\[\d+\]|{_QUOTED})*): ")


def service(**fields: Any) -> dict[str, Any]:
    return {"services": [{"type": "ccm", **fields}]}


def outbounds(*items: Any, **fields: Any) -> dict[str, Any]:
    return {"outbounds": list(items), **service(**fields)}


def multi(credentials: list[Any], users: list[Any] | None = None, **fields: Any) -> dict[str, Any]:
    return service(credentials=credentials, users=users or [], **fields)


def tls(**fields: Any) -> dict[str, Any]:
    return service(tls=fields)


def outbound_tls(**fields: Any) -> dict[str, Any]:
    return outbounds({**HTTP, "tls": fields})


# name -> (note, config) or (note, {"config_text": text})
CASES: dict[str, tuple[str, Any]] = {
    # ---------------------------------------------------------------- valid documents (check says ok)
    "ok-singbox-docs-example": ("sing-box's own ccm example loads unchanged", {"services": [{
        "type": "ccm", "listen": "0.0.0.0", "listen_port": 8080, "usages_path": "./claude-usages.json",
        "users": [{"name": "alice", "token": "ak-ccm-hello-world"}, {"name": "bob", "token": "ak-ccm-hello-bob"}]}]}),
    "ok-singbox-sections": ("other sing-box sections, services and outbound types are accepted", {
        "log": {"level": "WARNING", "timestamp": False},
        "dns": {"servers": [{"type": "local"}]}, "ntp": 1, "inbounds": [{"type": "mixed"}], "route": {},
        "experimental": {}, "endpoints": [], "certificate": {},
        "outbounds": [{"type": "direct"}, {"type": "shadowsocks", "tag": "ss", "anything": [1]},
                      {**SOCKS, "version": 4, "routing_mark": "0x10", "tcp_fast_open": True, "connect_timeout": "5s",
                       "network": "tcp", "udp_over_tcp": {"enabled": True}, "domain_resolver": {"server": "x"},
                       "fallback_delay": "300ms", "network_type": "wifi", "reuse_addr": False}],
        "services": [{"type": "derp", "tag": "x", "anything": 1},
                     {"type": "ccm", "listen": "::1", "detour": "0", "sniff": True, "tcp_keep_alive": "1m",
                      "tcp_keep_alive_interval": "30s", "udp_timeout": "5m", "reuse_addr": True, "tls": {},
                      "headers": {"anthropic-beta": ["a", "b"]}, "users": None, "admin_tokens": None}]}),
    "ok-ephemeral-ports": ("two services on port 0 never clash",
                           {"services": [{"type": "ccm", "tag": "a", "listen_port": 0},
                                         {"type": "ccm", "tag": "b", "listen_port": 0}]}),
    "ok-pool": ("a pool with every credential type", {
        "outbounds": [SOCKS],
        "services": [{"type": "ccm", "credentials": [
            {"tag": "a", "credential_path": "/x/a.json", "usages_path": "/x/a-usage.json", "detour": "proxy-a",
             "reserve_5h": 20, "limit_weekly": 100},
            {**EXTERNAL, "server": "10.0.0.2", "server_port": 8443, "poll_interval": "30m", "usages_path": "/x/e.json"},
            {"tag": "pool", "type": "fallback", "credentials": ["a", "e"], "poll_interval": "0s"}],
            "users": [{**ALICE, "credential": "pool"},
                      {"name": "peer", "token": "ak-ccm-peer-token", "credential": "e", "external_credential": "e",
                       "allow_external_usage": True}],
            "admin_tokens": ["admin-secret-1"]}]}),
    "ok-comments": ("comments as sing-box allows them", {"config_text":
                    '// top\n{ # hash\n "services": [ /* block\n */ {"type": "ccm", "tag": "a//b#c"} ]\n}\n'}),
    "ok-tls-inline": ("inbound TLS from inline PEM", tls(enabled=True, certificate=PEM.splitlines(), key=KEY,
                                                       min_version="1.2", alpn="http/1.1",
                                                       client_authentication="verify-if-given",
                                                       client_certificate=PEM, acme={"enabled": False})),
    # ---------------------------------------------------------------- decoding (load only)
    "json-syntax": ("a trailing comma", {"config_text": '{\n  "services": [\n    {"type": "ccm",}\n  ]\n}\n'}),
    "json-nan": ("NaN is not JSON", {"config_text": '{"services": [{"type": "ccm", "listen_port": NaN}]}'}),
    "json-duplicate-key": ("a key twice in one object",
                           {"config_text": '{"services": [{"type": "ccm", "listen_port": 1, "listen_port": 2}]}'}),
    "json-duplicate-key-nested": ("duplicate keys in users and headers", {"config_text":
                                  '{"services": [{"type": "ccm", "headers": {"X-A": "1", "X-A": "2"},'
                                  ' "users": [{"name": "a", "name": "b", "token": "ak-ccm-secret-alice"}]}]}'}),
    "json-too-deep": ("nesting deeper than the decoder goes", {"config_text": "[" * 5000 + "]" * 5000}),
    # ---------------------------------------------------------------- top level
    "top-not-object": ("the document is a list", [1]),
    "top-null": ("the document is null", None),
    "top-unknown-key": ("a key sing-box does not have", {"bogus": 1, **service()}),
    "top-odd-key": ("a key that needs quoting in the path", {"we\nird": 1, **service()}),
    "no-services": ("no services at all", {}),
    "no-ccm-service": ("only other services", {"services": [{"type": "derp"}]}),
    "services-not-list": ("services is an object", {"services": {"type": "ccm"}}),
    "service-not-object": ("a service is a number", {"services": [1, {"type": "ccm"}]}),
    "service-without-type": ("a service without type", {"services": [{"tag": "x"}]}),
    "service-empty-type": ("a service with an empty type", {"services": [{"type": ""}]}),
    "service-type-not-string": ("a service whose type is a number", {"services": [{"type": 1}, {"type": "ccm"}]}),
    "log-not-object": ("log is a number", {"log": 1, **service()}),
    "log-level": ("an unknown level", {"log": {"level": "loud"}, **service()}),
    "log-level-type": ("level is a number", {"log": {"level": 1}, **service()}),
    "log-key": ("an unknown log key", {"log": {"color": True}, **service()}),
    "log-types": ("log fields of the wrong type",
                  {"log": {"disabled": "no", "timestamp": 1, "output": "a\u0000b"}, **service()}),
    # ---------------------------------------------------------------- service fields
    "service-unknown-key": ("unknown service key", service(foo=1)),
    "service-odd-key": ("an unknown key that needs quoting", service(**{"we\nird": 1})),
    "service-tag-type": ("tag is a number", service(tag=1)),
    "listen-host-name": ("listen is a name", service(listen="localhost")),
    "listen-type": ("listen is a number", service(listen=1)),
    "listen-port-range": ("port above 65535", service(listen_port=65536)),
    "listen-port-negative": ("negative port", service(listen_port=-1)),
    "listen-port-bool": ("port is a boolean", service(listen_port=True)),
    "listen-port-string": ("port is a string", service(listen_port="80")),
    "listen-port-float": ("port is a float", service(listen_port=80.0)),
    "usages-path-type": ("usages_path is a number", service(usages_path=1)),
    "usages-path-nul": ("usages_path with NUL", service(usages_path="a\u0000b")),
    "credential-path-nul": ("credential_path with NUL", service(credential_path="a\u0000b")),
    "credential-path-surrogate": ("credential_path with an unpaired surrogate", service(credential_path="a\ud800")),
    "reuse-addr-type": ("reuse_addr is a string", service(reuse_addr="yes")),
    "disable-keep-alive-type": ("disable_tcp_keep_alive is a number", service(disable_tcp_keep_alive=1)),
    "keep-alive-negative": ("tcp_keep_alive below zero", service(tcp_keep_alive="-1s")),
    "keep-alive-interval-unit": ("tcp_keep_alive_interval without unit", service(tcp_keep_alive_interval="30")),
    "listen-ignored-typed": ("ignored listen fields are still type-checked", service(
        tcp_fast_open="yes", bind_interface=1, netns=2, tcp_multi_path="x", udp_fragment=0, udp_timeout="5",
        sniff="x", sniff_override_destination=1, sniff_timeout=1, domain_strategy=1, udp_disable_domain_unmapping=1)),
    "duration-needs-unit": ("connect_timeout without unit", service(connect_timeout="90")),
    "duration-zero": ("response_timeout of zero", service(response_timeout="0s")),
    "duration-negative": ("shutdown_grace below zero", service(shutdown_grace="-1s")),
    "duration-number": ("client_timeout as a number", service(client_timeout=60)),
    "duration-unknown-unit": ("stream_idle_timeout with an unknown unit", service(stream_idle_timeout="1x")),
    "duration-out-of-range": ("a duration beyond Go's range", service(shutdown_grace="9" * 30 + "h")),
    "body-size-zero": ("max_request_body_size of zero", service(max_request_body_size=0)),
    "body-size-float": ("max_request_body_size as a float", service(max_request_body_size=1.5)),
    "upstream-scheme": ("upstream_url is ftp", service(upstream_url="ftp://x")),
    "upstream-no-host": ("upstream_url without host", service(upstream_url="https://")),
    "upstream-query": ("upstream_url with a query", service(upstream_url="https://x/?a=1")),
    "upstream-empty-query": ("upstream_url with an empty query", service(upstream_url="https://x/?")),
    "upstream-user-info": ("upstream_url with user info", service(upstream_url="https://u:p@x")),
    "upstream-bad-port": ("upstream_url with a port out of range", service(upstream_url="https://x:99999")),
    "upstream-whitespace": ("upstream_url with a space", service(upstream_url="https://x/a b")),
    "upstream-type": ("upstream_url is a number", service(upstream_url=1)),
    "token-url-fragment": ("token_url with a fragment", service(token_url="https://x/t#f")),
    "duplicate-service-tag": ("two services with the default tag",
                              {"services": [{"type": "ccm"}, {"type": "ccm", "listen_port": 8081}]}),
    "same-listener": ("two services on one address and port",
                      {"services": [{"type": "ccm", "tag": "a"}, {"type": "ccm", "tag": "b"}]}),
    "wildcard-listener": ("a wildcard and a loopback listener on one port",
                          {"services": [{"type": "ccm", "tag": "a", "listen": "::"},
                                        {"type": "ccm", "tag": "b", "listen": "127.0.0.1"}]}),
    "wildcard-v4-listener": ("an IPv4 wildcard clashes with IPv4 only", {"services": [
        {"type": "ccm", "tag": "a", "listen": "0.0.0.0"}, {"type": "ccm", "tag": "b", "listen": "::1"},
        {"type": "ccm", "tag": "c", "listen": "127.0.0.2"}]}),
    "listener-after-bad-port": ("an invalid port is not compared", {"services": [
        {"type": "ccm", "tag": "a"}, {"type": "ccm", "tag": "b", "listen_port": "8080"}]}),
    # ---------------------------------------------------------------- headers
    "header-authorization": ("Authorization cannot be set", service(headers={"Authorization": "x"})),
    "header-api-key": ("x-api-key cannot be set", service(headers={"X-Api-Key": "x"})),
    "header-host": ("Host cannot be set", service(headers={"host": "x"})),
    "header-content-length": ("Content-Length cannot be set", service(headers={"Content-Length": "1"})),
    "header-hop-by-hop": ("hop-by-hop headers cannot be set", service(headers={"Transfer-Encoding": "chunked",
                                                                               "Connection": "close"})),
    "header-name": ("a header name with a space", service(headers={"Bad Name": "x"})),
    "header-crlf": ("a header value with CRLF", service(headers={"X-A": ["ok", "a\r\nb"]})),
    "header-value-type": ("a header value that is a number", service(headers={"X-A": 1})),
    "header-value-item-type": ("a header value list with a number", service(headers={"X-A": ["a", 1]})),
    "header-no-values": ("a header with an empty list", service(headers={"X-A": []})),
    "header-duplicate-case": ("one header twice, in two cases", service(headers={"X-A": "1", "x-a": "2"})),
    "headers-type": ("headers is a list", service(headers=["X-A"])),
    # ---------------------------------------------------------------- users
    "users-type": ("users is an object", service(users={})),
    "user-not-object": ("a user is a number", service(users=[1, ALICE])),
    "user-key": ("an unknown user key", service(users=[{**ALICE, "password": "x"}])),
    "user-no-name": ("a user without name", service(users=[{"token": "ak-ccm-secret-alice"}])),
    "user-empty-name": ("a user with a blank name", service(users=[{"name": " ", "token": "ak-ccm-secret-alice"}])),
    "user-name-control": ("a user name with a line break", service(users=[{**ALICE, "name": "a\nb"}])),
    "user-duplicate-name": ("two users named alice",
                            service(users=[ALICE, {"name": "alice", "token": "ak-ccm-other-token"}])),
    "user-empty-token": ("an empty token", service(users=[{"name": "alice", "token": ""}])),
    "user-short-token": ("a short token", service(users=[{"name": "alice", "token": "short"}])),
    "user-token-space": ("a token with spaces", service(users=[{"name": "alice", "token": "ak ccm secret"}])),
    "user-token-type": ("a token that is a number", service(users=[{"name": "alice", "token": 12345678}])),
    "user-no-token": ("a user without token", service(users=[{"name": "alice"}])),
    "user-both-tokens": ("token and token_sha256", service(users=[{**ALICE, "token_sha256": "0" * 64}])),
    "user-bad-sha256": ("token_sha256 not hex", service(users=[{"name": "alice", "token_sha256": "xyz"}])),
    "user-duplicate-token": ("two users with one token",
                             service(users=[ALICE, {"name": "bob", "token": "ak-ccm-secret-alice"}])),
    "user-duplicate-token-by-hash": ("a token and the SHA-256 of the same token", service(users=[
        ALICE, {"name": "bob", "token_sha256": ALICE_SHA256.upper()},
        {"name": "carol", "token_sha256": ALICE_SHA256}])),
    "user-credential-legacy": ("credential without credentials", service(users=[{**ALICE, "credential": "a"}])),
    "user-external-legacy": ("external_credential without credentials",
                             service(users=[{**ALICE, "external_credential": "a"}])),
    "user-field-types": ("user fields of the wrong type", service(users=[{
        **ALICE, "credential": 1, "external_credential": 2, "allow_external_usage": "yes"}])),
    "user-problems-collected": ("every problem of a broken user and its service", service(
        listen="x", listen_port=-1, users=[{"name": ""}], tls={"acme": {"domain": "x"}})),
    "user-duplicates-beside-broken-user": ("duplicates are found though another user is broken", service(users=[
        ALICE, {"name": "alice", "token": "ak-ccm-secret-alice"}, {"name": "carol", "token": "short"}])),
    # ---------------------------------------------------------------- admin tokens
    "admin-token-equals-user": ("an admin token that is a user token",
                                service(users=[ALICE], admin_tokens=["ak-ccm-secret-alice"])),
    "admin-token-empty": ("an empty admin token", service(admin_tokens=[""])),
    "admin-token-space": ("an admin token with a space", service(admin_tokens=["admin secret"])),
    "admin-token-item-type": ("an admin token that is a number", service(admin_tokens=[1])),
    "admin-tokens-type": ("admin_tokens is a string", service(admin_tokens="admin-secret-1")),
    "admin-token-duplicate": ("one admin token twice", service(admin_tokens=["admin-secret-1", "admin-secret-1"])),
    # ---------------------------------------------------------------- pricing
    "pricing-type": ("pricing is an object", service(pricing={})),
    "price-not-object": ("a price is a number", service(pricing=[1])),
    "price-regex": ("an invalid regular expression", service(pricing=[{"model": "(", "input": 1, "output": 1}])),
    "price-model-empty": ("an empty model pattern", service(pricing=[{"model": "", "input": 1, "output": 1}])),
    "price-model-missing": ("a price without model", service(pricing=[{"input": 1, "output": 1}])),
    "price-negative": ("a negative price", service(pricing=[{"model": "x", "input": -1, "output": 1}])),
    "price-missing-output": ("a price without output", service(pricing=[{"model": "x", "input": 1}])),
    "price-bool": ("a price that is a boolean", service(pricing=[{"model": "x", "input": True, "output": 1}])),
    "price-string": ("a price that is a string", service(pricing=[{"model": "x", "input": "1", "output": 1}])),
    "price-infinite": ("a price beyond float range", {"config_text":
                       '{"services": [{"type": "ccm", "pricing": [{"model": "x", "input": 1e999, "output": 1}]}]}'}),
    "price-cache-negative": ("a negative cache price", service(pricing=[{"model": "x", "input": 1, "output": 1,
                                                                         "cache_write_1h": -2}])),
    "price-key": ("an unknown price key", service(pricing=[{"model": "x", "input": 1, "output": 1, "foo": 1}])),
    "premium-key": ("premium with a model", service(pricing=[{"model": "x", "input": 1, "output": 1,
                                                               "premium": {"model": "y"}}])),
    "premium-not-object": ("premium is a number", service(pricing=[{"model": "x", "input": 1, "output": 1,
                                                                     "premium": 2}])),
    # ---------------------------------------------------------------- inbound TLS
    "tls-not-object": ("tls is a string", service(tls="on")),
    "tls-needs-certificate": ("TLS enabled without certificate or key", tls(enabled=True)),
    "tls-needs-key": ("TLS enabled without key", tls(enabled=True, certificate=PEM)),
    "tls-missing-file": ("a certificate file that is not there",
                        tls(enabled=True, certificate_path="/nonexistent/c.pem", key=KEY)),
    "tls-directory": ("a key path that is a directory", tls(enabled=True, certificate=PEM, key_path="/")),
    "tls-both-sources": ("key and key_path", tls(enabled=True, key=KEY, key_path="/x", certificate=PEM)),
    "tls-not-pem": ("a certificate that is not PEM", tls(enabled=True, certificate="abc", key=KEY)),
    "tls-pem-item-type": ("a certificate line that is a number", tls(certificate=["-----BEGIN X-----", 1])),
    "tls-enabled-type": ("enabled is a string", tls(enabled="yes")),
    "tls-server-name-type": ("server_name is a number", tls(server_name=1)),
    "tls-h2": ("alpn h2", tls(alpn=["h2", "http/1.1"])),
    "tls-other-alpn": ("alpn spdy", tls(alpn="spdy/3")),
    "tls-alpn-item-type": ("an alpn entry that is a number", tls(alpn=["http/1.1", 1])),
    "tls-version": ("TLS 1.4", tls(min_version="1.4")),
    "tls-version-type": ("a version that is a number", tls(max_version=1.2)),
    "tls-version-order": ("min above max", tls(min_version="1.3", max_version="1.2")),
    "tls-cipher": ("an OpenSSL cipher name", tls(cipher_suites=["ECDHE-RSA-AES128-GCM-SHA256"])),
    "tls-cipher-type": ("cipher_suites is a number", tls(cipher_suites=1)),
    "tls-acme": ("acme", tls(acme={"domain": "x"})),
    "tls-ech": ("ech", tls(ech={"enabled": True})),
    "tls-reality": ("reality", tls(reality={"enabled": True})),
    "tls-kernel": ("kernel TLS", tls(kernel_tx=True, kernel_rx=True)),
    "tls-client-key-pin": ("client_certificate_public_key_sha256", tls(client_certificate_public_key_sha256=["x"])),
    "tls-curve-type": ("curve_preferences is a number", tls(curve_preferences=1)),
    "tls-client-auth-value": ("an unknown client_authentication", tls(client_authentication="maybe")),
    "tls-client-auth-type": ("client_authentication is a number", tls(client_authentication=1)),
    "tls-client-auth-unverified": ("require-any", tls(client_authentication="require-any")),
    "tls-client-auth-request": ("request", tls(client_authentication="request")),
    "tls-client-auth-no-ca": ("verify-if-given without a CA", tls(enabled=True, certificate=PEM, key=KEY,
                                                                  client_authentication="verify-if-given")),
    "tls-client-ca-unused": ("a client CA that is never asked for", tls(client_certificate=PEM)),
    "tls-client-ca-missing-file": ("a client CA file that is not there", tls(
        enabled=True, certificate=PEM, key=KEY, client_authentication="require-and-verify",
        client_certificate_path=["/nonexistent/ca.pem"])),
    "tls-client-ca-path-type": ("client_certificate_path is a number", tls(client_certificate_path=1)),
    "tls-unknown-key": ("an outbound-only key on inbound TLS", tls(insecure=True)),
    # ---------------------------------------------------------------- outbounds and detour
    "outbounds-type": ("outbounds is an object", {"outbounds": {}, **service()}),
    "outbound-not-object": ("an outbound is a number", outbounds(1)),
    "outbound-without-type": ("an outbound without type", outbounds({"tag": "x"})),
    "outbound-type-control": ("an outbound type with a line break", outbounds({"type": "so\ncks", "tag": "x"})),
    "outbound-tag-type": ("an outbound tag that is a number", outbounds({**SOCKS, "tag": 1})),
    "duplicate-outbound-tag": ("two outbounds with one tag", outbounds(SOCKS, {**SOCKS, "server_port": 1081})),
    "duplicate-outbound-index-tag": ("a tag equal to another outbound's index",
                                     outbounds({"type": "direct"}, {"type": "direct", "tag": "0"})),
    "duplicate-tag-without-type": ("an outbound without type still claims its tag",
                                   outbounds({"tag": "x"}, {"type": "direct", "tag": "x"})),
    "unknown-detour": ("detour names nothing", service(detour="nope")),
    "detour-type": ("detour is a number", service(detour=1)),
    "unusable-detour": ("detour names a shadowsocks outbound",
                        outbounds({"type": "shadowsocks", "tag": "ss", "method": "x"}, detour="ss")),
    "socks-no-server": ("socks without server", outbounds({"type": "socks", "tag": "s", "server_port": 1})),
    "socks-no-port": ("socks without port", outbounds({"type": "socks", "tag": "s", "server": "x"})),
    "socks-empty-server": ("socks with an empty server", outbounds({**SOCKS, "server": ""})),
    "socks-port-zero": ("socks port 0", outbounds({**SOCKS, "server_port": 0})),
    "socks-version": ("socks version 6", outbounds({**SOCKS, "version": "6"})),
    "socks-version-bool": ("socks version true", outbounds({**SOCKS, "version": True})),
    "socks4-password": ("a password with socks 4a", outbounds({**SOCKS, "version": "4a", "username": "u",
                                                              "password": "proxy-password-1"})),
    "socks-username-type": ("a username that is a number", outbounds({**SOCKS, "username": 1})),
    "socks-unknown-key": ("path on a socks outbound", outbounds({**SOCKS, "path": "/"})),
    "socks-network-type": ("network is a number", outbounds({**SOCKS, "network": 1})),
    "outbound-chain": ("detour on an outbound", outbounds({**SOCKS, "detour": "other"})),
    "dial-timeout-unit": ("connect_timeout without unit", outbounds({**SOCKS, "connect_timeout": "5"})),
    "dial-timeout-zero": ("connect_timeout of zero", outbounds({"type": "direct", "connect_timeout": "0s"})),
    "dial-ignored-typed": ("ignored dial fields are still type-checked", outbounds({
        **SOCKS, "tcp_fast_open": "x", "fallback_delay": "5", "network_type": 1, "inet4_bind_address": 1,
        "bind_address_no_port": 1, "reuse_addr": 1, "disable_tcp_keep_alive": 1, "tcp_keep_alive": "x",
        "network_strategy": 1, "fallback_network_type": [1]})),
    "direct-key": ("server on a direct outbound", outbounds({"type": "direct", "tag": "d", "server": "x"})),
    "http-path-type": ("path is a number", outbounds({**HTTP, "path": 1})),
    "http-header": ("a proxy header with a line break", outbounds({**HTTP, "headers": {"X-A": "a\nb"}})),
    "http-header-name": ("a proxy header name with a space", outbounds({**HTTP, "headers": {"X A": "b"}})),
    "http-tls-type": ("tls is a number", outbounds({**HTTP, "tls": 1})),
    "http-tls-utls": ("utls", outbound_tls(enabled=True, utls={"enabled": True})),
    "http-tls-unsupported": ("every unsupported outbound TLS key", outbound_tls(
        reality={"enabled": True}, ech={"enabled": True}, fragment=True, fragment_fallback_delay="1s",
        record_fragment=True, certificate_public_key_sha256=["x"], client_certificate=["x"],
        client_certificate_path="x", client_key=["x"], client_key_path="x")),
    "http-tls-switched-off": ("unsupported keys that are switched off", outbound_tls(
        utls={"enabled": False}, reality={}, ech=None, fragment=False, client_key="", client_key_path=[])),
    "http-tls-h2": ("alpn h2 towards a proxy", outbound_tls(enabled=True, alpn="h2")),
    "http-tls-not-pem": ("a proxy CA that is not PEM", outbound_tls(enabled=True, certificate="abc")),
    "http-tls-missing-file": ("a proxy CA file that is not there",
                              outbound_tls(enabled=True, certificate_path="/nonexistent/ca.pem")),
    "http-tls-both-sources": ("certificate and certificate_path", outbound_tls(certificate=PEM,
                                                                               certificate_path="/x")),
    "http-tls-version-order": ("min above max towards a proxy", outbound_tls(min_version="1.3", max_version="1.0")),
    "http-tls-types": ("outbound TLS fields of the wrong type", outbound_tls(
        insecure="yes", disable_sni=1, server_name=1, curve_preferences=[1], cipher_suites=["NOPE"])),
    "http-tls-key": ("an inbound-only key on outbound TLS", outbound_tls(key_path="/x")),
    # ---------------------------------------------------------------- usage and credential files
    "shared-usages-path": ("two services write one usage file", {"services": [
        {"type": "ccm", "tag": "a", "usages_path": "/tmp/u.json"},
        {"type": "ccm", "tag": "b", "listen_port": 8081, "usages_path": "/tmp/x/../u.json"}]}),
    "usages-path-is-credential-file": ("a usage file that is a credential file", multi([
        {"tag": "a", "credential_path": "/x/c.json"}, {"tag": "b", "credential_path": "/x/b.json",
                                                       "usages_path": "/x/c.json"}])),
    "legacy-usages-is-credential-file": ("across services, in legacy mode", {"services": [
        {"type": "ccm", "tag": "a", "credential_path": "/x/c.json"},
        {"type": "ccm", "tag": "b", "listen_port": 8081, "usages_path": "/x/c.json"}]}),
    "shared-usages-across-modes": ("a legacy usage file shared with a pooled credential", {"services": [
        {"type": "ccm", "tag": "a", "usages_path": "/x/u.json"},
        {"type": "ccm", "tag": "b", "listen_port": 8081,
         "credentials": [{"tag": "c", "usages_path": "/x/u.json"}, {**EXTERNAL, "usages_path": "/x/u.json"}]}]}),
    # ---------------------------------------------------------------- multi-credential mode
    "credentials-type": ("credentials is an object", service(credentials={})),
    "credential-not-object": ("a credential is a number", multi([1])),
    "credentials-with-credential-path": ("legacy credential_path beside credentials",
                                         multi([{"tag": "a"}], credential_path="/x")),
    "credentials-with-usages-path": ("legacy usages_path beside credentials", multi([{"tag": "a"}], usages_path="/x")),
    "credentials-with-detour": ("legacy detour beside credentials",
                                outbounds(SOCKS, credentials=[{"tag": "a"}], detour="proxy-a")),
    "credential-without-tag": ("a credential without tag", multi([{"type": "default"}])),
    "credential-empty-tag": ("a credential with an empty tag", multi([{"tag": ""}])),
    "duplicate-credential-tag": ("two credentials with one tag", multi([{"tag": "a"}, {"tag": "a"}])),
    "credential-type": ("an unknown credential type", multi([{"tag": "a", "type": "oauth"}])),
    "credential-type-known-tag": ("a credential of unknown type is still known to users",
                                  multi([{"tag": "a", "type": "oauth"}], [{**ALICE, "credential": "a"}])),
    "credential-type-not-string": ("a credential type that is a number", multi([{"tag": "a", "type": 1}])),
    "reserve-range": ("reserve_5h of 100", multi([{"tag": "a", "reserve_5h": 100}])),
    "limit-range": ("limit_weekly of 101", multi([{"tag": "a", "limit_weekly": 101}])),
    "reserve-and-limit": ("reserve and limit for one window", multi([{"tag": "a", "reserve_weekly": 5,
                                                                      "limit_weekly": 90}])),
    "reserve-and-limit-5h": ("reserve and limit for the 5-hour window", multi([{"tag": "a", "reserve_5h": 5,
                                                                                "limit_5h": 90}])),
    "key-of-balancer-on-default": ("strategy on a default credential", multi([{"tag": "a", "strategy": "random"}])),
    "key-of-external-on-default": ("url and poll_interval on a default credential",
                                   multi([{"tag": "a", "url": "https://x", "poll_interval": "1m"}])),
    "key-of-default-on-external": ("credential_path and reserve on an external credential",
                                   multi([{**EXTERNAL, "credential_path": "/x", "limit_5h": 1}])),
    "key-of-default-on-balancer": ("detour and usages_path on a balancer", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"], "detour": "x", "usages_path": "/u"}])),
    "unknown-credential-key": ("an unknown credential key", multi([{"tag": "a", "foo": 1}])),
    "credential-detour": ("a credential detour that names nothing", multi([{"tag": "a", "detour": "nope"}])),
    "credential-paths-nul": ("credential paths with NUL", multi([{"tag": "a", "credential_path": "\u0000",
                                                                  "usages_path": "\u0000"}])),
    "external-without-token": ("an external credential without token",
                               multi([{"tag": "e", "type": "external", "url": "https://peer"}])),
    "external-without-url": ("an external credential without url",
                             multi([{"tag": "e", "type": "external", "token": "external-token-1"}])),
    "external-reverse": ("a reverse external credential", multi([{**EXTERNAL, "reverse": True}])),
    "external-url": ("an external url without scheme", multi([{**EXTERNAL, "url": "peer:8080"}])),
    "external-token-empty": ("an empty external token", multi([{**EXTERNAL, "token": ""}])),
    "external-token-space": ("an external token with a space", multi([{**EXTERNAL, "token": "external token"}])),
    "external-field-types": ("external fields of the wrong type", multi([{
        **EXTERNAL, "server": 1, "server_port": 70000, "reverse": "no", "usages_path": 1, "poll_interval": "5",
        "detour": 2}])),
    "external-detour-unusable": ("an external credential through a shadowsocks outbound", {
        "outbounds": [{"type": "shadowsocks", "tag": "ss"}],
        **multi([{**EXTERNAL, "detour": "ss"}])}),
    "strategy": ("an unknown strategy", multi([{"tag": "a"}, {"tag": "p", "type": "balancer", "strategy": "best",
                                                              "credentials": ["a"]}])),
    "strategy-type": ("a strategy that is a number", multi([{"tag": "a"}, {"tag": "p", "type": "balancer",
                                                                           "strategy": 1, "credentials": ["a"]}])),
    "fallback-type-with-strategy": ("type fallback with another strategy", multi([
        {"tag": "a"}, {"tag": "p", "type": "fallback", "strategy": "random", "credentials": ["a"]}])),
    "rebalance-negative": ("a negative rebalance threshold", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"], "rebalance_threshold": -1}])),
    "rebalance-above-100": ("a rebalance threshold above 100", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"], "rebalance_threshold": 101}])),
    "rebalance-not-least-used": ("a rebalance threshold with round robin", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "strategy": "round-robin", "credentials": ["a"],
                       "rebalance_threshold": 5}])),
    "balancer-no-members": ("a balancer over nothing", multi([{"tag": "p", "type": "balancer", "credentials": []}])),
    "balancer-members-missing": ("a balancer without credentials", multi([{"tag": "p", "type": "balancer"}])),
    "balancer-members-type": ("credentials is a number", multi([{"tag": "p", "type": "balancer", "credentials": 1}])),
    "balancer-member-item-type": ("a member that is a number", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a", 1]}])),
    "balancer-unknown-member": ("a member that names nothing",
                                multi([{"tag": "p", "type": "balancer", "credentials": ["a"]}])),
    "balancer-unknown-scalar-member": ("a single member that names nothing",
                                       multi([{"tag": "p", "type": "balancer", "credentials": "a"}])),
    "nested-balancer": ("a balancer inside a balancer", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"]},
        {"tag": "q", "type": "fallback", "credentials": ["a", "p"]}])),
    "balancer-duplicate-member": ("a member listed twice", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a", "a"]}])),
    "poll-interval": ("a poll interval without unit", multi([
        {"tag": "a"}, {"tag": "p", "type": "balancer", "credentials": ["a"], "poll_interval": "60"}])),
    "user-without-credential": ("a pooled user without credential", multi([{"tag": "a"}], [ALICE])),
    "user-credential-type": ("a pooled user whose credential is a number",
                             multi([{"tag": "a"}], [{**ALICE, "credential": 1}])),
    "user-unknown-credential": ("a user naming an unknown credential", multi([{"tag": "a"}],
                                                                             [{**ALICE, "credential": "b"}])),
    "user-unknown-external": ("a user naming an unknown external credential", multi(
        [{"tag": "a"}], [{**ALICE, "credential": "a", "external_credential": "x"}])),
    "user-external-not-external": ("external_credential naming a default credential", multi(
        [{"tag": "a"}], [{**ALICE, "credential": "a", "external_credential": "a"}])),
    "user-external-only": ("a user bound to an external credential only", multi([EXTERNAL],
                                                                               [{**ALICE, "credential": "e"}])),
    "user-external-only-balancer": ("a user bound to a balancer of external credentials only", multi(
        [EXTERNAL, {"tag": "p", "type": "balancer", "credentials": "e"}], [{**ALICE, "credential": "p"}])),
    # ---------------------------------------------------------------- keys of the typed model (recorded from it)
    "new-admin-token-short": ("typed model: admin tokens follow the user-token rules", service(admin_tokens=["admin"])),
    "new-placeholder-tokens": ("typed model: the examples' placeholder tokens are refused", service(
        users=[{"name": "alice", "token": "ak-ccm-change-me-alice"}], admin_tokens=["ak-ccm-changeme-admin"])),
    "new-limits-types": ("typed model: limits of the wrong types", service(usages_path="/u.json", limits={
        "budget": [{"usd": 0, "per": "year"}, {"usd": "1"}], "requests_per_minute": 0, "max_concurrent": 1.5,
        "models": [], "window_share": {"five_hour": 101, "weekly": 0}, "daily": 1})),
    "new-budget-period-twice": ("typed model: one budget per period", service(usages_path="/u.json", limits={
        "budget": [{"usd": 1, "per": "day"}, {"usd": 2, "per": "day"}]})),
    "new-ledger-missing": ("typed model: budgets and shares need usage records", {"services": [
        {"type": "ccm", "tag": "single", "limits": {"budget": [{"usd": 1, "per": "day"}]}},
        {"type": "ccm", "tag": "pool", "listen_port": 8081, "state": None,
         "credentials": [{"tag": "a", "usages_path": "/a.json"}, {"tag": "b"}],
         "users": [{**ALICE, "credential": "b", "limits": {"window_share": {"weekly": 10}}}]}]}),
    "new-user-controls": ("typed model: disabled and expires", service(users=[
        {**ALICE, "disabled": 1, "expires": "2026-12-31 23:59:59"}])),
    "new-service-keys": ("typed model: overage, authorize_url and state", service(
        overage="never", authorize_url="https://u:p@claude.com/x", state={"type": "redis", "url": "http://x"})),
    "ok-new-keys": ("typed model: every new key, valid", service(
        usages_path="/u.json", overage="deny", authorize_url="https://claude.com/cai/oauth/authorize",
        limits={"budget": [{"usd": 5, "per": "day"}, {"usd": 50, "per": "month"}], "requests_per_minute": 30,
                "max_concurrent": 2, "models": ["claude-sonnet-*", "claude-haiku-*"],
                "window_share": {"five_hour": 30, "weekly": 20}},
        users=[{**ALICE, "disabled": False, "expires": "2026-12-31T23:59:59Z", "limits": {"models": "claude-*"}}],
        state={"type": "redis", "url": "redis://127.0.0.1:6379/0", "key_prefix": "team-a:"},
        reuse_addr=True, tcp_keep_alive="2m", tcp_keep_alive_interval="20s")),
    # ---------------------------------------------------------------- several problems at once
    "check-every-problem": ("what `ccm-wsgi check` prints for a document with five problems", {
        "outbounds": [SOCKS, {**SOCKS, "server_port": 1081}],
        "services": [{"type": "ccm", "listen_port": 70000, "detour": "nope", "foo": 1,
                      "users": [ALICE, {"name": "bob", "token": "ak-ccm-secret-alice"}]}]}),
    "secrets-never-quoted": ("problems with secrets in them", {
        "outbounds": [{**SOCKS, "version": "4", "password": "proxy-password-1"}],
        "services": [
            {"type": "ccm", "tag": "a", "users": [ALICE, {**ALICE, "name": "bob"}],
             "admin_tokens": ["ak-ccm-secret-alice", "admin-secret-1", "admin-secret-1"],
             "upstream_url": "https://user:proxy-password-1@x/?q=admin-secret-1"},
            {"type": "ccm", "tag": "b", "listen_port": 8081, "users": [{**ALICE, "name": "c", "token_sha256": "z"}],
             "credentials": [{"tag": "e", "type": "external", "url": "https://external-token-1", "reverse": True,
                              "token": "external-token-1 "}]}]}),
    "relations-beside-type-errors": ("relations are checked though sibling fields are broken", {
        "outbounds": [{**HTTP, "server_port": "x", "tls": {"min_version": "1.3", "max_version": "1.2", "foo": 1}}],
        "services": [{"type": "ccm", "listen_port": "x", "credentials": [
            {"tag": "a", "reserve_5h": 5, "limit_5h": 50, "foo": 1},
            {"tag": "p", "type": "fallback", "strategy": "random", "credentials": ["a", "a", "zz"], "bar": 2}],
            "users": [{**ALICE, "credential": "p", "foo": 1}, {"name": "bob", "token": "ak-ccm-secret-alice",
                                                                 "credential": "nope"}],
            "tls": {"enabled": True, "certificate": PEM, "key": KEY, "key_path": "/x", "foo": 1}}]}),
}


def split(line: str) -> list[str]:
    match = PATH.match(line)
    if match is None:
        raise SystemExit(f"cannot find the path in {line!r}")
    return [match.group(1), line[match.end():]]


def problems_of(case: Any) -> list[list[str]]:
    try:
        if isinstance(case, dict) and "config_text" in case:
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "config.json"
                path.write_text(case["config_text"], encoding="utf-8")
                load(str(path))
        else:
            parse(case)
    except ConfigError as exc:
        return [split(line) for line in exc.problems]
    return []


def main() -> None:
    force = "--force" in sys.argv[1:]
    written = 0
    for name, (note, case) in CASES.items():
        target = HERE / f"{name}.json"
        if target.exists() and not force:
            continue
        record: dict[str, Any] = {"note": note}
        if isinstance(case, dict) and "config_text" in case:
            record["config_text"] = case["config_text"]
        else:
            record["config"] = case
        record["problems"] = problems_of(case)
        target.write_text(json.dumps(record, indent=1, ensure_ascii=True) + "\n", encoding="utf-8")
        written += 1
    print(f"{written} case(s) written, {len(CASES)} in all")


if __name__ == "__main__":
    main()
