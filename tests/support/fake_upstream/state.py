"""Everything the fake knows: its config, accounts and their tokens, counters, records and release keys."""

from __future__ import annotations

import itertools
import secrets
import time
from collections import Counter
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import gevent.event

from .common import FIVE_HOURS_DEFAULT_RESET, MAX_RECORDS, RECORD_BODY_LIMIT, SEVEN_DAY_DEFAULT_RESET, HttpError
from .wire import Request


def _default_five_hour_reset() -> int:
    return int(time.time()) + FIVE_HOURS_DEFAULT_RESET


def _default_seven_day_reset() -> int:
    return int(time.time()) + SEVEN_DAY_DEFAULT_RESET


@dataclass
class Account:
    """Scripted per-account state. Utilisations are fractions (0.42); a string is sent verbatim (garbage tests)."""

    id: str
    five_hour_utilization: float | str = 0.1
    five_hour_reset: int | str = field(default_factory=_default_five_hour_reset)
    seven_day_utilization: float | str = 0.2
    seven_day_reset: int | str = field(default_factory=_default_seven_day_reset)
    status: str = "allowed"
    claim: str = "five_hour"
    quota_429: bool = False
    usage_api: dict[str, Any] | None = None  # a fault, same keys as the global usage_api fault
    organization_type: str = "claude_max"
    rate_limit_tier: str = "default_claude_max_20x"
    profile: dict[str, Any] | None = None  # replaces the whole /api/oauth/profile answer
    extra_usage: dict[str, Any] | None = None  # the usage API's `extra_usage` (default: paid extra usage off)
    headers: dict[str, str | None] = field(default_factory=dict)  # extra / override headers on /v1 answers


STATE_FIELDS = {f.name for f in fields(Account)} - {"id"}


@dataclass
class AccessToken:
    account: str
    expires_at: float | None  # epoch seconds; None = never expires
    revoked: bool = False
    auto: bool = False  # auto-registered in lenient mode; strict mode does not accept it

    def expired(self) -> bool:
        return self.expires_at is not None and time.time() >= self.expires_at


@dataclass
class RefreshToken:
    account: str
    spent: bool = False


FAULT_KEYS = {"status", "delay_ms", "hold", "down", "reset", "retry_after", "times", "body"}


def validate_fault(value: Any, what: str) -> dict[str, Any] | None:
    if value is None or value == {}:
        return None
    if not isinstance(value, dict):
        raise HttpError(400, f"{what} must be an object or null")
    unknown = set(value) - FAULT_KEYS
    if unknown:
        raise HttpError(400, f"{what}: unknown keys {sorted(unknown)}; allowed {sorted(FAULT_KEYS)}")
    return dict(value)


AUTHORIZE_KEYS = {"redirect", "error", "account"}


@dataclass
class Config:
    strict: bool = False
    token_expires_in: int = 3600
    token_endpoint: dict[str, Any] | None = None
    usage_api: dict[str, Any] | None = None
    authorize: dict[str, Any] | None = None  # how the authorize page answers (see authorize.py)
    date_skew: float = 0.0  # seconds added to the `Date` of every answer (a clock that is off)

    def update(self, data: dict[str, Any]) -> None:
        unknown = set(data) - {f.name for f in fields(self)}
        if unknown:
            raise HttpError(400, f"unknown config keys {sorted(unknown)}")
        if "strict" in data:
            self.strict = bool(data["strict"])
        if "token_expires_in" in data:
            self.token_expires_in = int(data["token_expires_in"])
        if "token_endpoint" in data:
            self.token_endpoint = validate_fault(data["token_endpoint"], "token_endpoint")
        if "usage_api" in data:
            self.usage_api = validate_fault(data["usage_api"], "usage_api")
        if "authorize" in data:
            knobs = data["authorize"] or None
            if knobs is not None and (not isinstance(knobs, dict) or set(knobs) - AUTHORIZE_KEYS):
                raise HttpError(400, f"authorize must be an object with keys among {sorted(AUTHORIZE_KEYS)}")
            self.authorize = knobs
        if "date_skew" in data:
            self.date_skew = float(data["date_skew"])


@dataclass
class Release:
    """A stream (or a held token request) tagged with a key: how far it got, and whether it waits."""

    event: gevent.event.Event = field(default_factory=gevent.event.Event)
    events: int = 0  # SSE events written (JSON: body pieces)
    deltas: int = 0  # content_block_delta events written
    bytes: int = 0  # body bytes written (before compression)
    waiting: bool = False
    done: bool = False
    timed_out: bool = False  # nobody released it in time: the answer was failed (reset)

    def to_json(self, key: str) -> dict[str, Any]:
        return {"key": key, "events": self.events, "deltas": self.deltas, "bytes": self.bytes,
                "waiting": self.waiting, "released": self.event.is_set(), "done": self.done,
                "timed_out": self.timed_out}


@dataclass
class Stats:
    requests_total: int = 0
    requests_by_path: Counter[str] = field(default_factory=Counter)
    responses_by_status: Counter[str] = field(default_factory=Counter)
    messages_by_account: Counter[str] = field(default_factory=Counter)
    unauthorized: int = 0
    oauth_beta_missing: int = 0  # OAuth bearer tokens refused for want of the oauth beta flag
    refreshes: int = 0
    refreshes_by_account: Counter[str] = field(default_factory=Counter)
    invalid_grant: int = 0
    authorizations: int = 0  # authorize requests that issued a code
    logins: int = 0  # codes exchanged for tokens
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    usage_api_calls: Counter[str] = field(default_factory=Counter)
    profile_api_calls: Counter[str] = field(default_factory=Counter)
    connections_total: int = 0
    streams_total: int = 0
    streams_completed: int = 0
    closed_early: int = 0
    dropped: int = 0


class FakeState:
    """Everything the fake knows: config, accounts and tokens, counters, records, release keys."""

    def __init__(self, config: Config) -> None:
        self.initial_config = Config(**asdict(config))
        self.config = config
        self.accounts: dict[str, Account] = {}
        self.access: dict[str, AccessToken] = {}
        self.refresh: dict[str, RefreshToken] = {}
        self.stats = Stats()
        self.records: list[dict[str, Any]] = []
        self.releases: dict[str, Release] = {}
        self.authorizations: dict[str, Any] = {}  # code -> authorize.Authorization
        self.seq = itertools.count(1)
        self.token_seq = itertools.count(1)
        self.active_streams = 0
        self.active_requests = 0

    # ----- accounts and tokens
    def new_token(self, kind: str) -> str:
        return f"sk-ant-{kind}01-fake-{next(self.token_seq)}-{secrets.token_urlsafe(12)}"

    def expiry(self, expires_in: Any) -> float | None:
        return None if expires_in is None else time.time() + float(expires_in)

    def add_account(self, data: dict[str, Any]) -> dict[str, Any]:
        data = dict(data)
        access = data.pop("access_token", None)
        refresh = data.pop("refresh_token", None)
        expires_in = data.pop("expires_in", self.config.token_expires_in)
        account_id = data.pop("account", None) or access or self.new_token("acct")
        access = access or self.new_token("oat")
        account = self.accounts.get(account_id) or Account(id=account_id)
        self.apply_state(account, data)
        self.accounts[account_id] = account
        self.access[access] = AccessToken(account_id, self.expiry(expires_in))
        if refresh:
            self.refresh[refresh] = RefreshToken(account_id)
        return {"account": account_id, "access_token": access, "refresh_token": refresh,
                "expires_at": self.access[access].expires_at}

    def apply_state(self, account: Account, data: dict[str, Any]) -> None:
        unknown = set(data) - STATE_FIELDS
        if unknown:
            raise HttpError(400, f"unknown account state keys {sorted(unknown)}; allowed {sorted(STATE_FIELDS)}")
        for key, value in data.items():
            if key == "usage_api":
                value = validate_fault(value, "usage_api")
            setattr(account, key, value)

    def auto_register(self, token: str) -> AccessToken:
        """Lenient mode: an unknown bearer token becomes its own account (strict mode will not accept it)."""
        if token not in self.accounts:
            self.accounts[token] = Account(id=token)
        self.access[token] = AccessToken(token, None, auto=True)
        return self.access[token]

    def find_account(self, ref: str, create: bool = False) -> Account | None:
        """By account id, access token or refresh token; optionally create account `ref` with token `ref`."""
        if ref in self.accounts:
            return self.accounts[ref]
        if ref in self.access:
            return self.accounts[self.access[ref].account]
        if ref in self.refresh:
            return self.accounts[self.refresh[ref].account]
        if not create:
            return None
        self.accounts[ref] = Account(id=ref)
        self.access[ref] = AccessToken(ref, None)
        return self.accounts[ref]

    def tokens_of(self, account_id: str) -> dict[str, Any]:
        now = time.time()
        return {
            "access_tokens": [
                {"token": t, "expires_in": None if a.expires_at is None else round(a.expires_at - now, 3),
                 "revoked": a.revoked}
                for t, a in self.access.items() if a.account == account_id
            ],
            "refresh_tokens": [
                {"token": t, "spent": r.spent} for t, r in self.refresh.items() if r.account == account_id
            ],
        }

    def rotate(self, refresh_token: str) -> tuple[Account, str, str] | None:
        """Spend a valid refresh token and issue a new access + refresh token pair for its account."""
        entry = self.refresh.get(refresh_token)
        if entry is None or entry.spent:
            return None
        entry.spent = True
        access, refresh = self.new_token("oat"), self.new_token("ort")
        self.access[access] = AccessToken(entry.account, self.expiry(self.config.token_expires_in))
        self.refresh[refresh] = RefreshToken(entry.account)
        self.stats.refreshes += 1
        self.stats.refreshes_by_account[entry.account] += 1
        return self.accounts[entry.account], access, refresh

    def release(self, key: str) -> Release:
        if key not in self.releases:
            self.releases[key] = Release()
        return self.releases[key]

    # ----- records and stats
    def record(self, req: Request) -> dict[str, Any]:
        rec = {
            "seq": next(self.seq),
            "time": time.time(),
            "method": req.method,
            "path": req.target,
            "route": req.path,
            "headers": [[k, v] for k, v in req.headers],
            "body_length": len(req.body),
            "body": req.body[:RECORD_BODY_LIMIT].decode("utf-8", "replace"),
            "body_truncated": len(req.body) > RECORD_BODY_LIMIT,
            "account": None,
            "status": None,
        }
        self.records.append(rec)
        del self.records[:-MAX_RECORDS]
        self.stats.requests_total += 1
        self.stats.requests_by_path[req.path] += 1
        return rec

    def reset(self, accounts: bool = False, config: bool = False) -> None:
        self.stats = Stats()
        self.records.clear()
        for rel in self.releases.values():
            rel.event.set()  # never leave a stream blocked on a key nobody can see any more
        self.releases.clear()
        if accounts:
            self.authorizations.clear()
            self.accounts.clear()
            self.access.clear()
            self.refresh.clear()
        if config:
            self.config = Config(**asdict(self.initial_config))

    def stats_json(self, open_connections: int, open_all: int) -> dict[str, Any]:
        data = {f.name: getattr(self.stats, f.name) for f in fields(self.stats)}
        data = {k: dict(v) if isinstance(v, Counter) else v for k, v in data.items()}
        data["token_requests"] = [dict(t) for t in self.stats.token_requests]
        data.update(open_connections=open_connections, open_connections_all=open_all,
                    active_streams=self.active_streams, active_requests=self.active_requests)
        return data
