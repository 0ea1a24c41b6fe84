"""Shared fixtures: a fake Anthropic upstream, `ccm-wsgi serve` and gunicorn processes, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.constants import ACCESS, ALICE, BOB, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Gunicorn, Proxy, service_config, write_credentials
from tests.support.redis_server import RedisServer

pytest_plugins = ["tests.support.secrets_guard"]  # remembers the suite's tokens and logs for tests/test_secrets.py


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeUpstream]:
    upstream = FakeUpstream.start(tmp_path)
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture
def creds(tmp_path: Path, fake: FakeUpstream) -> Path:
    """A fresh credential file whose tokens the fake upstream knows."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    return write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    started: list[Proxy] = []

    def start(config: dict[str, Any], name: str = "proxy", env: dict[str, str] | None = None,
              wrapper: tuple[str, ...] = ()) -> Proxy:
        proxy = Proxy(tmp_path, config, name=name, env=env, wrapper=wrapper).start()
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        proxy.stop()


@pytest.fixture
def proxy(fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> Proxy:
    """One service with two users (alice, bob), no usage file."""
    users = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]
    return start_proxy({"log": {"level": "info"}, "services": [service_config(fake.url, creds, users=users)]})


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    started: list[Gunicorn] = []

    def start(config: dict[str, Any], workers: int = 2, env: dict[str, str] | None = None,
              extra: tuple[str, ...] = ()) -> Gunicorn:
        server = Gunicorn(tmp_path, config, workers=workers, env=env, extra=extra).start()
        started.append(server)
        return server

    yield start
    for server in started:
        with contextlib.suppress(ProcessLookupError):
            for pid in server.worker_pids():
                os.kill(pid, signal.SIGCONT)
        server.stop()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A real redis-server on a free 127.0.0.1 port, in the test's directory, stopped at the end."""
    server = RedisServer(tmp_path / "redis").start()
    yield server
    server.stop()


@pytest.fixture
def cluster(tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer,
            start_proxy: Callable[..., Proxy]) -> Callable[..., list[Proxy]]:
    """`cluster(n, expires_in=..., env=..., **service fields)`: n `ccm-wsgi serve` nodes on `redis_server`, each holding
    its own copy of one login (fake account ACCESS/REFRESH) and its own usage file."""
    from tests.support.nodes import node_config

    def start(n: int, expires_in: float = 3600, env: dict[str, str] | None = None, **fields: Any) -> list[Proxy]:
        fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=max(expires_in, 1))
        nodes = []
        for i in range(n):
            name = f"node{i}"
            write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH, expires_in=expires_in)
            nodes.append(start_proxy(node_config(fake, redis_server, tmp_path, name, **fields), name=name, env=env))
        return nodes
    return start
