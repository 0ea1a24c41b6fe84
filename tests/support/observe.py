"""What the metrics and status page tests share: reading a scrape as Prometheus would, `ccm-wsgi usage --json`
per user, and TLS clients that trust a test CA."""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

import anthropic
import trustme
import urllib3
from prometheus_client.parser import text_string_to_metric_families

from tests.support.constants import ACCESS, ALICE, BOB, REFRESH
from tests.support.procs import HTTP, request, service_config, write_credentials

ADMIN = "ak-ccm-admin-observe-0123456789"
HAIKU = "claude-haiku-4-5"
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = ADMIN, pool: urllib3.PoolManager = HTTP) -> Samples:
    """`GET /metrics` on a connection of its own (a gunicorn test picks the worker by pausing the others), parsed by
    prometheus_client's own parser: {(sample name, sorted labels): value}."""
    headers = {"Authorization": "Bearer " + token} if token else {}
    pool.clear()  # a new connection: to whichever worker accepts it now
    r = request("GET", url + "/metrics", pool=pool, headers=headers)
    assert r.status == 200, r.data
    assert r.headers["content-type"].startswith("text/plain; version=")
    samples: Samples = {}
    for family in text_string_to_metric_families(r.data.decode()):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples of `name` that have these labels (and any others), as PromQL's `sum` would."""
    wanted = set(labels.items())
    return sum(n for (sample, found), n in samples.items() if sample == name and wanted <= set(found))


def usage_by_user(path: str) -> dict[str, dict[str, float]]:
    """`ccm-wsgi usage -f PATH --json`, added up per user over every bucket ("-": requests without a user)."""
    out = subprocess.run([sys.executable, "-m", "ccm_wsgi", "usage", "-f", path, "--json"], capture_output=True,
                         text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    found: dict[str, dict[str, float]] = {}
    for combo in json.loads(out.stdout)["combinations"]:
        for user, stats in combo["by_user"].items():
            into = found.setdefault(user, {})
            for key in ("request_count", "input_tokens", "output_tokens", "cache_read_input_tokens",
                        "cache_creation_input_tokens", "cost_usd"):
                into[key] = into.get(key, 0) + stats.get(key, 0)
    return found


def tls_pool(ca: trustme.CA) -> urllib3.PoolManager:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return urllib3.PoolManager(ssl_context=ctx, retries=False, timeout=urllib3.Timeout(connect=5, read=30))


def tls_sdk(url: str, token: str, ca: trustme.CA) -> anthropic.Anthropic:
    ctx = ssl.create_default_context()
    ca.configure_trust(ctx)
    return anthropic.Anthropic(base_url=url, auth_token=token, max_retries=0, timeout=30,
                               http_client=anthropic.DefaultHttpxClient(verify=ctx))


def knobs(input_tokens: int, output_tokens: int, cache_read: int = 0, cache_write: int = 0,
          **more: Any) -> dict[str, str]:
    """The fake upstream's usage knobs (and any other `x-fake-*`), as request headers."""
    sent = {"input-tokens": input_tokens, "output-tokens": output_tokens, "cache-read-tokens": cache_read,
            "cache-creation-tokens": cache_write, **{k.replace("_", "-"): v for k, v in more.items()}}
    return {"x-fake-" + k: str(v) for k, v in sent.items()}


def two_users(upstream_url: str, tmp_path: Path) -> dict[str, Any]:
    """A config for gunicorn: alice, bob (haiku only), an admin token, a usage file."""
    creds = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)
    users = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB, "limits": {"models": [HAIKU]}}]
    return {"log": {"level": "info"}, "services": [service_config(
        upstream_url, creds, users=users, admin_tokens=[ADMIN], usages_path=str(tmp_path / "usages.json"))]}
