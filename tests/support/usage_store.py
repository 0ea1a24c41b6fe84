"""Building blocks of the usage-store tests (tests/unit/test_usage_store.py in process, tests/test_usage_store.py
across processes): records, a store on a path, and what a fresh read-only load of a usage file counts."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ccm_wsgi.accounting.pricing import Pricing
from ccm_wsgi.accounting.usage import Record, UsageStore, load_totals, render

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "singbox-usages.json"
W1 = 1766620800  # 2025-12-25 00:00:00 UTC
log = logging.getLogger("test-usage")


def rec(user: str = "alice", model: str = "claude-sonnet-4-5", **fields: int) -> Record:
    values = {"context_window": 200_000, "week_start_unix": W1, "messages_count": 1, "input_tokens": 10}
    values |= dict.fromkeys(
        (
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "cache_creation_5m_input_tokens",
            "cache_creation_1h_input_tokens",
        ),
        0,
    )
    return Record(user, model, **(values | fields))


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
