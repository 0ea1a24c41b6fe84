"""How a limit refuses a request: an Anthropic-shaped error the real `claude` CLI shows as it is.

Claude Code prints the error message of a 429 after "API Error: Request rejected (429)", so each message
names the limit and when it frees. Where waiting cannot help (a budget, a window share, a disabled or
expired user, extra usage denied) the answer carries `x-should-retry: false` and the CLI stops at once;
where a slot frees within seconds (rate, concurrency) it carries `retry-after`, and the CLI's own retry
succeeds. A denied model is a 400 `invalid_request_error`, as Claude Code's gateway protocol asks. No limit
ever answers 401 or 403: Claude Code reads those as a broken login. A budget refusal also carries the
usage-limit headers of that protocol (`overage-*` with `rejected`), without `representative-claim`, so the
CLI prints our sentence rather than one of its own.
"""

from __future__ import annotations

import math

from ..accounting.periods import ADJECTIVE, when
from ..anthropic import RATELIMIT_PREFIX as RL
from ..errors import ProxyError

NO_RETRY = ("x-should-retry", "false")


class Refusal(ProxyError):
    """A request a limit refused; `limit` names it (access log, metrics)."""

    def __init__(self, limit: str, status: int, kind: str, message: str, headers: list[tuple[str, str]]):
        super().__init__(status, kind, message, headers)
        self.limit = limit


def _retry_after(seconds: float) -> tuple[str, str]:
    return "retry-after", str(max(1, math.ceil(seconds)))


def disabled(user: str) -> Refusal:
    return Refusal("disabled", 429, "permission_error",
                   f"{user}'s access to this ccm-wsgi is disabled; ask its operator", [NO_RETRY])


def expired(user: str, at: float) -> Refusal:
    return Refusal("expired", 429, "permission_error",
                   f"{user}'s access to this ccm-wsgi expired on {when(at)}; ask its operator", [NO_RETRY])


def model(name: str, allowed: tuple[str, ...]) -> Refusal:
    return Refusal("model", 400, "invalid_request_error",
                   f"model {name or '(none)'} is not allowed for you here (allowed: {', '.join(allowed)})", [NO_RETRY])


def budget(per: str, usd: float, resets: float, now: float) -> Refusal:
    reset = str(int(resets))
    headers = [NO_RETRY, _retry_after(resets - now), (RL + "status", "rejected"), (RL + "reset", reset),
               (RL + "overage-reset", reset), (RL + "overage-utilization", "1"),
               (RL + "overage-surpassed-threshold", "1"), (RL + "overage-period", ADJECTIVE[per]),
               (RL + "overage-disabled-reason", "org_spend_cap_reached")]
    return Refusal(f"budget_{per}", 429, "billing_error",
                   f"{ADJECTIVE[per]} budget of ${usd:.2f} reached; resets {when(resets)}", headers)


def share(window: str, percent: float, resets: float, now: float) -> Refusal:
    name = "5-hour" if window == "five_hour" else "weekly"
    wait = [_retry_after(resets - now)] if resets > now else []
    until = f"resets {when(resets)}" if resets > now else "until the window resets"
    return Refusal(f"share_{window}", 429, "rate_limit_error",
                   f"your share ({percent:g}%) of the subscription's {name} window is used up; {until}",
                   [NO_RETRY, *wait])


def overage(resets: float, now: float) -> Refusal:
    until = when(resets) if resets > now else "the window resets"
    wait = [_retry_after(resets - now)] if resets > now else []
    return Refusal("overage", 429, "rate_limit_error",
                   f"the subscription's included usage is spent and paid extra usage is not allowed here; "
                   f"requests resume when the window resets ({until})", [NO_RETRY, *wait])


def rate(per_minute: int, wait: float) -> Refusal:
    return Refusal("requests_per_minute", 429, "rate_limit_error",
                   f"more than {per_minute} requests in a minute; retry in {max(1, math.ceil(wait))}s",
                   [_retry_after(wait)])


def concurrency(most: int, wait: float) -> Refusal:
    return Refusal("max_concurrent", 429, "rate_limit_error",
                   f"{most} of your requests are already running; retry in a moment", [_retry_after(wait)])
