"""One process's sliding minute (`requests_per_minute` under `ccm-wsgi serve`): counted per tenth of a second, it
admits and refuses exactly as a log of every request's time would with each time moved to the end of its tenth,
so it is never more permissive than the exact log and answers at most a tenth of a second later; and it keeps
a few hundred counts however busy the user is."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_wsgi.limits.counters import MINUTE, Minute

START = 1_790_000_000.0


def logged(per_minute: int, times: list[float], rounded: bool) -> list[float]:
    """The answers of a log of every admitted request's time (rounded up to its tenth, or exact)."""
    log: list[float] = []
    answers = []
    for now in times:
        log = [t for t in log if t > now - MINUTE]
        if len(log) >= per_minute:
            answers.append(log[len(log) - per_minute] + MINUTE - now)
        else:
            log.append(math.ceil(now * 10) / 10 if rounded else now)
            answers.append(0.0)
    return answers


def instants(gaps: list[float]) -> list[float]:
    times, now = [], START
    for gap in gaps:
        now += gap
        times.append(now)
    return times


_gaps = st.lists(st.one_of(st.floats(min_value=0.0, max_value=0.3), st.floats(min_value=0.0, max_value=40.0)),
                 max_size=120)


@settings(max_examples=300, deadline=None)
@given(st.integers(min_value=1, max_value=12), _gaps)
def test_the_minute_answers_as_a_log_of_rounded_times_never_more_permissive_than_the_exact_log(
        per_minute: int, gaps: list[float]) -> None:
    times = instants(gaps)
    minute = Minute()
    ours = [minute.hit(per_minute, now) for now in times]
    assert all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(ours, logged(per_minute, times, True), strict=True))
    exact = logged(per_minute, times, False)
    first = next((i for i, (a, b) in enumerate(zip(ours, exact, strict=True)) if (a > 0) != (b > 0)), None)
    if first is not None:  # the first time they disagree, it is ours that refuses, by at most a tenth later
        assert ours[first] > 0 and exact[first] == 0
        assert ours[first] <= 0.1 + 1e-6
    for a, b in zip(ours[:first], exact[:first], strict=True):  # until then, refusals free at most a tenth later
        assert b - 1e-6 <= a <= b + 0.1 + 1e-6


def test_a_busy_user_keeps_a_count_per_tenth() -> None:
    minute = Minute()
    now = START
    for _ in range(200_000):  # 2,000 requests a second for 100 seconds
        assert minute.hit(10**9, now) == 0.0
        now += 0.0005
    assert 120_000 <= minute.total <= 120_000 + 200 + 1  # a minute's requests, and at most a tenth's more
    assert len(minute.counts) <= 601
