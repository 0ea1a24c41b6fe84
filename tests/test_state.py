"""Several ccm-wsgi nodes sharing one Redis (`state`): one refresh, one set of totals, one set of limits.

Every test runs real `ccm-wsgi serve` nodes (and a gunicorn node) against the fake upstream and a real
`redis-server` on a free port. The clients are the official `anthropic` SDK and plain HTTP; what is checked
is what a user or an operator would see: statuses, the token endpoint's count of refreshes, the usage files
and `ccm-wsgi usage --json`, the admin status.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
import trustme

from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.limits import held_stream
from tests.support.nodes import (
    PREFIX,
    Cluster,
    admin_state,
    ask,
    node_config,
    requests_by_user,
    token_posts,
    usage_json,
)
from tests.support.procs import Gunicorn, Proxy, request, wait_for, write_credentials
from tests.support.redis_server import RedisServer

pytestmark = pytest.mark.timeout(180)


def refusal(node: Proxy, token: str) -> tuple[int, str, dict[str, str]]:
    body = json.dumps({"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}).encode()
    r = request("POST", node.url + "/v1/messages", body=body,
                headers={"Authorization": "Bearer " + token, "content-type": "application/json"})
    kind = json.loads(r.data)["error"]["type"] if r.status != 200 else ""
    return r.status, kind, dict(r.headers)


def test_three_nodes_refresh_once_and_count_every_record_once(
        tmp_path: Path, fake: FakeUpstream, cluster: Cluster) -> None:
    nodes = cluster(3, expires_in=60)  # inside the five-minute margin: every node wants a refresh
    for i in range(9):
        ask(nodes[i % 3], ALICE if i % 2 else BOB, stream=bool(i % 3 == 1))
    assert token_posts(fake) == 1
    assert fake.stats()["invalid_grant"] == 0
    for node in nodes:  # every node wrote the refreshed login through to its own file
        stored = json.loads((tmp_path / node.config_path.stem / ".credentials.json").read_text())["claudeAiOauth"]
        assert stored["accessToken"] != ACCESS
    for node in nodes:
        node.stop()
    for node in nodes:  # every node's file holds every node's records, each once
        doc = json.loads((tmp_path / node.config_path.stem / "usage.json").read_text())
        assert requests_by_user(doc) == {"alice": 4, "bob": 5}, node.config_path.stem
    assert requests_by_user(usage_json(nodes[0].config_path)) == {"alice": 4, "bob": 5}


def test_cluster_wide_concurrency_and_budget_and_a_killed_node(
        tmp_path: Path, fake: FakeUpstream, cluster: Cluster) -> None:
    users = [{"name": "alice", "token": ALICE, "limits": {"max_concurrent": 1}},
             {"name": "bob", "token": BOB, "limits": {"budget": [{"usd": 0.0002, "per": "day"}]}}]
    first, second = cluster(2, users=users)
    ask(first, ALICE)  # completed on the node that is killed below: its records must survive
    ask(first, ALICE, stream=True)
    ask(first, BOB)
    held = held_stream(first, ALICE, "slot", release_timeout_ms=60000)
    wait_for(lambda: fake.sent_info("slot")["waiting"], what="the held stream")
    status, kind, headers = refusal(second, ALICE)  # alice's one slot is taken on the other node
    assert (status, kind) == (429, "rate_limit_error") and int(headers["retry-after"]) > 0
    first.kill()  # mid-stream: its lease expires, the slot comes back
    held.release_conn()
    fake.release("slot")
    wait_for(lambda: refusal(second, ALICE)[0] == 200, timeout=60, interval=0.5, what="alice's slot back")
    # bob's daily budget: two requests cost more than it, whichever nodes served them
    ask(second, BOB)
    status, kind, headers = refusal(second, BOB)
    assert (status, kind) == (429, "billing_error") and headers.get("x-should-retry") == "false"
    second.stop()
    totals = requests_by_user(usage_json(second.config_path))
    assert totals == {"alice": 3, "bob": 2}, totals  # the killed node's completed records are all there


def test_waiters_for_a_slot_are_served_in_arrival_order_across_nodes(
        fake: FakeUpstream, redis_server: RedisServer, cluster: Cluster) -> None:
    first, second = cluster(2, users=[{"name": "alice", "token": ALICE, "limits": {"max_concurrent": 1}}],
                            env={"CCM_QUEUE_WAIT": "60"})
    queue = redis.Redis.from_url(redis_server.url)

    def queued(n: int) -> None:
        wait_for(lambda: queue.zcard(PREFIX + "ccm:limits:alice:queue") == n, timeout=30, what=f"{n} waiting")

    answers: dict[str, Any] = {}

    def wait_in_line(node: Proxy, key: str) -> None:
        answers[key] = held_stream(node, ALICE, key, release_timeout_ms=60000)

    answers["now"] = held_stream(first, ALICE, "now", release_timeout_ms=60000)  # the one slot
    waiters = []
    for node, key in ((second, "w1"), (first, "w2"), (second, "w3")):  # they line up across both nodes
        waiters.append(threading.Thread(target=wait_in_line, args=(node, key)))
        waiters[-1].start()
        queued(len(waiters))
    for served, still in (("now", "w1"), ("w1", "w2"), ("w2", "w3")):
        fake.release(served)
        answers[served].read()
        wait_for(lambda key=still: fake.sent_info(key)["waiting"], timeout=30, what=f"{still} served")
        later = [k for k in ("w1", "w2", "w3") if k > still]
        assert not any(fake.sent_info(k)["waiting"] for k in later), f"{later} overtook {still}"
    fake.release("w3")
    for waiter in waiters:
        waiter.join(30)
    answers["w3"].read()
    assert queue.zcard(PREFIX + "ccm:limits:alice:queue") == 0


def test_redis_outage_during_traffic_fails_nothing_and_counts_each_record_once(
        tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    redis = RedisServer(tmp_path / "redis-aof", persist=True).start()
    try:
        fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
        nodes = []
        for name in ("node0", "node1"):
            write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH)
            nodes.append(start_proxy(node_config(fake, redis, tmp_path, name), name=name))
        sent = {"alice": 0, "bob": 0}
        failures: list[BaseException] = []
        stop = threading.Event()

        def traffic(node: Proxy, token: str, user: str) -> None:
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                try:
                    ask(node, token, stream=bool(n % 2))
                    sent[user] += 1
                except Exception as exc:  # any failure fails the test
                    failures.append(exc)

        threads = [threading.Thread(target=traffic, args=args) for args in
                   ((nodes[0], ALICE, "alice"), (nodes[1], BOB, "bob"))]
        for thread in threads:
            thread.start()

        def more(than: int) -> bool:
            return sum(sent.values()) >= than + 6

        mark = sum(sent.values())
        wait_for(lambda: more(mark), timeout=30, what="traffic")
        redis.stop()
        wait_for(lambda: not any(admin_state(n)["healthy"] for n in nodes), timeout=30, what="nodes on local state")
        mark = sum(sent.values())
        wait_for(lambda: more(mark), timeout=30, what="traffic while Redis is down")
        redis.start()
        wait_for(lambda: all(admin_state(n)["healthy"] for n in nodes), timeout=30, what="nodes back on Redis")
        mark = sum(sent.values())
        wait_for(lambda: more(mark), timeout=30, what="traffic after Redis is back")
        stop.set()
        for thread in threads:
            thread.join(60)
        assert not failures, failures[:3]
        assert all(admin_state(n)["outages"] >= 1 for n in nodes)
        for node in nodes:
            node.stop()
        for node in nodes:  # each report: file + what the stream holds beyond it, each record once
            assert requests_by_user(usage_json(node.config_path)) == sent
        last = json.loads((tmp_path / "node1" / "usage.json").read_text())
        assert requests_by_user(last) == sent  # the node stopped last folded every node's records
    finally:
        redis.stop()


def test_gunicorn_node_and_serve_node_share_one_refresh_and_one_set_of_totals(
        tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer, start_proxy: Callable[..., Proxy]) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=60)
    configs = {}
    for name in ("serve", "gunicorn"):
        write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH, expires_in=60)
        configs[name] = node_config(fake, redis_server, tmp_path, name)
    serve = start_proxy(configs["serve"], name="serve")
    workers = Gunicorn(tmp_path, configs["gunicorn"], workers=2, name="gunicorn").start()
    try:
        sent = {"alice": 0, "bob": 0}
        for i in range(12):
            node = serve if i % 3 == 0 else workers  # gunicorn spreads its share over both workers
            user, token = ("alice", ALICE) if i % 2 else ("bob", BOB)
            ask(node, token, stream=bool(i % 4 == 1))
            sent[user] += 1
        assert token_posts(fake) == 1 and fake.stats()["invalid_grant"] == 0
    finally:
        workers.stop()
    serve.stop()
    for name in ("serve", "gunicorn"):
        assert requests_by_user(usage_json(tmp_path / f"{name}.json")) == sent
    assert requests_by_user(json.loads((tmp_path / "serve" / "usage.json").read_text())) == sent


def test_rediss_url_with_a_private_ca(tmp_path: Path, fake: FakeUpstream, start_proxy: Callable[..., Proxy]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    paths = tmp_path / "redis-tls.pem", tmp_path / "redis-tls.key", tmp_path / "ca.pem"
    cert.cert_chain_pems[0].write_to_path(str(paths[0]))
    cert.private_key_pem.write_to_path(str(paths[1]))
    ca.cert_pem.write_to_path(str(paths[2]))
    redis = RedisServer(tmp_path / "redis-tls", tls=paths).start()
    try:
        fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
        write_credentials(tmp_path / "node" / ".credentials.json", ACCESS, REFRESH)
        config = node_config(fake, redis, tmp_path, "node")
        config["services"][0]["state"]["url"] = f"rediss://127.0.0.1:{redis.tls_port}/0?ssl_ca_certs={paths[2]}"
        node = start_proxy(config, name="node")
        ask(node, ALICE)
        assert admin_state(node)["healthy"]
        node.stop()
        doc = json.loads((tmp_path / "node" / "usage.json").read_text())
        assert requests_by_user(doc) == {"alice": 1} and doc["shared"]["stream"] != "0-0"  # through the stream
    finally:
        redis.stop()


COOPERATION = """
import sys
from gevent import monkey
monkey.patch_all()
import gevent, redis
r = redis.Redis.from_url(sys.argv[1])
ticks = []
def tick():
    while True:
        ticks.append(1)
        gevent.sleep(0.01)
ticker = gevent.spawn(tick)
gevent.sleep(0)
before = len(ticks)
r.blpop("nothing-ever", timeout=1)  # Redis keeps this answer back for a second
print(len(ticks) - before)
"""


def test_a_redis_wait_does_not_stall_other_greenlets(redis_server: RedisServer) -> None:
    out = subprocess.run([sys.executable, "-c", COOPERATION, redis_server.url], capture_output=True, text=True,
                         timeout=30, check=True)
    assert int(out.stdout) > 10  # the other greenlet kept running while redis-py waited for its answer
