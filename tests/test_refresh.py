"""Refreshing the subscription token without ever logging it out.

Every test runs a real `ccm-wsgi serve` against the fake token endpoint, and where Claude Code's own lock
matters, the real npm `proper-lockfile` drives that lock from a node process exactly as Claude Code does
(tests/node/claude-lock.js): the lock is the directory `<config dir>.lock`, stale after 10 s, kept alive
every 5 s. The invariant checked throughout: a refresh token is sent to the token endpoint at most once,
and the token endpoint never answers `invalid_grant`.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.constants import ACCESS, ALICE, MODEL, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, request, service_config, wait_for, write_credentials
from tests.support.system import immutable, tmpfs, unavailable

ROOT = Path(__file__).resolve().parent.parent
NODE_SCRIPT = ROOT / "tests" / "node" / "claude-lock.js"
TOKEN_PATH = "/v1/oauth/token"
USERS = [{"name": "alice", "token": ALICE}]


def post(proxy: Proxy, **knobs: Any) -> Any:
    headers = {"Authorization": "Bearer " + ALICE, "content-type": "application/json"}
    headers.update({"x-fake-" + k.replace("_", "-"): str(v) for k, v in knobs.items()})
    body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return request("POST", proxy.url + "/v1/messages", body=body, headers=headers)


def token_posts(fake: FakeUpstream) -> list[dict[str, Any]]:
    return fake.requests(path=TOKEN_PATH)


def sent_with(fake: FakeUpstream) -> str:
    """The bearer token of the last /v1/messages request the upstream saw."""
    last = fake.requests(path="/v1/messages")[-1]
    return next(v for k, v in last["headers"] if k.lower() == "authorization").split(" ", 1)[1]


def oauth(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["claudeAiOauth"]  # type: ignore[no-any-return]


class ClaudeLockProcess:
    """tests/node/claude-lock.js in a subprocess; its JSON-line events are collected as they come."""

    def __init__(self, *args: str) -> None:
        if shutil.which("node") is None or not (NODE_SCRIPT.parent / "node_modules" / "proper-lockfile").is_dir():
            unavailable("node and the npm package proper-lockfile are needed (make test installs them)")
        self.proc = subprocess.Popen(["node", str(NODE_SCRIPT), *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        self.events: queue.Queue[dict[str, Any]] = queue.Queue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                self.events.put(json.loads(line))
            except ValueError:
                self.events.put({"event": "output", "text": line.rstrip()})

    def wait(self, event: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                item = self.events.get(timeout=max(0.01, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.seen.append(item)
            if item["event"] == event:
                return item
        raise AssertionError(f"node never printed {event!r}; it printed {self.seen}")

    def finish(self, timeout: float = 30.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


@pytest.fixture
def node() -> Iterator[Callable[..., ClaudeLockProcess]]:
    started: list[ClaudeLockProcess] = []

    def run(*args: str) -> ClaudeLockProcess:
        process = ClaudeLockProcess(*args)
        started.append(process)
        return process

    yield run
    for process in started:
        process.stop()


@pytest.fixture
def expired(tmp_path: Path, fake: FakeUpstream) -> Path:
    """A credential whose access token has expired: the next request must refresh it."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=-5)
    return write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=-5)


def serve(start_proxy: Callable[..., Proxy], fake: FakeUpstream, path: Path, name: str = "proxy",
          env: dict[str, str] | None = None) -> Proxy:
    return start_proxy({"log": {"level": "debug"}, "services": [service_config(fake.url, path, users=USERS)]},
                       name=name, env=env)


def in_background(call: Callable[[], Any]) -> Callable[[], Any]:
    """Run `call` in a thread; the returned function joins it and gives its result (or raises its error)."""
    result: list[Any] = []

    def target() -> None:
        try:
            result.append(("ok", call()))
        except BaseException as exc:
            result.append(("error", exc))

    thread = threading.Thread(target=target, daemon=True)
    thread.start()

    def join() -> Any:
        thread.join(60)
        assert result, "the request never finished"
        kind, value = result[0]
        if kind == "error":
            raise value
        return value

    return join


# ---------------------------------------------------------------------------------- Claude Code's lock


def test_claude_holding_its_lock_makes_ccm_wait_and_adopt_its_login(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy], node: Callable[..., ClaudeLockProcess]
) -> None:
    proxy = serve(start_proxy, fake, expired)
    new_access, new_refresh = "sk-ant-oat01-claude-refreshed-cccc", "sk-ant-ort01-claude-refreshed-dddd"
    fake.add_account(access_token=new_access, refresh_token=new_refresh, expires_in=3600)
    claude = node("hold", str(expired.parent), "3", new_access, new_refresh, "3600")
    lock = Path(claude.wait("locked")["lock"])
    assert lock == expired.parent.parent / "claude.lock" and lock.is_dir()
    r = post(proxy)  # waits while `claude` holds its lock, then uses the login it wrote
    assert r.status == 200
    assert claude.wait("released") and claude.finish() == 0
    assert token_posts(fake) == [], "ccm-wsgi called the token endpoint while Claude Code held its lock"
    assert sent_with(fake) == new_access and oauth(expired)["refreshToken"] == new_refresh
    assert not lock.exists()


def test_ccm_holds_the_lock_through_its_refresh_and_claude_adopts(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy], node: Callable[..., ClaudeLockProcess]
) -> None:
    proxy = serve(start_proxy, fake, expired)
    lock = expired.parent.parent / "claude.lock"
    fake.configure(token_endpoint={"delay_ms": 3000, "times": 1})
    done = in_background(lambda: post(proxy))
    wait_for(lambda: token_posts(fake), 15, what="ccm-wsgi's refresh request")
    assert lock.is_dir(), "ccm-wsgi refreshes without Claude Code's lock"
    claude = node("refresh", str(expired.parent), fake.url + TOKEN_PATH)  # a `claude` starting meanwhile
    assert done().status == 200
    assert claude.wait("adopted") and claude.wait("released") and claude.finish() == 0
    assert len(token_posts(fake)) == 1 and fake.stats()["invalid_grant"] == 0
    assert oauth(expired)["accessToken"] == sent_with(fake) != ACCESS and not lock.exists()


@pytest.mark.slow
def test_the_lock_is_kept_alive_for_a_refresh_longer_than_the_stale_time(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy], node: Callable[..., ClaudeLockProcess]
) -> None:
    proxy = serve(start_proxy, fake, expired)
    fake.configure(token_endpoint={"delay_ms": 14_000, "times": 1})
    done = in_background(lambda: post(proxy))
    wait_for(lambda: token_posts(fake), 15, what="ccm-wsgi's refresh request")
    claude = node("refresh", str(expired.parent), fake.url + TOKEN_PATH)
    # proper-lockfile retries 5 times 1-2 s apart, past the 10 s stale time: the heartbeat keeps the lock ours
    failed = claude.wait("lock_failed", timeout=40)
    assert failed["code"] == "ELOCKED"
    assert done().status == 200
    assert len(token_posts(fake)) == 1 and fake.stats()["invalid_grant"] == 0


@pytest.mark.slow
def test_a_lock_left_by_a_crashed_claude_goes_stale_and_ccm_refreshes(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy], node: Callable[..., ClaudeLockProcess]
) -> None:
    proxy = serve(start_proxy, fake, expired)
    crashed = node("crash", str(expired.parent))
    crashed.wait("locked")
    assert crashed.finish() == -signal.SIGKILL
    lock = expired.parent.parent / "claude.lock"
    assert lock.is_dir()
    assert post(proxy).status == 200  # waited for the lock to go stale (10 s), then refreshed
    assert len(token_posts(fake)) == 1 and not lock.exists()
    assert "abandoned refresh lock" in proxy.log()


@pytest.mark.slow
def test_a_lock_left_by_a_killed_ccm_goes_stale_for_claude(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy], node: Callable[..., ClaudeLockProcess]
) -> None:
    proxy = serve(start_proxy, fake, expired)
    fake.configure(token_endpoint={"delay_ms": 30_000, "times": 1})
    in_background(lambda: post(proxy))
    wait_for(lambda: token_posts(fake), 15, what="ccm-wsgi's refresh request")
    lock = expired.parent.parent / "claude.lock"
    assert lock.is_dir()
    proxy.kill()  # SIGKILL while holding the lock: the answer never arrives, the token is not rotated
    outcomes = []
    for _ in range(3):  # Claude Code gives up after 5 tries 1-2 s apart, and tries again at its next request
        claude = node("refresh", str(expired.parent), fake.url + TOKEN_PATH)
        claude.finish(40)
        outcomes.append(claude.wait("released" if claude.proc.returncode == 0 else "lock_failed")["event"])
        if "refreshed" in [e["event"] for e in claude.seen]:
            break
    assert "refreshed" in [e["event"] for e in claude.seen], outcomes
    assert fake.stats()["invalid_grant"] == 0 and not lock.exists()


# ---------------------------------------------------------------------------------- timing and politeness


def test_refresh_starts_when_less_than_five_minutes_remain(tmp_path: Path, fake: FakeUpstream,
                                                           start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    six = write_credentials(tmp_path / "six" / ".credentials.json", ACCESS, REFRESH, expires_in=6 * 60)
    assert post(serve(start_proxy, fake, six, name="six")).status == 200
    assert token_posts(fake) == []
    four = write_credentials(tmp_path / "four" / ".credentials.json", ACCESS, REFRESH, expires_in=4 * 60)
    assert post(serve(start_proxy, fake, four, name="four")).status == 200
    assert len(token_posts(fake)) == 1 and oauth(four)["accessToken"] != ACCESS


def test_token_endpoint_429_holds_refreshes_until_its_retry_after(
        expired: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    proxy = serve(start_proxy, fake, expired)
    fake.configure(token_endpoint={"status": 429, "retry_after": 3, "times": 1,
                                   "body": {"error": "rate_limit_exceeded"}})
    first = post(proxy)
    assert first.status == 503 and first.headers["retry-after"] == "3"
    for _ in range(5):  # within the Retry-After: answered at once, the token endpoint is left alone
        assert post(proxy).status == 503
    assert len(token_posts(fake)) == 1
    wait_for(lambda: post(proxy).status == 200, 10, interval=0.5, what="a refresh once Retry-After passed")
    assert len(token_posts(fake)) == 2 and fake.stats()["refreshes"] == 1


def test_429_while_the_token_still_works_keeps_serving(tmp_path: Path, fake: FakeUpstream,
                                                       start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=120)
    proxy = serve(start_proxy, fake, path)
    fake.configure(token_endpoint={"status": 429, "retry_after": 60, "times": 1})
    assert [post(proxy).status for _ in range(4)] == [200] * 4
    assert len(token_posts(fake)) == 1 and sent_with(fake) == ACCESS


def test_upstream_401_refreshes_at_most_once_a_minute(tmp_path: Path, fake: FakeUpstream, creds: Path,
                                                      start_proxy: Callable[..., Proxy]) -> None:
    proxy = serve(start_proxy, fake, creds)
    statuses = [post(proxy, status=401).status for _ in range(5)]
    assert statuses == [401] * 5  # the upstream's own answer, passed through once a refresh cannot help
    assert len(token_posts(fake)) == 1 and fake.stats()["refreshes"] == 1


def test_a_lost_answer_is_not_sent_again_while_the_token_works(tmp_path: Path, fake: FakeUpstream,
                                                               start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=4 * 60)
    proxy = serve(start_proxy, fake, path)
    fake.configure(token_endpoint={"reset": True, "times": 1})
    assert post(proxy).status == 200  # the refresh failed, the current token still works
    for _ in range(4):
        time.sleep(2)  # past the 5 s back-off of other failures
        assert post(proxy).status == 200
    assert len(token_posts(fake)) == 1, "a refresh token whose answer was lost was sent again"
    assert "answer was lost" in proxy.log()


# ---------------------------------------------------------------------------------- saving the new login


def test_no_room_to_save_the_login_means_no_refresh(tmp_path: Path, fake: FakeUpstream,
                                                    start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=-5)
    with tmpfs(tmp_path / "small", "64k") as disk:
        path = write_credentials(disk / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=-5)
        filler = disk / "filler"
        with open(filler, "wb") as f, contextlib.suppress(OSError):
            f.write(b"\0" * 256 * 1024)  # the disk is full
        proxy = serve(start_proxy, fake, path)
        r = post(proxy)
        assert r.status == 503 and b"no room to save" in r.data
        assert token_posts(fake) == [], "a refresh token was spent although its new login could not be saved"
        filler.unlink()
        os.utime(path)  # a changed file lifts the back-off at once
        assert post(proxy).status == 200
        assert len(token_posts(fake)) == 1 and oauth(path)["refreshToken"] != REFRESH


def test_a_refreshed_login_that_cannot_be_saved_is_kept_and_never_replaced(
        expired: Path, tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    run = tmp_path / "run"
    run.mkdir(mode=0o700)
    env = {"XDG_RUNTIME_DIR": str(run)}
    # Held before the processes start: the first one's quota poller refreshes a second after it starts, which
    # may come before the second process is up.
    fake.configure(token_endpoint={"hold": "answer", "times": 1})
    first = serve(start_proxy, fake, expired, name="first", env=env)
    second = serve(start_proxy, fake, expired, name="second", env=env)  # another process on the same file
    done = in_background(lambda: post(first))
    wait_for(lambda: token_posts(fake), 15, what="the refresh request")
    with immutable(expired):  # the save fails (as on EIO or a read-only remount) after the token was spent
        fake.release("answer")  # the new login arrives only now that the file cannot be written
        assert done().status == 200
        new_access = sent_with(fake)
        assert new_access != ACCESS and oauth(expired)["accessToken"] == ACCESS
        assert "saving" in first.log() and "failed" in first.log()
        for _ in range(3):  # the stale file never replaces the new login
            assert post(first).status == 200 and sent_with(fake) == new_access
        # the other process must not spend the refresh token the stale file still holds: it adopts
        assert post(second).status == 200 and sent_with(fake) == new_access
        assert len(token_posts(fake)) == 1 and fake.stats()["invalid_grant"] == 0
    # the save is retried until it succeeds
    wait_for(lambda: oauth(expired)["accessToken"] == new_access, 30, interval=0.2, what="the retried save")
    assert oauth(expired)["refreshToken"] != REFRESH and not list(run.glob("ccm-wsgi/pending-*"))
    assert post(second).status == 200 and len(token_posts(fake)) == 1


def test_a_refresh_as_root_keeps_owner_mode_and_symlink(tmp_path: Path, fake: FakeUpstream,
                                                        start_proxy: Callable[..., Proxy]) -> None:
    if os.geteuid() != 0:
        unavailable("giving the credential file to another user needs root")
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=-5)
    real = write_credentials(tmp_path / "home" / ".claude" / ".credentials.json", ACCESS, REFRESH, expires_in=-5)
    os.chown(real, 4242, 4243)
    os.chmod(real, 0o640)
    link = tmp_path / "claude" / ".credentials.json"
    link.parent.mkdir()
    link.symlink_to(real)
    proxy = serve(start_proxy, fake, link)
    assert post(proxy).status == 200 and len(token_posts(fake)) == 1
    assert link.is_symlink() and link.resolve() == real.resolve()
    st = real.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (4242, 4243, 0o640)
    assert oauth(real)["accessToken"] == sent_with(fake) != ACCESS


def test_requests_queued_behind_a_lost_refresh_answer_do_not_send_it_again(
        tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    path = write_credentials(tmp_path / "c" / ".credentials.json", ACCESS, REFRESH, expires_in=4 * 60)
    proxy = serve(start_proxy, fake, path)
    # the first refresh request is held at the token endpoint, then its connection is reset (answer lost)
    fake.configure(token_endpoint={"hold": "lost", "reset": True, "times": 1})
    first = in_background(lambda: post(proxy))
    wait_for(lambda: token_posts(fake), 15, what="the first refresh request")
    others = [in_background(lambda: post(proxy)) for _ in range(3)]  # they need the same refresh
    time.sleep(2)  # settle: let them reach the credential (not an assertion; a slow machine only weakens the test)
    fake.release("lost")
    assert first().status == 200  # the token still works
    assert [done().status for done in others] == [200] * 3
    assert len(token_posts(fake)) == 1, "a refresh token whose answer was lost was sent again by a queued request"
    assert fake.stats()["invalid_grant"] == 0
