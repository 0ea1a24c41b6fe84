"""Abuse and slow clients, against a real `ccm-wsgi serve`: what a scanner, a token holder or a web page
can do, and the listen and outbound settings that must really act.

Each test states a rule a user relies on: a TLS handshake cannot hold a socket, a body nobody reads is not
waited for, an open service on loopback does not serve web pages, a large request body is not decoded
whole, a compression bomb from an upstream is not expanded, one user cannot push the others' sessions
off their credential, and `reuse_addr`, TCP keep-alive and an outbound's `connect_timeout` do what the
configuration says.
"""

from __future__ import annotations

import hashlib
import http.server
import json
import re
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import brotli
import pytest
import trustme

from tests.support.constants import ALICE, BOB, MODEL, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import HTTP, Proxy, request, service_config, write_credentials


def messages_body(n: int = 1) -> bytes:
    return json.dumps({"model": MODEL, "max_tokens": 8,
                       "messages": [{"role": "user", "content": "hi"}] * n}).encode()


def recv_all(sock: socket.socket, limit: float = 20.0) -> tuple[bytes, bool]:
    """Everything the server sends until it closes (True) or `limit` seconds pass (False)."""
    sock.settimeout(limit)
    data = b""
    try:
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except TimeoutError:
        return data, False
    except ConnectionResetError:
        return data, True


def peak_rss_kib(proxy: Proxy) -> int:
    assert proxy.proc is not None
    status = Path(f"/proc/{proxy.proc.pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1))  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------------ TLS


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "chain.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    return str(tmp_path / "cert.pem"), str(tmp_path / "key.pem")


def test_a_tls_handshake_cannot_hold_a_socket_and_fails_in_one_line(
        fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy], tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    cfg = service_config(fake.url, creds, users=USERS, client_timeout="1s",
                         tls={"enabled": True, "certificate_path": cert, "key_path": key})
    proxy = start_proxy({"log": {"level": "info"}, "services": [cfg]})
    silent = socket.create_connection(("127.0.0.1", proxy.port))
    half = socket.create_connection(("127.0.0.1", proxy.port))
    half.sendall(b"\x16\x03\x01\x02\x00")  # the header of a ClientHello record, and nothing more
    for sock in (silent, half):
        _, closed = recv_all(sock)
        assert closed, "a client that never finishes its TLS handshake kept its socket"
        sock.close()
    for _ in range(5):  # plain HTTP on the TLS port: a failed handshake each
        with socket.create_connection(("127.0.0.1", proxy.port)) as plain:
            plain.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            recv_all(plain)
    log = proxy.log()
    assert "Traceback" not in log and "SSLError" not in log.replace("SSLError)", "")
    assert len(re.findall(r"INFO .*TLS handshake failed", log)) == 1  # the rate-limited summary
    context = ssl.create_default_context(cafile=None)
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", proxy.port)) as raw, context.wrap_socket(raw) as tls:
        tls.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
        assert recv_all(tls)[0].startswith(b"HTTP/1.1 200 ")  # and it still serves


# ------------------------------------------------------------------------------------------- bodies


@pytest.mark.parametrize("path, token", [("/v1/messages", "wrong-token-0123456789"), ("/nowhere", ALICE),
                                         ("/healthz", ALICE)])
def test_a_body_nobody_reads_is_not_waited_for(proxy: Proxy, path: str, token: str) -> None:
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{".encode())
        data, closed = recv_all(sock)
    assert data.split(b" ", 2)[1] in (b"401", b"404", b"200") and closed, data[:200]
    assert b"connection: close" in data.lower()


def test_a_trickled_chunked_body_is_cut_at_the_pace_of_client_timeout(
        fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    cfg = service_config(fake.url, creds, users=USERS, client_timeout="1s")
    proxy = start_proxy({"services": [cfg]})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                     "Transfer-Encoding: chunked\r\n\r\n".encode())
        answer = b""
        for _ in range(60):  # one byte every 0.3 s: always under the socket timeout, far behind the pace
            try:
                sock.sendall(b"1\r\n{\r\n")
            except OSError:
                break
            sock.settimeout(0.3)
            try:
                answer += sock.recv(65536)
            except TimeoutError:
                continue
            if answer:
                break
        rest, closed = recv_all(sock)
    # answered while the client was still sending: the pace, not the silence, ended the body
    assert answer.startswith(b"HTTP/1.1 408 ") and closed, answer + rest
    assert fake.requests(path="/v1/messages") == []


def test_a_large_request_body_is_not_decoded_whole(tmp_path: Path, fake: FakeUpstream, creds: Path,
                                                   start_proxy: Callable[..., Proxy]) -> None:
    usages = tmp_path / "usages.json"
    proxy = start_proxy({"services": [service_config(fake.url, creds, users=USERS, usages_path=str(usages))]})
    n = 800_000
    body = messages_body(n)  # about 24 MiB of tiny messages: decoded whole it would take ~24 times that
    assert request("GET", proxy.url + "/healthz").status == 200
    before = peak_rss_kib(proxy)
    r = request("POST", proxy.url + "/v1/messages", body=body,
                headers={"Authorization": "Bearer " + ALICE, "content-type": "application/json"})
    assert r.status == 200
    grown = (peak_rss_kib(proxy) - before) * 1024
    assert grown < 4 * len(body), f"the proxy grew by {grown >> 20} MiB for a {len(body) >> 20} MiB body"
    proxy.stop()
    combos = json.loads(usages.read_text())["combinations"]
    assert combos[0]["total"]["messages_count"] == n  # counted exactly without decoding


# ------------------------------------------------------------------------------------ compression bomb


class BombServer(http.server.ThreadingHTTPServer):
    """An upstream (a misbehaving peer) that answers every POST with a brotli bomb: 2 GiB of zeros."""

    def __init__(self) -> None:
        compressor = brotli.Compressor(quality=1)
        parts = [b'{"model":"x","usage":{"input_tokens":1,"output_tokens":1},"pad":"']
        zeros = b"0" * (1 << 20)
        parts += [compressor.process(p) for p in [parts.pop()]]
        parts += [compressor.process(zeros) for _ in range(2048)]
        parts.append(compressor.finish())
        self.bomb = b"".join(parts)
        super().__init__(("127.0.0.1", 0), self.Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length", "0")))
            bomb = self.server.bomb  # type: ignore[attr-defined]
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Encoding", "br")
            self.send_header("Content-Length", str(len(bomb)))
            self.end_headers()
            self.wfile.write(bomb)

        def log_message(self, *args: Any) -> None:
            pass


def test_a_compression_bomb_is_relayed_untouched_and_not_expanded(tmp_path: Path, creds: Path,
                                                                  start_proxy: Callable[..., Proxy]) -> None:
    bomb = BombServer()
    try:
        upstream = f"http://127.0.0.1:{bomb.server_address[1]}"
        cfg = service_config(upstream, creds, users=USERS, usages_path=str(tmp_path / "usages.json"))
        proxy = start_proxy({"services": [cfg]})
        assert request("GET", proxy.url + "/healthz").status == 200
        before = peak_rss_kib(proxy)
        r = request("POST", proxy.url + "/v1/messages", body=messages_body(),
                    headers={"Authorization": "Bearer " + ALICE, "Accept-Encoding": "br"}, decode_content=False)
        assert r.status == 200
        assert hashlib.sha256(r.data).digest() == hashlib.sha256(bomb.bomb).digest()
        grown = (peak_rss_kib(proxy) - before) << 10
        assert grown < 256 << 20, f"the proxy grew by {grown >> 20} MiB decoding a bomb"
        assert request("GET", proxy.url + "/healthz").status == 200
    finally:
        bomb.shutdown()


# ------------------------------------------------------------------------------------ open services


def test_an_open_service_does_not_serve_web_pages(fake: FakeUpstream, creds: Path,
                                                  start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy({"services": [service_config(fake.url, creds)]})  # no users: open
    port = proxy.port

    def ask(**headers: str) -> int:
        return request("POST", proxy.url + "/v1/messages", body=messages_body(), headers=headers).status

    assert ask(Host=f"attacker.example:{port}") == 403  # DNS rebinding: the page's own name
    assert ask(Host=f"127.0.0.1:{port}", Origin="http://attacker.example") == 403
    assert ask(Host=f"127.0.0.1:{port}", **{"Sec-Fetch-Site": "cross-site"}) == 403
    assert request("GET", proxy.url + "/ccm/v1/status", headers={"Host": "attacker.example"}).status == 403
    assert ask(Host=f"127.0.0.1:{port}") == 200
    assert ask(Host=f"localhost:{port}") == 200
    assert ask(Host=f"[::1]:{port}") == 200
    assert len(fake.requests(path="/v1/messages")) == 3


def test_a_service_with_users_serves_any_host(proxy: Proxy, fake: FakeUpstream) -> None:
    r = request("POST", proxy.url + "/v1/messages", body=messages_body(),
                headers={"Host": "ccm.example.org", "Authorization": "Bearer " + ALICE})
    assert r.status == 200


# ----------------------------------------------------------------------------------- sticky sessions


@pytest.mark.slow
def test_one_user_cannot_push_the_others_sessions_off_their_credential(
        tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    credentials = []
    for name in ("one", "two"):
        access, refresh = f"sk-ant-oat01-{name}-aaaaaaaaaaaaaaaa", f"sk-ant-ort01-{name}-bbbbbbbbbbbbbbbb"
        fake.add_account(access_token=access, refresh_token=refresh, account=name, expires_in=3600)
        path = write_credentials(tmp_path / name / ".credentials.json", access, refresh)
        credentials.append({"tag": name, "credential_path": str(path)})
    credentials.append({"tag": "pool", "type": "balancer", "strategy": "round_robin", "credentials": ["one", "two"]})
    users = [{"name": "alice", "token": ALICE, "credential": "pool"},
             {"name": "bob", "token": BOB, "credential": "pool"}]
    cfg = {"type": "ccm", "tag": "ccm", "listen": "127.0.0.1", "listen_port": 0, "upstream_url": fake.url,
           "token_url": fake.url + "/v1/oauth/token", "credentials": credentials, "users": users}
    proxy = start_proxy({"services": [cfg]})

    def served(token: str, session: str) -> str:
        r = request("POST", proxy.url + "/v1/messages/count_tokens", body=messages_body(),
                    headers={"Authorization": "Bearer " + token, "X-Claude-Code-Session-Id": session})
        assert r.status == 200
        return str(r.headers["x-fake-account"])

    pinned = served(ALICE, "alice-conversation")
    for n in range(10_050):  # more made-up sessions than the whole table holds
        served(BOB, f"junk-{n}")
    assert all(served(ALICE, "alice-conversation") == pinned for _ in range(4))


# ------------------------------------------------------------------------------------ listen fields


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_reuse_addr_lets_a_second_process_listen_on_the_same_port(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    port = free_port()
    shared = service_config(fake.url, creds, users=USERS, listen_port=port, reuse_addr=True)
    first = start_proxy({"services": [shared]}, name="first")
    second = start_proxy({"services": [shared]}, name="second")
    assert first.port == second.port == port
    assert request("GET", f"http://127.0.0.1:{port}/healthz").status == 200
    other = free_port()
    plain = service_config(fake.url, creds, users=USERS, listen_port=other)
    start_proxy({"services": [plain]}, name="third")
    with pytest.raises(RuntimeError, match="exited"):
        start_proxy({"services": [plain]}, name="fourth")


def keepalive_timers(port: int) -> list[str]:
    out = subprocess.run(["ss", "-tnoH", "state", "established", f"( sport = :{port} )"],
                         capture_output=True, text=True, check=True).stdout
    return re.findall(r"timer:\((keepalive,[^)]*)\)", out)


@pytest.mark.parametrize("fields, expect",
                         [({}, 5), ({"tcp_keep_alive": "7m"}, 7), ({"disable_tcp_keep_alive": True}, None)])
def test_tcp_keep_alive_is_set_on_client_connections(fake: FakeUpstream, creds: Path,
                                                     start_proxy: Callable[..., Proxy], fields: dict[str, Any],
                                                     expect: int | None) -> None:
    proxy = start_proxy({"services": [service_config(fake.url, creds, users=USERS, **fields)]})
    with socket.create_connection(("127.0.0.1", proxy.port)) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        sock.settimeout(10)
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
        timers = keepalive_timers(proxy.port)
    if expect is None:
        assert timers == []
    else:  # the first probe is due after the configured idle time: "keepalive,4min59sec,0" or "keepalive,5min,0"
        assert len(timers) == 1, timers
        minutes = int(re.match(r"keepalive,(\d+)min", timers[0]).group(1))  # type: ignore[union-attr]
        assert expect - 1 <= minutes <= expect, timers


# -------------------------------------------------------------------------------------- outbounds


@pytest.fixture
def blackhole() -> Iterator[int]:
    """A port whose accept queue is full: a SYN to it is dropped, so a connect hangs until its timeout."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(8):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        fillers.append(s)
    time.sleep(0.2)
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        probe.connect(("127.0.0.1", port))
        pytest.fail("the accept queue did not fill up")
    except TimeoutError:
        pass
    finally:
        probe.close()
    yield port
    for s in fillers:
        s.close()
    listener.close()


def test_an_outbound_connect_timeout_applies_to_v1_requests(creds: Path, start_proxy: Callable[..., Proxy],
                                                            blackhole: int) -> None:
    cfg = service_config(f"http://127.0.0.1:{blackhole}", creds, users=USERS, connect_timeout="10m",
                         detour="quick")
    proxy = start_proxy({"outbounds": [{"type": "direct", "tag": "quick", "connect_timeout": "1s"}],
                         "services": [cfg]})
    r = request("POST", proxy.url + "/v1/messages", body=messages_body(),
                headers={"Authorization": "Bearer " + ALICE})  # the test client gives up after 30 s
    assert r.status == 504 and b"did not connect in time" in r.data


# ------------------------------------------------------------------------------------------ quota


def test_the_reset_a_quota_429_names_is_the_one_the_client_gets(tmp_path: Path, fake: FakeUpstream,
                                                                start_proxy: Callable[..., Proxy]) -> None:
    access, refresh = "sk-ant-oat01-pooled-aaaaaaaaaaaaaa", "sk-ant-ort01-pooled-bbbbbbbbbbbbbb"
    fake.add_account(access_token=access, refresh_token=refresh, account="pooled", expires_in=3600)
    path = write_credentials(tmp_path / "p" / ".credentials.json", access, refresh)
    cfg = {"type": "ccm", "tag": "ccm", "listen": "127.0.0.1", "listen_port": 0, "upstream_url": fake.url,
           "token_url": fake.url + "/v1/oauth/token", "credentials": [{"tag": "p", "credential_path": str(path)}],
           "users": [{"name": "alice", "token": ALICE, "credential": "p"}]}
    proxy = start_proxy({"services": [cfg]})
    now = int(time.time())
    prefix = "anthropic-ratelimit-unified-"
    earlier = {prefix + "5h-utilization": "0.5", prefix + "5h-reset": str(now + 3 * 3600)}

    def ask(**knobs: str) -> Any:
        headers = {"Authorization": "Bearer " + ALICE, **{"x-fake-" + k: v for k, v in knobs.items()}}
        return request("POST", proxy.url + "/v1/messages", body=messages_body(), headers=headers)

    assert ask(ratelimit=json.dumps(earlier)).status == 200
    refused = {prefix + "status": "rejected", prefix + "5h-status": "rejected", prefix + "5h-utilization": "1.0",
               prefix + "5h-reset": str(now + 600), prefix + "representative-claim": "five_hour"}
    r = ask(status="429", ratelimit=json.dumps(refused))
    assert r.status == 429
    assert 500 <= int(r.headers["retry-after"]) <= 700, r.headers["retry-after"]
    HTTP.clear()
