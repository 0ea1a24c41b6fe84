"""Per-credential subscription quota: what Anthropic told us about the 5-hour and weekly windows.

Two sources feed a `Quota`: the `anthropic-ratelimit-unified-*` headers on every upstream response
(cheap, always fresh while traffic flows) and the background poll of `GET /api/oauth/usage`
(needed for idle credentials). Everything here is pure: no I/O, no locks, and every method takes the
current time as `now` (epoch seconds) so that tests can drive the clock.

Deliberate differences from sing-box:

* Header values are parsed leniently and a malformed one is ignored; nothing here ever raises on
  input from the network. Both `5h`/`7d` and `five_hour`/`seven_day` spellings are read.
* A window whose reset instant has passed counts as 0 %, so a credential comes back on its
  own when its window rolls over instead of waiting for the next poll.
* Failed polls do not bench a credential while its last good data is younger than a grace period;
  a 429 from the usage API is never a failure.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from email.utils import parsedate_to_datetime

PREFIX = "anthropic-ratelimit-unified-"
FIVE_HOUR_NAMES = ("5h", "five_hour", "five-hour")
WEEKLY_NAMES = ("7d", "seven_day", "seven-day")
PLAN_WEIGHT_HEADER = "x-ccm-plan-weight"

POLL_BACKOFF_BASE = 60.0  # first retry after a failed usage poll
POLL_BACKOFF_MAX = 300.0
USAGE_API_RETRY_DEFAULT = 60.0  # usage API said 429 without a usable Retry-After
LIMIT_FALLBACK = 60.0  # quota 429 without any hint of when it ends
EXTERNAL_DEFAULT_WEIGHT = 10.0
# A new window's reset is hours after the old one; smaller moves are clock jitter between the
# usage API (fractional RFC 3339) and the headers (whole seconds), not a new window.
RESET_JITTER = 60.0
# Nothing Anthropic sends resets further out than a week; anything beyond is garbage.
MAX_RESET_AHEAD = 8 * 86400.0
MAX_FRACTION = 100.0  # a utilisation "fraction" above this (10 000 %) is garbage

_RFC3339 = re.compile(r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?\s*(Z|z|[+-]\d{2}:?\d{2})?$")


@dataclass
class Quota:
    """What we know about one credential's subscription windows (percent, epoch seconds)."""

    five_hour: float = 0.0  # percent (0-100+)
    five_hour_reset: float = 0.0  # epoch seconds, 0 = unknown
    weekly: float = 0.0
    weekly_reset: float = 0.0
    status: str = ""  # last anthropic-ratelimit-unified-status
    limited_until: float = 0.0  # hard rate limit after a quota 429
    updated: float = 0.0  # last time data arrived (header or successful poll)
    poll_failures: int = 0
    poll_retry_at: float = 0.0  # do not poll before this (usage-API 429 or failure backoff)
    account_type: str = ""
    rate_limit_tier: str = ""
    remote_plan_weight: float = 0.0
    failing_since: float = 0.0  # first failure of the current poll-failure streak (grace anchor without data)
    overage_until: float = 0.0  # paid extra usage in use until this instant (the window's reset)

    # --- feeding data in -------------------------------------------------------------------------

    def observe_headers(
        self, headers: Mapping[str, str], now: float, external: bool = False, authoritative: bool = False
    ) -> bool:
        """Update from a response's rate-limit headers; True if any utilisation/reset parsed.

        Default credentials get Anthropic's raw fractions, rounded up and only allowed to rise within
        a window, because concurrent responses arrive out of order and an older, lower value must not
        undo a newer one. External credentials relay an already-aggregated figure that may go down.
        """
        found = _lower(headers)
        parsed = False
        for names, util_attr, reset_attr in (
            (FIVE_HOUR_NAMES, "five_hour", "five_hour_reset"),
            (WEEKLY_NAMES, "weekly", "weekly_reset"),
        ):
            util_raw = _first(found, names, "utilization")
            reset_raw = _first(found, names, "reset")
            parsed |= self._observe_window(util_raw, reset_raw, util_attr, reset_attr, now, external, authoritative)
        status = found.get(PREFIX + "status", "")
        if status:
            self.status = status.lower()[:64]
        if _using_overage(found):
            self.overage_until = max(self.overage_until, _limit_reset(found, now))
        if external:
            weight = _number(found.get(PLAN_WEIGHT_HEADER))
            if weight is not None and 0 < weight < 1e6:
                self.remote_plan_weight = weight
        if parsed:
            self._fresh(now)
        return parsed

    def _observe_window(
        self, util_raw: str | None, reset_raw: str | None, util_attr: str, reset_attr: str, now: float,
        external: bool, authoritative: bool,
    ) -> bool:
        """Apply one window's utilisation/reset pair; returns whether either value was usable.

        `authoritative` (a quota 429): its reset instants replace the stored ones even when earlier, since
        the answer that refused the request knows best when the window frees."""
        fraction = _number(util_raw)
        if fraction is not None and not 0 <= fraction <= MAX_FRACTION:
            fraction = None
        reset = _epoch(reset_raw, now)
        if external:
            if reset is not None:
                setattr(self, reset_attr, reset)
            if fraction is not None:
                setattr(self, util_attr, fraction * 100)
            return fraction is not None or reset is not None
        stored_reset = getattr(self, reset_attr)
        # The stored window is over (its reset passed) or a later reset arrived: a new window.
        changed = 0 < stored_reset <= now
        if authoritative and reset is not None:
            changed = changed or reset != stored_reset
            setattr(self, reset_attr, reset)
        elif reset is not None and reset > stored_reset:
            changed = changed or reset > stored_reset + RESET_JITTER
            setattr(self, reset_attr, reset)
        if fraction is not None:
            # round() first: 0.07 * 100 is 7.000000000000001 and must not become 8.
            percent = float(math.ceil(round(fraction * 100, 6)))
            if changed or percent >= getattr(self, util_attr):
                setattr(self, util_attr, percent)
        return fraction is not None or reset is not None

    def observe_usage_api(self, body: object, now: float) -> bool:
        """Apply a 200 from `/api/oauth/usage`; an unusable body counts as a poll failure.

        The API reports percentages directly, and they may go down (it is the authority), so no
        monotonic guard. Accepts the decoded JSON or raw bytes/str.
        """
        data = _decode(body)
        if not isinstance(data, dict) or not ({"five_hour", "seven_day"} & data.keys()):
            self.observe_poll_failure(now)
            return False
        for key, util_attr, reset_attr in (
            ("five_hour", "five_hour", "five_hour_reset"),
            ("seven_day", "weekly", "weekly_reset"),
        ):
            window = data.get(key)
            if not isinstance(window, dict):
                continue
            util = _number(window.get("utilization"))
            if util is not None and 0 <= util <= MAX_FRACTION * 100:
                setattr(self, util_attr, util)
            reset = _epoch(window.get("resets_at"), now)
            if reset is not None:
                setattr(self, reset_attr, reset)
        self._fresh(now)
        self.poll_retry_at = 0.0
        if self.limited_until and self.limited_until <= now:
            self.limited_until = 0.0
        return True

    def observe_poll_failure(self, now: float) -> None:
        """A usage poll failed (transport, token, non-200/429, bad body): back off 1, 2, 4, 5, 5... min."""
        if self.poll_failures == 0:
            self.failing_since = now
        self.poll_failures += 1
        delay = min(POLL_BACKOFF_BASE * 2 ** min(self.poll_failures - 1, 16), POLL_BACKOFF_MAX)
        self.poll_retry_at = now + delay

    def observe_poll_rate_limited(self, retry_after: float, now: float) -> None:
        """The usage API said 429: wait as asked, but this says nothing about the credential's quota."""
        try:
            wait = float(retry_after)
        except (TypeError, ValueError):
            wait = 0.0
        if not (math.isfinite(wait) and 0 < wait <= 86400):
            wait = USAGE_API_RETRY_DEFAULT
        self.poll_retry_at = now + wait

    def observe_429(self, headers: Mapping[str, str], now: float, external: bool = False) -> float:
        """Mark a quota 429: unusable until the instant it ends, which is returned.

        The window named by `representative-claim` decides; without a claim we know, the overall
        `unified-reset`, then the earliest window reset in the headers, then `retry-after`, then a
        minute. Earliest rather than latest: retrying a still-limited account costs one more 429,
        while benching a usable one for days costs capacity. The headers also update the windows.
        """
        with contextlib.suppress(Exception):  # belt and braces: a 429 must never become a 500
            self.observe_headers(headers, now, external, authoritative=True)
        found = _lower(headers)
        until = _limit_reset(found, now)
        self.limited_until = until
        return until

    def _fresh(self, now: float) -> None:
        """New data arrived: the last-known state is current again, so poll failures are forgiven."""
        self.updated = now
        self.poll_failures = 0
        self.failing_since = 0.0

    # --- reading it out ------------------------------------------------------------------------

    def windows(self) -> tuple[float, float, float, float]:
        """(5h utilisation, 5h reset, weekly utilisation, weekly reset) as last observed."""
        return self.five_hour, self.five_hour_reset, self.weekly, self.weekly_reset

    def readings(self, before: tuple[float, float, float, float]) -> tuple[float, ...]:
        """What a response just reported, for the usage ledger: per window its utilisation, its reset, and
        the utilisation known for the same window before the response (unknown before: the response's own,
        so that nothing earlier is attributed to it; a new window since: 0)."""
        five, five_reset, week, week_reset = before

        def base(old: float, old_reset: float, now: float, now_reset: float) -> float:
            if old_reset <= 0:
                return now
            return old if abs(old_reset - now_reset) <= RESET_JITTER else 0.0

        return (self.five_hour, self.five_hour_reset, base(five, five_reset, self.five_hour, self.five_hour_reset),
                self.weekly, self.weekly_reset, base(week, week_reset, self.weekly, self.weekly_reset))

    def limited(self, now: float) -> bool:
        """Hard-limited by a quota 429; clears itself at `limited_until`."""
        return self.limited_until > now

    def utilization(self, now: float) -> tuple[float, float]:
        """(5h, weekly) percent; a window whose reset has passed is a fresh window at 0 %."""
        five = 0.0 if 0 < self.five_hour_reset <= now else self.five_hour
        week = 0.0 if 0 < self.weekly_reset <= now else self.weekly
        return five, week

    def usable(self, cap_5h: float, cap_weekly: float, now: float, grace: float) -> bool:
        """Quota allows a request: not hard-limited, under both caps, and data not stale beyond grace."""
        if self.limited(now):
            return False
        five, week = self.utilization(now)
        if five >= cap_5h or week >= cap_weekly:
            return False
        return self.poll_failures == 0 or self.within_grace(now, grace)

    def within_grace(self, now: float, grace: float) -> bool:
        """Failed polls are tolerated while the last good data (or, with none ever, the first failure) is
        younger than `grace`: a flaky usage endpoint must not take a working account out of rotation."""
        anchor = self.updated if self.updated > 0 else self.failing_since
        return now - anchor < grace

    def next_poll(self, base_interval: float, now: float) -> float:
        """When the poller should ask the usage API next (never before `now`).

        After failures: the backoff instant. After a usage-API 429: its Retry-After. Otherwise the
        data's age reaching `base_interval`, so headers from live traffic make polling unnecessary.
        """
        if self.poll_failures > 0:
            return max(now, self.poll_retry_at)
        return max(now, self.updated + base_interval, self.poll_retry_at)

    def earliest_reset(self, now: float, cap_5h: float = 100.0, cap_weekly: float = 100.0) -> float:
        """When this credential should be usable again as far as quota knows; 0 if unknown.

        Hard-limited or over a cap: the latest of those blocking instants (all must clear). Otherwise
        (benched for another reason, e.g. stale data) the earlier known window reset, as sing-box does.
        Only future instants count.
        """
        five, week = self.utilization(now)
        blocking = []
        if self.limited(now):
            blocking.append(self.limited_until)
        if five >= cap_5h and self.five_hour_reset > now:
            blocking.append(self.five_hour_reset)
        if week >= cap_weekly and self.weekly_reset > now:
            blocking.append(self.weekly_reset)
        if blocking:
            return max(blocking)
        future = [r for r in (self.five_hour_reset, self.weekly_reset) if r > now]
        return min(future) if future else 0.0

    def weight(self, external: bool) -> float:
        """Plan weight of this credential: the peer's report for external ones, else from the plan."""
        if external:
            return self.remote_plan_weight if self.remote_plan_weight > 0 else EXTERNAL_DEFAULT_WEIGHT
        return plan_weight(self.account_type, self.rate_limit_tier)

    def snapshot(self, now: float) -> dict[str, object]:
        """JSON-ready view for the admin status: effective utilisation plus the raw bookkeeping."""
        five, week = self.utilization(now)
        return {
            "five_hour_utilization": five,
            "five_hour_reset": self.five_hour_reset or None,
            "weekly_utilization": week,
            "weekly_reset": self.weekly_reset or None,
            "status": self.status,
            "limited_until": self.limited_until if self.limited(now) else None,
            "overage_until": self.overage_until if self.overage_until > now else None,
            "updated": self.updated or None,
            "poll_failures": self.poll_failures,
            "account_type": self.account_type,
            "rate_limit_tier": self.rate_limit_tier,
        }


def _using_overage(found: Mapping[str, str]) -> bool:
    """Whether the subscription now pays for this request from extra usage: its window refused it
    (`rejected`) while extra usage let it through, or the upstream says so outright (Claude Code's rule)."""
    if found.get(PREFIX + "overage-in-use", "").strip().lower() == "true":
        return True
    status = found.get(PREFIX + "status", "").strip().lower()
    return status == "rejected" and found.get(PREFIX + "overage-status", "").strip().lower() in (
        "allowed", "allowed_warning")


def is_quota_429(headers: Mapping[str, str]) -> bool:
    """Whether an upstream 429 is about the subscription quota (fail over) rather than a throttle.

    True when a unified status or window status says `rejected`, or when no unified status is
    present at all (sing-box treats every 429 as quota, and passing a real quota 429 through would
    leave the session stuck on an exhausted account). False only when Anthropic explicitly says
    the subscription is still allowed.
    """
    found = _lower(headers)
    statuses = [found.get(PREFIX + "status", "")]
    statuses += [found.get(f"{PREFIX}{name}-status", "") for name in FIVE_HOUR_NAMES + WEEKLY_NAMES]
    statuses = [s.lower() for s in statuses if s]
    return not statuses or "rejected" in statuses


def plan_weight(account_type: str, rate_limit_tier: str) -> float:
    """Relative capacity of a plan: Max 20x = 10, Max 5x / Team 5x = 5, anything else 1."""
    kind = (account_type or "").strip().lower()
    tier = (rate_limit_tier or "").strip().lower()
    if kind == "max":
        return 10.0 if tier == "default_claude_max_20x" else 5.0
    if kind == "team" and tier == "default_claude_max_5x":
        return 5.0
    return 1.0


def caps(reserve_5h: int, reserve_weekly: int, limit_5h: int, limit_weekly: int) -> tuple[float, float]:
    """Stop-using thresholds in percent: an explicit limit wins, else 100 minus the reserve (min 1)."""

    def one(reserve: int, limit: int) -> float:
        return float(limit) if limit > 0 else 100.0 - max(reserve, 1)

    return one(reserve_5h, limit_5h), one(reserve_weekly, limit_weekly)


def format_duration(seconds: float) -> str:
    """Short human form for messages ("45s", "3m20s", "2h13m", "4d6h"); negative counts as 0."""
    total = max(0, int(seconds)) if math.isfinite(seconds) else 0
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days}d{hours}h"
    if hours:
        return f"{hours}h{minutes}m"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


# --- lenient parsing ----------------------------------------------------------------------------


def _lower(headers: Mapping[str, str] | None) -> dict[str, str]:
    """Headers as a lower-cased dict of stripped strings; anything unreadable yields what was read."""
    found: dict[str, str] = {}
    try:
        for key, value in headers.items() if headers is not None else ():
            name = key.decode("latin-1") if isinstance(key, bytes) else str(key)
            text = value.decode("latin-1") if isinstance(value, bytes) else str(value)
            found.setdefault(name.strip().lower(), text.strip())
    except Exception:
        pass
    return found


def _first(found: Mapping[str, str], names: tuple[str, ...], field: str) -> str | None:
    """The first present `anthropic-ratelimit-unified-<name>-<field>` across the window's spellings."""
    for name in names:
        value = found.get(f"{PREFIX}{name}-{field}")
        if value:
            return value
    return None


def _number(value: object) -> float | None:
    """A finite float from a number or numeric string, else None (never raises)."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value.strip() if isinstance(value, str) else value)  # type: ignore[arg-type]
    except (TypeError, ValueError, OverflowError):
        return None
    return number if math.isfinite(number) else None


def _epoch(value: object, now: float) -> float | None:
    """A reset instant from epoch seconds (or milliseconds) or RFC 3339; None when absent or absurd."""
    number = _number(value)
    if number is None and isinstance(value, str):
        number = _rfc3339(value.strip())
    if number is None or number <= 0:
        return None
    if number > 1e11:  # epoch milliseconds
        number /= 1000.0
    if number > now + MAX_RESET_AHEAD:
        return None
    return number


def _rfc3339(text: str) -> float | None:
    """Epoch seconds from RFC 3339 (any fraction length, `Z` or offset; naive means UTC)."""
    match = _RFC3339.match(text)
    if not match:
        return None
    year, month, day, hour, minute, second, fraction, zone = match.groups()
    try:
        stamp = datetime(int(year), int(month), int(day), int(hour), int(minute), int(second), tzinfo=timezone.utc)
    except ValueError:
        return None
    offset = 0
    if zone and zone not in ("Z", "z"):
        digits = zone[1:].replace(":", "")
        offset = (int(digits[:2]) * 60 + int(digits[2:])) * (1 if zone[0] == "+" else -1)
    stamp -= timedelta(minutes=offset)
    return stamp.timestamp() + (float("0." + fraction) if fraction else 0.0)


def _retry_after(value: str | None, now: float) -> float | None:
    """`Retry-After` as an absolute instant: delta seconds or an HTTP date; None when unusable."""
    seconds = _number(value)
    if seconds is not None:
        return now + seconds if 0 < seconds <= MAX_RESET_AHEAD else None
    if not value:
        return None
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    return when if now < when <= now + MAX_RESET_AHEAD else None


def _limit_reset(found: Mapping[str, str], now: float) -> float:
    """The instant a quota 429 ends, from the most specific hint available (see `observe_429`)."""

    def future(value: str | None) -> float | None:
        instant = _epoch(value, now)
        return instant if instant is not None and instant > now else None

    claim = found.get(PREFIX + "representative-claim", "").lower()
    for names in (FIVE_HOUR_NAMES, WEEKLY_NAMES):
        if claim in names and (instant := future(_first(found, names, "reset"))):
            return instant
    if instant := future(found.get(PREFIX + "reset")):
        return instant
    windows = [future(_first(found, names, "reset")) for names in (FIVE_HOUR_NAMES, WEEKLY_NAMES)]
    if known := [w for w in windows if w]:
        return min(known)
    if instant := _retry_after(found.get("retry-after"), now):
        return instant
    return now + LIMIT_FALLBACK


def _decode(body: object) -> object:
    """Decoded JSON from bytes/str, or the object itself; None when it does not parse."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            return json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return None
    return body
