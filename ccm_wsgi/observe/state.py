"""Figures read when Prometheus scrapes: each credential's windows and availability, budgets, the certificate.

These are states, not events, so they are read from the live objects at scrape time rather than counted.
Budgets come from the usage ledger, which every process follows from the shared usage journal, so every
gunicorn worker gives the same figures; a credential's windows are what this worker last heard from the
upstream (every worker polls them too), and the certificate is the one this worker serves.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from ..service import Service

WINDOWS = ("five_hour", "weekly")


class ServiceState(Collector):
    def __init__(self, service: Service):
        self.service = service

    def collect(self) -> Iterator[GaugeMetricFamily]:
        now = time.time()
        yield from self._credentials(now)
        yield self._budgets(now)
        tls = self.service.tls
        if tls is not None and tls.not_after is not None:
            yield GaugeMetricFamily("ccm_tls_certificate_expiry_timestamp_seconds",
                                    "When the certificate this service serves expires (Unix time)", tls.not_after)

    def _credentials(self, now: float) -> Iterator[GaugeMetricFamily]:
        ratio = GaugeMetricFamily("ccm_credential_utilization_ratio", "Utilisation of the subscription's window "
                                  "(five_hour, weekly), 0 to 1, as the upstream last reported it",
                                  labels=["credential", "window"])
        reset = GaugeMetricFamily("ccm_credential_window_reset_timestamp_seconds", "When the window resets (Unix "
                                  "time), while known", labels=["credential", "window"])
        available = GaugeMetricFamily("ccm_credential_available", "1 when the credential can give a token, 0 when "
                                      "it cannot (no login, unreadable file)", labels=["credential"])
        for account in self.service.accounts:
            quota = account.quota
            for window, percent, resets in zip(WINDOWS, quota.utilization(now),
                                               (quota.five_hour_reset, quota.weekly_reset), strict=True):
                ratio.add_metric([account.tag, window], percent / 100)
                if resets > now:
                    reset.add_metric([account.tag, window], resets)
            available.add_metric([account.tag], 1.0 if account.available() else 0.0)
        yield from (ratio, reset, available)

    def _budgets(self, now: float) -> GaugeMetricFamily:
        remaining = GaugeMetricFamily("ccm_user_budget_remaining_usd", "USD left of a user's budget in the current "
                                      "UTC day, week or month", labels=["user", "per"])
        limits = self.service.limits
        for user in self.service.cfg.users:
            config = self.service.cfg.limits_for(user)
            for budget in config.budget if config is not None else ():
                left = max(0.0, budget.usd - limits.spent(user.name, budget.per, now))
                remaining.add_metric([user.name, budget.per], left)
        return remaining
