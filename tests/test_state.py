"""Several ccm-wsgi nodes sharing one Redis (`state`): one refresh, one set of totals, one set of limits.

Every test runs real `ccm-wsgi serve` nodes (and a gunicorn node) against the fake upstream and a real
`redis-server` on a free port. The clients are the official `anthropic` SDK and plain HTTP; what is checked
is what a user or an operator would see: statuses, the token endpoint's count of refreshes, the usage files
and `ccm-wsgi usage --json`, the admin status.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Gunicorn, Proxy, request, service_config, wait_for, write_credentials
from tests.support.redis_server import RedisServer, redis_server  # noqa: F401 (fixture)

pytestmark = pytest.mark.timeout(180)
TOKEN_PATH = "/v1/oauth/token"
ADMIN = "ccm-admin-0123456789abcdef"


def node_config(fake: FakeUpstream, redis: RedisServer, tmp_path: Path, name: str, credentials: Path | None = None,
                **fields: Any) -> dict[str, Any]:
    """One node: its own copy of the credential file and its own usage file, the shared Redis."""
    service = service_config(fake.url, credentials or tmp_path / name / ".credentials.json",
                             usages_path=str(tmp_path / name / "usage.json"), users=USERS, admin_tokens=[ADMIN],
                             state={"type": "redis", "url": redis.url, "key_prefix": "t:"})
    service.update(fields)
    return {"log": {"level": "info"}, "services": [service]}


def client(node: Proxy, token: str = ALICE) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=node.url, auth_token=token, api_key=None, max_retries=0)


def ask(node: Proxy, token: str = ALICE, stream: bool = False, **headers: str) -> None:
    sdk = client(node, token)
    extra = {"x-fake-" + k.replace("_", "-"): v for k, v in headers.items()}
    messages = [{"role": "user", "content": "hi"}]
    if stream:
        with sdk.messages.stream(model=MODEL, max_tokens=16, messages=messages, extra_headers=extra) as s:
            s.get_final_message()
    else:
        sdk.messages.create(model=MODEL, max_tokens=16, messages=messages, extra_headers=extra)


def usage_json(config: Path) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "ccm_wsgi", "usage", "-c", str(config), "--json"],
                         capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def requests_by_user(doc: dict[str, Any]) -> dict[str, int]:
    found: dict[str, int] = {}
    for combo in doc.get("combinations", []):
        for user, stats in combo["by_user"].items():
            found[user] = found.get(user, 0) + stats["request_count"]
    return found


@pytest.fixture
def cluster(tmp_path: Path, fake: FakeUpstream, redis_server: RedisServer,
            start_proxy: Callable[..., Proxy]) -> Callable[..., list[Proxy]]:
    def start(n: int, expires_in: float = 3600, **fields: Any) -> list[Proxy]:
        fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=max(expires_in, 1))
        nodes = []
        for i in range(n):
            name = f"node{i}"
            write_credentials(tmp_path / name / ".credentials.json", ACCESS, REFRESH, expires_in=expires_in)
            nodes.append(start_proxy(node_config(fake, redis_server, tmp_path, name, **fields), name=name))
        return nodes
    return start


def test_three_nodes_refresh_once_and_count_every_record_once(
        tmp_path: Path, fake: FakeUpstream, cluster: Callable[..., list[Proxy]]) -> None:
    nodes = cluster(3, expires_in=60)  # inside the five-minute margin: every node wants a refresh
    for i in range(9):
        ask(nodes[i % 3], ALICE if i % 2 else BOB, stream=bool(i % 3 == 1))
    posts = fake.requests(path=TOKEN_PATH)
    assert len(posts) == 1, posts
    assert fake.stats()["invalid_grant"] == 0
    for node in nodes:  # every node wrote the refreshed login through to its own file
        stored = json.loads((tmp_path / node.config_path.stem / ".credentials.json").read_text())["claudeAiOauth"]
        assert stored["accessToken"] != ACCESS
    for node in nodes:
        node.stop()
    for node in nodes:
        doc = json.loads((tmp_path / node.config_path.stem / "usage.json").read_text())
        assert requests_by_user(doc) in ({"alice": 4, "bob": 5}, ), (node.config_path.stem, doc)
    assert requests_by_user(usage_json(nodes[0].config_path)) == {"alice": 4, "bob": 5}
