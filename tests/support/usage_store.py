"""Building blocks of the usage-store tests (tests/unit/test_usage_store.py in process, tests/test_usage_store.py
across processes): records, a store on a path, and what a fresh read-only load of a usage file counts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ccm_wsgi.accounting.pricing import Pricing
from ccm_wsgi.accounting.reading import load_totals
from ccm_wsgi.accounting.records import Record, render
from ccm_wsgi.accounting.sse import Usage
from ccm_wsgi.accounting.store import UsageStore
from ccm_wsgi.accounting.tokens import NAMES, Tokens

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "singbox-usages.json"
W1 = 1766620800  # 2025-12-25 00:00:00 UTC
log = logging.getLogger("test-usage")


def rec(user: str = "alice", model: str = "claude-sonnet-4-5", **fields: int) -> Record:
    """A record; token counters are keyword arguments by their usage-file names (input_tokens=10 unless given)."""
    tokens = Tokens(**({"input_tokens": 10} | {k: v for k, v in fields.items() if k in NAMES}))
    values = {"context_window": 200_000, "week_start_unix": W1, "messages_count": 1}
    values |= {k: v for k, v in fields.items() if k not in NAMES}
    return Record(user, model, tokens=tokens, **values)


def usage(model: str = "", *counts: int, stopped: bool = False, **named: int) -> Usage:
    """A response's Usage: the token counters positionally in usage-file order, or by name."""
    return Usage(model, Tokens(*counts, **named), stopped)


def store_at(path: Path, **kwargs: Any) -> UsageStore:
    return UsageStore(str(path), Pricing(), log, **kwargs)


def requests(path: Path) -> dict[str, int]:
    """Request count per user and in total, from a fresh read-only load of file + journal."""
    doc = render(load_totals(str(path), log), Pricing())
    counts: dict[str, int] = {"": 0}
    for combo in doc["combinations"]:
        counts[""] += combo["total"]["request_count"]
        for user, stats in combo["by_user"].items():
            counts[user] = counts.get(user, 0) + stats["request_count"]
    return counts


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".corrupt-" in p.name)
