"""Choosing a credential from a pool: strategies, sticky sessions, failover bookkeeping, status.

A session (one Claude Code conversation) stays on one credential so that its prompt cache keeps
paying off; it moves only when that credential becomes unusable, is excluded for this request
(it just answered a quota 429) or, for `least_used` with a rebalance threshold, has drifted too far
above the best choice. Other upstream errors never move a session.

Everything here is pure bookkeeping: no I/O and no blocking, so under gevent each call runs to
completion without a switch and needs no lock. (Not thread-safe; the service runs greenlets.)
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..errors import ProxyError
from ..names import STRATEGIES
from .quota import Quota, format_duration
from .sessions import MAX_PER_USER, MAX_SESSIONS, SESSION_TTL, Key, Pins, SessionPins

WEEK_HOURS = 168.0


class Member(Protocol):
    """A pooled credential as the balancer sees it (the integrator's Account objects)."""

    tag: str
    quota: Quota
    cap_5h: float
    cap_weekly: float
    external: bool

    def available(self) -> bool:
        """Credential file loaded (default) / peer reachable (external)."""
        ...

    def plan_weight(self) -> float:
        """Relative plan capacity (a Max 20x plan weighs more than a Pro plan)."""
        ...


class NoCredential(Exception):
    """No member can take the request; carries what the client should be told."""

    def __init__(self, message: str, retry_after: float | None = None, all_unavailable: bool = False):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after  # seconds until the earliest reset, None if unknown
        self.all_unavailable = all_unavailable  # no member is even loaded/reachable

    def as_proxy_error(self) -> ProxyError:
        """429 rate_limit_error with `retry-after` when quota is the reason; 503 when nothing is even loaded."""
        if self.all_unavailable:
            return ProxyError(503, "api_error", self.message)
        headers = [] if self.retry_after is None else [("retry-after", str(max(1, math.ceil(self.retry_after))))]
        return ProxyError(429, "rate_limit_error", self.message, headers)


class Balancer:
    """Selection over `members` (in configured order) with sticky sessions keyed by session id."""

    def __init__(
        self,
        tag: str,
        members: Sequence[Member],
        strategy: str = "least_used",
        rebalance_threshold: float = 0.0,
        grace: float = 900.0,
        session_ttl: float = SESSION_TTL,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        max_sessions: int = MAX_SESSIONS,
        max_per_user: int = MAX_PER_USER,
        pins: Callable[[SessionPins], Pins] | None = None,
    ):
        if strategy not in STRATEGIES:  # the config spells them out (least-used -> least_used)
            raise ValueError(f"unknown balancer strategy: {strategy}")
        self.tag = tag
        self.members = list(members)
        self.strategy = strategy
        self.rebalance_threshold = rebalance_threshold
        self.grace = grace
        self.session_ttl = session_ttl
        self._rng = rng or random.Random()
        self._clock = clock
        self._counter = 0
        own = SessionPins(session_ttl, max_sessions, max_per_user)
        self._pins: Pins = pins(own) if pins is not None else own  # shared by several nodes, or this one's

    # --- selection ----------------------------------------------------------------------------

    def select(
        self, session: str, exclude: frozenset[str] = frozenset(), allow_external: bool = True, user: str = ""
    ) -> Member:
        """The member for this request; raises NoCredential when none is usable.

        `exclude` holds tags already tried for this request (quota 429 failover); `allow_external`
        is the user's scope. A pinned session keeps its member unless the rules above move it; pins are
        kept per `user`, so one user's session ids never displace another's.
        """
        now = self._clock()
        self._pins.purge(now)
        usable = [m for m in self.usable_members(allow_external, now) if m.tag not in exclude]
        if self.strategy == "fallback":
            if not usable:
                raise self._failure(allow_external, now)
            return usable[0]
        key = (user, session)
        if session:
            kept = self._keep_pin(key, usable, now)
            if kept is not None:
                return kept
        choice = self._pick(usable, now)
        if choice is None:
            raise self._failure(allow_external, now)
        if session:
            self._pins.pin(key, choice.tag, now)
        return choice

    def recall(self, session: str, user: str = "") -> None:
        """A request of `session` is about to `select`: the pin table may fetch its pin meanwhile."""
        if session and self.strategy != "fallback":
            self._pins.recall((user, session))

    def _keep_pin(self, key: Key, usable: list[Member], now: float) -> Member | None:
        """The session's pinned member if it may stay there; otherwise drop the pin."""
        pin = self._pins.get(key, now)
        if pin is None:
            return None
        member = next((m for m in usable if m.tag == pin.tag), None)
        if member is not None and not self._should_rebalance(member, usable, now):
            self._pins.touch(key, now)
            return member
        self._pins.drop(key)
        return None

    def _should_rebalance(self, pinned: Member, usable: list[Member], now: float) -> bool:
        """least_used only: move when the pinned weekly use exceeds the best's by threshold/weight.

        Dividing by the plan weight makes big plans tolerate less drift in points, since each point
        of theirs is worth more capacity. Evaluated per session, so other sessions move lazily on
        their own next request, and only within their own scope.
        """
        if self.strategy != "least_used" or self.rebalance_threshold <= 0:
            return False
        best = _least_used(usable, now)
        if best is None or best is pinned:
            return False
        gap = pinned.quota.utilization(now)[1] - best.quota.utilization(now)[1]
        return gap > self.rebalance_threshold / _weight(pinned)

    def _pick(self, usable: list[Member], now: float) -> Member | None:
        """Apply the strategy to the usable members (already filtered by scope and exclusions)."""
        if not usable:
            return None
        if self.strategy == "least_used":
            return _least_used(usable, now)
        if self.strategy == "random":
            return self._rng.choice(usable)
        if self.strategy == "round_robin":
            return self._round_robin(usable)
        return usable[0]

    def _round_robin(self, usable: list[Member]) -> Member:
        """Shared counter over the full member list, so positions rotate even when some are benched."""
        start = self._counter % len(self.members)
        self._counter += 1
        tags = {m.tag for m in usable}
        for offset in range(len(self.members)):
            member = self.members[(start + offset) % len(self.members)]
            if member.tag in tags:
                return member
        return usable[0]

    # --- failure, 429, introspection ---------------------------------------------------------

    def on_rate_limited(self, member: Member, headers: Mapping[str, str], session: str, user: str = "") -> float:
        """A quota 429 from `member`: bench it until its reset (returned) and unpin the session.

        The next `select(session, exclude=...)` re-pins the session to whatever it picks, so the
        conversation follows the request to the new credential.
        """
        now = self._clock()
        until = member.quota.observe_429(headers, now, external=member.external)
        pin = self._pins.get((user, session), now) if session else None
        if pin is not None and pin.tag == member.tag:
            self._pins.drop((user, session))
        return until

    def usable_members(self, allow_external: bool = True, now: float | None = None) -> list[Member]:
        """Members in scope that can take a request right now, in configured order."""
        now = self._clock() if now is None else now
        return [m for m in self.members if (allow_external or not m.external) and self.is_usable(m, now)]

    def is_usable(self, member: Member, now: float | None = None) -> bool:
        """Loaded/reachable and the quota allows it (caps, hard limit, stale-data grace)."""
        now = self._clock() if now is None else now
        return member.available() and member.quota.usable(member.cap_5h, member.cap_weekly, now, self.grace)

    def pinned(self, session: str, user: str = "") -> str | None:
        """The tag `session` is pinned to, if any (compare before/after `select` to log new assignments)."""
        pin = self._pins.get((user, session), self._clock()) if session else None
        return pin.tag if pin is not None else None

    def sessions(self) -> dict[str, str]:
        """Live session id → member tag (for the admin status)."""
        self._pins.purge(self._clock())
        return {session: pin.tag for (_, session), pin in self._pins.items()}

    def sessions_on(self, tag: str) -> int:
        return sum(1 for _, pin in self._pins.items() if pin.tag == tag)

    def member_status(self, member: Member) -> dict[str, object]:
        """One member's state, the admin status's view of a credential: quota snapshot, caps, weight,
        usability, and the sessions this balancer pins to it."""
        now = self._clock()
        self._pins.purge(now)
        state = member.quota.snapshot(now)
        state.update(
            tag=member.tag,
            external=member.external,
            available=member.available(),
            usable=self.is_usable(member, now),
            cap_5h=member.cap_5h,
            cap_weekly=member.cap_weekly,
            plan_weight=_weight(member),
            sessions=self.sessions_on(member.tag),
        )
        return state

    def _failure(self, allow_external: bool, now: float) -> NoCredential:
        """Explain why nothing is usable, with seconds until the earliest member reset."""
        scoped = [m for m in self.members if allow_external or not m.external]
        loaded = [m for m in scoped if m.available()]
        if not scoped:
            return NoCredential(f"no credential in {self.tag} is allowed for this user", None, True)
        if not loaded:
            if len(scoped) == 1:
                return NoCredential(f"credential {scoped[0].tag} is unavailable", None, True)
            return NoCredential("all credentials unavailable", None, True)
        resets = [r for m in loaded if (r := m.quota.earliest_reset(now, m.cap_5h, m.cap_weekly)) > now]
        retry_after = min(resets) - now if resets else None
        subject = f"credential {loaded[0].tag} is" if len(scoped) == 1 else "all credentials"
        message = f"{subject} rate-limited"
        if retry_after is not None:
            message += f", {'earliest ' if len(scoped) > 1 else ''}reset in {format_duration(retry_after)}"
        return NoCredential(message, retry_after, False)

def _weight(member: Member) -> float:
    """The member's plan weight, with nonsense (≤ 0, NaN) treated as 1 so arithmetic stays sane."""
    try:
        weight = float(member.plan_weight())
    except (TypeError, ValueError):
        return 1.0
    return weight if math.isfinite(weight) and weight > 0 else 1.0


def _score(member: Member, now: float) -> float:
    """least_used score: weekly headroom * plan weight * reset urgency (168 h / hours to reset)."""
    weekly = member.quota.utilization(now)[1]
    score = (member.cap_weekly - weekly) * _weight(member)
    reset = member.quota.weekly_reset
    if reset > now:
        score *= WEEK_HOURS / max(1.0, (reset - now) / 3600.0)
    return score


def _least_used(usable: list[Member], now: float) -> Member | None:
    """Highest score wins; ties go to the earlier member in configured order."""
    best, best_score = None, -math.inf
    for member in usable:
        score = _score(member, now)
        if score > best_score:
            best, best_score = member, score
    return best


def aggregate_status(
    members: Sequence[Member], now: float, exclude_tag: str = "", allow_external: bool = True
) -> dict[str, float]:
    """The user's view: weight-averaged remaining headroom under each member's caps.

    Counts every available member in scope, usable or not, so the figure reflects real capacity;
    an idle member with cap 99 reports 1 %. Nothing counted → 100 / 100 / weight 0.
    """
    total_w = rem_5h = rem_week = 0.0
    for member in members:
        if member.tag == exclude_tag or (member.external and not allow_external) or not member.available():
            continue
        weight = _weight(member)
        five, week = member.quota.utilization(now)
        total_w += weight
        rem_5h += max(0.0, member.cap_5h - five) * weight
        rem_week += max(0.0, member.cap_weekly - week) * weight
    if total_w <= 0:
        return {"five_hour_utilization": 100.0, "weekly_utilization": 100.0, "plan_weight": 0.0}
    return {
        "five_hour_utilization": 100.0 - rem_5h / total_w,
        "weekly_utilization": 100.0 - rem_week / total_w,
        "plan_weight": total_w,
    }
