"""Which subscription serves a request.

An `Account` is everything one credential needs to send a request: how to authorize it, the
connection pool of its outbound, the upstream base URL, its usage store and its quota state. A
provider picks an account per request:

* `SingleProvider`: the legacy single-credential service (sing-box 1.13). Every request goes to the
  one credential and every upstream status passes through; its quota is only observed, for status.
* `PoolProvider`: multi-credential mode (sing-box 1.14 `credentials`). A balancer (or a one-member
  pool for a user bound to a single credential) chooses by quota, keeps sessions sticky, and the
  proxy moves a request to another account when the upstream answers a quota 429.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from ..accounting.store import UsageStore
from ..credentials import Credential
from ..upstream.outbounds import Route
from .balancer import Balancer
from .quota import Quota


@dataclass(eq=False)
class Account:
    tag: str
    credential: Credential
    route: Route
    base_url: str
    usage: UsageStore | None = None  # when this credential counts usage
    external: bool = False
    cap_5h: float = 100.0
    cap_weekly: float = 100.0
    poll_interval: float = 60.0
    quota: Quota = field(default_factory=Quota)

    def available(self) -> bool:
        return bool(self.credential.available())

    def plan_weight(self) -> float:
        if not self.external:
            info = self.credential.info()
            self.quota.account_type = info.get("subscription_type") or self.quota.account_type
            self.quota.rate_limit_tier = info.get("rate_limit_tier") or self.quota.rate_limit_tier
        return self.quota.weight(self.external)


class SingleProvider:
    """One credential for every request; upstream answers (429 included) pass through."""

    pooled = False

    def __init__(self, account: Account):
        self.account = account
        self.accounts = [account]

    def recall(self, session: str, user: str = "") -> None:
        """No session pins: one credential."""

    def select(self, session: str, exclude: frozenset[str] = frozenset(), allow_external: bool = True,
               user: str = "") -> Account:
        return self.account

    def on_rate_limited(self, account: Account, headers: Mapping[str, str], session: str, user: str = "") -> None:
        raise AssertionError("a single provider never fails over")


class PoolProvider:
    """A balancer over accounts; `select` raises `NoCredential` when none is usable."""

    pooled = True

    def __init__(self, balancer: Balancer):
        self.balancer = balancer
        self.accounts: list[Account] = balancer.members  # type: ignore[assignment]

    def recall(self, session: str, user: str = "") -> None:
        self.balancer.recall(session, user)

    def select(self, session: str, exclude: frozenset[str] = frozenset(), allow_external: bool = True,
               user: str = "") -> Account:
        return self.balancer.select(session, exclude, allow_external, user)  # type: ignore[return-value]

    def on_rate_limited(self, account: Account, headers: Mapping[str, str], session: str, user: str = "") -> None:
        self.balancer.on_rate_limited(account, headers, session, user)


Provider = SingleProvider | PoolProvider
