"""Budget periods: the UTC calendar day, week (from Monday) and month.

A budget counts what a user spent since the start of the current period and frees at its end. These are
calendar periods on purpose, easy to explain ("$5 a day"), not the subscription's own rolling 5-hour and
weekly windows (those are what `window_share` is about).
"""

from __future__ import annotations

import calendar
import functools
import time
from datetime import datetime, timezone

PERIODS = ("day", "week", "month")
ADJECTIVE = {"day": "daily", "week": "weekly", "month": "monthly"}
DAY = 86_400


def day_of(epoch: float) -> int:
    """The UTC day number (days since 1970-01-01) of an instant."""
    return int(epoch // DAY)


def bounds(per: str, now: float) -> tuple[int, int]:
    """(first day, first day of the next period) of the period `per` that contains `now`, as day numbers."""
    return _bounds(per, day_of(now))


@functools.lru_cache(maxsize=64)  # asked for each budget of every limited request: a few days' worth
def _bounds(per: str, today: int) -> tuple[int, int]:
    if per == "day":
        return today, today + 1
    if per == "week":
        start = today - (today + 3) % 7  # 1970-01-01 was a Thursday; Monday is day 4
        return start, start + 7
    date = datetime.fromtimestamp(today * DAY, timezone.utc)
    start = day_of(calendar.timegm((date.year, date.month, 1, 0, 0, 0)))
    return start, start + calendar.monthrange(date.year, date.month)[1]


@functools.lru_cache(maxsize=64)  # a limited request's budgets, for today
def first_days(periods: tuple[str, ...], today: int) -> list[int]:
    """The first day of each period in `periods` that contains day `today` (a list, never changed)."""
    return [_bounds(per, today)[0] for per in periods]


def day_name(day: int) -> str:
    return time.strftime("%Y-%m-%d", time.gmtime(day * DAY))


def day_number(name: str) -> int:
    return day_of(calendar.timegm(time.strptime(name, "%Y-%m-%d")))


def when(epoch: float) -> str:
    """`2026-11-30 00:00 UTC`: how a reset instant is told to a person."""
    return datetime.fromtimestamp(epoch, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def ends(per: str, now: float) -> float:
    """The instant the period `per` containing `now` ends (its budget frees)."""
    return float(bounds(per, now)[1] * DAY)


def oldest_day_kept(now: float) -> int:
    """Spend older than this cannot count towards any period any more (the longest is a month)."""
    return day_of(now) - 31 - 7

