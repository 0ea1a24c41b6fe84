"""The subscription-limit headers each user sees: their own standing, never somebody else's quota.

Claude Code warns its user from the `anthropic-ratelimit-unified-*` response headers ("You've used 95% of
your 5-hour limit"), when its token is a gateway token (see `ccm-wsgi token`). Passed through as they come,
they would describe the whole subscription (or, in a pool, one account of it) to every user. So they are
always replaced: the upstream's are dropped, and for each window (5-hour, weekly) the user's standing is
sent instead, the tighter of

* their window share, when they have one: the points their requests consumed, as a part of their share;
* the subscription they are served from: that credential's utilisation, or in a pool the weighted
  headroom of the credentials the user may use (as sing-box's newest ccm reports it).

`unified-status` is `allowed`, `allowed_warning` or `rejected` by Claude Code's own warning thresholds (5
hours: 90 % used with 72 % of the window gone; a week: 75/50/25 % used with 60/35/15 % gone). A budget
close to its end (75 %, 95 %) is reported the way Claude Code's gateway protocol reports a spending cap:
`overage-*` headers with `representative-claim: overage`. Per-account, overage and fallback details of
the real subscription are never passed on.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..anthropic import RATELIMIT_PREFIX as RL

WINDOW_SECONDS = {"five_hour": 5 * 3600.0, "weekly": 7 * 86400.0}
CLAIM = {"five_hour": "five_hour", "weekly": "seven_day"}
PREFIX = {"five_hour": "5h", "weekly": "7d"}
# Claude Code's early-warning thresholds: (utilisation, part of the window gone)
WARNINGS = {"five_hour": ((0.9, 0.72),), "weekly": ((0.75, 0.6), (0.5, 0.35), (0.25, 0.15))}
BUDGET_WARNINGS = (0.95, 0.75)


@dataclass(frozen=True, slots=True)
class Standing:
    """Where a user stands in one window: utilisation (0-1 and beyond) and when the window resets."""

    utilization: float
    reset: float


@dataclass(frozen=True, slots=True)
class BudgetStanding:
    utilization: float  # the fullest budget: spent / budget
    reset: float
    per: str


def status(window: str, standing: Standing, now: float) -> tuple[str, float | None]:
    """`allowed`, `allowed_warning` (with the threshold passed) or `rejected`."""
    if standing.utilization >= 1.0:
        return "rejected", 1.0
    length = WINDOW_SECONDS[window]
    gone = 1.0 - (standing.reset - now) / length if standing.reset > now else 0.0
    for used, elapsed in WARNINGS[window]:
        if standing.utilization >= used and gone >= elapsed:
            return "allowed_warning", used
    return "allowed", None


def standing_headers(windows: dict[str, Standing], budget: BudgetStanding | None,
                     now: float) -> list[tuple[str, str]]:
    """The limit headers of the user's standing, in place of the subscription's (which the caller drops)."""
    headers: list[tuple[str, str]] = []
    worst, worst_window = "allowed", ""
    order = {"allowed": 0, "allowed_warning": 1, "rejected": 2}
    for window, standing in windows.items():
        state, threshold = status(window, standing, now)
        prefix = RL + PREFIX[window]
        headers += [(f"{prefix}-utilization", f"{min(standing.utilization, 1.0):.2f}"),
                    (f"{prefix}-reset", str(int(standing.reset))), (f"{prefix}-status", state)]
        if threshold is not None:
            headers.append((f"{prefix}-surpassed-threshold", f"{threshold:g}"))
        if order[state] > order[worst] or not worst_window:
            worst, worst_window = state, window
    budget_state = "allowed"
    if budget is not None and budget.utilization >= BUDGET_WARNINGS[-1]:
        passed = next(t for t in BUDGET_WARNINGS if budget.utilization >= t)
        budget_state = "allowed_warning"
        reset = str(int(budget.reset))
        headers += [(RL + "overage-status", budget_state),
                    (RL + "overage-utilization", f"{min(budget.utilization, 0.99):.2f}"),
                    (RL + "overage-surpassed-threshold", f"{passed:g}"), (RL + "overage-reset", reset)]
    if worst != "allowed" or budget_state == "allowed":
        if worst_window:
            headers += [(RL + "status", worst), (RL + "reset", str(int(windows[worst_window].reset)))]
            if worst != "allowed":
                headers.append((RL + "representative-claim", CLAIM[worst_window]))
    else:
        assert budget is not None
        headers += [(RL + "status", budget_state), (RL + "reset", str(int(budget.reset))),
                    (RL + "representative-claim", "overage")]
    return headers
