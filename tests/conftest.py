"""Shared fixtures: a fake Anthropic upstream, `ccm-wsgi serve` and gunicorn processes, all on 127.0.0.1."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import trustme

from tests.support.constants import ACCESS, ALICE, BOB, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Gunicorn, Proxy, service_config, write_credentials
from tests.support.redis_server import RedisServer

P = TypeVar("P", bound=Proxy)
pytest_plugins = ["tests.support.secrets_guard"]  # remembers the suite's tokens and logs for tests/test_secrets.py


@pytest.fixture
def fake(tmp_path: Path) -> Iterator[FakeUpstream]:
    upstream = FakeUpstream.start(tmp_path)
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def module_fake(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeUpstream]:
    """One fake upstream for a whole module (one whose server is started once, for all its tests)."""
    upstream = FakeUpstream.start(tmp_path_factory.mktemp("fake"))
    try:
        yield upstream
    finally:
        upstream.stop()


@pytest.fixture(scope="module")
def module_ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def creds(tmp_path: Path, fake: FakeUpstream) -> Path:
    """A fresh credential file whose tokens the fake upstream knows."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    return write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)


@contextlib.contextmanager
def started(make: Callable[..., P]) -> Iterator[Callable[..., P]]:
    """A function that starts `make(...)`; whatever it started is stopped at the end."""
    procs: list[P] = []

    def start(*args: Any, **kwargs: Any) -> P:
        proc = make(*args, **kwargs).start()
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        proc.stop()


@pytest.fixture
def start_proxy(tmp_path: Path) -> Iterator[Callable[..., Proxy]]:
    """`start(config, name=, env=, wrapper=)`: a `ccm-wsgi serve` process (see Proxy)."""
    with started(functools.partial(Proxy, tmp_path)) as start:
        yield start


@pytest.fixture
def proxy(fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> Proxy:
    """One service with two users (alice, bob), no usage file."""
    users = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}]
    return start_proxy({"log": {"level": "info"}, "services": [service_config(fake.url, creds, users=users)]})


@pytest.fixture
def start_gunicorn(tmp_path: Path) -> Iterator[Callable[..., Gunicorn]]:
    """`start(config, workers=, env=, extra=)`: a gunicorn process (see Gunicorn)."""
    with started(functools.partial(Gunicorn, tmp_path)) as start:
        yield start


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
