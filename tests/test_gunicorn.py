"""gunicorn end to end: `gunicorn -c conf/gunicorn.conf.py ccm_wsgi.wsgi:app -w 2` against the fake upstream.

To know that *both* workers did something, a test pauses all workers but one with SIGSTOP: the paused
one cannot accept, so the next connection goes to the other (`only`). gunicorn's access log (pid per
request) shows where the concurrent bursts went.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import trustme

from tests.support.clients import ask, client, conversation, first_delta_only, stream_events
from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH, USERS
from tests.support.procs import (
    GUNICORN_CONF,
    HTTP,
    ROOT,
    Gunicorn,
    only,
    request,
    service_config,
    wait_for,
    write_credentials,
)
from tests.support.system import immutable


def message(server: Gunicorn, token: str = ALICE) -> tuple[int, int]:
    """One non-streaming message on a new connection; its (input, output) tokens."""
    usage = ask(server, token).usage
    return usage.input_tokens, usage.output_tokens


def stream(server: Gunicorn, token: str = ALICE) -> tuple[int, int]:
    final = ask(server, token, stream=True)
    assert final.content[0].text
    return final.usage.input_tokens, final.usage.output_tokens


def burst(calls: list[Callable[[], Any]]) -> list[Any]:
    """Run the calls at once, each on its own thread and connection; raise the first failure."""
    results: list[Any] = [None] * len(calls)
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            results[i] = calls[i]()
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    if errors:
        raise errors[0]
    return results


def totals(path: Path) -> dict[str, dict[str, int]]:
    """Requests and tokens in a usage file, overall and per user."""
    doc = json.loads(path.read_text())
    out: dict[str, dict[str, int]] = {}
    for combo in doc["combinations"]:
        for who, stats in [("*", combo["total"]), *combo["by_user"].items()]:
            into = out.setdefault(who, {"request_count": 0, "input_tokens": 0, "output_tokens": 0})
            for key in into:
                into[key] += stats[key]
    return out


def file_requests(path: Path) -> int:
    try:
        return totals(path).get("*", {}).get("request_count", 0)
    except (FileNotFoundError, ValueError):
        return -1


def test_streams_and_exact_usage_across_workers_saved_on_sigterm(tmp_path, fake, creds, start_gunicorn):
    usages = tmp_path / "usages.json"
    # a long grace and keep-alive: a worker that waited for either (instead of closing the connection of a
    # stream that ends during shutdown) would hold gunicorn far longer than the bounded wait below
    cfg = service_config(fake.url, creds, users=USERS, usages_path=str(usages), shutdown_grace="10m")
    server = start_gunicorn({"services": [cfg]}, extra=("--keep-alive", "600"))
    workers = sorted(server.worker_pids())
    assert len(workers) == 2
    expected: dict[str, list[tuple[int, int]]] = {"alice": [], "bob": []}
    # each worker serves one of each kind on its own
    for pid in workers:
        with only(server, pid):
            expected["alice"].append(message(server))
            expected["bob"].append(stream(server, BOB))
    assert sorted(set(server.request_pids())) == workers
    # then a burst spread over both
    calls = [lambda i=i: (message if i % 2 else stream)(server, (ALICE, BOB)[i % 3 == 0]) for i in range(16)]
    for i, usage in enumerate(burst(calls)):
        expected[("alice", "bob")[i % 3 == 0]].append(usage)
    # a stream's events reach the client while the upstream still holds the rest (no buffering)
    seen = stream_events(server, "g1", on_first_delta=lambda: first_delta_only(fake, "g1"))
    assert seen.count("content_block_delta") == 3 and seen[-1] == "message_stop"
    expected["alice"].append((10, 3))  # the fake's defaults: 10 in, one out per delta
    # SIGTERM while a stream is in flight: it finishes, every worker saves, gunicorn exits 0
    HTTP.clear()  # no idle keep-alive connection of ours holds a worker
    r = request("POST", server.url + "/v1/messages", preload_content=False, body=json.dumps(
        {"model": MODEL, "max_tokens": 16, "stream": True, "messages": [{"role": "user", "content": "x"}]}).encode(),
        headers={"Authorization": "Bearer " + BOB, "content-type": "application/json", "x-fake-events": "20",
                 "x-fake-delay-ms": "50", "x-fake-input-tokens": "3", "x-fake-output-tokens": "11"})
    first = r.read1(65536)
    assert b"message_start" in first
    server.signal(signal.SIGTERM)
    rest = r.read()
    assert b"message_stop" in first + rest and b"event: error" not in rest
    expected["bob"].append((3, 11))
    # our connection stays in the client's pool: no waiting for a next request on it once the stream ended
    assert server.wait(60) == 0
    assert "Worker exiting" in server.log()
    # the file itself (not only the journal) holds every request, counted once
    got = totals(usages)
    for user, usages_list in expected.items():
        assert got[user] == {"request_count": len(usages_list), "input_tokens": sum(u[0] for u in usages_list),
                             "output_tokens": sum(u[1] for u in usages_list)}, (user, got)
    assert got["*"]["request_count"] == sum(len(v) for v in expected.values()) == 22
    for secret in (ALICE, BOB, ACCESS, REFRESH):
        assert secret not in server.log()


def fold_lock_free(usages: Path) -> bool:
    """Nobody holds either of the usage file's locks: no fold (its lock is held until the sealed journal is
    removed, after the file is written) and no record is under way in any process."""
    for lock in (".fold.lock", ".lock"):
        fd = os.open(str(usages) + lock, os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        finally:
            os.close(fd)  # releases it at once
    return True


def test_periodic_save_runs_in_every_worker(tmp_path, fake, creds, start_gunicorn):
    """Each worker's saver greenlet folds its own records. A worker is only ever paused (`only`) when it has
    nothing unsaved and no fold under way: a worker frozen inside its fold would hold the usage lock."""
    usages = tmp_path / "usages.json"
    server = start_gunicorn({"services": [service_config(fake.url, creds, usages_path=str(usages))]},
                            env={"CCM_USAGE_SAVE_INTERVAL": "0.5"})
    assert file_requests(usages) == 0  # created empty at start
    wait_for(lambda: fold_lock_free(usages), 20, what="the start-up folds to end")
    sent = 0
    for _ in range(2):  # twice round: each worker's saver greenlet keeps running
        for pid in sorted(server.worker_pids()):
            with only(server, pid):
                message(server)
                sent += 1
                # only this worker has unsaved records: the file catches up only through its own saver
                wait_for(lambda n=sent: file_requests(usages) == n, 20, 0.05, what=f"worker {pid} to save usage")
                # and that fold is over (journal rotated, lock released) before this worker may be paused
                wait_for(lambda: fold_lock_free(usages), 20, what=f"worker {pid}'s fold to end")
            assert server.request_pids()[-1] == pid
    assert file_requests(usages) == 4


def test_folds_go_on_under_sustained_load_and_every_record_counts_once(tmp_path, fake, creds, start_gunicorn):
    """Under load a worker keeps the journal's shared lock from one response's record to the next within a turn
    of its event loop; a fold that waits for the exclusive lock says so, and is let in while requests keep
    coming. Every answered request is in the file once, and no fold is left waiting."""
    usages = tmp_path / "usages.json"
    server = start_gunicorn({"services": [service_config(fake.url, creds, usages_path=str(usages))]},
                            env={"CCM_USAGE_SAVE_INTERVAL": "0.2"})
    wait_for(lambda: fold_lock_free(usages), 20, what="the start-up folds to end")
    stop = threading.Event()
    answered = [0] * 16
    errors: list[BaseException] = []

    def load(i: int) -> None:
        try:
            with client(server, ALICE) as c:
                for _ in range(5000):
                    if stop.is_set():
                        return
                    c.messages.create(model=MODEL, max_tokens=16, messages=conversation())
                    answered[i] += 1
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=load, args=(i,)) for i in range(len(answered))]
    for t in threads:
        t.start()
    grown: list[int] = []  # the file's request count each time a fold made it grow while the load went on
    try:
        for _ in range(1200):
            n = file_requests(usages)
            if n > (grown[-1] if grown else 0):
                grown.append(n)
            if len(grown) >= 3 or errors:
                break
            time.sleep(0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert not errors, errors[0]
    assert len(grown) >= 3, f"folds were held up by the load: {grown}"
    assert server.stop() == 0
    assert file_requests(usages) == sum(answered) > grown[-1]
    assert usages.with_name("usages.json.lock").read_bytes()[8] == 0  # nobody waits for the lock


def test_one_refresh_across_workers(tmp_path, fake, start_gunicorn):
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=30)
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=30)
    server = start_gunicorn({"services": [service_config(fake.url, path)]})
    burst([lambda: message(server) for _ in range(12)])
    # whatever the burst hit, each worker then serves one on its own with the refreshed token
    for pid in sorted(server.worker_pids()):
        with only(server, pid):
            message(server)
    assert set(server.request_pids()) == server.worker_pids()
    stats = fake.stats()
    assert stats["refreshes"] == 1 and stats["invalid_grant"] == 0, stats
    oauth = json.loads(path.read_text())["claudeAiOauth"]
    assert oauth["accessToken"] != ACCESS and oauth["refreshToken"] != REFRESH


def test_tls_from_the_config(tmp_path, fake, creds, start_gunicorn):
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    tls = {"enabled": True, "certificate_path": str(tmp_path / "cert.pem"), "key_path": str(tmp_path / "key.pem")}
    server = start_gunicorn({"services": [service_config(fake.url, creds, users=USERS, tls=tls)]})
    assert server.scheme == "https"
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as raw, \
            ctx.wrap_socket(raw, server_hostname="127.0.0.1") as conn:
        assert conn.selected_alpn_protocol() == "http/1.1"
    with anthropic.Anthropic(base_url=server.url, auth_token=ALICE, max_retries=0,
                             http_client=anthropic.DefaultHttpxClient(verify=ctx)) as c, \
            c.messages.stream(model=MODEL, max_tokens=16, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream)


def test_bad_config_stops_gunicorn_with_the_check_lines(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"services": [service_config("http://127.0.0.1:1", tmp_path / "c.json",
                                                            detour="nope")]}))
    out = subprocess.run([sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "ccm_wsgi.wsgi:app"],
                         env={**os.environ, "CCM_CONFIG": str(path)}, cwd=ROOT, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode != 0
    assert any(line.startswith("services[0].detour: ") for line in out.stderr.splitlines()), out.stderr


def test_records_kept_in_memory_are_folded_once(tmp_path, fake, creds, start_gunicorn):
    usages = tmp_path / "usages.json"
    server = start_gunicorn({"services": [service_config(fake.url, creds, usages_path=str(usages))]},
                            workers=1, env={"CCM_USAGE_SAVE_INTERVAL": "0.5"})
    message(server)
    wait_for(lambda: file_requests(usages) == 1, 20, 0.05, what="the first fold")
    with immutable(usages.with_name("usages.json.journal")):  # appends fail: the records are kept in memory
        for _ in range(3):
            message(server)
        wait_for(lambda: file_requests(usages) == 4, 20, 0.05, what="the kept records to be folded")
    assert "keeping the record in memory" in server.log()
    for n in (5, 6):  # each new record makes the worker fold again
        message(server)
        wait_for(lambda n=n: file_requests(usages) >= n, 20, 0.05, what=f"fold number {n}")
    server.stop()
    assert file_requests(usages) == 6, "records kept in memory were folded more than once"
