"""`FakeUpstream`: the fake as a subprocess for tests, plus urllib3 wrappers for its control API.

Importing this module patches nothing and imports neither gevent nor ssl (urllib3 is imported when an
instance is made), so the package can be run with `python -m` and monkey-patch first.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

START_TIMEOUT = 10.0
ROOT = Path(__file__).resolve().parents[3]  # the repository: `tests` is importable from there
MODULE = "tests.support.fake_upstream"
CLI_FLAGS = {"host", "tls_cert", "tls_key", "token_expires_in", "strict_tokens", "verbose"}


class _InstanceOrClass:
    """`FakeUpstream.start(...)` creates and starts an instance; `instance.start(...)` starts that instance."""

    def __init__(self, func: Callable[..., Any]) -> None:
        self.func = func
        functools.update_wrapper(self, func)  # type: ignore[arg-type]

    def __get__(self, obj: Any, owner: type) -> Callable[..., Any]:
        return functools.partial(self.func, obj if obj is not None else owner())


class FakeUpstream:
    """The fake as a subprocess, plus urllib3 wrappers for its control API. Usable as a context manager."""

    _log_ids = itertools.count(1)

    def __init__(self) -> None:
        import urllib3

        self.proc: subprocess.Popen[bytes] | None = None
        self.host = "127.0.0.1"
        self.port = 0
        self.scheme = "http"
        self.log_path: Path | None = None
        self.args: list[str] = []
        self._http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=START_TIMEOUT),
                                         cert_reqs="CERT_NONE", assert_hostname=False)

    @_InstanceOrClass
    def start(self, tmp_path: Path | str | None = None, **cli_opts: Any) -> FakeUpstream:
        """Launch `python -m tests.support.fake_upstream --port 0 ...`; cli_opts map to flags (strict_tokens=True,
        token_expires_in=5)."""
        unknown = set(cli_opts) - CLI_FLAGS
        if unknown:
            raise TypeError(f"unknown FakeUpstream options {sorted(unknown)}; known {sorted(CLI_FLAGS)}")
        self.args = [sys.executable, "-m", MODULE, "--port", "0", "--parent-pid", str(os.getpid())]
        for name, value in cli_opts.items():
            if value is None or value is False:
                continue
            self.args.append("--" + name.replace("_", "-"))
            if value is not True:
                self.args.append(str(value))
        self.host = str(cli_opts.get("host") or "127.0.0.1")
        self.scheme = "https" if cli_opts.get("tls_cert") else "http"
        self.log_path = self._new_log_path(tmp_path)
        with open(self.log_path, "ab") as log_file:
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log_file, env=env,
                                         stdin=subprocess.DEVNULL, start_new_session=True)
        try:
            self.port = self._wait_listening()
        except Exception:
            self.kill()
            raise
        return self

    def _new_log_path(self, tmp_path: Path | str | None) -> Path:
        if tmp_path is None:
            fd, name = tempfile.mkstemp(prefix="fake_upstream-", suffix=".log")
            os.close(fd)
            return Path(name)
        directory = Path(tmp_path)
        directory.mkdir(parents=True, exist_ok=True)
        return directory / f"fake_upstream-{next(self._log_ids)}.log"

    def _wait_listening(self) -> int:
        assert self.proc is not None and self.proc.stdout is not None
        deadline = time.monotonic() + START_TIMEOUT
        fd = self.proc.stdout.fileno()
        data = b""
        while b"\n" not in data:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"fake upstream did not print LISTENING within {START_TIMEOUT}s:\n{self.log()}")
            readable, _, _ = select.select([fd], [], [], min(remaining, 0.2))
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    self.proc.wait(2)
                    raise RuntimeError(f"fake upstream exited with {self.proc.returncode}:\n{self.log()}")
                data += chunk
        line = data.split(b"\n", 1)[0].decode(errors="replace").strip()
        if not line.startswith("LISTENING "):
            raise RuntimeError(f"unexpected first line from fake upstream: {line!r}\n{self.log()}")
        return int(line.split()[1])

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def log(self) -> str:
        if self.log_path is None:
            return ""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    # ----- control API
    def call(self, method: str, path: str, body: Any = None, timeout: float = START_TIMEOUT) -> Any:
        """One control call; returns the decoded JSON answer, raises RuntimeError on a non-2xx status."""
        kwargs: dict[str, Any] = {"timeout": timeout}
        if body is not None:
            kwargs.update(body=json.dumps(body).encode(), headers={"content-type": "application/json"})
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            resp = self._http.request(method, self.url + path, **kwargs)
        if not 200 <= resp.status < 300:
            raise RuntimeError(f"fake control {method} {path} -> {resp.status}: {resp.data[:500]!r}")
        return json.loads(resp.data) if resp.data else None

    def stats(self) -> dict[str, Any]:
        return self.call("GET", "/_fake/stats")

    def requests(self, path: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        query = f"?since={since}" + (f"&path={path}" if path else "")
        return self.call("GET", "/_fake/requests" + query)

    def configure(self, **kwargs: Any) -> dict[str, Any]:
        return self.call("POST", "/_fake/config", kwargs)

    def reset(self, accounts: bool = False, config: bool = False) -> None:
        self.call("POST", "/_fake/reset", {"accounts": accounts, "config": config})

    def add_account(self, access_token: str | None = None, refresh_token: str | None = None,
                    **fields_: Any) -> dict[str, Any]:
        """POST /_fake/accounts; extra keyword arguments: account, expires_in, and any account state field."""
        body = {k: v for k, v in (("access_token", access_token), ("refresh_token", refresh_token)) if v}
        return self.call("POST", "/_fake/accounts", {**body, **fields_})

    def accounts(self) -> list[dict[str, Any]]:
        return self.call("GET", "/_fake/accounts")

    def set_state(self, ref: str, **state: Any) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call("POST", f"/_fake/accounts/{quote(ref, safe='')}/state", state)

    def state(self, ref: str) -> dict[str, Any]:
        from urllib.parse import quote

        return self.call("GET", f"/_fake/accounts/{quote(ref, safe='')}/state")

    def revoke(self, access_token: str | None = None, refresh_token: str | None = None) -> dict[str, Any]:
        return self.call("POST", "/_fake/revoke", {"access_token": access_token, "refresh_token": refresh_token})

    def authorizations(self) -> list[dict[str, Any]]:
        """Every login the authorize page saw, oldest first (code, state, code_challenge, redirect_uri, ...)."""
        return self.call("GET", "/_fake/authorizations")

    def expire_code(self, state: str) -> dict[str, Any]:
        """Let the code of the login with this `state` expire."""
        from urllib.parse import quote

        return self.call("POST", f"/_fake/authorizations/{quote(state, safe='')}", {"expired": True})

    def release(self, key: str) -> dict[str, Any]:
        return self.call("POST", f"/_fake/release/{key}")

    def sent(self, key: str) -> int:
        """How many content_block_delta events the stream tagged `key` has written so far."""
        return int(self.sent_info(key)["deltas"])

    def sent_info(self, key: str) -> dict[str, Any]:
        """{"key", "events" (all SSE events), "deltas", "waiting", "released", "done"}."""
        return self.call("GET", f"/_fake/sent/{key}")

    def wait_stats(self, predicate: Callable[[dict[str, Any]], Any], timeout: float = START_TIMEOUT,
                   what: str = "stats condition") -> dict[str, Any]:
        """Poll stats() until predicate(stats) is truthy; returns those stats or raises TimeoutError."""
        deadline = time.monotonic() + timeout
        while True:
            current = self.stats()
            if predicate(current):
                return current
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last stats: {current}")
            time.sleep(0.02)

    # ----- lifecycle
    def stop(self, timeout: float = START_TIMEOUT) -> int | None:
        """SIGTERM, wait (bounded), SIGKILL as a last resort; returns the exit status."""
        self._http.clear()
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)

    def __enter__(self) -> FakeUpstream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
