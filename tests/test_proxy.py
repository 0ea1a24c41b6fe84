"""The foundation end to end: a real `ccm-wsgi serve`, the fake upstream, the anthropic SDK."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import anthropic
import pytest

from tests.support.clients import ask, client, first_delta_only, messages_body, post_messages, stream_events
from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH
from tests.support.procs import request, service_config, wait_for, write_credentials
from tests.support.system import immutable, require, unavailable


def last_request(fake, path="/v1/messages"):
    return [r for r in fake.requests() if r["path"].split("?")[0] == path][-1]


def header(req, name):
    values = [v for k, v in req["headers"] if k.lower() == name]
    return values[0] if values else None


def test_healthz_and_404s(proxy):
    r = request("GET", proxy.url + "/healthz")
    assert r.status == 200 and json.loads(r.data) == {"status": "ok"}
    for method, path in [("GET", "/"), ("HEAD", "/"), ("GET", "/v1"), ("POST", "/api/oauth/token"), ("GET", "/x")]:
        r = request(method, proxy.url + path)
        assert r.status == 404, (method, path)
        if method != "HEAD":
            assert json.loads(r.data) == {"type": "error", "error": {"type": "not_found_error", "message": "Not found"}}


def test_non_streaming_with_auth_token(proxy, fake):
    message = ask(proxy)
    assert message.content[0].text
    sent = last_request(fake)
    assert header(sent, "authorization") == "Bearer " + ACCESS
    assert header(sent, "x-api-key") is None
    assert header(sent, "anthropic-beta").split(",")[0] == "oauth-2025-04-20"


def test_streaming_with_sdk_api_key_and_query_kept(proxy, fake):
    """The SDK's `api_key=` (which anthropic 2.x sends as a Bearer token, like `auth_token=`; the raw `x-api-key`
    header is tested below), a query string and the client's own beta flags."""
    c = client(proxy, BOB, api_key=True)
    with c.messages.stream(model=MODEL, max_tokens=64, messages=[{"role": "user", "content": "hi"}],
                           extra_query={"beta": "true"},
                           extra_headers={"anthropic-beta": "context-1m-2025-08-07"}) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text and final.usage.output_tokens > 0
    sent = last_request(fake)
    assert sent["path"] == "/v1/messages?beta=true"
    assert header(sent, "authorization") == "Bearer " + ACCESS
    assert header(sent, "x-api-key") is None
    assert header(sent, "anthropic-beta") == "oauth-2025-04-20,context-1m-2025-08-07"


def test_x_api_key_alone_authenticates_and_never_goes_upstream(proxy, fake):
    """A client that authenticates only with `x-api-key` (as an API-key client does): the user's token is
    ccm-wsgi's, the upstream gets the subscription's OAuth bearer and the oauth beta flag, and never the header."""
    r = post_messages(proxy, token=None, headers={"x-api-key": BOB})
    assert r.status == 200 and r.json()["type"] == "message"
    sent = last_request(fake)
    assert {k.lower() for k, _ in sent["headers"]}.isdisjoint({"x-api-key", "api-key"})
    assert not [k for k, v in sent["headers"] if BOB in v], "the user's token went upstream"
    assert header(sent, "authorization") == "Bearer " + ACCESS
    assert header(sent, "anthropic-beta") == "oauth-2025-04-20"
    assert any(" bob POST /v1/messages 200 " in line for line in proxy.access_lines())


def test_count_tokens(proxy):
    count = client(proxy).messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hello"}])
    assert count.input_tokens > 0


def test_auth_failures_are_401_and_never_echo_the_token(proxy):
    wrong = "ak-ccm-wrong-token-zzzzzzzzzz"
    with pytest.raises(anthropic.AuthenticationError) as err:
        ask(proxy, wrong)
    assert err.value.status_code == 401
    assert err.value.body["error"]["type"] == "authentication_error"
    assert wrong not in json.dumps(err.value.body)
    r = request("POST", proxy.url + "/v1/messages", body=b"{}")
    assert r.status == 401 and json.loads(r.data)["error"]["type"] == "authentication_error"
    r = request("POST", proxy.url + "/v1/messages", body=b"{}", headers={"Authorization": "Basic " + wrong})
    assert r.status == 401
    # lower-case scheme and extra spaces are accepted (RFC 7235)
    r = request("POST", proxy.url + "/v1/messages/count_tokens", body=b'{"model":"m","messages":[]}',
                headers={"Authorization": "bearer   " + ALICE, "content-type": "application/json"})
    assert r.status == 200
    assert wrong not in proxy.log()


def test_headers_rules(fake, creds, start_proxy):
    cfg = service_config(fake.url, creds, headers={"x-team": "blue", "User-Agent": ["ccm-test"]})
    proxy = start_proxy({"services": [cfg]})
    r = request("POST", proxy.url + "/v1/messages", body=json.dumps(
        {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode(), headers={
        "Content-Type": "application/json", "Authorization": "Bearer whatever", "X-Api-Key": "k",
        "Connection": "keep-alive, x-secret-hop", "X-Secret-Hop": "1", "Keep-Alive": "timeout=5",
        "User-Agent": "claude-cli/2.1", "anthropic-version": "2023-06-01", "Proxy-Authorization": "Basic x",
        "anthropic-beta": "oauth-2025-04-20, fine-grained-tool-streaming-2025-05-14",
    })
    assert r.status == 200
    # end-to-end response headers pass back
    assert r.headers["request-id"].startswith("req_")
    assert "anthropic-ratelimit-unified-5h-utilization" in r.headers
    sent = last_request(fake)
    names = {k.lower() for k, _ in sent["headers"]}
    assert {"x-api-key", "x-secret-hop", "keep-alive", "proxy-authorization"}.isdisjoint(names)
    assert header(sent, "x-team") == "blue"
    assert header(sent, "user-agent") == "ccm-test"
    assert header(sent, "anthropic-version") == "2023-06-01"
    assert header(sent, "anthropic-beta") == "oauth-2025-04-20,fine-grained-tool-streaming-2025-05-14"
    assert header(sent, "host") == f"127.0.0.1:{fake.port}"


@pytest.mark.parametrize("framing", ["chunked", "close"])
def test_event_reaches_client_before_upstream_sends_the_next(proxy, fake, framing):
    """The first delta is read by the client while the upstream has sent exactly that one and holds the rest
    (a relay that buffers fails: the fake fails the stream when nobody releases it), chunked or close-delimited."""
    key = "k-" + framing
    events = stream_events(proxy, key, {"x-fake-framing": framing}, on_first_delta=lambda: first_delta_only(fake, key))
    assert events.count("content_block_delta") == 3 and events[-1] == "message_stop"


def test_large_json_body_reaches_client_before_upstream_sends_the_rest(proxy, fake):
    """A Content-Length answer over 1 MB is relayed as it arrives: the client reads its first part while the
    upstream still holds the rest."""
    r = request("POST", proxy.url + "/v1/messages", body=messages_body(), preload_content=False, headers={
        "Authorization": "Bearer " + ALICE, "content-type": "application/json", "x-fake-bytes": "2000000",
        "x-fake-wait-release": "big"})
    assert r.status == 200
    total = int(r.headers["content-length"])
    first = r.read(64 * 1024)
    held = fake.sent_info("big")
    assert len(first) == 64 * 1024 and held["waiting"] and held["bytes"] < total, held
    fake.release("big")
    rest = r.read()
    assert len(first) + len(rest) == total > 1_000_000
    assert json.loads(first + rest)["usage"]["output_tokens"] == 5


def test_client_disconnect_closes_upstream(proxy, fake):
    body = json.dumps({"model": MODEL, "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() +
                 b"\r\nContent-Type: application/json\r\nx-fake-events: 200\r\nx-fake-delay-ms: 50\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    for _ in range(50):
        received += sock.recv(65536)
        if b"message_start" in received:
            break
    assert b"message_start" in received
    sock.close()
    wait_for(lambda: fake.stats()["closed_early"] >= 1, 10, what="upstream to see the closed stream")
    wait_for(lambda: fake.stats()["active_streams"] == 0, 10, what="no stream left open upstream")


def test_upstream_status_passes_through(proxy):
    with pytest.raises(anthropic.APIStatusError) as err:
        ask(proxy, headers={"x-fake-status": "529", "x-fake-retry-after": "7"})
    assert err.value.status_code == 529
    assert err.value.response.headers["retry-after"] == "7"
    assert err.value.body["error"]["type"] == "overloaded_error"


def test_mid_stream_drop_ends_with_sse_error(proxy):
    r = request("POST", proxy.url + "/v1/messages", preload_content=False, body=json.dumps(
        {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode(),
        headers={"Authorization": "Bearer " + ALICE, "x-fake-drop-after": "2", "content-type": "application/json"})
    data = r.read()
    assert r.status == 200
    assert data.count(b"event: content_block_delta") == 2
    assert data.rstrip().split(b"\n\n")[-1].startswith(b"event: error\ndata: {\"type\":\"error\"")


def test_idle_stream_and_stall_before_headers(fake, creds, start_proxy):
    cfg = service_config(fake.url, creds, stream_idle_timeout="1s", response_timeout="1s")
    proxy = start_proxy({"services": [cfg]})
    body = json.dumps({"model": MODEL, "max_tokens": 5, "stream": True,
                       "messages": [{"role": "user", "content": "x"}]}).encode()
    r = request("POST", proxy.url + "/v1/messages", body=body, headers={"x-fake-stall-after": "1"})
    assert r.status == 200
    last = r.data.rstrip().split(b"\n\n")[-1]
    assert last.startswith(b"event: error") and b"api_error" in last
    r = request("POST", proxy.url + "/v1/messages", body=body, headers={"x-fake-stall-before-headers": "1"})
    assert r.status == 504 and json.loads(r.data)["type"] == "error"
    wait_for(lambda: fake.stats()["active_streams"] == 0, 10, what="stalled streams closed upstream")


def test_connect_failure_is_502(creds, start_proxy):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    proxy = start_proxy({"services": [service_config(f"http://127.0.0.1:{dead}", creds)]})
    r = request("POST", proxy.url + "/v1/messages", body=b"{}")
    assert r.status == 502
    assert json.loads(r.data)["error"]["type"] == "api_error"


def test_body_limit_413(fake, creds, start_proxy):
    proxy = start_proxy({"services": [service_config(fake.url, creds, max_request_body_size=1000)]})
    r = request("POST", proxy.url + "/v1/messages", body=b"x" * 2000)
    assert r.status == 413 and json.loads(r.data)["error"]["type"] == "request_too_large"
    r = request("POST", proxy.url + "/v1/messages/count_tokens", body=b'{"model":"m","messages":[]}')
    assert r.status == 200


def test_refresh_when_expiring_keeps_other_keys(tmp_path, fake, start_proxy):
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=30)
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=30,
                             mcpOAuth={"server": {"accessToken": "mcp-keep-me"}})
    proxy = start_proxy({"services": [service_config(fake.url, path)]})
    ask(proxy)
    ask(proxy)
    assert fake.stats()["refreshes"] == 1
    document = json.loads(path.read_text())
    assert document["mcpOAuth"] == {"server": {"accessToken": "mcp-keep-me"}}
    oauth = document["claudeAiOauth"]
    assert oauth["accessToken"] != ACCESS and oauth["refreshToken"] != REFRESH
    assert oauth["expiresAt"] > (time.time() + 600) * 1000
    assert oauth["scopes"] == ["user:inference", "user:profile"] and oauth["subscriptionType"] == "max"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert header(last_request(fake), "authorization") == "Bearer " + oauth["accessToken"]
    token_call = last_request(fake, "/v1/oauth/token")
    assert token_call["path"] == "/v1/oauth/token"
    for secret in (ACCESS, REFRESH, oauth["accessToken"], oauth["refreshToken"]):
        assert secret not in proxy.log()


def inside_refresh_lock(proxy, lock: Path) -> bool:
    """The process has the credential's lock file open: it is inside a refresh, holding or waiting for the lock."""
    for fd in Path(f"/proc/{proxy.proc.pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # a descriptor closed while we look
            if os.readlink(fd) == str(lock):
                return True
    return False


@pytest.mark.parametrize("claude_lock", [True, False], ids=["both-locks", "flock-alone"])
def test_two_processes_refresh_once(tmp_path, fake, start_proxy, claude_lock):
    """Two processes need the same refresh at the same moment: the token endpoint holds the first one's request
    until the second is inside its refresh too (waiting for the lock the first holds, or, were there no lock,
    at the token endpoint as well). Only one refresh token is ever spent. The second process makes one request:
    another request of its own arriving after the first process saved would read the new file anyway, and hide
    a second process that does not re-read the file once it holds the lock. Without Claude Code's lock (its
    directory cannot be created: the home directory is immutable), ccm-wsgi's own flock alone must do it."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=30)
    home = tmp_path / "home"
    path = write_credentials(home / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=30)
    # Set before the processes start: a process's quota poller asks for a token (and so refreshes it) a second
    # after it starts; had that refresh gone through, the second process would find the new login in the file.
    fake.configure(token_endpoint={"hold": "refresh"})
    with contextlib.nullcontext() if claude_lock else immutable(home):
        proxies = [start_proxy({"services": [service_config(fake.url, path)]}, name=f"p{i}") for i in range(2)]
        refresh_once(fake, path, proxies)
    if not claude_lock:
        assert "under ccm-wsgi's own lock only" in proxies[0].log()


def refresh_once(fake, path, proxies):
    """Four requests through the first process and one through the second, all needing the same refresh, which
    the token endpoint holds until the second process is inside its refresh too."""
    errors = []

    def hit(p):
        try:
            ask(p)
        except Exception as exc:
            errors.append(exc)

    def token_posts():
        return len(fake.requests(path="/v1/oauth/token"))

    threads = [threading.Thread(target=hit, args=(p,)) for p in [proxies[0]] * 4 + [proxies[1]]]
    for t in threads[:4]:
        t.start()
    wait_for(lambda: token_posts() == 1, 10, what="the first process's refresh at the token endpoint")
    threads[4].start()
    lock = Path(str(path) + ".lock")
    wait_for(lambda: inside_refresh_lock(proxies[1], lock) or token_posts() > 1, 10,
             what="the second process inside its refresh")
    fake.release("refresh")
    for t in threads:
        t.join(30)
    assert not errors
    stats = fake.stats()
    assert token_posts() == 1 and stats["refreshes"] == 1 and stats["invalid_grant"] == 0, stats


def test_upstream_401_renews_and_retries_once(proxy, fake):
    fake.revoke(ACCESS)
    message = ask(proxy)
    assert message.content
    assert fake.stats()["refreshes"] == 1


def test_invalid_grant_says_login_must_be_renewed(tmp_path, fake, start_proxy):
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, "spent-refresh-token", expires_in=-10)
    proxy = start_proxy({"services": [service_config(fake.url, path)]})
    r = request("POST", proxy.url + "/v1/messages", body=b"{}")
    assert r.status == 503
    message = json.loads(r.data)["error"]["message"]
    assert "must be renewed" in message and "invalid_grant" in message
    assert "invalid_grant" in proxy.log() and "spent-refresh-token" not in proxy.log()


def test_missing_credentials_then_created(tmp_path, fake, start_proxy):
    path = tmp_path / "later" / ".credentials.json"
    proxy = start_proxy({"services": [service_config(fake.url, path)]})
    r = request("POST", proxy.url + "/v1/messages", body=b"{}")
    assert r.status == 503
    assert str(path) in json.loads(r.data)["error"]["message"]
    path.parent.mkdir()
    path.write_text("{not json")
    r = request("POST", proxy.url + "/v1/messages", body=b"{}")
    assert r.status == 503 and "invalid JSON" in json.loads(r.data)["error"]["message"]
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    write_credentials(path, ACCESS, REFRESH)
    assert ask(proxy).content


def test_access_log_line(proxy):
    ask(proxy)
    bob = client(proxy, BOB)
    with bob.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
        s.until_done()
    log = proxy.log()
    assert any(" alice POST /v1/messages 200 " in line and " whole" in line for line in log.splitlines())
    assert any(" bob POST /v1/messages 200 " in line and " stream" in line for line in log.splitlines())
    for secret in (ALICE, BOB, ACCESS, REFRESH):
        assert secret not in log


def test_graceful_shutdown_lets_streams_finish(proxy):
    r = request("POST", proxy.url + "/v1/messages", preload_content=False, body=json.dumps(
        {"model": MODEL, "max_tokens": 5, "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode(),
        headers={"Authorization": "Bearer " + ALICE, "x-fake-events": "20", "x-fake-delay-ms": "50"})
    first = r.read1(65536) if hasattr(r, "read1") else r.read(10)
    assert first
    proxy.signal(15)
    rest = r.read()
    assert b"message_stop" in first + rest
    assert proxy.wait(30) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2)


def test_two_services_two_listeners(fake, creds, start_proxy):
    a = service_config(fake.url, creds, tag="a", users=[{"name": "alice", "token": ALICE}])
    b = service_config(fake.url, creds, tag="b", users=[{"name": "bob", "token": BOB}])
    proxy = start_proxy({"services": [a, b]})
    assert set(proxy.ports) == {"a", "b"}
    for tag, token in (("a", ALICE), ("b", BOB)):
        url = f"http://127.0.0.1:{proxy.ports[tag]}"
        assert request("GET", url + "/healthz").status == 200
        r = request("POST", url + "/v1/messages/count_tokens", body=b'{"model":"m","messages":[]}',
                    headers={"Authorization": "Bearer " + token})
        assert r.status == 200
    r = request("POST", f"http://127.0.0.1:{proxy.ports['a']}/v1/messages/count_tokens", body=b"{}",
                headers={"Authorization": "Bearer " + BOB})
    assert r.status == 401


def test_open_service_warns_when_not_loopback(fake, creds, start_proxy):
    """A service with no users on an address others can reach says so. It listens on 192.0.2.1 (TEST-NET-1)
    inside a network namespace of its own, where the address may be bound without belonging to an interface:
    nothing can reach it there, and no test listens on all interfaces."""
    unshare = require("unshare", "util-linux")
    probe = subprocess.run([unshare, "--net", "true"], capture_output=True, text=True)
    if probe.returncode:
        unavailable(f"cannot make a network namespace here (root needed): {probe.stderr.strip()}")
    private = (unshare, "--net", "sh", "-c", 'echo 1 > /proc/sys/net/ipv4/ip_nonlocal_bind && exec "$@"', "sh")
    proxy = start_proxy({"services": [service_config(fake.url, creds, listen="192.0.2.1")]}, wrapper=private)
    assert "listening on http://192.0.2.1:" in proxy.log()
    assert "service ccm listens on 192.0.2.1 with no users: anyone who can reach it uses the subscription" \
        in proxy.log()
    loopback = start_proxy({"services": [service_config(fake.url, creds)]}, name="loopback")
    assert request("GET", loopback.url + "/healthz").status == 200 and "with no users" not in loopback.log()


def test_token_command():
    out = subprocess.run([sys.executable, "-m", "ccm_wsgi", "token"], capture_output=True, text=True, check=True)
    token = out.stdout.strip()
    assert len(token) >= 40 and all(c.isalnum() or c in "-_." for c in token)
    # shaped as a gateway JWT so that Claude Code shows its usage notices; the secret part is 256 bits
    _, payload, secret = token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    assert claims["aud"] == "claude-gateway" and len(base64.urlsafe_b64decode(secret + "=")) == 32
    again = subprocess.run([sys.executable, "-m", "ccm_wsgi", "token"], capture_output=True, text=True, check=True)
    assert again.stdout.strip() != token


def test_client_disconnect_mid_json_closes_the_upstream_connection(proxy, fake):
    # the proxy's first quota poll comes shortly after start, the next one minutes later: wait for it, so that
    # no other request to the upstream host takes (and so discards) a half-read connection parked in the pool
    wait_for(lambda: fake.requests(path="/api/oauth/usage"), 15, what="the first quota poll")
    body = json.dumps({"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "x"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall(b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer " + ALICE.encode() +
                 b"\r\nContent-Type: application/json\r\nx-fake-bytes: 8000000\r\nx-fake-wait-release: big2\r\n"
                 b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while b"\r\n\r\n" not in received or len(received) < 32 * 1024:
        received += sock.recv(65536)
    assert received.startswith(b"HTTP/1.1 200 ")
    wait_for(lambda: fake.sent_info("big2")["waiting"], 10, what="the upstream to hold the rest of the body")
    sock.close()  # the client is gone; the upstream still has almost all of the 8 MB to send
    fake.release("big2")
    # the proxy notices at its next write to the client and must then close the upstream connection: the fake
    # sees its writes fail. Released to the pool instead, the connection stays open and swallows the body.
    wait_for(lambda: fake.stats()["closed_early"] >= 1, 20, what="the upstream to see its connection closed")
