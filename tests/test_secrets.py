"""No token ever reaches a log line or an error body.

`test_no_secret_in_any_log_or_error_body` runs last (tests/support/secrets_guard.py moves it there) and checks the
whole session: every user token, admin token, access token, refresh token and proxy password the suite
wrote into a config or credentials file, sent, gave the SDK or that a fake upstream issued, against every
log file under the session's temporary directory and every 4xx/5xx body procs.request or the SDK received.
The other tests drive one proxy, at debug level, through the error paths where a token is at hand.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path
from typing import Any

import pytest

from tests.support import constants, procs
from tests.support.constants import ACCESS, ALICE, BOB, REFRESH
from tests.support.procs import request, service_config, write_credentials
from tests.support.secrets_guard import Gathered, find_leaks, mask, scan_dir

ADMIN = "ak-ccm-admin-secret-0123456789"
def session_texts(gathered: Gathered) -> list[tuple[str, str]]:
    logs = gathered.logs | {path for root in gathered.roots for path in root.rglob("*.log")}
    texts = [(str(p), p.read_text(errors="replace")) for p in sorted(logs) if p.is_file()]
    texts += [(where, body.decode("utf-8", "replace")) for where, body in gathered.bodies]
    return texts


# ----------------------------------------------------------------------------------------------- the guard


def test_the_guard_finds_a_planted_secret() -> None:
    planted = f"INFO x: fine\nWARNING y: bearer={BOB}; and {REFRESH}.\nunrelated sk-ant-oat01-fake\n"
    hits = find_leaks({ALICE, BOB, REFRESH}, [("planted", planted)])
    assert {h[1] for h in hits} == {mask(BOB), mask(REFRESH)}
    assert all(BOB not in h[1] and REFRESH not in h[1] for h in hits)  # the report does not leak either
    # an unregistered token of a known shape counts too
    assert find_leaks(set(), [("x", "refreshed: sk-ant-ort01-fake-3-AbCdEfGhIjKlMnOp")]) == [
        ("x", mask("sk-ant-ort01-fake-3-AbCdEfGhIjKlMnOp"))]
    assert find_leaks({ALICE}, [("x", "nothing here " * 1000)]) == []


def test_credentials_and_configs_are_remembered(tmp_path: Path) -> None:
    write_credentials(tmp_path / "c.json", "sk-ant-oat01-remember-me-1", "sk-ant-ort01-remember-me-2",
                      mcpOAuth={"srv": {"accessToken": "mcp-token-remember-me"}})
    procs.Proxy(tmp_path, {"services": [{"users": [{"name": "u", "token": "user-token-remember-me"}],
                                         "admin_tokens": ["admin-token-remember-me"]}],
                           "outbounds": [{"password": "proxy-password-remember-me"}]}, name="unstarted")
    assert {"sk-ant-oat01-remember-me-1", "sk-ant-ort01-remember-me-2", "mcp-token-remember-me",
            "user-token-remember-me", "admin-token-remember-me", "proxy-password-remember-me"} <= procs.SECRETS
    assert tmp_path / "unstarted.log" in procs.LOG_FILES


# ---------------------------------------------------------------------------- error paths, at debug level


def raw(port: int, data: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(data)
        out = b""
        try:
            while chunk := s.recv(65536):
                out += chunk
        except OSError:
            pass
    procs.ERROR_BODIES.append((f"raw socket to {port}", out.partition(b"\r\n\r\n")[2]))
    return out


def test_error_paths_never_show_a_token(tmp_path: Path, fake: Any, start_proxy: Any) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    creds = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=-30)
    users = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]
    proxy = start_proxy({"log": {"level": "debug"}, "services": [
        service_config(fake.url, creds, users=users, admin_tokens=[ADMIN], client_timeout="1s")]})
    body = b'{"model":"claude-sonnet-4-6","max_tokens":5,"messages":[{"role":"user","content":"x"}]}'
    wrong = "ak-ccm-wrong-but-close-" + ALICE[-8:]
    procs.remember_secrets(wrong, ADMIN)
    first_body = len(procs.ERROR_BODIES)

    def post(path: str = "/v1/messages", **headers: str) -> Any:
        return request("POST", proxy.url + path, body=body, headers={"content-type": "application/json", **headers})

    # wrong user tokens, every way a client can send them
    for headers in ({"Authorization": "Bearer " + wrong}, {"Authorization": "bearer  " + wrong},
                    {"x-api-key": wrong}, {"Authorization": "Basic " + wrong}, {"Authorization": wrong}):
        assert post(**headers).status == 401
    assert request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + wrong}).status == 401
    # malformed requests that carry a token: a bad request line, oversized headers, ambiguous framing
    auth = b"Authorization: Bearer " + ALICE.encode() + b"\r\n"
    assert raw(proxy.port, b"GET /v1/models?key=" + ALICE.encode() + b" HTTP/9.9\r\n" + auth + b"\r\n") \
        .startswith(b"HTTP/1.1 400 ")
    assert raw(proxy.port, b"GET /v1/models HTTP/1.1\r\n" + auth + b"X-Pad: " + b"p" * 70_000 + b"\r\n\r\n") \
        .startswith(b"HTTP/1.1 431 ")
    assert raw(proxy.port, b"POST /v1/messages HTTP/1.1\r\n" + auth + b"Content-Length: 3\r\nContent-Length: 4"
               b"\r\n\r\nabcd").startswith(b"HTTP/1.1 400 ")
    # a token endpoint that repeats the refresh token in its error
    fake.configure(token_endpoint={"status": 400, "times": 1, "body": {"error": REFRESH, "error_description": REFRESH}})
    r = post(Authorization="Bearer " + ALICE)
    assert r.status == 503 and b"must be renewed" in r.data and REFRESH.encode() not in r.data
    write_credentials(creds, ACCESS, REFRESH, expires_in=-30)  # a changed file lifts the back-off
    fake.configure(token_endpoint={"status": 500, "times": 1, "body": {"error": "server_error", "detail": REFRESH}})
    assert post(Authorization="Bearer " + ALICE).status == 502
    # a working refresh, then an upstream 401 (revoked token) renewed once more
    write_credentials(creds, ACCESS, REFRESH, expires_in=-30)
    assert post(Authorization="Bearer " + ALICE).status == 200
    new = json.loads(creds.read_text())["claudeAiOauth"]
    procs.remember_secrets(new)
    fake.revoke(access_token=new["accessToken"])
    assert post(**{"x-api-key": BOB}).status == 200
    assert request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + ADMIN}).status == 200
    # invalid_grant: the spent refresh token is named nowhere
    latest = json.loads(creds.read_text())["claudeAiOauth"]
    procs.remember_secrets(latest)
    write_credentials(creds, latest["accessToken"], new["refreshToken"], expires_in=-30)  # spent already
    r = post(Authorization="Bearer " + ALICE)
    assert r.status == 503 and b"invalid_grant" in r.data

    log = proxy.log()
    assert "invalid_grant" in log and "DEBUG" in log
    secrets = procs.SECRETS | {ALICE, BOB, ACCESS, REFRESH, ADMIN, wrong}
    texts = [("proxy log", log)] + [(w, b.decode("utf-8", "replace")) for w, b in procs.ERROR_BODIES[first_body:]]
    assert len(texts) > 12
    assert find_leaks(secrets, texts) == []


# ------------------------------------------------------------------------------------- the whole session


def test_no_secret_in_any_log_or_error_body(request: pytest.FixtureRequest,
                                           tmp_path_factory: pytest.TempPathFactory) -> None:
    """Runs last: every secret of the session against every log and error body of the session (with
    CCM_TEST_SCAN_DIR, of every pytest process of the run: `make test` runs this test on its own after the rest)."""
    gathered = Gathered.here(tmp_path_factory.getbasetemp())
    directory = scan_dir()
    if directory is not None:
        gathered.add_saved(directory)
        if len(request.session.items) == 1:  # run on its own: the other processes' gatherings are the scan
            assert gathered.processes > 1, f"no pytest process left what it gathered in {directory}"
    secrets = {s for s in gathered.secrets | set(constants.TOKENS) if len(s) >= procs.MIN_SECRET}
    texts = session_texts(gathered)
    assert {ALICE, BOB, ACCESS, REFRESH} <= secrets
    assert texts, "no log file found: the scan would prove nothing"
    leaks = find_leaks(secrets, texts)
    assert not leaks, f"{len(leaks)} secret(s) found in logs or error bodies: {leaks[:20]}"
