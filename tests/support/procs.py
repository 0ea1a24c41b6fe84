"""Start real `ccm-wsgi serve` (or gunicorn) processes for tests and read what they log."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import trustme
import urllib3

START_TIMEOUT = 20.0
LISTEN_RE = re.compile(r"service (\S+) listening on (https?)://([\d.]+):(\d+)")

# What the suite uses that must never show up in a log or an error body, and where such things are
# written; tests/test_secrets.py checks every one against every one at the end of the session.
SECRETS: set[str] = set()
LOG_FILES: set[Path] = set()
ERROR_BODIES: list[tuple[str, bytes]] = []  # (where, body) of answers with a 4xx/5xx status
SECRET_KEYS = frozenset({"token", "admin_tokens", "password", "accesstoken", "refreshtoken", "access_token",
                         "refresh_token"})
MIN_SECRET = 10  # shorter strings ("x", "k") would match by accident


def remember_secrets(*values: Any) -> None:
    """Strings (or the secret-named fields of JSON-like objects) the suite sent or stored as credentials."""
    for value in values:
        if isinstance(value, str):
            if len(value) >= MIN_SECRET:
                SECRETS.add(value)
        elif isinstance(value, dict):
            for key, item in value.items():
                if str(key).lower() in SECRET_KEYS:
                    remember_secrets(*(item if isinstance(item, list) else [item]))
                elif isinstance(item, (dict, list)):
                    remember_secrets(item)
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (dict, list)):
                    remember_secrets(item)


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.02, what: str = "condition") -> Any:
    """Poll `predicate` until it returns something truthy; bounded."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def write_credentials(path: Path, access: str, refresh: str, expires_in: float = 3600, **extra: Any) -> Path:
    """A Claude Code style `.credentials.json` (expiresAt in ms)."""
    oauth = {
        "accessToken": access,
        "refreshToken": refresh,
        "expiresAt": int((time.time() + expires_in) * 1000),
        "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "max",
    }
    oauth.update(extra.pop("oauth", {}))
    document = {"claudeAiOauth": oauth, **extra}
    remember_secrets(document)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(document, indent=2))
    os.chmod(path, 0o600)
    return path


def write_pair(cert: trustme.LeafCert, directory: Path, stem: str) -> tuple[Path, Path]:
    """A trustme certificate (with its chain) and its key as PEM files `<stem>.crt` and `<stem>.key`."""
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{stem}.crt", directory / f"{stem}.key"
    cert_path.write_bytes(b"".join(blob.bytes() for blob in cert.cert_chain_pems))
    key_path.write_bytes(cert.private_key_pem.bytes())
    return cert_path, key_path


def service_config(upstream_url: str, credential_path: Path | str, **fields: Any) -> dict[str, Any]:
    service = {
        "type": "ccm", "tag": "ccm", "listen": "127.0.0.1", "listen_port": 0,
        "credential_path": str(credential_path), "upstream_url": upstream_url,
        "token_url": upstream_url + "/v1/oauth/token",
    }
    service.update(fields)
    return service


class Proxy:
    """A `ccm-wsgi serve -c CONFIG` subprocess; stderr goes to `log_path`."""

    def __init__(self, tmp_path: Path, config: dict[str, Any], name: str = "proxy", env: dict[str, str] | None = None,
                 wrapper: tuple[str, ...] = ()):
        self.wrapper = wrapper  # a command that runs the process (strace, unshare, ...)
        self.config_path = tmp_path / f"{name}.json"
        self.config_path.write_text(json.dumps(config, indent=2))
        self.log_path = tmp_path / f"{name}.log"
        remember_secrets(config)
        LOG_FILES.add(self.log_path)
        output = config.get("log", {}).get("output") if isinstance(config.get("log"), dict) else None
        if output:
            LOG_FILES.add(Path(output))
        self.env = {**os.environ, "TZ": "UTC", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.ports: dict[str, int] = {}
        self.scheme = "http"

    def start(self) -> Proxy:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*self.wrapper, sys.executable, "-m", "ccm_wsgi", "serve", "-c", str(self.config_path)],
                stdout=log, stderr=log, env=self.env, start_new_session=True,
            )
        n_services = sum(1 for s in json.loads(self.config_path.read_text())["services"] if s.get("type") == "ccm")
        wait_for(lambda: self._ready(n_services), START_TIMEOUT, what=f"proxy start (log: {self.log_path})")
        return self

    def _ready(self, n: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"proxy exited with {self.proc.returncode}:\n{self.log()}")
        for m in LISTEN_RE.finditer(self.log()):
            self.ports[m.group(1)] = int(m.group(4))
            self.scheme = m.group(2)
        return len(self.ports) >= n

    @property
    def port(self) -> int:
        return next(iter(self.ports.values()))

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def access_lines(self) -> list[str]:
        """ccm-wsgi's access-log lines (one per request, written once the exchange is finished)."""
        return [line for line in self.log().splitlines() if "ccm_wsgi.access:" in line]

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30.0) -> int:
        assert self.proc is not None
        return self.proc.wait(timeout)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(5)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


HTTP = urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))


def request(method: str, url: str, pool: urllib3.PoolManager = HTTP, **kwargs: Any) -> urllib3.BaseHTTPResponse:
    """urllib3 request (through `pool`: one that trusts a test CA, for https); the tokens it sends and the error
    bodies it gets are remembered (see SECRETS)."""
    for name, value in (kwargs.get("headers") or {}).items():
        if name.lower() in ("authorization", "x-api-key"):
            remember_secrets(value.split(None, 1)[-1] if name.lower() == "authorization" else value)
    r = pool.request(method, url, **kwargs)
    if r.status >= 400 and kwargs.get("preload_content", True):
        ERROR_BODIES.append((f"{method} {url}", r.data))
    return r


ROOT = Path(__file__).resolve().parents[2]
GUNICORN_CONF = ROOT / "conf" / "gunicorn.conf.py"
GUNICORN_LISTEN_RE = re.compile(r"Listening at: (https?)://([\d.]+):(\d+)")
WORKER_READY_RE = re.compile(r"service (\S+) ready in worker (\d+)")


class Gunicorn(Proxy):
    """`gunicorn -c conf/gunicorn.conf.py ccm_wsgi.wsgi:app -w N -b 127.0.0.1:0` with CCM_CONFIG; ready
    once it listens and every worker has built its service. `extra` adds command-line arguments. gunicorn's
    own access log (one line per request, with the worker's pid) goes to `access_log`."""

    ACCESS_FORMAT = "%(p)s %(m)s %(U)s %(s)s"

    def __init__(self, tmp_path: Path, config: dict[str, Any], workers: int = 2, name: str = "gunicorn",
                 env: dict[str, str] | None = None, extra: tuple[str, ...] = ()):
        super().__init__(tmp_path, config, name=name, env=env)
        self.env["CCM_CONFIG"] = str(self.config_path)
        self.workers = workers
        self.access_log = tmp_path / f"{name}.access.log"
        self.extra = ("--access-logfile", str(self.access_log), "--access-logformat", self.ACCESS_FORMAT, *extra)

    def start(self) -> Gunicorn:
        command = [sys.executable, "-m", "gunicorn", "-c", str(GUNICORN_CONF), "ccm_wsgi.wsgi:app",
                   "-w", str(self.workers), "-b", "127.0.0.1:0", *self.extra]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=log, env=self.env, start_new_session=True,
                                         cwd=ROOT)
        wait_for(lambda: self._ready(self.workers), START_TIMEOUT, what=f"gunicorn start (log: {self.log_path})")
        return self

    def _ready(self, n: int) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"gunicorn exited with {self.proc.returncode}:\n{self.log()}")
        text = self.log()
        listening = GUNICORN_LISTEN_RE.search(text)
        if listening:
            self.scheme = listening.group(1)
            self.ports["gunicorn"] = int(listening.group(3))
        return bool(listening) and len(self.worker_pids()) >= n

    def stop(self) -> int | None:
        for pid in self.worker_pids():  # workers a test paused (see `only`) must be able to stop
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        return super().stop()

    def worker_pids(self) -> set[int]:
        """Workers that built their service (a worker replaced later adds its pid)."""
        return {int(m.group(2)) for m in WORKER_READY_RE.finditer(self.log())}

    def request_pids(self) -> list[int]:
        """The pid of the worker that served each request so far, in order (gunicorn's access log)."""
        try:
            text = self.access_log.read_text()
        except FileNotFoundError:
            return []
        return [int(m.group(1)) for m in re.finditer(r"^<(\d+)> ", text, re.M)]


@contextlib.contextmanager
def only(server: Gunicorn, pid: int) -> Iterator[None]:
    """Every other worker is paused (SIGSTOP), so new connections go to worker `pid` (workers that ended
    are passed over)."""
    others = [p for p in server.worker_pids() if p != pid]
    for other in others:
        with contextlib.suppress(ProcessLookupError):
            os.kill(other, signal.SIGSTOP)
    try:
        yield
    finally:
        for other in others:
            with contextlib.suppress(ProcessLookupError):
                os.kill(other, signal.SIGCONT)
