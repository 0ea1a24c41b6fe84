"""What any node learns about a credential's quota, seen by every node.

Each node learns utilisation from the responses it relays and from its own polls of the usage API. Every
SYNC_SECONDS, off the request path, one pipeline writes this node's view of each credential
(`quota:<tag>`, a hash field per node, expiring after a day unused) and reads the other nodes' views;
each window takes the latest reset any node saw and, within one window, the highest utilisation (it only
rises within a window, whoever saw it), and paid extra usage counts from whichever node saw it first.
So a pool stops choosing a credential that another node just found exhausted within seconds, and the
per-user rate-limit headers agree across nodes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import gevent

from ..pool.quota import RESET_JITTER
from .connection import SharedState, Unavailable

if TYPE_CHECKING:
    from ..pool.providers import Account
    from ..pool.quota import Quota

log = logging.getLogger("ccm_wsgi.state")

SYNC_SECONDS = 2.0
KEEP_SECONDS = 86_400
FIELDS = ("five_hour", "five_hour_reset", "weekly", "weekly_reset", "overage_until")


def view(quota: Quota) -> dict[str, float]:
    return {name: float(getattr(quota, name)) for name in FIELDS}


def merge(quota: Quota, other: dict[str, Any]) -> None:
    """Fold another node's view of the same credential into ours."""
    for util, reset in (("five_hour", "five_hour_reset"), ("weekly", "weekly_reset")):
        theirs, their_reset = other.get(util), other.get(reset)
        if not isinstance(theirs, (int, float)) or not isinstance(their_reset, (int, float)):
            continue
        mine = getattr(quota, reset)
        if their_reset > mine + RESET_JITTER:  # a later window: theirs is the current one
            setattr(quota, reset, float(their_reset))
            setattr(quota, util, float(theirs))
        elif abs(their_reset - mine) <= RESET_JITTER and theirs > getattr(quota, util):
            setattr(quota, util, float(theirs))
    overage = other.get("overage_until")
    if isinstance(overage, (int, float)) and overage > quota.overage_until:
        quota.overage_until = float(overage)


class SharedQuota:
    def __init__(self, state: SharedState, accounts: Sequence[Account]):
        self.state = state
        self.accounts = [a for a in accounts if not a.external]
        self._greenlet: gevent.Greenlet | None = None

    def start(self) -> None:
        if self.accounts and self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)

    def stop(self) -> None:
        greenlet, self._greenlet = self._greenlet, None
        if greenlet is not None:
            greenlet.kill(block=False)

    def _run(self) -> None:
        while True:
            gevent.sleep(SYNC_SECONDS)
            try:
                views = self.state.run("sharing quota", self._exchange)
            except Unavailable:
                continue
            for account, found in zip(self.accounts, views, strict=True):
                for node, raw in (found or {}).items():
                    if node.decode() == self.state.node:
                        continue
                    try:
                        merge(account.quota, json.loads(raw))
                    except (ValueError, AttributeError):
                        log.warning("shared quota of credential %s: skipped a damaged entry", account.tag)

    def _exchange(self, r: Any) -> list[Any]:
        pipe = r.pipeline(transaction=False)
        for account in self.accounts:
            key = self.state.key("quota", account.tag)
            pipe.hset(key, self.state.node, json.dumps(view(account.quota)))
            pipe.expire(key, KEEP_SECONDS)
            pipe.hgetall(key)
        return list(pipe.execute())[2::3]
