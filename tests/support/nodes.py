"""Several ccm-wsgi nodes on one Redis, for the shared-state tests: their configs, and what a client or an
operator sees of them (answers, the usage report, the admin status)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic

from tests.support.constants import ALICE, MODEL, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, request, service_config
from tests.support.redis_server import RedisServer

TOKEN_PATH = "/v1/oauth/token"
ADMIN = "ccm-admin-0123456789abcdef"
PREFIX = "t:"


def node_config(fake: FakeUpstream, redis: RedisServer, tmp_path: Path, name: str, credentials: Path | None = None,
                **fields: Any) -> dict[str, Any]:
    """One node: its own copy of the credential file and its own usage file, the shared Redis."""
    service = service_config(fake.url, credentials or tmp_path / name / ".credentials.json",
                             usages_path=str(tmp_path / name / "usage.json"), users=USERS, admin_tokens=[ADMIN],
                             state={"type": "redis", "url": redis.url, "key_prefix": PREFIX})
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


def status(node: Proxy, token: str = ADMIN) -> dict[str, Any]:
    r = request("GET", node.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + token})
    assert r.status == 200, r.data
    return json.loads(r.data)  # type: ignore[no-any-return]


def admin_state(node: Proxy) -> dict[str, Any]:
    return status(node)["state"]  # type: ignore[no-any-return]


def token_posts(fake: FakeUpstream) -> int:
    return len(fake.requests(path=TOKEN_PATH))


def last_token(fake: FakeUpstream) -> str:
    """The bearer token of the last Messages request the upstream received."""
    headers = {k.lower(): v for k, v in fake.requests(path="/v1/messages")[-1]["headers"]}
    return str(headers.get("authorization", "")).removeprefix("Bearer ")


Cluster = Callable[..., list[Proxy]]
