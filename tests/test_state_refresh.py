"""Refreshing one subscription login from several nodes: the rules that keep its single-use refresh token from
being spent twice when Redis is down or an answer is lost.

Real `ccm-wsgi serve` nodes on a real `redis-server`, the fake token endpoint counting every refresh. The
fake hands out tokens valid for a little more than the five-minute margin, so a login refreshed at the start
needs refreshing again a few seconds later: during the outage the test makes.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.support.constants import ACCESS, ALICE, BOB, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.nodes import ask, last_token, node_config, status, token_posts
from tests.support.procs import Proxy, wait_for, write_credentials
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)
SHORT = 303  # seconds a refreshed token lasts: fresh for 3 s, then inside the five-minute margin
STALE = 4.0  # seconds after which such a token wants a refresh


def holders(fake: FakeUpstream, redis: RedisServer, tmp_path: Path, start_proxy: Callable[..., Proxy],
            *names: str, without_file: tuple[str, ...] = ()) -> list[Proxy]:
    """Nodes that each hold a copy of the login's file (about to expire), and nodes that hold none."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    nodes = []
    for name in names:
        write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH, expires_in=60)
        nodes.append(start_proxy(node_config(fake, redis, tmp_path, name), name=name))
    for name in without_file:
        nodes.append(start_proxy(node_config(fake, redis, tmp_path, name), name=name))
    return nodes


def sole(node: Proxy) -> bool:
    return bool(status(node)["credentials"][0]["shared"]["sole_holder"])


def file_token(tmp_path: Path, name: str) -> str:
    return str(json.loads((tmp_path / name / ".credentials.json").read_text())["claudeAiOauth"]["accessToken"])


def test_a_sole_holder_refreshes_while_redis_is_down_and_the_others_adopt_its_login(
        tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    redis = RedisServer(tmp_path / "redis-aof", persist=True).start()
    try:
        fake.configure(token_expires_in=SHORT)
        holder, other = holders(fake, redis, tmp_path, start_proxy, "holder", without_file=("other",))
        ask(holder, ALICE)  # the first refresh, under the cluster's lock
        ask(other, BOB)  # the node without the file uses the login Redis holds
        assert token_posts(fake) == 1 and sole(holder) and not sole(other)
        redis.stop()
        time.sleep(STALE)
        ask(holder, ALICE)  # due again: the only holder refreshes without the lock
        ask(other, BOB)  # the other waits, on the current token (still valid for minutes)
        assert token_posts(fake) == 2 and fake.stats()["invalid_grant"] == 0
        assert "refreshing without the cluster's lock" in holder.log()
        refreshed = file_token(tmp_path, "holder")
        redis.start()
        wait_for(lambda: status(other)["state"]["healthy"] and status(holder)["state"]["healthy"], timeout=30,
                 what="both nodes back on Redis")
        wait_for(lambda: (ask(other, BOB), last_token(fake) == refreshed)[1], timeout=30, interval=0.5,
                 what="the other node on the login refreshed during the outage")
        assert token_posts(fake) == 2 and fake.stats()["invalid_grant"] == 0
    finally:
        redis.stop()


def test_two_holders_refresh_nothing_while_redis_is_down(
        tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    redis = RedisServer(tmp_path / "redis").start()
    try:
        fake.configure(token_expires_in=SHORT)
        first, second = holders(fake, redis, tmp_path, start_proxy, "first", "second")
        ask(first, ALICE)
        ask(second, BOB)  # adopts the login the first node refreshed
        assert token_posts(fake) == 1
        wait_for(lambda: not sole(first) and not sole(second), timeout=30, what="each node knows of the other")
        redis.stop()
        time.sleep(STALE)
        for _ in range(3):  # due, but neither may spend the refresh token without the lock
            ask(first, ALICE)
            ask(second, BOB)
        assert token_posts(fake) == 1
        assert all("not refreshing while the shared state is unreachable" in n.log() for n in (first, second))
    finally:
        redis.stop()


def test_a_refresh_answer_lost_on_one_node_is_not_sent_again_by_another(
        tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer, start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    # The first refresh is sent and no answer ever comes back. Set before the nodes start: a node's quota
    # poller may ask for a token (and so refresh it) a second after the node starts, before any request.
    fake.configure(token_endpoint={"reset": True, "times": 1})
    nodes = []
    for name in ("first", "second"):
        write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH, expires_in=4 * 60)
        nodes.append(start_proxy(node_config(fake, redis_server, tmp_path, name), name=name))
    ask(nodes[0], ALICE)  # served on the current token; the refresh token may be spent
    for _ in range(3):
        ask(nodes[1], BOB)
        ask(nodes[0], ALICE)
    assert token_posts(fake) == 1, "a refresh token whose answer was lost was sent again"
    assert "answer was lost" in nodes[1].log()
