"""A pool of fake subscriptions: one fake account and credential file each, and a pooled service config."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.support.constants import ALICE
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import write_credentials

ADMIN = "ak-ccm-admin-0123456789abcdef"


def accounts(fake: FakeUpstream, tmp_path: Path, *names: str, **state: Any) -> dict[str, Path]:
    """One fake account and one credentials file per name; `state` applies to every account."""
    paths = {}
    for name in names:
        access, refresh = f"sk-ant-oat01-{name}-access-xxxxxxxx", f"sk-ant-ort01-{name}-refresh-xxxxxxx"
        fake.add_account(access_token=access, refresh_token=refresh, account=name, expires_in=3600, **state)
        paths[name] = write_credentials(tmp_path / name / ".credentials.json", access, refresh)
    return paths


def pool_service(fake: FakeUpstream, paths: dict[str, Path], strategy: str = "least_used",
                 users: list[dict[str, Any]] | None = None, extra_credentials: tuple[dict[str, Any], ...] = (),
                 **fields: Any) -> dict[str, Any]:
    """A pooled service of `paths` (tagged by name) with a balancer "pool" over them; alice uses the pool."""
    credentials = [{"tag": n, "credential_path": str(p)} for n, p in paths.items()]
    credentials += list(extra_credentials)
    credentials.append({"tag": "pool", "type": "balancer", "strategy": strategy, "credentials": list(paths)})
    service = {
        "type": "ccm", "tag": "ccm", "listen": "127.0.0.1", "listen_port": 0,
        "upstream_url": fake.url, "token_url": fake.url + "/v1/oauth/token",
        "credentials": credentials, "admin_tokens": [ADMIN],
        "users": users or [{"name": "alice", "token": ALICE, "credential": "pool"}],
    }
    service.update(fields)
    return {"services": [service]}
