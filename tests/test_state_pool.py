"""A pool of subscriptions behind several nodes on one Redis: what one node learns of a credential's quota is
seen by all, and a conversation stays on one credential whichever node serves it.

Real `ccm-wsgi serve` nodes, a real `redis-server`, the fake upstream (which says in `x-fake-account` which
account served each request)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.clients import post_messages
from tests.support.constants import ACCESS, ALICE, BOB
from tests.support.fake_upstream import FakeUpstream
from tests.support.nodes import ADMIN, PREFIX, Cluster, ask, status
from tests.support.observe import scrape, total
from tests.support.pools import ADMIN as POOL_ADMIN
from tests.support.pools import accounts, pool_service
from tests.support.procs import Proxy, wait_for
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)


def pool_nodes(fake: FakeUpstream, redis: RedisServer, tmp_path: Path, start_proxy: Callable[..., Proxy],
               n: int, strategy: str) -> list[Proxy]:
    """`n` nodes of one pool over accounts a and b, each node with its own copy of both credential files."""
    paths = accounts(fake, tmp_path, "a", "b")
    nodes = []
    for i in range(n):
        copies = {}
        for name, path in paths.items():
            copies[name] = tmp_path / f"node{i}" / name / ".credentials.json"
            copies[name].parent.mkdir(parents=True)
            shutil.copy(path, copies[name])
        config = pool_service(fake, copies, strategy, users=[{"name": "alice", "token": ALICE, "credential": "pool"}],
                              state={"type": "redis", "url": redis.url, "key_prefix": PREFIX})
        nodes.append(start_proxy(config, name=f"node{i}"))
    return nodes


def served_by(node: Proxy, session: str) -> str:
    r = post_messages(node, ALICE, headers={"x-claude-code-session-id": session} if session else {})
    assert r.status == 200, r.data
    return str(r.headers["x-fake-account"])


def test_a_conversation_keeps_its_credential_on_every_node(
        tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer, start_proxy: Callable[..., Proxy]) -> None:
    first, second = pool_nodes(fake, redis_server, tmp_path, start_proxy, 2, "round-robin")
    sessions = [f"conversation-{i}" for i in range(4)]
    pinned = {session: served_by(first, session) for session in sessions}
    assert list(pinned.values()) in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    served_by(second, "")  # the second node's own turn moves on by one: on its own it would pick the other one
    for _ in range(2):
        assert {session: served_by(second, session) for session in sessions} == pinned
        assert {session: served_by(first, session) for session in sessions} == pinned


def polled(node: Proxy) -> None:
    wait_for(lambda: all(c["updated"] for c in status(node, POOL_ADMIN)["credentials"]), 15, what="first quota poll")


def test_a_conversation_moved_by_one_node_follows_on_the_others(
        tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer, start_proxy: Callable[..., Proxy]) -> None:
    first, second = pool_nodes(fake, redis_server, tmp_path, start_proxy, 2, "least_used")
    fake.set_state("b", seven_day_utilization=0.5)  # a has more room: a new conversation goes to a
    for node in (first, second):
        polled(node)
    assert served_by(first, "moving") == "a"
    fake.set_state("a", quota_429=True, status="rejected")
    assert served_by(first, "moving") == "b"  # a's quota is spent: the first node moves the conversation
    fake.set_state("a", quota_429=False, status="allowed")  # a is back, and still has more room than b
    assert served_by(second, "new") == "a"
    assert served_by(second, "moving") == "b"  # the conversation stays where the first node moved it


def test_quota_learned_by_one_node_is_seen_by_the_others(fake: FakeUpstream, cluster: Cluster) -> None:
    first, second = cluster(2)
    fake.set_state(ACCESS, five_hour_utilization=0.63)
    ask(first, ALICE)  # only this node sees the new utilisation, in the response's headers

    def seen(node: Proxy) -> Any:
        return status(node)["credentials"][0]["five_hour_utilization"]

    assert seen(first) == 63
    wait_for(lambda: seen(second) == 63, timeout=15, interval=0.2, what="the other node's view of the quota")


def test_status_agrees_across_nodes(fake: FakeUpstream, cluster: Cluster) -> None:
    users = [{"name": "alice", "token": ALICE, "limits": {"budget": [{"usd": 50, "per": "day"}]}},
             {"name": "bob", "token": BOB, "limits": {"window_share": {"five_hour": 50}}}]
    nodes = cluster(2, users=users)
    fake.set_state(ACCESS, five_hour_utilization=0.2)
    for i in range(6):
        ask(nodes[i % 2], ALICE if i % 3 else BOB, stream=bool(i % 2))
    views = [{name: status(node)["users"][name] for name in ("alice", "bob")} for node in nodes]
    assert views[0] == views[1], json.dumps(views, indent=1)
    assert views[0]["alice"]["spent"]["day"] > 0 and views[0]["bob"]["window_share"]
    scrapes = [scrape(node.url, ADMIN) for node in nodes]  # /metrics: what is shared reads the same on both
    budgets = [{k: v for k, v in s.items() if k[0] == "ccm_user_budget_remaining_usd"} for s in scrapes]
    assert budgets[0] == budgets[1] and budgets[0]
    assert sum(total(s, "ccm_requests_total") for s in scrapes) == 6  # each node counts the requests it served
