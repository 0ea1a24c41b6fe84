"""A stop keeps its promises: nothing new starts, what is running may finish, and what is cut is recorded.

`ccm-wsgi serve` and gunicorn both: a stream still running when `shutdown_grace` ends is cut with an SSE
`error` event and recorded like any partial stream (usage journaled, access line written) before the
process exits; after SIGTERM no new request reaches the upstream, idle kept-alive connections are closed,
and a response that is still running ends its connection.
"""

from __future__ import annotations

import json
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.constants import ALICE, MODEL
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Gunicorn, Proxy, service_config, wait_for

USERS = [{"name": "alice", "token": ALICE}]


def stream_request(port: int, key: str = "", events: int = 60, delay_ms: int = 200) -> bytes:
    body = json.dumps({"model": MODEL, "max_tokens": 64, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    knobs = f"x-fake-events: {events}\r\nx-fake-delay-ms: {delay_ms}\r\n"
    if key:
        knobs += f"x-fake-wait-release: {key}\r\n"
    return (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{knobs}\r\n").encode() + body


def small_request(port: int) -> bytes:
    body = json.dumps({"model": MODEL, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}).encode()
    return (f"POST /v1/messages HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {ALICE}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body


class Reader:
    """A client connection read on a thread: everything that arrives, and whether the server closed it."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.data = b""
        self.closed = threading.Event()
        self._lock = threading.Lock()
        threading.Thread(target=self._read, daemon=True).start()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _read(self) -> None:
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    break
                with self._lock:
                    self.data += chunk
        except OSError:
            pass
        self.closed.set()

    def text(self) -> str:
        with self._lock:
            return self.data.decode("utf-8", "replace")

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def readers() -> Iterator[Callable[[int], Reader]]:
    opened: list[Reader] = []

    def open_(port: int) -> Reader:
        reader = Reader(port)
        opened.append(reader)
        return reader

    yield open_
    for reader in opened:
        reader.close()


def usage_total(path: Path) -> dict[str, Any]:
    combos = json.loads(path.read_text())["combinations"]
    return {"requests": sum(c["total"]["request_count"] for c in combos),
            "input": sum(c["total"]["input_tokens"] for c in combos),
            "output": sum(c["total"]["output_tokens"] for c in combos)}


def config(fake: FakeUpstream, creds: Path, usages: Path, grace: str) -> dict[str, Any]:
    return {"log": {"level": "info"}, "services": [service_config(
        fake.url, creds, users=USERS, usages_path=str(usages), shutdown_grace=grace)]}


def test_serve_records_a_stream_cut_at_the_end_of_the_grace_period(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy],
        readers: Callable[[int], Reader]) -> None:
    usages = tmp_path / "usages.json"
    proxy = start_proxy(config(fake, creds, usages, "2s"))
    client = readers(proxy.port)
    client.send(stream_request(proxy.port))
    wait_for(lambda: client.text().count("content_block_delta") >= 3, 10, what="the stream to start")
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(30) == 0
    client.closed.wait(10)
    assert "ccm-wsgi is shutting down" in client.text() and "event: error" in client.text()
    assert "partial(shutdown)" in proxy.log()
    total = usage_total(usages)  # the cut stream is in the usage file, with what it used
    assert total["requests"] == 1 and total["input"] == 10 and total["output"] >= 1


def test_gunicorn_records_a_stream_cut_at_the_end_of_the_grace_period(
        tmp_path: Path, fake: FakeUpstream, creds: Path, readers: Callable[[int], Reader]) -> None:
    usages = tmp_path / "usages.json"
    server = Gunicorn(tmp_path, config(fake, creds, usages, "2s"), workers=1).start()
    try:
        client = readers(server.port)
        client.send(stream_request(server.port))
        wait_for(lambda: client.text().count("content_block_delta") >= 3, 10, what="the stream to start")
        server.signal(signal.SIGTERM)
        assert server.wait(30) == 0
    finally:
        server.stop()
    client.closed.wait(10)
    assert "ccm-wsgi is shutting down" in client.text()
    assert "partial(shutdown)" in server.log() and "Worker graceful timeout" not in server.log()
    total = usage_total(usages)
    assert total["requests"] == 1 and total["input"] == 10 and total["output"] >= 1


def test_after_sigterm_no_new_request_starts_on_a_kept_alive_connection(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy],
        readers: Callable[[int], Reader]) -> None:
    proxy = start_proxy(config(fake, creds, tmp_path / "usages.json", "30s"))
    idle = readers(proxy.port)
    idle.send(small_request(proxy.port))
    wait_for(lambda: '"usage"' in idle.text(), 10, what="the first answer on the kept-alive connection")
    running = readers(proxy.port)
    running.send(stream_request(proxy.port, key="held", events=3, delay_ms=0))
    wait_for(lambda: "content_block_delta" in running.text(), 10, what="the held stream to start")
    seen = len(fake.requests(path="/v1/messages"))
    proxy.signal(signal.SIGTERM)
    assert idle.closed.wait(10), "an idle kept-alive connection stayed open after SIGTERM"
    fake.release("held")
    assert running.closed.wait(15), "the connection of a finished response stayed open"
    assert running.text().endswith("\r\n0\r\n\r\n") and "message_stop" in running.text()  # it did finish
    assert proxy.wait(30) == 0
    assert len(fake.requests(path="/v1/messages")) == seen, "a request after SIGTERM reached the upstream"


def test_a_request_arriving_during_the_stop_is_refused_without_the_upstream(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy],
        readers: Callable[[int], Reader]) -> None:
    proxy = start_proxy(config(fake, creds, tmp_path / "usages.json", "30s"))
    running = readers(proxy.port)
    running.send(stream_request(proxy.port, key="held2", events=3, delay_ms=0))
    wait_for(lambda: "content_block_delta" in running.text(), 10, what="the held stream to start")
    # a second request pipelined behind the running stream on the same connection
    running.send(small_request(proxy.port))
    seen = len(fake.requests(path="/v1/messages"))
    proxy.signal(signal.SIGTERM)
    wait_for(lambda: "shutting down" in proxy.log(), 10, what="the stop to begin")
    fake.release("held2")
    assert running.closed.wait(15)
    assert proxy.wait(30) == 0
    assert len(fake.requests(path="/v1/messages")) == seen
    assert '"usage"' not in running.text().split("message_stop", 1)[-1]  # the pipelined one was not answered


def test_gunicorn_refuses_a_request_arriving_during_the_stop_without_the_upstream(tmp_path, fake, creds, readers):
    server = Gunicorn(tmp_path, config(fake, creds, tmp_path / "usages.json", "30s"), workers=1).start()
    try:
        running = readers(server.port)
        running.send(stream_request(server.port, key="held3", events=3, delay_ms=0))
        wait_for(lambda: "content_block_delta" in running.text(), 10, what="the held stream to start")
        running.send(small_request(server.port))  # pipelined behind the running stream
        seen = len(fake.requests(path="/v1/messages"))
        server.signal(signal.SIGTERM)
        time.sleep(3)  # settle: the worker notices the stop (<= 1 s) and begins refusing (1.5 s later)
        fake.release("held3")
        assert running.closed.wait(15)
        assert server.wait(40) == 0
    finally:
        server.stop()
    assert len(fake.requests(path="/v1/messages")) == seen, "a request after SIGTERM reached the upstream"
    assert '"usage"' not in running.text().split("message_stop", 1)[-1]
