"""What the status page shows one viewer, read from the live service.

* The subscription's windows: each credential's 5-hour and weekly utilisation and when it resets. A user sees
  the credentials that can serve them, an admin every credential with its state.
* Usage: requests, tokens and USD of today, this week and this month (UTC calendar periods, as budgets count
  them), from the usage ledger: the same records `ccm-wsgi usage` adds up, followed from the shared journal,
  so every process shows the same figures. A user sees their own, an admin everyone's.
* Limits and what is left of each (the limits' own view), and the last refusals.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..accounting.ledger import Used
from ..accounting.periods import ADJECTIVE, bounds, when
from ..pool.quota import format_duration
from .session import Viewer

if TYPE_CHECKING:
    from ..config import User
    from ..pool.providers import Account
    from ..service import Service
    from .refusals import Refused

PERIODS = (("day", "Today"), ("week", "This week"), ("month", "This month"))
NOBODY = "(no user)"


@dataclass(frozen=True, slots=True)
class Window:
    name: str
    percent: float
    resets: str  # "in 2h13m (2026-11-02 14:00 UTC)", or "" when unknown


@dataclass(frozen=True, slots=True)
class Credential:
    tag: str
    available: bool
    plan: str
    windows: tuple[Window, ...]
    problem: str = ""  # why it is unavailable (admins only)


@dataclass(slots=True)
class Person:
    name: str
    periods: list[tuple[str, Used]]
    limits: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Page:
    viewer: Viewer
    credentials: tuple[Credential, ...]
    people: tuple[Person, ...]
    refusals: tuple[tuple[str, str, str, int], ...]  # when, who, limit, status; newest first
    updated: str
    counted: bool  # whether usage is counted at all (a usages_path)


def build(service: Service, viewer: Viewer, now: float | None = None) -> Page:
    now = time.time() if now is None else now
    user = viewer.user
    accounts = service.accounts if user is None else service.provider_for(user).accounts
    credentials = tuple(_credential(a, now, admin=user is None) for a in accounts)
    if user is not None:
        people: tuple[Person, ...] = (_person(service, user.name, now, user),)
    else:
        names = [u.name for u in service.cfg.users]
        seen = set().union(*(store.current_ledger().users() for store in service.usage_stores()))
        people = tuple(_person(service, name, now, service.auth.user_named(name))
                       for name in [*names, *([""] if "" in seen else [])])
    refused = [r for r in service.refusals.last() if user is None or r.user == user.name]
    return Page(viewer, credentials, people, tuple(_refusal(r) for r in reversed(refused)), when_exact(now),
                bool(service.usage_stores()))


def _credential(account: Account, now: float, admin: bool) -> Credential:
    quota = account.quota
    info = account.credential.info()
    windows = tuple(Window(name, percent, _resets(resets, now)) for name, percent, resets in
                    zip(("5-hour", "Weekly"), quota.utilization(now), (quota.five_hour_reset, quota.weekly_reset),
                        strict=True))
    plan = "external" if account.external else str(info.get("subscription_type") or "")
    problem = str(info.get("error") or "") if admin else ""
    return Credential(account.tag, bool(info.get("available")), plan, windows, problem)


def _resets(at: float, now: float) -> str:
    return f"in {format_duration(at - now)} ({when(at)})" if at > now else ""


def _person(service: Service, name: str, now: float, user: User | None) -> Person:
    periods = []
    for per, title in PERIODS:
        first, _ = bounds(per, now)
        total = Used()
        for store in service.usage_stores():
            total.add(store.current_ledger().since(name, first))
        periods.append((title, total))
    limits = _limits(service.limits.view(user)) if user is not None else []
    return Person(name or NOBODY, periods, limits)


def _limits(view: dict[str, Any]) -> list[str]:
    """The limits' own view of a user, in sentences."""
    lines = []
    if view.get("disabled"):
        lines.append("Access is disabled.")
    if view.get("expires"):
        lines.append(f"Access expires {view['expires']}.")
    for b in view.get("budget", ()):
        lines.append(f"{ADJECTIVE[b['per']].capitalize()} budget {usd(b['usd'])}: {usd(b['spent'])} spent, "
                     f"{usd(b['remaining'])} left, resets {when(b['resets'])}.")
    if view.get("requests_per_minute"):
        lines.append(f"At most {view['requests_per_minute']} requests a minute.")
    if view.get("max_concurrent"):
        lines.append(f"At most {view['max_concurrent']} requests at once ({view.get('in_flight', 0)} running).")
    if view.get("models"):
        lines.append("Models: " + ", ".join(view["models"]) + ".")
    for tag, windows in view.get("window_share", {}).items():
        for window, share in windows.items():
            name = "5-hour" if window == "five_hour" else "weekly"
            lines.append(f"Share of credential {tag}'s {name} window: {share['used']:g} of {share['share']:g} "
                         f"points used.")
    return lines or ["No limits."]


def _refusal(r: Refused) -> tuple[str, str, str, int]:
    return when_exact(r.at), r.user or NOBODY, r.limit, r.status


def when_exact(at: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(at))


def usd(amount: float) -> str:
    """Dollars as `ccm-wsgi usage` shows them (cents), a non-zero amount under a cent as such."""
    return "<$0.01" if 0 < amount < 0.005 else f"${amount:,.2f}"
