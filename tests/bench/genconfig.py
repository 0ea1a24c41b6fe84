#!/usr/bin/env python3
"""Write a ccm-wsgi config for the benchmark: every feature on, pointed at the harness's fake upstream.

    genconfig.py --dir DIR --name NAME --port PORT --upstream URL [--no-usage] [--limits]

Writes DIR/NAME.json (the config) and DIR/NAME.credentials.json (a Claude Code OAuth file whose
access token is already expired, so the first request refreshes it at `$UPSTREAM_URL/v1/oauth/token`
— the fake upstream started with `--strict-tokens` only accepts the tokens it issued). The service has
two users (their tokens are USER_TOKENS below), an access log (level info, one line per request, to
DIR/NAME.access.log) and, unless --no-usage, usage tracking (DIR/NAME.usages.json + its journal).
With --limits every user has every limit (`LIMITS`), set high enough that none refuses a request: what
they cost is the checking and the per-user headers.
"""

from __future__ import annotations

import argparse
import json
import os
import time

USER_TOKENS = {"alice": "bench-alice-0123456789abcdef", "bob": "bench-bob-0123456789abcdef"}
LIMITS = {"budget": [{"usd": 1e9, "per": "day"}, {"usd": 1e9, "per": "week"}, {"usd": 1e9, "per": "month"}],
          "requests_per_minute": 10**9, "max_concurrent": 10**6, "models": ["claude-*"],
          "window_share": {"five_hour": 100, "weekly": 100}}


def write(path: str, document: dict, mode: int = 0o644) -> None:
    with open(path, "w") as f:
        json.dump(document, f, indent=2)
        f.write("\n")
    os.chmod(path, mode)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True)
    p.add_argument("--name", default="ccm")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--upstream", required=True, help="the fake upstream's base URL, e.g. http://127.0.0.1:18080")
    p.add_argument("--no-usage", action="store_true", help="leave usages_path out (usage tracking off)")
    p.add_argument("--limits", action="store_true", help="every limit on every user (none ever reached)")
    a = p.parse_args()
    base = os.path.join(os.path.abspath(a.dir), a.name)
    credentials = base + ".credentials.json"
    write(credentials, {"claudeAiOauth": {
        "accessToken": "sk-ant-oat01-expired-bench",
        "refreshToken": "sk-ant-ort01-bench",
        "expiresAt": int((time.time() - 3600) * 1000),  # expired an hour ago: refreshed on first use
        "scopes": ["user:inference", "user:profile"],
        "subscriptionType": "max",
    }}, 0o600)
    service = {
        "type": "ccm", "tag": "ccm", "listen": "127.0.0.1", "listen_port": a.port,
        "credential_path": credentials,
        "upstream_url": a.upstream.rstrip("/"),
        "token_url": a.upstream.rstrip("/") + "/v1/oauth/token",
        "users": [{"name": name, "token": token} for name, token in USER_TOKENS.items()],
    }
    if not a.no_usage:
        service["usages_path"] = base + ".usages.json"
    if a.limits:
        service["limits"] = LIMITS
    config = {"log": {"level": "info", "output": base + ".access.log"}, "services": [service]}
    write(base + ".json", config)
    print(base + ".json")


if __name__ == "__main__":
    main()
