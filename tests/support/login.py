"""`ccm-wsgi login` as a person runs it, and the browser the person uses, for tests.

`LoginRun` starts `python -m ccm_wsgi login ...` with a pipe for standard input; its standard output and error go
to `*.log` files in the test's directory, so the session's secret scan reads everything it printed. Its
`CLAUDE_CONFIG_DIR` and `HOME` are in the test's directory: Claude Code's default location never means the real
one. `Browser` follows the authorize URL to the fake upstream the way a signed-in browser would.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import urllib3

from tests.support import procs
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import service_config, wait_for

TIMEOUT = 30.0


def login_service(fake: FakeUpstream, credential_path: Path | str, **fields: Any) -> dict[str, Any]:
    """A ccm service whose upstream, token endpoint and authorize page are the fake's."""
    return service_config(fake.url, credential_path, authorize_url=fake.url + "/cai/oauth/authorize", **fields)


def write_config(tmp_path: Path, services: list[dict[str, Any]], name: str = "config",
                 **top: Any) -> Path:
    path = tmp_path / f"{name}.json"
    document = {"log": {"level": "info"}, "services": services, **top}
    procs.remember_secrets(document)
    path.write_text(json.dumps(document, indent=2))
    return path


class LoginRun:
    """One `ccm-wsgi login` process."""

    _runs = 0

    def __init__(self, tmp_path: Path, *args: str, env: dict[str, str] | None = None):
        LoginRun._runs += 1
        stem = tmp_path / f"login-{LoginRun._runs}"
        self.out_path, self.err_path = stem.with_suffix(".out.log"), stem.with_suffix(".err.log")
        procs.LOG_FILES.update({self.out_path, self.err_path})
        home = tmp_path / "home"
        (home / ".claude").mkdir(parents=True, exist_ok=True)
        environment = {**os.environ, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude"),
                       "CCM_KEYCHAIN": "0", "SSH_CONNECTION": "192.0.2.7 50000 198.51.100.9 22", **(env or {})}
        with open(self.out_path, "wb") as out, open(self.err_path, "wb") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "ccm_wsgi", "login", *args], stdin=subprocess.PIPE,
                                         stdout=out, stderr=err, env=environment, start_new_session=True)

    def stdout(self) -> str:
        return self.out_path.read_text(errors="replace")

    def stderr(self) -> str:
        return self.err_path.read_text(errors="replace")

    def url(self, prefix: str) -> str:
        """The authorize URL, once printed (on a line of its own)."""
        def printed() -> str | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"login exited with {self.proc.returncode}: {self.stdout()}{self.stderr()}")
            return next((line for line in self.stdout().splitlines() if line.startswith(prefix)), None)

        return str(wait_for(printed, TIMEOUT, what="the authorize URL"))

    def paste(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def interrupt(self) -> None:
        self.proc.send_signal(signal.SIGINT)

    def wait(self, timeout: float = TIMEOUT) -> int:
        """The exit status; standard input is closed first (nothing more is pasted)."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            with contextlib.suppress(BrokenPipeError):
                self.proc.stdin.close()
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            raise AssertionError(f"login did not end: {self.stdout()}{self.stderr()}") from None

    def run(self, text: str | None = None, timeout: float = TIMEOUT) -> int:
        """Paste `text` (if any) and wait for the end."""
        if text is not None:
            self.paste(text)
        return self.wait(timeout)


class Browser:
    """A browser already signed in to the fake: it opens the authorize URL and follows where that leads."""

    def __init__(self) -> None:
        self.http = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=TIMEOUT))

    def authorize(self, url: str) -> str:
        """The address the authorize page sends the browser to (the redirect URI with code and state)."""
        resp = self.http.request("GET", url, redirect=False)
        assert resp.status == 302, (resp.status, resp.data[:300])
        return str(resp.headers["location"])

    def page(self, url: str) -> str:
        resp = self.http.request("GET", url, redirect=False)
        assert resp.status == 200, (resp.status, resp.data[:300])
        return resp.data.decode()

    def land(self, location: str) -> urllib3.BaseHTTPResponse:
        """Load the redirect target, as the browser does; `localhost` is reached on 127.0.0.1 (the ssh tunnel's end)."""
        return self.http.request("GET", location.replace("http://localhost:", "http://127.0.0.1:", 1), redirect=False)


def query(location: str) -> dict[str, str]:
    return {k: v[0] for k, v in parse_qs(urlsplit(location).query).items()}


def shown_code(location: str) -> str:
    """What the hosted callback page shows for this redirect: `code#state`."""
    q = query(location)
    return f"{q['code']}#{q['state']}"


def leftovers(directory: Path) -> list[str]:
    """Temporary files a write could have left beside the credential file."""
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or p.name.startswith(".ccm-wsgi-probe"))
