"""Which subscription serves a request.

An `Account` is everything one credential needs to send a request: how to authorize it, the
connection pool of its outbound, the upstream base URL and its usage store. A provider picks an
account per request; the single provider (one credential, sing-box 1.13's model) always gives the
same one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import urllib3

from .credentials import OAuthCredential


@dataclass
class Account:
    tag: str
    credential: OAuthCredential
    pool: urllib3.PoolManager
    base_url: str
    outbound: str
    usage: Any = None  # UsageStore when the credential counts usage


class SingleProvider:
    """One credential for every request."""

    def __init__(self, account: Account):
        self.account = account
        self.accounts = [account]

    def select(self, user: Any, session: str) -> Account:
        return self.account
