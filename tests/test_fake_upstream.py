"""Self-tests of the fake Anthropic upstream, talking to it directly over real sockets."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import anthropic
import pytest
import trustme
import urllib3

from tests.support.constants import MODEL
from tests.support.fake_upstream import FakeUpstream

HELLO = [{"role": "user", "content": "hello"}]
STREAM_BODY = json.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": HELLO}).encode()
JSON_BODY = json.dumps({"model": MODEL, "max_tokens": 16, "messages": HELLO}).encode()
HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=10))


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    fake = FakeUpstream.start(tmp_path_factory.mktemp("fake"))
    try:
        yield fake
    finally:
        assert fake.stop() == 0, fake.log()


@pytest.fixture
def fake(shared: FakeUpstream) -> FakeUpstream:
    shared.reset(accounts=True, config=True)
    return shared


OAUTH = {"anthropic-beta": "oauth-2025-04-20"}  # what every OAuth bearer request needs, as with Anthropic


def sdk(fake: FakeUpstream, token: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=fake.url, auth_token=token, max_retries=0, timeout=10, default_headers=OAUTH)


def post(fake: FakeUpstream, path: str, body: bytes, headers: dict[str, str] | None = None,
         **kw: object) -> urllib3.BaseHTTPResponse:
    all_headers = {"authorization": "Bearer tok", "content-type": "application/json", **OAUTH, **(headers or {})}
    return HTTP.request("POST", fake.url + path, body=body, headers=all_headers, **kw)


def read_until(chunks: Iterator[bytes], marker: bytes) -> bytes:
    """Consume `chunks` (one read_chunked() iterator: abandoning it closes the connection) up to `marker`."""
    data = b""
    for chunk in chunks:
        data += chunk
        if marker in data:
            return data
    raise AssertionError(f"{marker!r} never arrived; got {data!r}")


def test_sdk_non_streaming(fake: FakeUpstream) -> None:
    fake.add_account("tok-a", "ref-a", account="acct-a", five_hour_utilization=0.42)
    raw = sdk(fake, "tok-a").messages.with_raw_response.create(
        model=MODEL, max_tokens=16, messages=HELLO,
        extra_headers={"x-fake-input-tokens": "42", "x-fake-cache-read-tokens": "7", "x-fake-cache-1h-tokens": "3"})
    message = raw.parse()
    assert message.content[0].text == "Hello from fake upstream"
    assert message.model == MODEL and message.stop_reason == "end_turn"
    assert (message.usage.input_tokens, message.usage.output_tokens) == (42, 5)
    assert message.usage.cache_read_input_tokens == 7 and message.usage.cache_creation_input_tokens == 3
    assert message.usage.cache_creation.ephemeral_1h_input_tokens == 3
    assert raw.headers["request-id"].startswith("req_fake_")
    assert raw.headers["anthropic-ratelimit-unified-5h-utilization"] == "0.42"
    assert raw.headers["anthropic-ratelimit-unified-status"] == "allowed"
    [record] = fake.requests(path="/v1/messages")
    assert record["account"] == "acct-a" and record["body_length"] == len(record["body"])
    assert ["Authorization", "Bearer tok-a"] in [[k.title(), v] for k, v in record["headers"]]
    assert fake.stats()["requests_by_path"] == {"/v1/messages": 1}


def test_sdk_streaming(fake: FakeUpstream) -> None:
    fake.add_account("tok-s")
    with sdk(fake, "tok-s").messages.stream(
            model=MODEL, max_tokens=16, messages=HELLO,
            extra_headers={"x-fake-events": "4", "x-fake-output-tokens": "9", "x-fake-model": "claude-x"}) as stream:
        types = [event.type for event in stream]
        final = stream.get_final_message()
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert types.count("content_block_delta") == 4
    assert final.content[0].text == "Hello 1 2 3"
    assert final.model == "claude-x" and final.usage.output_tokens == 9 and final.usage.input_tokens == 10
    stats = fake.stats()
    assert stats["streams_total"] == stats["streams_completed"] == 1 and stats["active_streams"] == 0


def test_refresh_rotation_and_invalid_grant(fake: FakeUpstream) -> None:
    fake.configure(strict=True)
    fake.add_account("old-access", "refresh-1", account="carol", five_hour_utilization=0.5)
    grant = {"grant_type": "refresh_token", "refresh_token": "refresh-1", "client_id": "cid", "scope": "user:inference"}
    r = post(fake, "/v1/oauth/token", json.dumps(grant).encode())
    assert r.status == 200, r.data
    tokens = json.loads(r.data)
    assert tokens["token_type"] == "Bearer" and tokens["expires_in"] == 3600 and tokens["scope"] == "user:inference"
    assert tokens["access_token"] != "old-access" and tokens["refresh_token"] != "refresh-1"
    # The new access token belongs to carol: her scripted state comes with it.
    raw = sdk(fake, tokens["access_token"]).messages.with_raw_response.create(model=MODEL, max_tokens=8,
                                                                             messages=HELLO)
    assert raw.headers["anthropic-ratelimit-unified-5h-utilization"] == "0.5"
    # Reusing the spent refresh token fails; the rotated one works, also form-encoded at /oauth/token.
    r = post(fake, "/v1/oauth/token", json.dumps(grant).encode())
    assert r.status == 400 and json.loads(r.data) == {"error": "invalid_grant",
                                                      "error_description": "Refresh token not found or invalid"}
    form = f"grant_type=refresh_token&refresh_token={tokens['refresh_token']}&client_id=cid".encode()
    r = post(fake, "/oauth/token", form, {"content-type": "application/x-www-form-urlencoded"})
    assert r.status == 200
    stats = fake.stats()
    assert stats["refreshes"] == 2 and stats["refreshes_by_account"] == {"carol": 2}
    assert stats["invalid_grant"] == 1
    assert [t["client_id"] for t in stats["token_requests"]] == ["cid"] * 3
    assert stats["token_requests"][0]["scope"] == "user:inference"


def test_token_endpoint_faults(fake: FakeUpstream) -> None:
    fake.add_account("a", "r")
    fake.configure(token_endpoint={"status": 500, "times": 1})
    grant = json.dumps({"grant_type": "refresh_token", "refresh_token": "r"}).encode()
    assert post(fake, "/v1/oauth/token", grant).status == 500
    assert post(fake, "/v1/oauth/token", grant).status == 200  # the fault was used up
    fake.configure(token_endpoint={"down": True})
    with pytest.raises(urllib3.exceptions.ProtocolError):
        post(fake, "/v1/oauth/token", grant)


def test_strict_mode_401(fake: FakeUpstream) -> None:
    fake.configure(strict=True)
    fake.add_account("good")
    fake.add_account("stale", expires_in=-1)
    with pytest.raises(anthropic.AuthenticationError) as err:
        sdk(fake, "unknown").messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert err.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.AuthenticationError):
        sdk(fake, "stale").messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert sdk(fake, "good").messages.create(model=MODEL, max_tokens=8, messages=HELLO).content
    fake.revoke("good")
    with pytest.raises(anthropic.AuthenticationError):
        sdk(fake, "good").messages.create(model=MODEL, max_tokens=8, messages=HELLO)
    assert fake.stats()["unauthorized"] == 3


def test_drop_after_resets_mid_stream(fake: FakeUpstream) -> None:
    r = post(fake, "/v1/messages", STREAM_BODY, {"x-fake-drop-after": "2"}, preload_content=False)
    assert r.status == 200
    data = b""
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for chunk in r.read_chunked():
            data += chunk
    assert data.count(b"event: content_block_delta") == 2 and b"message_stop" not in data
    assert fake.stats()["dropped"] == 1


def test_stall_after_counts_client_close(fake: FakeUpstream) -> None:
    r = post(fake, "/v1/messages", STREAM_BODY, {"x-fake-stall-after": "1"}, preload_content=False)
    chunks = r.read_chunked()
    read_until(chunks, b"content_block_delta")
    assert fake.stats()["active_streams"] == 1
    chunks.close()  # abandons the response: urllib3 closes the connection
    fake.wait_stats(lambda s: s["closed_early"] == 1 and s["active_streams"] == 0, what="stalled stream closed")


def test_gzip_json_and_incremental_sse(fake: FakeUpstream) -> None:
    r = post(fake, "/v1/messages", JSON_BODY, {"x-fake-encoding": "gzip", "accept-encoding": "gzip"})
    assert r.headers["content-encoding"] == "gzip"
    assert json.loads(r.data)["content"][0]["text"] == "Hello from fake upstream"
    r = post(fake, "/v1/messages", JSON_BODY, {"x-fake-encoding": "gzip", "accept-encoding": "identity"})
    assert "content-encoding" not in r.headers and json.loads(r.data)["type"] == "message"
    # A gzip stream still delivers the first delta while the upstream holds the rest.
    r = post(fake, "/v1/messages", STREAM_BODY,
             {"x-fake-encoding": "gzip", "accept-encoding": "gzip", "x-fake-wait-release": "gz"}, preload_content=False)
    assert r.headers["content-encoding"] == "gzip"
    chunks = r.read_chunked(decode_content=True)
    data = read_until(chunks, b"content_block_delta")
    info = fake.sent_info("gz")
    assert info["waiting"] and info["deltas"] == 1 and info["events"] == 4
    fake.release("gz")
    data += b"".join(chunks)
    assert data.count(b"event: content_block_delta") == 5 and data.endswith(b"event: message_stop\n"
                                                                             b"data: {\"type\":\"message_stop\"}\n\n")


def test_wait_release_hook(fake: FakeUpstream) -> None:
    fake.add_account("tok-w")
    seen: list[str] = []
    with sdk(fake, "tok-w").messages.stream(model=MODEL, max_tokens=16, messages=HELLO,
                                            extra_headers={"x-fake-wait-release": "k1", "x-fake-events": "3"}) as s:
        for event in s:
            seen.append(event.type)
            if event.type == "content_block_delta" and seen.count("content_block_delta") == 1:
                assert fake.sent("k1") == 1 and fake.sent_info("k1")["waiting"]
                fake.release("k1")
    assert seen.count("content_block_delta") == 3 and seen[-1] == "message_stop"
    assert fake.sent_info("k1")["done"]


def test_quota_429_and_usage_api(fake: FakeUpstream) -> None:
    fake.add_account("tok-q", account="quinn", seven_day_utilization=0.9, claim="seven_day")
    fake.set_state("quinn", quota_429=True)
    r = post(fake, "/v1/messages", JSON_BODY, {"authorization": "Bearer tok-q"})
    assert r.status == 429 and json.loads(r.data)["error"]["type"] == "rate_limit_error"
    assert r.headers["anthropic-ratelimit-unified-status"] == "rejected" and int(r.headers["retry-after"]) > 0
    usage = HTTP.request("GET", fake.url + "/api/oauth/usage", headers={"authorization": "Bearer tok-q", **OAUTH})
    assert json.loads(usage.data)["seven_day"]["utilization"] == 90.0
    fake.set_state("quinn", usage_api={"status": 429, "retry_after": 60})
    usage = HTTP.request("GET", fake.url + "/api/oauth/usage", headers={"authorization": "Bearer tok-q", **OAUTH})
    assert usage.status == 429 and usage.headers["retry-after"] == "60"
    assert fake.stats()["usage_api_calls"] == {"quinn": 2}
    assert HTTP.request("GET", fake.url + "/ccm/v1/status").status == 404


def test_bad_request_does_not_kill_the_server(fake: FakeUpstream) -> None:
    with socket.create_connection(("127.0.0.1", fake.port), timeout=5) as sock:
        sock.sendall(b"NONSENSE\r\n\r\n")
        assert sock.recv(65536).startswith(b"HTTP/1.1 400 ")
    assert post(fake, "/v1/messages", b"{not json").status == 400
    assert post(fake, "/v1/messages", JSON_BODY).status == 200


def test_tls(tmp_path: Path) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_path))
    cert.private_key_pem.write_to_path(str(key_path))
    with ca.cert_pem.tempfile() as ca_path, FakeUpstream.start(tmp_path, tls_cert=cert_path, tls_key=key_path) as fake:
        assert fake.url.startswith("https://")
        http = urllib3.PoolManager(ca_certs=ca_path, retries=False, timeout=5)
        r = http.request("POST", fake.url + "/v1/messages", body=JSON_BODY,
                         headers={"authorization": "Bearer t", **OAUTH})
        assert r.status == 200 and json.loads(r.data)["type"] == "message"
        assert fake.stats()["requests_total"] == 1
        assert fake.stop() == 0


def test_oauth_bearer_without_the_beta_flag_is_refused(fake: FakeUpstream) -> None:
    """As Anthropic does: an OAuth (bearer) token needs `anthropic-beta: oauth-2025-04-20`, on /v1/* and on the
    usage API; among other flags and across header lines is fine; an `x-api-key` needs none."""
    fake.add_account("tok-b", account="beta")
    for headers in ({"anthropic-beta": "context-1m-2025-08-07"}, {"anthropic-beta": "oauth-2025-04-20x"}, {}):
        r = HTTP.request("POST", fake.url + "/v1/messages", body=JSON_BODY,
                         headers={"authorization": "Bearer tok-b", "content-type": "application/json", **headers})
        assert r.status == 401 and json.loads(r.data)["error"] == {
            "type": "authentication_error", "message": "OAuth authentication is currently not supported."}
        r = HTTP.request("GET", fake.url + "/api/oauth/usage", headers={"authorization": "Bearer tok-b", **headers})
        assert r.status == 401 and json.loads(r.data)["error"]["type"] == "authentication_error"
    r = HTTP.request("POST", fake.url + "/v1/messages", body=JSON_BODY, headers=urllib3.HTTPHeaderDict([
        ("authorization", "Bearer tok-b"), ("anthropic-beta", "context-1m-2025-08-07"),
        ("anthropic-beta", "fast-mode-2026-02-01, oauth-2025-04-20")]))
    assert r.status == 200
    r = HTTP.request("POST", fake.url + "/v1/messages", body=JSON_BODY, headers={"x-api-key": "tok-b"})
    assert r.status == 200
    stats = fake.stats()
    assert stats["oauth_beta_missing"] == 6 and stats["usage_api_calls"] == {}


def test_unreleased_stream_fails_instead_of_going_on(fake: FakeUpstream) -> None:
    r = post(fake, "/v1/messages", STREAM_BODY, {"x-fake-wait-release": "never", "x-fake-release-timeout-ms": "300"},
             preload_content=False)
    data = b""
    with pytest.raises(urllib3.exceptions.ProtocolError):
        for chunk in r.read_chunked():
            data += chunk
    assert data.count(b"event: content_block_delta") == 1 and b"message_stop" not in data
    info = fake.sent_info("never")
    assert info["timed_out"] and info["deltas"] == 1 and not info["released"]


def test_json_body_waits_for_release_after_its_first_piece(fake: FakeUpstream) -> None:
    r = post(fake, "/v1/messages", JSON_BODY, {"x-fake-bytes": "1000000", "x-fake-wait-release": "big"},
             preload_content=False)
    total = int(r.headers["content-length"])
    first = r.read(256 * 1024)
    info = fake.sent_info("big")
    assert len(first) == info["bytes"] == 256 * 1024 < total and info["waiting"]
    fake.release("big")
    rest = r.read()
    assert len(first + rest) == total and json.loads(first + rest)["type"] == "message"
    assert fake.sent_info("big")["done"]


def test_token_endpoint_hold(fake: FakeUpstream) -> None:
    fake.add_account("a", "r")
    fake.configure(token_endpoint={"hold": "tok", "times": 1})
    grant = json.dumps({"grant_type": "refresh_token", "refresh_token": "r"}).encode()
    with socket.create_connection(("127.0.0.1", fake.port), timeout=10) as sock:
        sock.sendall(b"POST /v1/oauth/token HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: " + str(len(grant)).encode() + b"\r\n\r\n" + grant)
        fake.wait_stats(lambda s: s["requests_by_path"].get("/v1/oauth/token") == 1, what="the held request")
        assert fake.sent_info("tok")["waiting"] and fake.stats()["refreshes"] == 0
        fake.release("tok")
        assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert fake.stats()["refreshes"] == 1
