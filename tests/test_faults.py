"""Faults on every side of the proxy: the upstream, the OAuth token endpoint and credentials file, the usage file.

Each fault gets the documented answer (a status with an Anthropic-shaped error, or an SSE `error` event once
a stream has started), nothing leaks (the fake's open connections and streams and the proxy's file
descriptors return to where they were, and a SIGTERM finds no request still in flight), no refresh token is
sent twice, and no credentials or usage file is ever corrupted or loses a record. Disk-full, read-only and
immutable files are real (a small tmpfs, a read-only bind mount, `chattr +i`); where the machine does not
allow them the test is skipped, except under CI, where that fails (tests/support/system.py). SIGKILL during a
save is covered by tests/test_usage_e2e.py and tests/test_usage_store.py.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import procs
from tests.support.clients import messages_body, post_messages
from tests.support.constants import ACCESS, ALICE, BOB, REFRESH, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, request, service_config, wait_for, write_credentials
from tests.support.system import immutable, read_only, tmpfs

TOKEN_PATH = "/v1/oauth/token"


# --------------------------------------------------------------------------------------------- helpers


def error_type(data: bytes) -> str:
    return json.loads(data)["error"]["type"]


def last_event(data: bytes) -> bytes:
    return data.rstrip().split(b"\n\n")[-1]


def fd_count(proxy: Proxy) -> int:
    """The proxy's open descriptors, with no client connection of ours kept alive."""
    assert proxy.proc is not None
    procs.HTTP.clear()
    return len(os.listdir(f"/proc/{proxy.proc.pid}/fd"))


def token_posts(fake: FakeUpstream) -> list[dict[str, Any]]:
    return fake.requests(path=TOKEN_PATH)


LONG_GRACE = "10m"  # proxies that `stops_at_once` stops: a request left counted as in flight would hold them this long


def stops_at_once(proxy: Proxy) -> None:
    """SIGTERM with a grace period of LONG_GRACE: the process must exit (bounded wait, far shorter than the grace)
    without cutting anything, which it does only when no request is counted as in flight any more."""
    grace = {s.get("shutdown_grace") for s in json.loads(proxy.config_path.read_text())["services"]}
    assert grace == {LONG_GRACE}, "stops_at_once needs services with shutdown_grace LONG_GRACE"
    proxy.signal(signal.SIGTERM)
    try:
        assert proxy.wait(60) == 0, proxy.log()
    except subprocess.TimeoutExpired:
        raise AssertionError(f"a request was still counted as in flight:\n{proxy.log()}") from None
    assert "cutting" not in proxy.log()


def fill(directory: Path) -> Path:
    """Write a file in `directory` until the file system is full."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        for _ in range(100_000):
            try:
                f.write(b"\0" * 4096)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                return filler
    raise AssertionError("the file system never filled up")


def usage_total(path: Path) -> dict[str, int]:
    """request_count per user in a usage file."""
    doc = json.loads(path.read_text())
    counts: dict[str, int] = {}
    for combo in doc["combinations"]:
        for user, stats in combo["by_user"].items():
            counts[user] = counts.get(user, 0) + stats["request_count"]
    return counts


@pytest.fixture
def faulty(fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy], tmp_path: Path) -> Proxy:
    """Short upstream timeouts, usage accounting on, a long shutdown grace (see `stops_at_once`)."""
    cfg = service_config(fake.url, creds, users=USERS, stream_idle_timeout="1s", response_timeout="1s",
                         shutdown_grace=LONG_GRACE, usages_path=str(tmp_path / "usage" / "usages.json"))
    return start_proxy({"log": {"level": "info"}, "services": [cfg]})


# ------------------------------------------------------------------------------------------ upstream


def cheap_faults(proxy: Proxy) -> None:
    """Every fault that costs no timeout, with its documented answer."""
    status, _, data = post_messages(proxy, drop_after=0)  # reset before the status line
    assert status == 502 and error_type(data) == "api_error" and b"upstream unreachable" in data
    status, _, data = post_messages(proxy, drop_after=1)  # reset in the middle of a small JSON body
    assert status == 502 and b"lost while reading the response" in data
    reply = post_messages(proxy, drop_after=1, bytes=2_000_000)  # ... of a relayed one: the client's is cut too
    assert reply.status == 200 and len(reply.data) < int(reply.headers["content-length"])
    assert reply.cut, f"the client was left waiting for the rest of a body that will not come: {reply.ended!r}"
    for drop in (0, 2):  # reset mid-stream
        status, _, data = post_messages(proxy, stream=True, drop_after=drop)
        assert status == 200 and data.count(b"event: content_block_delta") == drop
        assert last_event(data) == (b'event: error\ndata: {"type":"error","error":{"type":"api_error",'
                                    b'"message":"the upstream connection was lost mid-stream"}}')
    status, _, data = post_messages(proxy, stream=True, error_after=1)  # the upstream's own error event
    assert status == 200 and b'"overloaded_error"' in last_event(data)
    for code, kind in ((529, "overloaded_error"), (503, "api_error"), (500, "api_error")):
        status, headers, data = post_messages(proxy, status=code, retry_after=7)
        assert status == code and error_type(data) == kind
        assert headers.get("retry-after") == ("7" if code != 500 else None)
    status, headers, data = post_messages(proxy, invalid_json=1)  # passed on untouched, not counted
    assert status == 200 and data == b'{"id":"msg_broken","type":"message","content":[{"type":"text","text":"Hel'
    status, _, data = post_messages(proxy, stream=True)
    assert status == 200 and data.endswith(b'"message_stop"}\n\n')


def test_upstream_faults_get_documented_answers_and_leak_nothing(faulty: Proxy, fake: FakeUpstream,
                                                                 tmp_path: Path) -> None:
    assert post_messages(faulty).status == 200
    base_fds, base_conns = fd_count(faulty), fake.stats()["open_connections"]
    cheap_faults(faulty)
    # stalls: before the headers (504), in a stream (SSE error), in a relayed JSON body (cut)
    status, _, data = post_messages(faulty, stall_before_headers=1)
    assert status == 504 and error_type(data) == "api_error" and b"did not answer in time" in data
    status, _, data = post_messages(faulty, stream=True, stall_after=1)
    assert status == 200 and last_event(data).startswith(b"event: error") and b"sent nothing for 1s" in data
    reply = post_messages(faulty, stall_after=1, bytes=2_000_000)  # cut by the proxy's 1 s idle timeout, not ours
    assert reply.status == 200 and len(reply.data) < int(reply.headers["content-length"])
    assert reply.cut, f"the client was left waiting for the rest of a body that will not come: {reply.ended!r}"
    # a 10 MB answer arrives whole and is counted
    status, headers, data = post_messages(faulty, bytes=10_000_000, input_tokens=1234, output_tokens=567)
    assert status == 200 and len(data) == int(headers["content-length"]) >= 10_000_000
    assert data.endswith(b'"output_tokens":567,"service_tier":"standard"}}')
    for _ in range(4):  # more rounds: a leak per fault would show as growth
        cheap_faults(faulty)
    wait_for(lambda: fake.stats()["active_streams"] == 0, 10, what="no stream left open upstream")
    wait_for(lambda: fake.stats()["open_connections"] <= base_conns + 2, 10, what="upstream connections released")
    wait_for(lambda: fd_count(faulty) <= base_fds + 2, 10, what="proxy descriptors back to the baseline")
    assert post_messages(faulty, token=BOB).status == 200
    lines = faulty.access_lines()
    assert any("partial(upstream dropped)" in line for line in lines)
    assert any("partial(idle timeout)" in line for line in lines)
    assert any(" 10000" in line and " in=1234 out=567 " in line for line in lines), "the 10 MB answer was not counted"
    assert "Traceback" not in faulty.log()
    stops_at_once(faulty)
    counts = usage_total(tmp_path / "usage" / "usages.json")
    assert counts["bob"] == 1 and counts["alice"] > 5 * 4


@contextlib.contextmanager
def plaintext_server() -> Iterator[int]:
    """A port that answers anything (a TLS ClientHello included) with a plain-HTTP line and closes."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                conn, _ = listener.accept()
                with conn:
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        listener.close()


def test_unreachable_and_untrusted_upstreams_are_502(tmp_path: Path, creds: Path,
                                                     start_proxy: Callable[..., Proxy]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls_fake = FakeUpstream.start(tmp_path, tls_cert=tmp_path / "cert.pem", tls_key=tmp_path / "key.pem")
    with plaintext_server() as plain:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            dead = s.getsockname()[1]
        cases = {
            "refused": (f"http://127.0.0.1:{dead}", "connection refused"),
            "untrusted": (tls_fake.url, "certificate of upstream not trusted"),
            "tls-to-plain": (f"https://127.0.0.1:{plain}", "TLS handshake with upstream failed"),
        }
        services = [service_config(url, creds, tag=tag, users=USERS, shutdown_grace=LONG_GRACE)
                    for tag, (url, _) in cases.items()]
        proxy = start_proxy({"services": services})
        base = fd_count(proxy)
        for _ in range(5):
            for tag, (_, says) in cases.items():
                r = request("POST", f"http://127.0.0.1:{proxy.ports[tag]}/v1/messages", body=messages_body(),
                            headers={"Authorization": "Bearer " + ALICE})
                message = json.loads(r.data)["error"]["message"]
                assert r.status == 502 and says.lower() in message.lower(), (tag, message)
        assert tls_fake.stats()["requests_total"] == 0
        wait_for(lambda: fd_count(proxy) <= base + 1, 10, what="no descriptor left open")
        stops_at_once(proxy)
    tls_fake.stop()


# --------------------------------------------------------------------------------------- credentials


@pytest.fixture
def expiring(tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> tuple[Proxy, Path]:
    """A proxy whose credential has expired: its first request must refresh (a refresh that fails while the
    token still works would leave requests using it)."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=30)
    path = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=-5)
    proxy = start_proxy({"services": [service_config(fake.url, path, users=USERS)]})
    return proxy, path


def test_refresh_whose_answer_is_lost_is_not_sent_again(expiring: tuple[Proxy, Path], fake: FakeUpstream) -> None:
    proxy, path = expiring
    before = path.read_bytes()
    for fault in ({"reset": True}, {"down": True}):  # the endpoint got the request, its answer never came
        fake.configure(token_endpoint={**fault, "times": 5})
        status, _, data = post_messages(proxy)
        assert status == 502 and "answer was lost" in json.loads(data)["error"]["message"]
        assert len(token_posts(fake)) == 1, "a refresh token that may be spent was sent again"
        assert post_messages(proxy).status == 502 and len(token_posts(fake)) == 1  # backing off
        assert path.read_bytes() == before
        fake.reset()
        write_credentials(path, ACCESS, REFRESH, expires_in=-5)  # a changed file ends the back-off
        before = path.read_bytes()
    fake.configure(token_endpoint=None)
    assert post_messages(proxy).status == 200 and len(token_posts(fake)) == 1 and fake.stats()["refreshes"] == 1


def test_token_endpoint_500_and_unreachable_back_off(expiring: tuple[Proxy, Path], fake: FakeUpstream,
                                                     tmp_path: Path, start_proxy: Callable[..., Proxy]) -> None:
    proxy, path = expiring
    fake.configure(token_endpoint={"status": 500, "times": 1})
    status, _, data = post_messages(proxy)
    assert status == 502 and "token endpoint failed (HTTP 500 server_error)" in json.loads(data)["error"]["message"]
    for _ in range(5):  # no refresh storm: the next ones wait for the back-off (or a changed file)
        assert post_messages(proxy).status == 502
    assert len(token_posts(fake)) == 1
    assert "refresh failed" in proxy.log() and json.loads(path.read_text())["claudeAiOauth"]["accessToken"] == ACCESS
    # a token endpoint nobody listens on: a connection that never opened is retried, then a clear 502
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    other = write_credentials(tmp_path / "other" / ".credentials.json", ACCESS, REFRESH, expires_in=-5)
    cfg = service_config(fake.url, other, users=USERS, token_url=f"http://127.0.0.1:{dead}/v1/oauth/token")
    down = start_proxy({"services": [cfg]}, name="down")
    status, _, data = post_messages(down)
    assert status == 502 and "token endpoint is unreachable" in json.loads(data)["error"]["message"]
    assert post_messages(down, token=BOB).status == 502 and request("GET", down.url + "/healthz").status == 200


def test_slow_token_endpoint_refreshes_once_for_everyone(expiring: tuple[Proxy, Path], fake: FakeUpstream) -> None:
    proxy, path = expiring
    fake.configure(token_endpoint={"delay_ms": 1500, "times": 1})
    results: list[int] = []
    threads = [threading.Thread(target=lambda t=t: results.append(post_messages(proxy, token=t).status))
               for t in (ALICE, BOB) * 3]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [200] * 6
    stats = fake.stats()
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0 and len(token_posts(fake)) == 1
    assert json.loads(path.read_text())["claudeAiOauth"]["accessToken"] != ACCESS


def test_invalid_grant_is_not_retried(expiring: tuple[Proxy, Path], fake: FakeUpstream) -> None:
    proxy, path = expiring
    fake.revoke(refresh_token=REFRESH)  # spent elsewhere
    for _ in range(4):
        status, _, data = post_messages(proxy)
        assert status == 503 and "must be renewed" in json.loads(data)["error"]["message"]
    assert fake.stats()["invalid_grant"] == 1 and len(token_posts(fake)) == 1
    assert json.loads(path.read_text())["claudeAiOauth"]["refreshToken"] == REFRESH


def test_broken_credential_files_are_clear_503s_until_fixed(fake: FakeUpstream, creds: Path,
                                                            start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy({"services": [service_config(fake.url, creds, users=USERS)]})
    assert post_messages(proxy).status == 200
    good = creds.read_text()
    cases: list[tuple[Callable[[], None], str]] = [
        (lambda: creds.write_text(""), "file is empty"),
        (lambda: creds.write_text(good[: len(good) // 2]), "invalid JSON"),
        (lambda: creds.write_text("[]"), "no claudeAiOauth object"),
        (lambda: creds.write_text('{"claudeAiOauth": {"refreshToken": "x"}}'), "accessToken is missing"),
        (lambda: creds.write_text(good.replace('"expiresAt": ', '"expiresAt": "soon", "x": ')),
         "expiresAt is not a number"),
        (lambda: (creds.unlink(), creds.mkdir()), "Is a directory"),  # unreadable (even for root)
        (lambda: (creds.rmdir(), creds.symlink_to(creds.parent / "gone")), "file not found"),
    ]
    for breaks, says in cases:
        breaks()
        status, _, data = post_messages(proxy)
        message = json.loads(data)["error"]["message"]
        assert status == 503 and says in message and str(creds) in message, message
        assert request("GET", proxy.url + "/healthz").status == 200
    creds.unlink()
    creds.write_text(good)
    assert post_messages(proxy).status == 200 and creds.read_text() == good  # picked up again, never rewritten
    assert "Traceback" not in proxy.log()


def test_read_only_credentials_directory_is_never_refreshed(expiring: tuple[Proxy, Path], fake: FakeUpstream) -> None:
    proxy, path = expiring
    before = path.read_bytes()
    with read_only(path.parent):
        status, _, data = post_messages(proxy)
        message = json.loads(data)["error"]["message"]
        assert status == 503 and "is not writable" in message and "refuses to refresh" in message
        assert token_posts(fake) == [] and path.read_bytes() == before
        # a fresh login written by its owner (before the directory went read-only) is used as it is
    write_credentials(path, ACCESS, REFRESH, expires_in=3600)
    with read_only(path.parent):
        assert post_messages(proxy).status == 200 and token_posts(fake) == []


def claude_refreshes(fake: FakeUpstream, path: Path, refresh: str) -> tuple[str, str, bytes]:
    """What a local `claude` does: spend the refresh token at the token endpoint, write the file atomically."""
    r = request("POST", fake.url + TOKEN_PATH, body=json.dumps({
        "grant_type": "refresh_token", "refresh_token": refresh, "client_id": "claude"}).encode(),
        headers={"content-type": "application/json"})
    assert r.status == 200, r.data
    answer = json.loads(r.data)
    document = json.loads(path.read_text())
    document["claudeAiOauth"].update(accessToken=answer["access_token"], refreshToken=answer["refresh_token"],
                                     expiresAt=int((time.time() + 3600) * 1000))
    data = json.dumps(document, indent=2).encode()
    tmp = path.with_name(".claude-writes.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return answer["access_token"], answer["refresh_token"], data


def bearer_of(record: dict[str, Any]) -> str:
    return next(v for k, v in record["headers"] if k.lower() == "authorization").removeprefix("Bearer ")


def test_local_claude_rotates_the_token_while_requests_are_in_flight(
        fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    proxy = start_proxy({"services": [service_config(fake.url, creds, users=USERS)]})
    streamed: list[bytes] = []
    in_flight = threading.Thread(
        target=lambda: streamed.append(post_messages(proxy, stream=True, wait_release="rot").data))
    in_flight.start()
    wait_for(lambda: fake.sent_info("rot")["waiting"], 10, what="a stream in flight")
    access, _, written = claude_refreshes(fake, creds, REFRESH)
    fake.revoke(access_token=ACCESS)  # the old token stops working at once
    for token in (ALICE, BOB, ALICE):
        assert post_messages(proxy, token=token).status == 200
    fake.release("rot")
    in_flight.join(20)
    assert streamed and streamed[0].endswith(b'"message_stop"}\n\n')
    messages = [r for r in fake.requests(path="/v1/messages")]
    assert [bearer_of(r) for r in messages[-3:]] == [access] * 3
    refresh_posts = token_posts(fake)
    assert len(refresh_posts) == 1 and fake.stats()["invalid_grant"] == 0  # claude's own, and nothing else
    assert creds.read_bytes() == written
    # claude rewriting the file in place: a request that sees it half-written gets a clear 503, then all is well
    with open(creds, "r+b") as f:
        f.truncate(0)
        f.write(written[: len(written) // 2])
        f.flush()
        status, _, data = post_messages(proxy)
        assert status == 503 and "invalid JSON" in json.loads(data)["error"]["message"]
        f.write(written[len(written) // 2:])
    assert post_messages(proxy).status == 200 and creds.read_bytes() == written
    assert len(token_posts(fake)) == 1 and "Traceback" not in proxy.log()


def test_refresh_racing_a_local_claude_never_spends_a_token_twice(expiring: tuple[Proxy, Path],
                                                                  fake: FakeUpstream) -> None:
    proxy, path = expiring
    fake.configure(token_endpoint={"hold": "proxy", "times": 1})  # the proxy's refresh is answered last...
    result: list[int] = []
    racer = threading.Thread(target=lambda: result.append(post_messages(proxy).status))
    racer.start()
    wait_for(lambda: len(token_posts(fake)) == 1, 10, what="the proxy's refresh to reach the endpoint")
    access, refresh, written = claude_refreshes(fake, path, REFRESH)  # ...claude's is answered first
    fake.release("proxy")
    racer.join(20)
    assert result == [200]  # the proxy's refresh was refused, it adopted claude's login
    assert bearer_of(fake.requests(path="/v1/messages")[-1]) == access
    posts = token_posts(fake)
    sent = [json.loads(p["body"])["refresh_token"] for p in posts]
    assert sent == [REFRESH, REFRESH] and fake.stats()["invalid_grant"] == 1
    assert path.read_bytes() == written  # claude's file, not overwritten
    for _ in range(3):
        assert post_messages(proxy).status == 200
    assert len(token_posts(fake)) == 2 and refresh not in [json.loads(p["body"])["refresh_token"]
                                                           for p in token_posts(fake)]


# ------------------------------------------------------------------------------------------- storage


def serve_counting(fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy], usages: Path,
                   name: str = "proxy") -> Proxy:
    cfg = service_config(fake.url, creds, users=USERS, usages_path=str(usages), shutdown_grace=LONG_GRACE)
    return start_proxy({"log": {"level": "info"}, "services": [cfg]}, name=name)


def requests_for(proxy: Proxy, n: int) -> None:
    for i in range(n):
        status, _, data = post_messages(proxy, stream=i % 2 == 1, token=(ALICE, BOB)[i % 2])
        assert status == 200, data


def test_disk_full_keeps_serving_and_loses_no_record(tmp_path: Path, fake: FakeUpstream, creds: Path,
                                                     start_proxy: Callable[..., Proxy]) -> None:
    with tmpfs(tmp_path / "usage", "96k") as disk:
        usages = disk / "usages.json"
        # space comes back before the proxy stops: the records kept in memory are saved
        proxy = serve_counting(fake, creds, start_proxy, usages, "first")
        requests_for(proxy, 2)
        filler = fill(disk)
        requests_for(proxy, 20)
        assert "usage: cannot append" in proxy.log() and "No space left on device" in proxy.log()
        json.loads(usages.read_text())  # the file itself is untouched
        filler.unlink()
        stops_at_once(proxy)
        assert usage_total(usages) == {"alice": 11, "bob": 11}
        # still full when the proxy stops: the file stays whole, the journal keeps what it took, and every
        # record it could not take is logged as a journal line to add back
        proxy = serve_counting(fake, creds, start_proxy, usages, "second")
        saved = usages.read_bytes()
        filler = fill(disk)
        requests_for(proxy, 20)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
        assert usages.read_bytes() == saved and "saving" in proxy.log() and "failed" in proxy.log()
        lines = re.findall(r"add this as a line of its own to (\S+) to keep it: (\{.*\})$", proxy.log(), re.M)
        assert lines, "no record was left for the log"
        filler.unlink()
        with open(disk / "usages.json.journal", "a") as journal:
            for journal_path, line in lines:
                assert journal_path == str(usages) + ".journal"
                journal.write("\n" + line + "\n")
        proxy = serve_counting(fake, creds, start_proxy, usages, "third")
        stops_at_once(proxy)
        assert usage_total(usages) == {"alice": 21, "bob": 21}
        assert "Traceback" not in "".join(p.read_text() for p in tmp_path.glob("*.log"))


def test_immutable_usage_file_or_journal_keeps_serving(tmp_path: Path, fake: FakeUpstream, creds: Path,
                                                       start_proxy: Callable[..., Proxy]) -> None:
    usages = tmp_path / "usage" / "usages.json"
    proxy = serve_counting(fake, creds, start_proxy, usages, "a")
    requests_for(proxy, 2)
    before = usages.read_bytes()
    with immutable(usages):  # the fold cannot replace the file: logged, the journal keeps everything
        requests_for(proxy, 4)
        proxy.signal(signal.SIGTERM)
        assert proxy.wait(15) == 0
        assert usages.read_bytes() == before and "usage: saving" in proxy.log()
    proxy = serve_counting(fake, creds, start_proxy, usages, "b")
    requests_for(proxy, 2)
    with immutable(usages.with_name("usages.json.journal")):  # appends fail: records kept in memory
        requests_for(proxy, 4)
        assert "usage: cannot append" in proxy.log()
        stops_at_once(proxy)
    assert usage_total(usages) == {"alice": 6, "bob": 6}
    assert "Traceback" not in proxy.log()


def test_unwritable_usage_directory_at_start_is_one_clear_error(tmp_path: Path, fake: FakeUpstream,
                                                                creds: Path) -> None:
    directory = tmp_path / "usage"
    directory.mkdir()
    cfg = service_config(fake.url, creds, users=USERS, usages_path=str(directory / "usages.json"))
    with read_only(directory):
        proxy = Proxy(tmp_path, {"services": [cfg]}, name="ro")
        with pytest.raises(RuntimeError, match="exited with 1"):
            proxy.start()
    log = proxy.log()
    assert "cannot start service ccm: usage file" in log and "Read-only file system" in log
    assert "Traceback" not in log
