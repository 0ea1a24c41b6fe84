"""Real proxy servers for tests, each a subprocess on 127.0.0.1 and a free port, started within bounds.

| helper | program (Debian package) | speaks | counted from |
|---|---|---|---|
| `start_socks5` | microsocks | SOCKS5, optional user/password | stdout `connected to HOST:PORT` |
| `start_http_proxy` | tinyproxy | HTTP forwarding + CONNECT, optional Basic auth | log `Established connection` |
| `start_socks4` | v2ray | SOCKS4, SOCKS4a (and SOCKS5), no auth | access log `accepted tcp:HOST:PORT` |
| `start_https_proxy` | v2ray | HTTP proxy over TLS, optional Basic auth | access log `accepted ...HOST:PORT` |

`Proxy.connections()` is the number of upstream connections the proxy opened (what proves that traffic
went through it) and `Proxy.destinations()` what it was asked to reach, as it was asked: a host name
there means the client let the proxy resolve it (socks5h/socks4a), an IP that it resolved locally.
Logs are written asynchronously by some programs: use `wait_connections`.

A missing program skips the test, except under CI (`CI` set), where it fails: `tests/install-system-deps.sh`
installs them all (microsocks, tinyproxy, v2ray).
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from tests.support.system import require

START_TIMEOUT = 15.0
STOP_TIMEOUT = 5.0
ATTEMPTS = 3  # a free port can be taken between picking it and the proxy binding it


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class Proxy:
    """A running proxy program: `.port`, `.stop()`, `.connections()`, `.destinations()`."""

    def __init__(self, name: str, port: int, proc: subprocess.Popen[bytes], log_path: Path, output_path: Path,
                 pattern: re.Pattern[str]):
        self.name, self.port, self.proc = name, port, proc
        self.log_path, self.output_path, self.pattern = log_path, output_path, pattern

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def destinations(self) -> list[str]:
        """Each upstream connection the proxy made, as the host (and port) it was asked for."""
        return [m.group(1) for m in self.pattern.finditer(self.log_text())]

    def connections(self) -> int:
        return len(self.destinations())

    def wait_connections(self, at_least: int, timeout: float = 5.0) -> int:
        """Poll the log until `at_least` connections show (bounded); returns the count."""
        deadline = time.monotonic() + timeout
        while True:
            count = self.connections()
            if count >= at_least or time.monotonic() >= deadline:
                return count
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is not None:
            return
        try:  # the program and anything it forked: it runs in its own session
            os.killpg(self.proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        try:
            self.proc.wait(STOP_TIMEOUT)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(STOP_TIMEOUT)

    def __enter__(self) -> Proxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _start(name: str, directory: Path, pattern: str, command: Callable[[int], list[str]],
           log_file: Callable[[int], Path] | None = None) -> Proxy:
    """Run `command(port)` until it listens on 127.0.0.1:port; a few ports, START_TIMEOUT each."""
    directory.mkdir(parents=True, exist_ok=True)
    last = ""
    for _ in range(ATTEMPTS):
        port = free_port()
        output = directory / f"{name}-{port}.out"
        with open(output, "wb") as out:
            proc = subprocess.Popen(command(port), stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                    cwd=directory, start_new_session=True)
        proxy = Proxy(name, port, proc, log_file(port) if log_file else output, output, re.compile(pattern))
        deadline = time.monotonic() + START_TIMEOUT
        while proc.poll() is None and time.monotonic() < deadline:
            if _accepts(port):
                return proxy
            time.sleep(0.05)
        exited = proc.poll() is not None
        proxy.stop()
        last = output.read_text(errors="replace")[-2000:]
        if not exited:
            break  # still running but not listening after START_TIMEOUT: another port will not help
    raise RuntimeError(f"{name} did not listen on 127.0.0.1 (exited, or not within {START_TIMEOUT}s); "
                       f"its output:\n{last}")


def start_socks5(tmp_path: Path, username: str | None = None, password: str | None = None) -> Proxy:
    """microsocks: SOCKS5 only; with `username` and `password`, RFC 1929 auth is required."""
    program = require("microsocks", "microsocks")
    auth = ["-u", username, "-P", password or ""] if username else []
    return _start("microsocks", tmp_path, r"connected to (\S+)",
                  lambda port: [program, "-i", "127.0.0.1", "-p", str(port), "-b", "127.0.0.1", *auth])


def start_http_proxy(tmp_path: Path, username: str | None = None, password: str | None = None) -> Proxy:
    """tinyproxy: plain-http forwarding and CONNECT to any port; Basic auth when `username` is given.

    tinyproxy 1.11 answers a missing or wrong Basic auth with 401 (not 407), on CONNECT too.
    """
    program = require("tinyproxy", "tinyproxy")

    def command(port: int) -> list[str]:
        lines = [
            f"Port {port}", "Listen 127.0.0.1", "Timeout 60", "MaxClients 200", "Allow 127.0.0.1",
            f'LogFile "{tmp_path}/tinyproxy-{port}.log"', "LogLevel Connect", "DisableViaHeader Yes",
            # no ConnectPort lines: CONNECT is allowed to every port
        ]
        if username:
            lines.append(f"BasicAuth {username} {password or ''}")
        config = tmp_path / f"tinyproxy-{port}.conf"
        config.write_text("\n".join(lines) + "\n")
        return [program, "-d", "-c", str(config)]

    return _start("tinyproxy", tmp_path, r'Established connection to host "([^"]+)"', command,
                  lambda port: tmp_path / f"tinyproxy-{port}.log")


def _v2ray(name: str, tmp_path: Path, inbound: Callable[[int], dict[str, object]]) -> Proxy:
    program = require("v2ray", "v2ray")

    def command(port: int) -> list[str]:
        config = {
            "log": {"access": str(tmp_path / f"{name}-{port}.access.log"), "loglevel": "warning"},
            "inbounds": [{"listen": "127.0.0.1", "port": port, **inbound(port)}],
            "outbounds": [{"protocol": "freedom"}],
        }
        path = tmp_path / f"{name}-{port}.json"
        path.write_text(json.dumps(config, indent=2))
        return [program, "-config", str(path)]

    return _start(name, tmp_path, r" accepted (?:tcp:|https?:)?(?://)?([^/\s]+)", command,
                  lambda port: tmp_path / f"{name}-{port}.access.log")


def start_socks4(tmp_path: Path) -> Proxy:
    """v2ray's socks inbound without auth: SOCKS4, SOCKS4a and SOCKS5 (microsocks and dante lack 4a)."""
    return _v2ray("v2ray-socks", tmp_path, lambda port: {
        "protocol": "socks", "settings": {"auth": "noauth", "udp": False}})


def start_https_proxy(tmp_path: Path, cert_path: Path, key_path: Path, username: str | None = None,
                      password: str | None = None) -> Proxy:
    """v2ray's http inbound behind TLS (an `https://` proxy): CONNECT and forwarding; 407 on bad auth."""
    accounts = [{"user": username, "pass": password or ""}] if username else []
    return _v2ray("v2ray-https", tmp_path, lambda port: {
        "protocol": "http", "settings": {"accounts": accounts},
        "streamSettings": {"security": "tls", "tlsSettings": {
            "certificates": [{"certificateFile": str(cert_path), "keyFile": str(key_path)}]}},
    })
