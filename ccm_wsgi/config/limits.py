"""Per-user limits: a `limits` object on a service (every user's default) or on a user (replacing it).

Every key is optional. Budgets count USD per UTC calendar period, `window_share` caps the part of the
subscription's 5-hour and weekly windows one user's requests may use; both are derived from the usage
records, so they need a usage ledger (the service checks that one exists).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterator
from typing import Annotated

from pydantic import Field

from .base import REF, REQUIRED, Loc, Problem, Reading, Section, claim, entries, quote
from .values import choice, each, integer, number, plain, strings

PERIODS = ("day", "week", "month")
Percent = Annotated[float | None, number(0.0, 100.0, above=True)]


class Budget(Section):
    usd: Annotated[float, number(0.0, above=True), REQUIRED] = Field(default=0.0, description="US dollars per period")
    per: Annotated[str, choice(*PERIODS), REQUIRED] = Field(
        default="day", description="day (from 00:00 UTC), week (from Monday 00:00 UTC) or month (from the 1st), in UTC")


class WindowShare(Section):
    five_hour: Percent = Field(default=None, description="percent of the subscription's 5-hour window")
    weekly: Percent = Field(default=None, description="percent of the subscription's weekly window")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if not read.given:
            yield Problem((), "needs five_hour, weekly or both")

    @functools.cached_property
    def windows(self) -> tuple[tuple[int, str, float], ...]:
        """(place in the ledger's windows, name, percent) of each window with a share."""
        both = (("five_hour", self.five_hour), ("weekly", self.weekly))  # the order of the ledger's windows
        return tuple((place, name, percent) for place, (name, percent) in enumerate(both) if percent is not None)


class Limits(Section):
    budget: tuple[Budget, ...] = Field(default=(), description="USD per day, week or month (at most one per period)")
    requests_per_minute: Annotated[int | None, integer(1)] = Field(
        default=None, description="requests per sliding minute")
    max_concurrent: Annotated[int | None, integer(1)] = Field(
        default=None, description="requests in flight at once, streams included")
    models: Annotated[tuple[str, ...], plain(strings), each(
        lambda pattern: None if pattern.strip() else "must not contain an empty pattern")] = Field(
        default=(), description='fnmatch patterns of the models the user may ask for, e.g. "claude-sonnet-*"')
    window_share: WindowShare | None = Field(default=None, description="the user's share of the subscription's windows")

    def relations(self, read: Reading) -> Iterator[Problem]:
        periods: dict[str, Loc] = {}
        for index, budget in entries(self.budget):
            if not budget.was_read("per"):
                continue
            first = claim(periods, budget.per, ("budget", index))
            if first is not None:
                yield Problem(("budget", index, "per"), f"duplicate period {quote(budget.per)} (same as {REF})",
                              (first,))
        if "models" in read.given and read.valid("models") and not self.models:
            yield Problem(("models",), "must name at least one model pattern")

    # -- derived once per config ----------------------------------------------------------------------

    @functools.cached_property
    def needs_ledger(self) -> bool:
        """Whether enforcing these limits needs the usage records (budget or window share)."""
        return bool(self.budget) or self.window_share is not None

    @functools.cached_property
    def pattern(self) -> re.Pattern[str] | None:
        """The `models` patterns as one regular expression (fnmatch's own translation, case-sensitive); None:
        any model."""
        if not self.models:
            return None
        return re.compile("|".join(f"(?:{fnmatch.translate(pattern)})" for pattern in self.models))
