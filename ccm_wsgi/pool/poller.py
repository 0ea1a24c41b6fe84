"""Background quota polling, one greenlet per account, never in the request path.

Response headers keep the quota fresh while traffic flows; when an account is idle its state is
refreshed from Anthropic's usage API (default credentials) or the peer's `/ccm/v1/status`
(external ones), with back-off on failure. A usage-API 429 only delays the next poll.
"""

from __future__ import annotations

import json
import logging
import random
import time
from typing import TYPE_CHECKING

import gevent
import urllib3

from ..anthropic import API_USER_AGENT, OAUTH_BETA, USAGE_PATH
from ..credentials.errors import CredentialError

if TYPE_CHECKING:
    from .providers import Account

log = logging.getLogger("ccm_wsgi.poller")

TIMEOUT = urllib3.Timeout(connect=5.0, read=10.0)


def poll_once(account: Account) -> None:
    """One poll; every outcome lands in `account.quota`."""
    quota, now = account.quota, time.time()
    try:
        token = account.credential.access_token()
    except CredentialError:
        quota.observe_poll_failure(now)
        return
    if account.external:
        url = account.base_url + "/ccm/v1/status"
        headers = {"Authorization": "Bearer " + token}
    else:
        url = account.base_url + USAGE_PATH
        headers = {"Authorization": "Bearer " + token, "anthropic-beta": OAUTH_BETA, "User-Agent": API_USER_AGENT,
                   "Content-Type": "application/json"}
    try:
        resp = account.route.pool.request("GET", url, headers=headers, timeout=TIMEOUT, retries=False, redirect=False)
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        log.warning("quota poll for %s failed: %s", account.tag, type(exc).__name__)
        quota.observe_poll_failure(now)
        return
    if resp.status == 429:
        retry_after = resp.headers.get("retry-after", "")
        quota.observe_poll_rate_limited(float(retry_after) if retry_after.isdigit() else 60.0, now)
    elif resp.status == 200 and account.external:
        observe_peer_status(account, resp.data, now)
    elif resp.status == 200:
        quota.observe_usage_api(resp.data, now)
    elif resp.status == 404 and account.external:
        quota.poll_failures, quota.updated = 0, now  # an older peer without the endpoint: headers only
    else:
        log.warning("quota poll for %s: HTTP %d", account.tag, resp.status)
        quota.observe_poll_failure(now)


def observe_peer_status(account: Account, body: bytes, now: float) -> None:
    """A peer ccm's `/ccm/v1/status` answer: its pool-wide utilisation and plan weight."""
    quota = account.quota
    try:
        status = json.loads(body)
        five, week = float(status["five_hour_utilization"]), float(status["weekly_utilization"])
        weight = float(status.get("plan_weight") or 0)
    except (ValueError, KeyError, TypeError):
        quota.observe_poll_failure(now)
        return
    quota.five_hour, quota.weekly, quota.updated, quota.poll_failures = five, week, now, 0
    if weight > 0:
        quota.remote_plan_weight = weight


def run(account: Account) -> None:
    while True:
        now = time.time()
        delay = max(1.0, account.quota.next_poll(account.poll_interval, now) - now)
        gevent.sleep(delay + random.uniform(0, min(5.0, delay / 10)))
        if account.available():
            poll_once(account)


def start(accounts: list[Account]) -> list[gevent.Greenlet]:
    return [gevent.spawn(run, account) for account in accounts]
