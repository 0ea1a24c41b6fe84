"""Quota tracking and credential selection: pure logic driven by a fake clock and a seeded RNG."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_wsgi.http.request import facts
from ccm_wsgi.pool.balancer import Balancer, NoCredential, aggregate_status
from ccm_wsgi.pool.quota import Quota, caps, format_duration, is_quota_429, plan_weight

T0 = 1_750_000_000.0
HOUR = 3600.0
H = "anthropic-ratelimit-unified-"


class Clock:
    """A settable clock so that resets, grace and session expiry are deterministic."""

    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Acct:
    """A minimal Member."""

    tag: str
    weight: float = 1.0
    cap_5h: float = 99.0
    cap_weekly: float = 99.0
    external: bool = False
    loaded: bool = True
    quota: Quota = field(default_factory=Quota)

    def available(self) -> bool:
        return self.loaded

    def plan_weight(self) -> float:
        return self.weight


def acct(tag: str, weekly: float = 0.0, weekly_reset: float = 0.0, five: float = 0.0, **kw: object) -> Acct:
    a = Acct(tag, **kw)  # type: ignore[arg-type]
    a.quota.weekly, a.quota.weekly_reset, a.quota.five_hour = weekly, weekly_reset, five
    return a


def pool(*members: Acct, strategy: str = "least_used", clock: Clock | None = None, **kw: object) -> Balancer:
    return Balancer("pool", list(members), strategy=strategy, clock=clock or Clock(), rng=random.Random(7), **kw)


# --- strategies ----------------------------------------------------------------------------------


def test_least_used_worked_example() -> None:
    """least_used: A (40 %, weight 5, resets in 84 h) scores 590, B (10 %, weight 1, 168 h) 89: A wins."""
    a = acct("a", weekly=40, weekly_reset=T0 + 84 * HOUR, weight=5)
    b = acct("b", weekly=10, weekly_reset=T0 + 168 * HOUR, weight=1)
    assert pool(b, a).select("").tag == "a"


def test_least_used_prefers_headroom_and_ties_go_to_list_order() -> None:
    a, b, c = acct("a", weekly=50), acct("b", weekly=20), acct("c", weekly=20)
    assert pool(a, b, c).select("").tag == "b"
    assert pool(acct("x"), acct("y")).select("").tag == "x"


def test_least_used_ignores_five_hour_except_as_gate() -> None:
    a, b = acct("a", five=90, weekly=0), acct("b", five=0, weekly=30)
    assert pool(a, b).select("").tag == "a"
    a.quota.five_hour = 99
    assert pool(a, b).select("").tag == "b"


def test_round_robin_rotates_and_skips_unusable() -> None:
    a, b, c = acct("a"), acct("b"), acct("c")
    bal = pool(a, b, c, strategy="round_robin")
    assert [bal.select("").tag for _ in range(4)] == ["a", "b", "c", "a"]
    b.quota.weekly = 100
    assert [bal.select("").tag for _ in range(3)] == ["c", "c", "a"]


def test_random_is_uniform_among_usable_only() -> None:
    a, b, c = acct("a"), acct("b", weekly=100), acct("c")
    bal = pool(a, b, c, strategy="random")
    seen = [bal.select("").tag for _ in range(200)]
    assert set(seen) == {"a", "c"}
    assert 60 < seen.count("a") < 140


def test_fallback_takes_first_usable_and_is_not_sticky() -> None:
    a, b = acct("a"), acct("b")
    bal = pool(a, b, strategy="fallback")
    assert bal.select("s1").tag == "a"
    a.quota.limited_until = T0 + 60
    assert bal.select("s1").tag == "b"
    a.quota.limited_until = 0
    assert bal.select("s1").tag == "a"
    assert bal.sessions() == {}


def test_strategy_names_are_the_config_ones() -> None:
    """The config spells strategies out (least-used -> least_used, see tests/test_config.py); the balancer takes
    only those."""
    assert pool(acct("a"), strategy="round_robin").strategy == "round_robin"
    for unknown in ("best", "least-used", ""):
        with pytest.raises(ValueError):
            pool(acct("a"), strategy=unknown)


def test_scope_filters_external() -> None:
    ext = acct("ext", external=True, weight=10)
    local = acct("local", weekly=50)
    bal = pool(ext, local)
    assert bal.select("").tag == "ext"
    assert bal.select("", allow_external=False).tag == "local"
    with pytest.raises(NoCredential) as info:
        pool(ext).select("", allow_external=False)
    assert info.value.all_unavailable


# --- sticky sessions -----------------------------------------------------------------------------


def test_session_stays_when_another_becomes_better() -> None:
    a, b = acct("a", weekly=10), acct("b", weekly=20)
    bal = pool(a, b)
    assert bal.select("s").tag == "a"
    a.quota.weekly = 80
    assert bal.select("s").tag == "a"
    assert bal.select("other").tag == "b"
    assert bal.sessions() == {"s": "a", "other": "b"}
    assert bal.pinned("s") == "a" and bal.pinned("nope") is None and bal.pinned("") is None


def test_session_moves_on_exhaustion_and_stays_moved() -> None:
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b)
    assert bal.select("s").tag == "a"
    a.quota.weekly = 99  # at the cap
    assert bal.select("s").tag == "b"
    a.quota.weekly = 0
    assert bal.select("s").tag == "b"


def test_session_moves_on_exclusion() -> None:
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b)
    bal.select("s")
    assert bal.select("s", exclude=frozenset({"a"})).tag == "b"
    assert bal.sessions()["s"] == "b"


def test_session_moves_when_unavailable() -> None:
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b)
    bal.select("s")
    a.loaded = False
    assert bal.select("s").tag == "b"


def test_rebalance_threshold() -> None:
    """Moves only when pinned.weekly - best.weekly > threshold / pinned weight."""
    a, b = acct("a", weight=2), acct("b", weekly=5, weight=2)
    bal = pool(a, b, rebalance_threshold=20)
    assert bal.select("s").tag == "a"
    a.quota.weekly = 15  # gap 10 = threshold/weight: stay
    assert bal.select("s").tag == "a"
    a.quota.weekly = 15.5
    assert bal.select("s").tag == "b"


def test_no_rebalance_without_threshold_or_other_strategy() -> None:
    for strategy, threshold in (("least_used", 0.0), ("round_robin", 5.0)):
        a, b = acct("a"), acct("b")
        bal = pool(a, b, strategy=strategy, rebalance_threshold=threshold)
        first = bal.select("s")
        first.quota.weekly = 90
        assert bal.select("s") is first


def test_session_ttl_is_last_use() -> None:
    clock = Clock()
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b, clock=clock, session_ttl=100)
    bal.select("s")
    a.quota.weekly = 50
    for _ in range(5):  # kept alive by use well past the ttl since creation
        clock.advance(60)
        assert bal.select("s").tag == "a"
    clock.advance(100)
    assert bal.sessions() == {}
    assert bal.select("s").tag == "b"


def test_session_table_is_bounded() -> None:
    bal = pool(acct("a"), max_sessions=3)
    for sid in ("s1", "s2", "s3", "s4"):
        bal.select(sid)
    bal.select("s2")  # refreshes s2, so s3 is now the oldest
    bal.select("s5")
    assert set(bal.sessions()) == {"s4", "s2", "s5"}


def test_on_rate_limited_moves_the_session_with_the_request() -> None:
    clock = Clock()
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b, clock=clock)
    assert bal.select("s").tag == "a"
    until = bal.on_rate_limited(a, {H + "representative-claim": "five_hour", H + "5h-reset": str(int(T0 + 600))}, "s")
    assert until == T0 + 600
    assert "s" not in bal.sessions()
    assert bal.select("s", exclude=frozenset({"a"})).tag == "b"
    assert bal.select("s").tag == "b"
    clock.advance(601)  # a usable again, but the session stays where it is now
    assert bal.is_usable(a)
    assert bal.select("s").tag == "b"


def test_on_rate_limited_leaves_other_pins_alone() -> None:
    a, b = acct("a"), acct("b", weekly=20)
    bal = pool(a, b)
    bal.select("s")
    bal.on_rate_limited(b, {"retry-after": "30"}, "s")
    assert bal.sessions() == {"s": "a"}


# --- NoCredential ------------------------------------------------------------------------------


def test_no_credential_retry_after_is_earliest_reset() -> None:
    a = acct("a", weekly=99, weekly_reset=T0 + 5 * HOUR)
    b = acct("b")
    b.quota.limited_until = T0 + 2 * HOUR + 13 * 60
    with pytest.raises(NoCredential) as info:
        pool(a, b).select("s")
    err = info.value
    assert err.retry_after == pytest.approx(2 * HOUR + 13 * 60)
    assert not err.all_unavailable
    assert err.message == "all credentials rate-limited, earliest reset in 2h13m"
    proxy = err.as_proxy_error()
    assert proxy.status == 429 and proxy.kind == "rate_limit_error"
    assert ("retry-after", "7980") in proxy.headers


def test_no_credential_unknown_reset_and_unavailable() -> None:
    a = acct("a", weekly=100)
    with pytest.raises(NoCredential) as info:
        pool(a).select("")
    assert info.value.retry_after is None
    assert info.value.message == "credential a is rate-limited"
    assert info.value.as_proxy_error().headers == []
    with pytest.raises(NoCredential) as info:
        pool(acct("a", loaded=False), acct("b", loaded=False)).select("")
    assert info.value.all_unavailable and info.value.message == "all credentials unavailable"


def test_no_credential_when_all_excluded() -> None:
    a, b = acct("a"), acct("b")
    bal = pool(a, b)
    for m in (a, b):
        bal.on_rate_limited(m, {H + "representative-claim": "7d", H + "7d-reset": str(int(T0 + 3 * HOUR))}, "")
    with pytest.raises(NoCredential) as info:
        bal.select("", exclude=frozenset({"a", "b"}))
    assert info.value.retry_after == pytest.approx(3 * HOUR)


# --- quota: resets, caps, grace ------------------------------------------------------------------


def test_reset_passed_counts_as_zero_and_usable_again() -> None:
    clock = Clock()
    a = acct("a", weekly=99.5, weekly_reset=T0 + 60, five=100)
    a.quota.five_hour_reset = T0 + 30
    bal = pool(a, clock=clock)
    assert not bal.is_usable(a)
    assert a.quota.utilization(T0) == (100, 99.5)
    clock.advance(60)
    assert a.quota.utilization(clock.now) == (0.0, 0.0)
    assert bal.select("").tag == "a"


def test_caps_from_reserve_and_limit() -> None:
    assert caps(0, 0, 0, 0) == (99.0, 99.0)
    assert caps(1, 10, 0, 0) == (99.0, 90.0)
    assert caps(10, 10, 50, 100) == (50.0, 100.0)
    q = Quota(five_hour=50)
    assert not q.usable(50, 99, T0, 900)
    assert q.usable(51, 99, T0, 900)
    q = Quota(weekly=90)
    assert not q.usable(*caps(0, 10, 0, 0), T0, 900)
    assert q.usable(*caps(0, 9, 0, 0), T0, 900)


def test_limited_until_clears_itself() -> None:
    q = Quota(limited_until=T0 + 10)
    assert not q.usable(99, 99, T0, 900)
    assert q.usable(99, 99, T0 + 10, 900)


def test_poll_failures_within_grace_keep_member_usable() -> None:
    q = Quota(updated=T0)
    q.observe_poll_failure(T0 + 60)
    q.observe_poll_failure(T0 + 120)
    assert q.poll_failures == 2
    assert q.usable(99, 99, T0 + 899, 900)
    assert not q.usable(99, 99, T0 + 900, 900)
    q.observe_headers({H + "5h-utilization": "0.1"}, T0 + 1000)
    assert q.poll_failures == 0 and q.usable(99, 99, T0 + 1000, 900)


def test_poll_failure_without_any_data_gets_grace_from_first_failure() -> None:
    q = Quota()
    q.observe_poll_failure(T0)
    q.observe_poll_failure(T0 + 300)
    assert q.usable(99, 99, T0 + 899, 900)
    assert not q.usable(99, 99, T0 + 900, 900)


def test_usage_api_429_is_not_a_failure() -> None:
    q = Quota(updated=T0 - 10_000)
    q.observe_poll_rate_limited(120, T0)
    assert q.poll_failures == 0
    assert q.usable(99, 99, T0 + 10_000, 900)
    assert q.next_poll(60, T0) == T0 + 120
    q.observe_poll_rate_limited(float("nan"), T0)
    assert q.next_poll(60, T0) == T0 + 60


def test_next_poll_backoff() -> None:
    q = Quota(updated=T0)
    assert q.next_poll(60, T0) == T0 + 60
    delays = []
    for _ in range(5):
        q.observe_poll_failure(T0)
        delays.append(q.next_poll(60, T0) - T0)
    assert delays == [60, 120, 240, 300, 300]
    q.observe_usage_api({"five_hour": {"utilization": 3}}, T0 + 10)
    assert q.next_poll(60, T0 + 10) == T0 + 70
    assert Quota().next_poll(60, T0) == T0  # never polled: due now


def test_usage_api_body() -> None:
    q = Quota(five_hour=80, weekly=50, poll_failures=2, limited_until=T0 - 1)
    body = {
        "five_hour": {"utilization": 12.5, "resets_at": "2025-06-15T16:00:00.123456+00:00"},
        "seven_day": {"utilization": 33, "resets_at": "2025-06-20T00:00:00Z"},
        "seven_day_opus": None,
    }
    assert q.observe_usage_api(json.dumps(body).encode(), T0)
    assert (q.five_hour, q.weekly) == (12.5, 33)  # may decrease
    assert q.five_hour_reset == pytest.approx(1_750_003_200.123456)
    assert q.weekly_reset == 1_750_377_600
    assert q.poll_failures == 0 and q.limited_until == 0 and q.updated == T0
    q.observe_usage_api({"five_hour": {"utilization": "x", "resets_at": T0 + 100}, "seven_day": None}, T0)
    assert q.five_hour == 12.5 and q.five_hour_reset == T0 + 100


def test_usage_api_garbage_is_a_failure() -> None:
    for body in (b"not json", ["x"], {"other": 1}, None):
        q = Quota()
        assert not q.observe_usage_api(body, T0)
        assert q.poll_failures == 1


# --- quota: headers ----------------------------------------------------------------------------


def test_headers_both_spellings() -> None:
    for five, week in (("5h", "7d"), ("five_hour", "seven_day")):
        q = Quota()
        headers = {
            f"{H}{five}-utilization": "0.42",
            f"{H}{five}-reset": str(int(T0 + HOUR)),
            f"{H}{week}-utilization": "0.07",
            f"{H}{week}-reset": str(int(T0 + 50 * HOUR)),
            "Anthropic-Ratelimit-Unified-Status": "allowed_warning",
        }
        assert q.observe_headers(headers, T0)
        assert (q.five_hour, q.weekly) == (42, 7)
        assert (q.five_hour_reset, q.weekly_reset) == (T0 + HOUR, T0 + 50 * HOUR)
        assert q.status == "allowed_warning" and q.updated == T0


def test_headers_monotonic_within_window_for_default() -> None:
    q = Quota()
    reset = str(int(T0 + HOUR))
    q.observe_headers({H + "5h-utilization": "0.301", H + "5h-reset": reset}, T0)
    assert q.five_hour == 31  # rounded up
    q.observe_headers({H + "5h-utilization": "0.20", H + "5h-reset": reset}, T0 + 1)
    assert q.five_hour == 31  # an older, lower value arriving late does not undo it
    q.observe_headers({H + "5h-utilization": "0.05", H + "5h-reset": str(int(T0 + 6 * HOUR))}, T0 + 2)
    assert q.five_hour == 5  # new window


def test_headers_after_reset_passed_accept_lower_value() -> None:
    q = Quota(five_hour=90, five_hour_reset=T0)
    q.observe_headers({H + "5h-utilization": "0.02"}, T0 + 1)
    assert q.five_hour == 2


def test_headers_external_are_raw_and_may_decrease() -> None:
    q = Quota(five_hour=50)
    q.observe_headers({H + "5h-utilization": "0.260000", "X-CCM-Plan-Weight": "6"}, T0, external=True)
    assert q.five_hour == pytest.approx(26.0) and q.remote_plan_weight == 6
    assert q.weight(True) == 6
    assert Quota().weight(True) == 10
    q2 = Quota()
    q2.observe_headers({"X-CCM-Plan-Weight": "6"}, T0)
    assert q2.remote_plan_weight == 0  # only trusted from peers


def test_malformed_headers_never_raise_and_keep_state() -> None:
    q = Quota(five_hour=40, five_hour_reset=T0 + HOUR, weekly=10, weekly_reset=T0 + 9 * HOUR, updated=T0 - 5)
    before = (q.five_hour, q.five_hour_reset, q.weekly, q.weekly_reset, q.updated)
    bad = {
        H + "5h-utilization": "garbage",
        H + "5h-reset": "soon",
        H + "7d-utilization": "nan",
        H + "7d-reset": "-5",
        H + "representative-claim": "weird",
    }
    assert not q.observe_headers(bad, T0)
    assert (q.five_hour, q.five_hour_reset, q.weekly, q.weekly_reset, q.updated) == before
    assert not q.observe_headers({H + "5h-utilization": "inf", H + "7d-reset": "1e300"}, T0)
    assert not q.observe_headers(None, T0)  # type: ignore[arg-type]
    assert not q.observe_headers({b"x": object()}, T0)  # type: ignore[dict-item]
    assert q.observe_429(bad, T0) == T0 + 60
    assert (q.five_hour, q.weekly) == (40, 10)


def test_observe_429_picks_reset_by_claim() -> None:
    five, week = str(int(T0 + HOUR)), str(int(T0 + 30 * HOUR))
    base = {H + "5h-reset": five, H + "7d-reset": week}
    cases = (("5h", T0 + HOUR), ("five_hour", T0 + HOUR), ("7d", T0 + 30 * HOUR), ("seven_day", T0 + 30 * HOUR))
    for claim, expected in cases:
        q = Quota()
        assert q.observe_429({**base, H + "representative-claim": claim}, T0) == expected
        assert q.limited_until == expected and not q.usable(100, 100, T0, 900)


def test_observe_429_fallbacks() -> None:
    q = Quota()
    # a claim whose header is missing: the overall unified reset, then the earliest window reset
    assert q.observe_429({H + "representative-claim": "7d", H + "reset": str(int(T0 + 500))}, T0) == T0 + 500
    both = {H + "5h-reset": str(int(T0 + 900)), H + "seven_day-reset": str(int(T0 + 90_000))}
    assert q.observe_429({**both, H + "representative-claim": "weird"}, T0) == T0 + 900
    assert q.observe_429({"Retry-After": "42"}, T0) == T0 + 42
    assert q.observe_429({"retry-after": "Wed, 18 Jun 2025 15:10:00 GMT"}, T0) == 1_750_259_400
    assert q.observe_429({"retry-after": "later"}, T0) == T0 + 60
    assert q.observe_429({H + "5h-reset": str(int(T0 - 10)), H + "representative-claim": "5h"}, T0) == T0 + 60


def test_is_quota_429() -> None:
    assert is_quota_429({})
    assert is_quota_429({H + "status": "rejected"})
    assert is_quota_429({H + "status": "allowed", H + "7d-status": "rejected"})
    assert not is_quota_429({H + "status": "allowed"})


def test_earliest_reset() -> None:
    q = Quota(five_hour=99, five_hour_reset=T0 + HOUR, weekly=99, weekly_reset=T0 + 9 * HOUR)
    assert q.earliest_reset(T0, 99, 99) == T0 + 9 * HOUR  # both windows block: the later one
    assert q.earliest_reset(T0, 99, 100) == T0 + HOUR
    assert q.earliest_reset(T0, 100, 100) == T0 + HOUR  # not over a cap: the earlier known reset
    assert Quota().earliest_reset(T0) == 0


def test_plan_weight_and_format_duration() -> None:
    assert plan_weight("max", "default_claude_max_20x") == 10
    assert plan_weight("max", "default_claude_max_5x") == 5
    assert plan_weight("team", "default_claude_max_5x") == 5
    assert plan_weight("team", "") == 1
    assert plan_weight("pro", "anything") == 1
    durations = (-3, 45, 200, 7980, 4 * 86400 + 6 * HOUR)
    assert [format_duration(s) for s in durations] == ["0s", "45s", "3m20s", "2h13m", "4d6h"]


# --- status ------------------------------------------------------------------------------------


def test_aggregate_status_example() -> None:
    """The pool view: A (5h 30, weekly 40, w 5) and B (0, 10, w 1), caps 99 → 26 / 36 / 6."""
    a = acct("a", weekly=40, five=30, weight=5)
    b = acct("b", weekly=10, weight=1)
    gone = acct("gone", loaded=False, weight=10)
    status = aggregate_status([a, b, gone], T0)
    assert status == pytest.approx({"five_hour_utilization": 26, "weekly_utilization": 36, "plan_weight": 6})
    assert aggregate_status([a, b], T0, exclude_tag="b")["plan_weight"] == 5
    assert aggregate_status([], T0) == {"five_hour_utilization": 100, "weekly_utilization": 100, "plan_weight": 0}
    ext = acct("ext", external=True, weight=10)
    assert aggregate_status([ext], T0, allow_external=False)["plan_weight"] == 0


def test_member_status_for_admin() -> None:
    a, b = acct("a", weekly=40, weight=5), acct("b", weekly=99)
    bal = pool(a, b)
    bal.select("s1")
    state = bal.member_status(a)
    assert state["tag"] == "a" and state["usable"] and state["sessions"] == 1 and state["weekly_utilization"] == 40
    assert not bal.member_status(b)["usable"]


# --- session id ----------------------------------------------------------------------------------


def session_of(header: str | None, body: object) -> str:
    return facts(json.dumps(body).encode(), header).session


def test_session_id_sources() -> None:
    sid = "0b6f0c55-1d2e-4f4a-9a3c-6a1f5d1e2c3b"
    both = {"metadata": {"user_id": "u_session_x"}}
    assert session_of(f" {sid} ", both) == sid
    current = {"metadata": {"user_id": json.dumps({"device_id": "d", "account_uuid": "a", "session_id": sid})}}
    assert session_of(None, current) == sid
    legacy = {"metadata": {"user_id": f"user_abc_account_def_session_{sid}"}}
    assert session_of(None, legacy) == sid


def test_session_id_garbage() -> None:
    for body in (
        None,
        [],
        "x",
        {"metadata": None},
        {"metadata": {"user_id": 5}},
        {"metadata": {"user_id": "plain"}},
        {"metadata": {"user_id": "{not json"}},
        {"metadata": {"user_id": '{"session_id": 7}'}},
    ):
        assert session_of(None, body) == ""
    assert session_of("", {"metadata": {"user_id": "a_session_b"}}) == "b"
    long_id = session_of("x" * 5000, None)
    assert long_id.startswith("sha256:") and len(long_id) < 100


def test_one_user_cannot_evict_the_others_pins() -> None:
    a, b = acct("a"), acct("b")
    bal = Balancer("pool", [a, b], "round_robin", max_sessions=100, max_per_user=10)
    assert bal.select("alice-session", user="alice").tag == "a"
    for n in range(500):  # made-up session ids, far beyond both bounds
        bal.select(f"junk-{n}", user="mallory")
    assert bal.pinned("alice-session", user="alice") == "a"
    assert sum(1 for sid in bal.sessions() if sid.startswith("junk-")) == 10
    assert bal.select("alice-session", user="alice").tag == "a"


_HEADER_NAMES = [
    H + suffix
    for suffix in (
        "5h-utilization",
        "5h-reset",
        "five_hour-utilization",
        "seven_day-reset",
        "7d-utilization",
        "7d-reset",
        "reset",
        "status",
        "representative-claim",
    )
] + ["retry-after", "x-ccm-plan-weight"]


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.sampled_from(_HEADER_NAMES), st.text(max_size=30)), st.booleans())
def test_any_header_values_never_raise(values: dict[str, str], external: bool) -> None:
    q = Quota(five_hour=10, weekly=10)
    q.observe_headers(values, T0, external)
    until = q.observe_429(values, T0, external)
    assert T0 < until <= T0 + 8 * 86400
    assert q.usable(99, 99, T0, 900) in (True, False)
