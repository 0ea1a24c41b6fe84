"""Abuse from clients, over raw sockets: the proxy reaches only the configured upstream, answers with clear
Anthropic-shaped errors, never echoes or logs a token, and keeps serving everyone else.

Wrong tokens by the thousand, absolute-form and CONNECT requests, Host tricks, dot segments and
percent-encoded paths, line breaks in headers, oversized heads and bodies, ambiguous framing, slowloris
heads and bodies, idle keep-alive connections by the hundred, malformed JSON bodies. Timing: a token is
looked up by its SHA-256 digest and compared with hmac.compare_digest; the tests check that mechanism (no
raw token is ever compared), not wall-clock times.
"""

from __future__ import annotations

import contextlib
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs
from tests.support.constants import ALICE, BOB, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, request, service_config, wait_for, write_credentials
from tests.support.secrets_guard import find_leaks

COUNT_BODY = b'{"model":"claude-sonnet-4-6","messages":[{"role":"user","content":"hi"}]}'
MAX_BODY = 100_000


@pytest.fixture
def proxy(fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy], tmp_path: Path) -> Proxy:
    cfg = service_config(fake.url, creds, users=USERS, client_timeout="1s", max_request_body_size=MAX_BODY,
                         usages_path=str(tmp_path / "usage" / "usages.json"))
    return start_proxy({"log": {"level": "info"}, "services": [cfg]})


def exchange(port: int, data: bytes, timeout: float = 10.0) -> bytes:
    """Send raw bytes, read until the server closes (or `timeout`); a reset ends the read too."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):
            s.sendall(data)
        out = b""
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                out += chunk
    head, _, body = out.partition(b"\r\n\r\n")
    if re.match(rb"HTTP/1\.[01] [45]", head):
        procs.ERROR_BODIES.append((f"raw exchange with {port}", body))
    return out


def status_of(response: bytes) -> int:
    m = re.match(rb"HTTP/1\.[01] (\d{3}) ", response)
    assert m, response[:200]
    return int(m.group(1))


def error_of(response: bytes) -> dict[str, Any]:
    return json.loads(response.split(b"\r\n\r\n", 1)[1])["error"]


def post_raw(target: bytes = b"/v1/messages/count_tokens", headers: bytes = b"", body: bytes = COUNT_BODY,
             token: str = ALICE, method: bytes = b"POST") -> bytes:
    return (method + b" " + target + b" HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer " + token.encode() +
            b"\r\nContent-Type: application/json\r\n" + headers + b"Content-Length: " + str(len(body)).encode() +
            b"\r\nConnection: close\r\n\r\n" + body)


def v1_requests(fake: FakeUpstream) -> list[dict[str, Any]]:
    """What reached the upstream's API (the background quota poll aside)."""
    return [r for r in fake.requests() if r["route"].startswith("/v1/")]


def served(proxy: Proxy, token: str = ALICE) -> bool:
    r = request("POST", proxy.url + "/v1/messages/count_tokens", body=COUNT_BODY,
                headers={"Authorization": "Bearer " + token, "content-type": "application/json"})
    return r.status == 200


# ---------------------------------------------------------------------------------------- tokens


@pytest.mark.slow
def test_ten_thousand_wrong_tokens_are_401_never_echoed_and_others_still_served(proxy: Proxy,
                                                                                fake: FakeUpstream) -> None:
    # guesses that share ever longer prefixes with a real token, and random ones
    wrong = [ALICE[: i % len(ALICE)] + secrets.token_urlsafe(12) for i in range(10_000)]
    procs.remember_secrets(*wrong)
    per_conn = 500
    responses: list[bytes] = []

    def hammer(batch: list[str]) -> None:
        data = b"".join(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nx-api-key: " + t.encode() + b"\r\n\r\n"
                        for t in batch[:-1])
        data += b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + batch[-1].encode() + \
            b"\r\nConnection: close\r\n\r\n"
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
            s.sendall(data)
            out = b""
            while chunk := s.recv(1 << 20):
                out += chunk
        responses.append(out)

    threads = [threading.Thread(target=hammer, args=(wrong[i:i + per_conn],))
               for i in range(0, len(wrong), per_conn)]
    for t in threads:
        t.start()
    while any(t.is_alive() for t in threads):
        assert served(proxy, BOB)  # others are served meanwhile
        time.sleep(0.05)
    for t in threads:
        t.join(60)
    data = b"".join(responses)
    assert data.count(b"HTTP/1.1 401 ") == len(wrong) and b"HTTP/1.1 200" not in data
    assert data.count(b'"type":"authentication_error"') == len(wrong)
    assert served(proxy)
    assert "/v1/models" not in fake.stats()["requests_by_path"]  # no wrong token got through
    leaks = find_leaks(set(wrong), [("responses", data.decode()), ("proxy log", proxy.log())])
    assert leaks == []


# ----------------------------------------------------------------------------------- where it goes


def test_absolute_uri_connect_and_host_tricks_reach_only_the_upstream(proxy: Proxy, fake: FakeUpstream) -> None:
    listener_seen: list[bytes] = []
    with socket.create_server(("127.0.0.1", 0)) as trap:
        trap.settimeout(0.05)
        evil = f"127.0.0.1:{trap.getsockname()[1]}".encode()
        cases = [
            (b"POST http://" + evil + b"/v1/messages/count_tokens", b"", 404),  # absolute form
            (b"POST https://" + evil + b"/v1/messages/count_tokens", b"", 404),
            (b"CONNECT " + evil, b"", 404),
            (b"POST //" + evil + b"/v1/messages/count_tokens", b"", 404),
            (b"POST /v1/messages/count_tokens", b"Host: " + evil + b"\r\nX-Forwarded-Host: " + evil + b"\r\n", 200),
            (b"POST /v1/@" + evil + b"/x", b"", 404),  # userinfo trick: a path upstream, not a host
            (b"POST /v1//" + evil + b"/x", b"", 404),
            (b"POST /v1/messages/count_tokens?u=http://" + evil, b"", 200),
            (b"POST /v1/messages/count_tokens#@" + evil, b"", 200),
        ]
        for line, extra, expected in cases:
            method, _, target = line.partition(b" ")
            answer = exchange(proxy.port, post_raw(target, extra, method=method))
            assert status_of(answer) == expected, (line, answer[:300])
        with contextlib.suppress(OSError):
            conn, _ = trap.accept()
            listener_seen.append(conn.recv(100))
            conn.close()
    assert listener_seen == [], "the proxy connected to a host other than its upstream"
    upstream = v1_requests(fake)
    assert upstream and all(dict((k.lower(), v) for k, v in r["headers"])["host"] == f"127.0.0.1:{fake.port}"
                            for r in upstream)
    assert {r["route"] for r in upstream} == {"/v1/messages/count_tokens", f"/v1/@{evil.decode()}/x",
                                              f"/v1//{evil.decode()}/x"}
    assert served(proxy)


def test_dot_segments_and_encoded_paths(proxy: Proxy, fake: FakeUpstream) -> None:
    refused = [b"/v1/../v1/messages", b"/v1/./messages", b"/v1/%2e%2e/admin", b"/v1/%2E%2e/x", b"/v1/.%2e/x",
               b"/v1/messages%2f..%2f..%2fx", b"/v1/a\\b", b"/v1/%5c..%5cx", b"/v1/messages/..", b"/v1/x/%2e"]
    for target in refused:
        answer = exchange(proxy.port, post_raw(target))
        assert status_of(answer) == 400 and error_of(answer)["type"] == "invalid_request_error", target
    assert v1_requests(fake) == []
    # other encodings are forwarded exactly as the client wrote them
    passed = [b"/v1/messages/count_tokens?x=%2e%2e%2f", b"/v1/x%252e%252e/y", b"/v1/%00x",
              b"/v1/x%0d%0aX-Injected:%20yes"]
    for target in passed:
        exchange(proxy.port, post_raw(target))
    def hex_upper(path: str) -> str:  # urllib3 writes percent-encodings in upper case: the same URL (RFC 3986)
        return re.sub(r"%[0-9a-fA-F]{2}", lambda m: m.group().upper(), path)

    assert [r["path"] for r in v1_requests(fake)] == [hex_upper(t.decode()) for t in passed]
    log = proxy.log()
    assert not re.search(r"^X-Injected", log, re.M) and "x\\r\\nX-Injected: yes" in log  # escaped, one line
    assert served(proxy)


def test_line_breaks_in_headers_never_reach_the_upstream(proxy: Proxy, fake: FakeUpstream) -> None:
    cases = [
        b"X-Folded: first\r\n second part\r\n",  # obs-fold: one space instead
        b"X-Folded: first\r\n\tX-Injected: yes\r\n",
        b"X-Bare-Cr: a\rX-Second: b\r\n",
        b"X-Bare-Lf: a\nX-Third: c\r\n",
    ]
    for extra in cases:
        assert status_of(exchange(proxy.port, post_raw(headers=extra))) == 200, extra
    for record in v1_requests(fake):
        for name, value in record["headers"]:
            assert "\r" not in value and "\n" not in value and name == name.strip()
            assert name.lower() != "x-injected"
    folded = [v for r in v1_requests(fake) for k, v in r["headers"] if k == "x-folded"]
    assert folded == ["first second part", "first X-Injected: yes"]


def test_oversized_heads_bodies_and_ambiguous_framing(proxy: Proxy, fake: FakeUpstream) -> None:
    def head(extra: bytes, target: bytes = b"/v1/messages/count_tokens") -> int:
        return status_of(exchange(proxy.port, post_raw(target, extra)))

    assert status_of(exchange(proxy.port, b"GET /v1/" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n")) == 414
    big = exchange(proxy.port, post_raw(headers=b"X-Big: " + b"b" * 70_000 + b"\r\n"))
    assert status_of(big) == 431 and error_of(big)["type"] == "invalid_request_error"
    assert head(b"".join(b"X-Many-%d: %s\r\n" % (i, b"m" * 1000) for i in range(70))) == 431
    assert head(b"".join(b"X-H%d: v\r\n" % i for i in range(101))) == 431
    assert head(b"".join(b"X-Fine-%d: %s\r\n" % (i, b"f" * 1000) for i in range(30))) == 200  # 30 KB is fine
    # bodies: declared too large (answered before it is sent), chunked too large, exactly at the limit
    answer = exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                      ALICE.encode() + b"\r\nContent-Length: 1000000000000\r\n\r\n")
    assert status_of(answer) == 413 and error_of(answer)["type"] == "request_too_large"
    assert b"\r\nConnection: close\r\n" in answer  # not read, not waited for
    chunk = b"x" * 60_000
    answer = exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " +
                      ALICE.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n" +
                      (b"%x\r\n" % len(chunk) + chunk + b"\r\n") * 2 + b"0\r\n\r\n")
    assert status_of(answer) == 413
    assert status_of(exchange(proxy.port, post_raw(body=b" " * (MAX_BODY - 2) + b"{}"))) == 200
    assert v1_requests(fake)[-1]["body_length"] == MAX_BODY
    # framing a front proxy could read differently
    for extra in (b"Content-Length: 5\r\n", b"Transfer-Encoding: chunked\r\n", b"Transfer-Encoding: gzip\r\n",
                  b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"):
        answer = exchange(proxy.port, post_raw(headers=extra))
        assert status_of(answer) == 400 and error_of(answer)["message"] == "malformed HTTP request", extra
    for length in (b"abc", b"-1", b"1e3"):
        answer = exchange(proxy.port, b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: " + length +
                          b"\r\n\r\n{}")
        assert status_of(answer) == 400
    assert len(v1_requests(fake)) == 2  # the 30 KB head and the body at the limit
    assert served(proxy) and "Traceback" not in proxy.log()


def trickle(port: int, first: bytes, drip: bytes, every: float, budget: float) -> tuple[bytes, float]:
    """Send `first`, then `drip` every `every` seconds until the server answers or `budget` runs out."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=budget) as s:
        s.sendall(first)
        s.settimeout(every)
        answer = b""
        while time.monotonic() - start < budget:
            try:
                chunk = s.recv(65536)
            except TimeoutError:
                with contextlib.suppress(OSError):
                    s.sendall(drip)
                continue
            except OSError:
                break
            if not chunk:
                break
            answer += chunk
    return answer, time.monotonic() - start


def test_slowloris_heads_and_bodies_are_cut_at_client_timeout(proxy: Proxy) -> None:
    auth = b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
    cases = {
        "head, a byte at a time": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + auth + b"X-Slow: ", b"a"),
        "head, silent": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n", b""),
        "body, a byte at a time": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + auth +
                                   b"Content-Length: 1000\r\n\r\n{", b"a"),
        "body, silent": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + auth + b"Content-Length: 1000\r\n\r\n{", b""),
        "chunked body, a chunk at a time": (b"POST /v1/messages HTTP/1.1\r\nHost: x\r\n" + auth +
                                            b"Transfer-Encoding: chunked\r\n\r\n", b"1\r\na\r\n"),
    }
    results: dict[str, tuple[bytes, float]] = {}

    def run(name: str, first: bytes, drip: bytes) -> None:
        results[name] = trickle(proxy.port, first, drip, 0.2, 6.0)

    threads = [threading.Thread(target=run, args=(name, *case)) for name, case in cases.items()]
    for t in threads:
        t.start()
    assert served(proxy)  # meanwhile
    for t in threads:
        t.join(10)
    for name, (answer, took) in results.items():
        assert status_of(answer) == 408, (name, answer[:200])
        assert error_of(answer)["type"] == "invalid_request_error"
        assert took < 4.5, f"{name}: the connection was held for {took:.1f}s with client_timeout 1s"
    assert served(proxy) and "Traceback" not in proxy.log()


@pytest.mark.slow
def test_hundreds_of_idle_keep_alive_connections(proxy: Proxy) -> None:
    assert proxy.proc is not None
    procs.HTTP.clear()
    base = len(list(Path(f"/proc/{proxy.proc.pid}/fd").iterdir()))
    conns = []
    try:
        for i in range(400):
            s = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
            if i % 2:  # one request, then idle on keep-alive
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            conns.append(s)
        assert served(proxy) and served(proxy, BOB)  # others are not starved
        deadline = time.monotonic() + 8
        for s in conns:  # every one is closed by the proxy after client_timeout
            s.settimeout(max(0.1, deadline - time.monotonic()))
            data = b""
            while chunk := s.recv(65536):
                data += chunk
            assert data in (b"",) or data.startswith(b"HTTP/1.1 200 ")
    finally:
        for s in conns:
            s.close()
    procs.HTTP.clear()
    wait_for(lambda: len(list(Path(f"/proc/{proxy.proc.pid}/fd").iterdir())) <= base + 1, 5,
             what="the proxy's descriptors back to the baseline")
    assert served(proxy)


# ---------------------------------------------------------------------------------------- bodies


MALFORMED = [b"", b"{not json", b"[]", b"null", b'"a string"', b"[" * 100_000, b"\xff\xfe\x00garbage",
             b'{"model": 5, "messages": "x", "metadata": {"user_id": ["x"]}}',
             b'{"model": "claude-sonnet-4-6", "max_tokens": 1e999999, "messages": [{"role": 1}]}',
             b'{"model": "claude-sonnet-4-6", "messages": [], "stream": "yes"}',
             b'{"model": {"x": 1}, "messages": 7, "stream": true}', b'{"a": NaN, "b": Infinity}']


def test_malformed_json_bodies_are_forwarded_untouched(tmp_path: Path, fake: FakeUpstream, creds: Path,
                                                       start_proxy: Callable[..., Proxy]) -> None:
    other = write_credentials(tmp_path / "pooled" / ".credentials.json", "sk-ant-oat01-pooled-access-0",
                              "sk-ant-ort01-pooled-refresh-0")
    fake.add_account(access_token="sk-ant-oat01-pooled-access-0", refresh_token="sk-ant-ort01-pooled-refresh-0")
    single = service_config(fake.url, creds, tag="single", users=USERS,
                            usages_path=str(tmp_path / "single" / "usages.json"))
    pooled = service_config(fake.url, creds, tag="pooled", credentials=[
        {"tag": "a", "credential_path": str(creds), "usages_path": str(tmp_path / "a" / "usages.json")},
        {"tag": "b", "credential_path": str(other)},
        {"tag": "pool", "type": "balancer", "credentials": ["a", "b"]}],
        users=[{"name": "alice", "token": ALICE, "credential": "pool"}])
    del pooled["credential_path"]
    proxy = start_proxy({"log": {"level": "info"}, "services": [single, pooled]})
    sent = 0
    for tag in ("single", "pooled"):
        for target in (b"/v1/messages/count_tokens", b"/v1/messages"):
            for data in MALFORMED:
                answer = exchange(proxy.ports[tag], post_raw(target, body=data))
                assert b"\r\nrequest-id: req_fake_" in answer, (tag, data[:40], answer[:300])  # the upstream's answer
                sent += 1
                record = v1_requests(fake)[-1]
                assert record["body_length"] == len(data)
                assert record["body"].encode("utf-8", "replace")[:100] == data.decode("utf-8", "replace") \
                    .encode("utf-8", "replace")[:100]
    assert len(v1_requests(fake)) == sent
    log = proxy.log()
    assert "Traceback" not in log and "internal error" not in log
    assert len([line for line in log.splitlines() if "ccm_wsgi.access:" in line]) == sent
    # a weird but valid answer is counted; the service goes on as usual
    assert any("model={'x': 1}" in line for line in log.splitlines())
    assert served(proxy) and status_of(exchange(proxy.ports["pooled"], post_raw())) == 200
