"""`ccm-wsgi usage`: who used what, by week, in tokens and dollars; and what each user spent in the current UTC
day, week and month, beside their budgets.

It reads the same state the server folds (usage file plus the journal lines not yet folded) under a
shared lock and never writes anything, so it is safe to run against a live server. Costs come from
the store's own cost rules (`Stats.cost`, `sum_cents`), and `--json` goes through the store's one
serialiser, so the table, the JSON and the file always agree.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .ledger import Ledger
from .periods import PERIODS, bounds
from .pricing import LONG_CONTEXT, Pricing, sum_cents
from .reading import Located, UsageFileError, dumps, load_ledger, load_totals, stream_cursor
from .records import Bucket, Stats, Totals, format_time, render, week_key

if TYPE_CHECKING:
    from ..config import Service

log = logging.getLogger("ccm_wsgi.report")

ANONYMOUS = "-"  # requests without a user name (a service with no users) are only in bucket totals
_HEADERS = ("User", "Model", "Requests", "Messages", "Input", "Output", "Cache read", "Cache write", "USD")


@dataclass(slots=True)
class Target:
    label: str
    path: str
    pricing: Pricing
    service: str = ""  # the service whose spend this file counts towards (-c), else the file itself
    budgets: dict[str, dict[str, float]] = field(default_factory=dict)  # user -> period -> USD (-c)
    config: Service | None = None  # with shared state: what the cluster's stream holds beyond the file counts too


@dataclass(slots=True)
class Row:
    user: str
    model: str
    stats: Stats
    usd: float


class ReportError(Exception):
    """A problem that ends the report with exit code 1; the message says what to do."""


def run(config_path: str | None = None, usages_file: str | None = None, as_json: bool = False) -> int:
    """Print the report for `-c CONFIG` (every usages_path in it) or `-f FILE`; returns the exit code."""
    try:
        targets = _config_targets(config_path) if config_path else [_file_target(usages_file or "")]
    except ReportError as exc:
        print(exc, file=sys.stderr)
        return 1
    status = 0
    loaded: list[tuple[Target, Totals]] = []
    ledgers: list[tuple[Target, Ledger]] = []
    for target in targets:
        try:
            tail = _stream_tail(target)
            loaded.append((target, load_totals(target.path, log, tail)))
            if not as_json:
                ledgers.append((target, load_ledger(target.path, log, target.pricing, tail)))
        except FileNotFoundError:
            print(f"{target.label}: no usage file at {target.path} (nothing recorded yet?)", file=sys.stderr)
            status = 1
        except (UsageFileError, OSError) as exc:
            print(f"{target.label}: {exc}", file=sys.stderr)
            status = 1
    if as_json:  # the usage file's schema, as sing-box reads it
        _print_json(loaded, several=config_path is not None and len(targets) > 1)
    else:
        for i, (target, totals) in enumerate(loaded):
            if i:
                print()
            print("\n".join(table(target.label, totals, target.pricing)))
        for service, users in spend(ledgers, time.time()).items():
            print()
            print("\n".join(spend_table(service, users)))
    return status


def spend(ledgers: list[tuple[Target, Ledger]], now: float) -> dict[str, dict[str, dict[str, Any]]]:
    """What each user spent in the current UTC day, week and month, over every usage file of a service, and
    the budgets they have there: {service: {user: {per: {"spent": USD, "budget": USD or None}}}}."""
    found: dict[str, dict[str, dict[str, Any]]] = {}
    for target, ledger in ledgers:
        users = found.setdefault(target.service or target.label, {})
        for user in sorted({*(user for user in ledger.spend if user), *target.budgets}):  # "": no user, no budget
            periods = users.setdefault(user, {per: {"spent": 0.0, "budget": target.budgets.get(user, {}).get(per)}
                                              for per in PERIODS})
            for per, usd in zip(PERIODS, ledger.spent(user, [bounds(per, now)[0] for per in PERIODS]), strict=True):
                periods[per]["spent"] += usd
    for users in found.values():
        for periods in users.values():
            for row in periods.values():
                row["spent"] = round(row["spent"], 6)
    return found


def spend_table(service: str, users: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """Spend and budgets per user as a table (UTC calendar periods)."""
    lines = [f"Spend in UTC calendar periods - {service}"]
    if not users:
        return [*lines, "", "Nothing spent yet."]
    rows: list[tuple[str, ...]] = [("User", "Today", "This week", "This month")]
    for user, periods in users.items():
        cells = []
        for per in PERIODS:
            row = periods[per]
            cell = f"{row['spent']:,.2f}"
            if row["budget"] is not None:
                cell += f" of {row['budget']:,.2f} ({100 * row['spent'] / row['budget']:.0f}%)"
            cells.append(cell)
        rows.append((user, *cells))
    return [*lines, "", *_layout(rows, rules_before=set(), text_columns=1)]


def _print_json(loaded: list[tuple[Target, Totals]], several: bool) -> None:
    """One file: its usage document. Several (a config with several usages_path): {path: document}."""
    if several:
        docs = {target.path: render(totals, target.pricing) for target, totals in loaded}
        print(json.dumps(docs, indent=2, ensure_ascii=False))
    elif loaded:
        target, totals = loaded[0]
        sys.stdout.write(dumps(render(totals, target.pricing)))


def _stream_tail(target: Target) -> list[Located]:
    """With shared state, the other nodes' records the file does not hold yet (none when Redis is unreachable:
    the report then says what this node's file and journals hold, and warns)."""
    if target.config is None or target.config.state is None:
        return []
    from redis.exceptions import RedisError

    from ..state.usage import tail

    cursor = stream_cursor(target.path)
    try:
        return tail(target.config, target.path, cursor.stream if cursor is not None else "0-0")
    except RedisError as exc:
        print(f"{target.label}: the shared state is unreachable ({type(exc).__name__}); showing this node's "
              "records and those folded before", file=sys.stderr)
        return []


def _file_target(path: str) -> Target:
    return Target(path, path, Pricing(log=log))


def _config_targets(config_path: str) -> list[Target]:
    from ..config import BalancerCredential, ConfigError, load

    try:
        config = load(config_path)
    except ConfigError as exc:
        raise ReportError("\n".join(exc.problems)) from None
    targets: list[Target] = []
    seen: set[str] = set()
    for service in config.services:
        pricing = Pricing(service.pricing, log)
        if service.pooled:
            places = [(f"service {service.tag}, credential {c.tag}", c.usages_path)
                      for c in service.credentials if not isinstance(c, BalancerCredential)]
        else:
            places = [(f"service {service.tag}", service.usages_path)]
        budgets = {user.name: {b.per: b.usd for b in limits.budget}
                   for user in service.users if (limits := service.limits_for(user)) is not None}
        for label, path in places:
            if path and path not in seen:
                seen.add(path)
                targets.append(Target(f"{label} ({path})", path, pricing, f"service {service.tag}", budgets, service))
    if not targets:
        raise ReportError(f"{config_path}: no ccm service has a usages_path, so no usage is recorded")
    return targets


# --- the table -------------------------------------------------------------------------------


def table(label: str, totals: Totals, pricing: Pricing) -> list[str]:
    """The human report for one usage file: one block per week, newest first, "no week" last."""
    lines = [f"{label} - last updated {format_time(totals.last_updated_ns)}"]
    weeks: defaultdict[int, list[Bucket]] = defaultdict(list)
    for bucket in totals.buckets.values():
        weeks[max(bucket.week_start_unix, 0)].append(bucket)
    if not weeks:
        return [*lines, "", "No usage recorded yet."]
    for week in sorted(weeks, key=lambda w: (w == 0, -w)):
        title = f"Week from {week_key(week)}" if week else "No week (records without a weekly reset time)"
        lines += ["", title, *_week_block(weeks[week], pricing)]
    all_buckets = list(totals.buckets.values())
    grand = _sum_stats(b.total for b in all_buckets)
    usd = sum_cents([b.total.cost(pricing, b.model, b.context_window) for b in all_buckets])
    lines += ["", f"All weeks: {_summary(grand, usd)}"]
    return lines


def _week_block(buckets: list[Bucket], pricing: Pricing) -> list[str]:
    rows = sorted(_rows(buckets, pricing), key=lambda r: (r.user == ANONYMOUS, r.user, r.model))
    body: list[tuple[str, ...]] = []
    by_user: defaultdict[str, list[Row]] = defaultdict(list)
    for row in rows:
        by_user[row.user].append(row)
    for user, user_rows in by_user.items():
        body += [_cells(r.user, r.model, r.stats, r.usd) for r in user_rows]
        if len(user_rows) > 1:
            total = _sum_stats(r.stats for r in user_rows)
            body.append(_cells(user, "total", total, sum_cents([r.usd for r in user_rows])))
    week_total = _sum_stats(b.total for b in buckets)
    week_usd = sum_cents([b.total.cost(pricing, b.model, b.context_window) for b in buckets])
    footer = _cells("total", "", week_total, week_usd)
    return _layout([_HEADERS, *body, footer], rules_before={len(body) + 1})


def _rows(buckets: list[Bucket], pricing: Pricing) -> list[Row]:
    rows = []
    for b in buckets:
        model = f"{b.model} (1M)" if b.context_window >= LONG_CONTEXT else b.model
        for user, stats in b.by_user.items():
            rows.append(Row(user, model, stats, stats.cost(pricing, b.model, b.context_window)))
        rest = Stats()
        rest.merge(b.total)
        for stats in b.by_user.values():
            rest.merge(stats, sign=-1)
        if not rest.is_zero():
            rows.append(Row(ANONYMOUS, model, rest, rest.cost(pricing, b.model, b.context_window)))
    return rows


def _sum_stats(items: Any) -> Stats:
    total = Stats()
    for stats in items:
        total.merge(stats)
    return total


def _cells(user: str, model: str, s: Stats, usd: float) -> tuple[str, ...]:
    t = s.tokens
    numbers = (s.request_count, s.messages_count, t.input_tokens, t.output_tokens, t.cache_read_input_tokens,
               t.cache_creation_input_tokens)
    return (user, model, *(f"{n:,}" for n in numbers), f"{usd:,.2f}")


def _summary(s: Stats, usd: float) -> str:
    t = s.tokens
    return (
        f"{s.request_count:,} requests, {s.messages_count:,} messages, {t.input_tokens:,} input, "
        f"{t.output_tokens:,} output, {t.cache_read_input_tokens:,} cache read, "
        f"{t.cache_creation_input_tokens:,} cache write tokens, USD {usd:,.2f}"
    )


def _layout(rows: list[tuple[str, ...]], rules_before: set[int], text_columns: int = 2) -> list[str]:
    """Text columns left-aligned, numbers right-aligned, a rule under the header and before `rules_before`."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        if n in rules_before or n == 1:
            out.append("  " + "  ".join("-" * w for w in widths))
        cells = [c.ljust(w) if i < text_columns else c.rjust(w)
                 for i, (c, w) in enumerate(zip(row, widths, strict=True))]
        out.append(("  " + "  ".join(cells)).rstrip())
    return out
