"""The OAuth side of the fake: the token endpoint (refresh-token grant with rotation; the authorization-code grant
of a login is in authorize.py), the usage and profile APIs, and the scripted faults (delay, close, reset, status)
both can be given."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import parse_qsl

from . import authorize
from .common import (
    DEFAULT_SCOPE,
    HOLD_TIMEOUT,
    MAX_TOKEN_LOG,
    OAUTH_BETA_MISSING,
    DropConnection,
    HttpError,
    anthropic_error,
    bounded,
    has_oauth_beta,
    rfc3339,
)
from .state import Account, FakeState
from .wire import Exchange


class TokenEndpoint:
    def __init__(self, state: FakeState, ex: Exchange) -> None:
        self.state = state
        self.ex = ex

    def handle(self) -> None:
        if self.ex.req.method != "POST":
            raise HttpError(405, "use POST", body={"error": "invalid_request", "error_description": "use POST"})
        apply_fault(self.ex, self.state, self.state.config, "token_endpoint",
                    {"error": "server_error", "error_description": "fake token endpoint fault"})
        params = self.params()
        entry = {"client_id": params.get("client_id"), "scope": params.get("scope"),
                 "grant_type": params.get("grant_type"), "refresh_token": params.get("refresh_token"),
                 "content_type": self.ex.req.header("content-type"), "status": None}
        log_list = self.state.stats.token_requests
        log_list.append(entry)
        del log_list[:-MAX_TOKEN_LOG]
        if params.get("grant_type") == "authorization_code":
            entry["status"] = 400  # until the grant succeeds
            answer = authorize.exchange(self.state, params)
            entry["status"] = 200
            self.ex.send_json(200, answer)
            return
        if params.get("grant_type") != "refresh_token":
            entry["status"] = 400
            raise HttpError(400, "unsupported grant", body={
                "error": "unsupported_grant_type",
                "error_description": f"grant_type {params.get('grant_type')!r} is not supported by the fake"})
        rotated = self.state.rotate(str(params.get("refresh_token") or ""))
        if rotated is None:
            self.state.stats.invalid_grant += 1
            entry["status"] = 400
            raise HttpError(400, "invalid_grant", body={
                "error": "invalid_grant", "error_description": "Refresh token not found or invalid"})
        account, access, refresh = rotated
        entry["status"] = 200
        if self.ex.record is not None:
            self.ex.record["account"] = account.id
        self.ex.send_json(200, {
            "token_type": "Bearer",
            "access_token": access,
            "refresh_token": refresh,
            "expires_in": self.state.config.token_expires_in,
            "scope": params.get("scope") or DEFAULT_SCOPE,
            "account": {"uuid": f"acct-{account.id}", "email_address": f"{account.id}@fake.invalid"},
            "organization": {"uuid": f"org-{account.id}", "name": "Fake Org"},
        })

    def params(self) -> dict[str, Any]:
        """A JSON object or a form-encoded body (decided by the body itself, not the Content-Type)."""
        body = self.ex.req.body
        if body and not body.lstrip().startswith((b"{", b"[")):
            return dict(parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            raise HttpError(400, "bad body", body={"error": "invalid_request",
                                                   "error_description": "body is not JSON"}) from None
        if not isinstance(data, dict):
            raise HttpError(400, "bad body", body={"error": "invalid_request",
                                                   "error_description": "body must be an object"})
        return data


def take_fault(holder: Any, attr: str) -> dict[str, Any] | None:
    """The fault stored in `holder.attr`, consuming one use when it has a `times` budget."""
    fault = getattr(holder, attr)
    if not fault:
        return None
    if "times" in fault:
        fault["times"] = int(fault["times"]) - 1
        if fault["times"] <= 0:
            setattr(holder, attr, None)
    return fault


def apply_fault(ex: Exchange, state: FakeState, holder: Any, attr: str, error_body: Any) -> None:
    """delay_ms, then hold (until POST /_fake/release/KEY; reset if nobody does within HOLD_TIMEOUT), then
    down (close) / reset (RST) / status (with optional retry_after and body)."""
    fault = take_fault(holder, attr)
    if not fault:
        return
    delay = float(fault.get("delay_ms") or 0) / 1000
    if delay > 0 and ex.conn.wait_peer_close(bounded(delay)):
        raise DropConnection()
    if fault.get("hold"):
        rel = state.release(str(fault["hold"]))
        rel.waiting = True
        released = rel.event.wait(HOLD_TIMEOUT)
        rel.waiting, rel.done = False, True
        if not released:
            rel.timed_out = True
            ex.conn.reset()
            raise DropConnection()
    if fault.get("reset"):
        ex.conn.reset()
        raise DropConnection()
    if fault.get("down"):
        ex.conn.close()
        raise DropConnection()
    status = fault.get("status")
    if status and int(status) != 200:
        headers = [("retry-after", str(fault["retry_after"]))] if fault.get("retry_after") is not None else []
        raise HttpError(int(status), "fault", body=fault.get("body", error_body), headers=headers)


class OAuthApi:
    def __init__(self, state: FakeState, ex: Exchange) -> None:
        self.state = state
        self.ex = ex

    def handle(self) -> None:
        if self.ex.req.method != "GET":
            raise HttpError(405, "use GET")
        account = self.account()
        if self.ex.record is not None:
            self.ex.record["account"] = account.id
        if self.ex.req.path == "/api/oauth/usage":
            self.state.stats.usage_api_calls[account.id] += 1
            holder = account if account.usage_api else self.state.config
            apply_fault(self.ex, self.state, holder, "usage_api", anthropic_error(500, "fake usage API fault"))
            self.ex.send_json(200, self.usage(account))
        else:
            self.state.stats.profile_api_calls[account.id] += 1
            self.ex.send_json(200, self.profile(account))

    def account(self) -> Account:
        auth = self.ex.req.header("authorization") or ""
        token = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        usage = self.ex.req.path == "/api/oauth/usage"
        if token and usage and not has_oauth_beta(self.ex.req.header("anthropic-beta")):  # as Anthropic does
            self.state.stats.unauthorized += 1
            self.state.stats.oauth_beta_missing += 1
            raise HttpError(401, OAUTH_BETA_MISSING)
        entry = self.state.access.get(token) if token else None
        strict = self.state.config.strict
        if not token or (entry is not None and entry.revoked) or (
                strict and (entry is None or entry.auto or entry.expired())):
            self.state.stats.unauthorized += 1
            raise HttpError(401, "OAuth authentication is required or the token is invalid")
        if entry is None:
            entry = self.state.auto_register(token)
        return self.state.accounts[entry.account]

    @staticmethod
    def window(utilization: Any, reset: Any) -> dict[str, Any]:
        try:
            percent: Any = round(float(utilization) * 100, 6)
        except (TypeError, ValueError):
            percent = utilization
        try:
            resets_at: Any = rfc3339(float(reset))
        except (TypeError, ValueError, OverflowError, OSError):
            resets_at = reset
        return {"utilization": percent, "resets_at": resets_at}

    def usage(self, account: Account) -> dict[str, Any]:
        return {
            "five_hour": self.window(account.five_hour_utilization, account.five_hour_reset),
            "seven_day": self.window(account.seven_day_utilization, account.seven_day_reset),
            "seven_day_oauth_apps": None,
            "seven_day_opus": None,
            "extra_usage": account.extra_usage or {"is_enabled": False, "monthly_limit": None, "used_credits": None,
                                                   "utilization": None},
        }

    @staticmethod
    def profile(account: Account) -> dict[str, Any]:
        if account.profile is not None:
            return account.profile
        return {
            "account": {"uuid": f"acct-{account.id}", "email": f"{account.id}@fake.invalid",
                        "has_claude_max": account.organization_type == "claude_max"},
            "organization": {"uuid": f"org-{account.id}", "organization_type": account.organization_type,
                             "rate_limit_tier": account.rate_limit_tier},
        }
