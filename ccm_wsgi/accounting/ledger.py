"""What each user spent, and how much of the subscription's windows their requests consumed.

The ledger is derived from the usage records alone, in the order of the usage journal, so it is as durable
and as exact as they are, and every process that reads the same journal (gunicorn workers, a restarted
`ccm-wsgi`) arrives at the same figures. It is saved with the usage file at every fold.

* Spend: USD per user per UTC day (priced as the usage file prices it), kept for the last five weeks, the
  longest budget period plus a margin. Requests without a user (an open service) are kept under "".
* Counts: requests and tokens (input, output, cache read, cache write) per user per UTC day, kept as long,
  so that the status page tells what each user used today, this week and this month. A file written before
  counts were kept has none for its days: those show their spend only.
* Window share: the subscription reports its 5-hour and weekly utilisation (0-100 points) on every
  response. Each record carries what its response reported. The rule: the points by which the
  utilisation rose are shared among the users whose requests completed since it last rose, in proportion
  to what those requests cost. So the points attributed to all users add up exactly to the rise that
  proxied traffic revealed: never more than the window's utilisation, and with only proxied traffic equal
  to it (the utilisation before the first request the proxy saw in a window is not attributed to
  anyone). A new window (a later reset instant) starts from zero.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .periods import DAY, day_name, day_number, oldest_day_kept
from .records import column_sums

if TYPE_CHECKING:
    from .pricing import Pricing
    from .records import Record

WINDOWS = ("five_hour", "weekly")
COUNTS = ("requests", "input", "output", "cache_read", "cache_write")
_COUNTED = operator.attrgetter("tokens.input_tokens", "tokens.output_tokens", "tokens.cache_read_input_tokens",
                               "tokens.cache_creation_input_tokens")  # the token counts of COUNTS, by record
_COST = operator.attrgetter("cost")
_NO_COUNTS = (0,) * len(COUNTS)
GROUPED_FROM = 32  # records added together are grouped by user and day from this many on: cheaper, not below
RESET_JITTER = 60.0  # resets from different sources differ by seconds; a new window moves by hours


@dataclass(slots=True)
class Window:
    reset: float = 0.0
    seen: float = 0.0  # utilisation accounted for so far
    points: dict[str, float] = field(default_factory=dict)
    pending: dict[str, float] = field(default_factory=dict)  # cost since the utilisation last rose

    def observe(self, user: str, weight: float, utilization: float, reset: float, before: float) -> None:
        """One response's reading of this window: its utilisation (points), its reset (epoch seconds), and the
        utilisation the proxy knew for the window before the request was sent."""
        if reset > self.reset + RESET_JITTER:
            self.reset, self.seen = reset, before
            self.points.clear()
            self.pending.clear()
        elif reset < self.reset - RESET_JITTER:
            return  # a reading from a window already over
        self.pending[user] = self.pending.get(user, 0.0) + weight
        if utilization <= self.seen:
            return
        rise = utilization - self.seen
        total = sum(self.pending.values())
        for name, part in self.pending.items():
            share = rise * part / total if total > 0 else (rise if name == user else 0.0)
            self.points[name] = self.points.get(name, 0.0) + share
        self.pending.clear()
        self.seen = utilization

    def used(self, user: str, now: float) -> float:
        """Points attributed to `user` in this window; none once it is over."""
        return 0.0 if 0 < self.reset <= now else self.points.get(user, 0.0)

    def to_json(self) -> dict[str, Any]:
        return {"reset": _plain(self.reset), "seen": _plain(self.seen),
                "points": {k: _plain(v) for k, v in self.points.items()},
                "pending": {k: _plain(v) for k, v in self.pending.items()}}

    @classmethod
    def from_json(cls, raw: Any) -> Window:
        if not isinstance(raw, dict):
            return cls()
        return cls(_number(raw.get("reset")), _number(raw.get("seen")), _numbers(raw.get("points")),
                   _numbers(raw.get("pending")))


@dataclass(slots=True)
class Used:
    """What one user used over some days: requests, tokens by kind and USD."""

    requests: int = 0
    input: int = 0
    output: int = 0
    cache_read: int = 0
    cache_write: int = 0
    usd: float = 0.0

    def add(self, other: Used) -> None:
        self.requests += other.requests
        self.input += other.input
        self.output += other.output
        self.cache_read += other.cache_read
        self.cache_write += other.cache_write
        self.usd += other.usd


class Ledger:
    def __init__(self) -> None:
        self.spend: dict[str, dict[int, float]] = {}  # user -> UTC day number -> USD
        self.counts: dict[str, dict[int, list[int]]] = {}  # user -> UTC day number -> COUNTS
        self.windows = {name: Window() for name in WINDOWS}

    def add(self, rec: Record, t_ns: int, pricing: Pricing) -> None:
        """Add one usage record: what `add_all` adds for each record of a batch, without grouping."""
        user = rec.user
        cost = rec.cost or pricing.cost_of(rec)
        if user and rec.readings:
            self._observe(user, cost, rec.readings)
        day = int(t_ns / 1e9 // DAY)
        days = self.spend.get(user)
        if days is None:
            days = self.spend[user] = {}
        days[day] = days.get(day, 0.0) + cost
        by_day = self.counts.get(user)
        if by_day is None:
            by_day = self.counts[user] = {}
        n = by_day.get(day, _NO_COUNTS)
        tokens = rec.tokens
        by_day[day] = [n[0] + 1, n[1] + tokens.input_tokens, n[2] + tokens.output_tokens,
                       n[3] + tokens.cache_read_input_tokens, n[4] + tokens.cache_creation_input_tokens]

    def add_all(self, entries: Sequence[tuple[Record, int]], pricing: Pricing) -> None:
        """Add usage records in journal order: each one's user, time (ns), cost (its own, else priced) and
        tokens, and what its response reported (see `_observe`). A user's day gets its records' costs added in
        their order, as adding them one by one would, whatever the batch."""
        if len(entries) < GROUPED_FROM:  # (a ledger read before each limited request finds a few)
            for rec, t_ns in entries:
                self.add(rec, t_ns, pricing)
            return
        groups: dict[tuple[str, int], list[Record]] = {}
        for rec, t_ns in entries:
            user = rec.user
            key = (user, int(t_ns / 1e9 // DAY))  # the UTC day, as `day_of` tells it
            group = groups.get(key)
            if group is None:
                groups[key] = [rec]
            else:
                group.append(rec)
            if user and rec.readings:
                self._observe(user, rec.cost or pricing.cost_of(rec), rec.readings)
        for (user, day), recs in groups.items():
            costs = list(map(_COST, recs))
            if not all(costs):  # a record without a cost of its own (a journal line without one) is priced
                costs = [cost or pricing.cost_of(rec) for cost, rec in zip(costs, recs, strict=True)]
            days = self.spend.get(user)
            if days is None:
                days = self.spend[user] = {}
            days[day] = functools.reduce(operator.add, costs, days.get(day, 0.0))
            by_day = self.counts.get(user)
            if by_day is None:
                by_day = self.counts[user] = {}
            sums = (len(recs), *column_sums(_COUNTED, recs))
            by_day[day] = list(map(operator.add, by_day.get(day, _NO_COUNTS), sums))

    def _observe(self, user: str, cost: float, readings: tuple[float, ...]) -> None:
        """What a response of `user` that cost `cost` reported (`readings`: the 5-hour window's utilisation,
        reset and utilisation before, then the weekly window's; a window with no reset was not reported)."""
        if len(readings) >= 3 and readings[1] > 0:
            self.windows["five_hour"].observe(user, cost, readings[0], readings[1], readings[2])
        if len(readings) >= 6 and readings[4] > 0:
            self.windows["weekly"].observe(user, cost, readings[3], readings[4], readings[5])

    def copy(self) -> Ledger:
        """An independent copy (a few small dicts: far cheaper than `copy.deepcopy`)."""
        twin = Ledger()
        twin.spend = {user: dict(days) for user, days in self.spend.items()}
        twin.counts = {user: {day: list(counts) for day, counts in days.items()} for user, days in self.counts.items()}
        twin.windows = {name: Window(w.reset, w.seen, dict(w.points), dict(w.pending))
                        for name, w in self.windows.items()}
        return twin

    def spent(self, user: str, first_days: Sequence[int]) -> list[float]:
        """USD spent by `user` from the start of each of `first_days` on (its days' spend added in their order)."""
        days = self.spend.get(user) or {}
        totals = []
        for first in first_days:  # one user's few periods and days (every limited request): plain loops
            total = 0.0
            for day in days:
                if day >= first:
                    total += days[day]
            totals.append(total)
        return totals

    def since(self, user: str, first_day: int) -> Used:
        """What `user` used from the start of day `first_day` on."""
        totals = [0] * len(COUNTS)
        for day, counts in self.counts.get(user, {}).items():
            if day >= first_day:
                for i, n in enumerate(counts):
                    totals[i] += n
        requests, input_tokens, output, cache_read, cache_write = totals
        return Used(requests, input_tokens, output, cache_read, cache_write, self.spent(user, [first_day])[0])

    def users(self) -> set[str]:
        """Everyone with a record in the days kept ("" for requests without a user)."""
        return set(self.spend) | set(self.counts)

    def shares(self, user: str, now: float) -> tuple[float, float]:
        """Points of the current 5-hour and weekly windows attributed to `user`."""
        return self.windows["five_hour"].used(user, now), self.windows["weekly"].used(user, now)

    def reset(self, window: str) -> float:
        return self.windows[window].reset

    def to_json(self, now: float) -> dict[str, Any]:
        oldest = oldest_day_kept(now)
        spend = {user: {day_name(day): _plain(usd) for day, usd in sorted(days.items()) if day >= oldest}
                 for user, days in sorted(self.spend.items())}
        counts = {user: {day_name(day): list(n) for day, n in sorted(days.items()) if day >= oldest}
                  for user, days in sorted(self.counts.items())}
        return {"spend": {user: days for user, days in spend.items() if days},
                "counts": {user: days for user, days in counts.items() if days},
                "windows": {name: window.to_json() for name, window in self.windows.items()}}

    @classmethod
    def from_json(cls, raw: Any) -> Ledger:
        ledger = cls()
        if not isinstance(raw, dict):
            return ledger
        spend = raw.get("spend")
        if isinstance(spend, dict):
            for user, days in spend.items():
                if isinstance(days, dict):
                    ledger.spend[user] = {day_number(day): _number(usd) for day, usd in days.items()
                                          if _is_day(day)}
        counts = raw.get("counts")  # absent from files written before counts were kept
        if isinstance(counts, dict):
            for user, days in counts.items():
                if isinstance(days, dict):
                    ledger.counts[user] = {day_number(day): _integers(n) for day, n in days.items() if _is_day(day)}
        windows = raw.get("windows")
        if isinstance(windows, dict):
            for name in WINDOWS:
                ledger.windows[name] = Window.from_json(windows.get(name))
        return ledger


def _plain(value: float) -> float | int:
    """Whole numbers as integers, as the rest of the usage file writes them (Go's way)."""
    return int(value) if value.is_integer() else value


def _number(value: Any) -> float:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def _numbers(raw: Any) -> dict[str, float]:
    return {str(k): _number(v) for k, v in raw.items()} if isinstance(raw, dict) else {}


def _integers(raw: Any) -> list[int]:
    """A day's counts; anything unusable counts as zero."""
    values = raw if isinstance(raw, list) else []
    return [values[i] if i < len(values) and type(values[i]) is int else 0 for i in range(len(COUNTS))]


def _is_day(text: Any) -> bool:
    try:
        day_number(text)
    except (TypeError, ValueError):
        return False
    return True
