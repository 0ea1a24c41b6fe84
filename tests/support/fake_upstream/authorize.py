"""The login side of the fake: Claude's authorize page and the token endpoint's `authorization_code` grant.

`GET .../oauth/authorize` (any path ending so, e.g. `/cai/oauth/authorize`) records what a login asked for: the
PKCE challenge, state, redirect URI, client id and scope, and issues a one-time code for it. It then behaves like
a browser session whose user pressed "Authorize": a 302 to the redirect URI with `code` and `state`. The config
key `authorize` changes that: `{"redirect": false}` answers a page that shows `code#state` instead (what the hosted
callback page shows), `{"error": "access_denied"}` redirects with that error and no code, `{"account": ID}` makes
the login's tokens belong to that account (created if new) instead of a new one.

The token endpoint's `authorization_code` grant accepts a code once, and only with the verifier whose S256 hash is
the challenge the authorize request carried, the same state, redirect URI and client id; it answers new access
and refresh tokens that the fake then accepts (and refreshes), with the scope the login asked for.

Control: `GET /_fake/authorizations` lists every login (newest last), `GET /_fake/authorizations/<state>` shows
one, `POST /_fake/authorizations/<state>` with `{"expired": true}` lets its code expire.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import html
import secrets
import time
from dataclasses import asdict, dataclass
from typing import Any
from urllib.parse import urlencode

from .common import HttpError
from .state import FakeState
from .wire import Exchange

CODE_LIFETIME = 600.0  # seconds, as the real authorization server's codes
REQUIRED = ("client_id", "response_type", "redirect_uri", "scope", "code_challenge", "code_challenge_method",
            "state")


@dataclass
class Authorization:
    """One login: what its authorize request asked for, and the code issued for it."""

    code: str
    state: str
    code_challenge: str
    code_challenge_method: str
    redirect_uri: str
    client_id: str
    scope: str
    code_param: str  # the `code=true` Claude Code sends first
    account: str | None
    expires_at: float
    used: bool = False

    def view(self) -> dict[str, Any]:
        return {**asdict(self), "expired": time.time() >= self.expires_at}


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def authorize(state: FakeState, ex: Exchange) -> None:
    """The authorize page: record the login, issue its code, redirect (or show `code#state`)."""
    if ex.req.method != "GET":
        raise HttpError(405, "use GET")
    query = ex.req.query
    missing = [name for name in REQUIRED if not query.get(name)]
    if missing:
        raise HttpError(400, f"authorize request without {', '.join(missing)}")
    if query["response_type"] != "code" or query["code_challenge_method"] != "S256":
        raise HttpError(400, "only response_type=code with code_challenge_method=S256")
    knobs = state.config.authorize or {}
    redirect = query["redirect_uri"]
    if knobs.get("error"):
        location = redirect + "?" + urlencode({"error": knobs["error"], "state": query["state"]})
        ex.send_bytes(302, b"", "text/plain", [("location", location)])
        return
    grant = Authorization(
        code=secrets.token_urlsafe(24), state=query["state"], code_challenge=query["code_challenge"],
        code_challenge_method=query["code_challenge_method"], redirect_uri=redirect, client_id=query["client_id"],
        scope=query["scope"], code_param=query.get("code", ""), account=knobs.get("account"),
        expires_at=time.time() + CODE_LIFETIME)
    state.authorizations[grant.code] = grant
    state.stats.authorizations += 1
    if knobs.get("redirect", True):
        location = redirect + "?" + urlencode({"code": grant.code, "state": grant.state})
        ex.send_bytes(302, b"", "text/plain", [("location", location)])
        return
    page = f"<html><body><p>Paste this code into your terminal:</p><code>{html.escape(grant.code)}#" \
           f"{html.escape(grant.state)}</code></body></html>"
    ex.send_bytes(200, page.encode(), "text/html; charset=utf-8")


def refused(status: int, error: str, description: str) -> HttpError:
    return HttpError(status, error, body={"error": error, "error_description": description})


def exchange(state: FakeState, params: dict[str, Any]) -> dict[str, Any]:
    """The `authorization_code` grant: every check a real authorization server makes, then new tokens."""
    grant = state.authorizations.get(str(params.get("code") or ""))
    if grant is None or grant.used:
        state.stats.invalid_grant += 1
        raise refused(400, "invalid_grant", "Invalid 'code' in request.")
    if time.time() >= grant.expires_at:
        state.stats.invalid_grant += 1
        raise refused(400, "invalid_grant", "The authorization code has expired.")
    if params.get("client_id") != grant.client_id:
        raise refused(401, "invalid_client", "client_id does not match the authorization request")
    if params.get("redirect_uri") != grant.redirect_uri:
        state.stats.invalid_grant += 1
        raise refused(400, "invalid_grant", "redirect_uri does not match the authorization request")
    if not hmac.compare_digest(s256(str(params.get("code_verifier") or "")), grant.code_challenge):
        state.stats.invalid_grant += 1
        raise refused(400, "invalid_grant", "code_verifier does not match the code_challenge")
    if params.get("state") != grant.state:
        raise refused(400, "invalid_request", "state does not match the authorization request")
    grant.used = True
    issued = state.add_account({"account": grant.account or state.new_token("acct"),
                                "access_token": state.new_token("oat"), "refresh_token": state.new_token("ort")})
    state.stats.logins += 1
    account = issued["account"]
    return {
        "token_type": "Bearer",
        "access_token": issued["access_token"],
        "refresh_token": issued["refresh_token"],
        "expires_in": state.config.token_expires_in,
        "scope": grant.scope,
        "account": {"uuid": f"acct-{account}", "email_address": "login@fake.invalid"},
        "organization": {"uuid": f"org-{account}", "name": "Fake Org"},
    }


def control(state: FakeState, ex: Exchange, rest: list[str]) -> None:
    """`/_fake/authorizations[/<state>]`: read the logins, or let one's code expire."""
    method = ex.req.method
    if not rest and method == "GET":
        ex.send_json(200, [grant.view() for grant in state.authorizations.values()])
        return
    found = [grant for grant in state.authorizations.values() if rest and grant.state == rest[0]]
    if len(rest) != 1 or method not in ("GET", "POST"):
        raise HttpError(404, f"no control endpoint {method} {ex.req.path}")
    if not found:
        raise HttpError(404, f"no authorization with state {rest[0]!r}")
    grant = found[-1]
    if method == "POST":
        body = ex.req.json()
        if not isinstance(body, dict) or set(body) - {"expired"}:
            raise HttpError(400, 'give {"expired": true}')
        if body.get("expired"):
            grant.expires_at = time.time() - 1
    ex.send_json(200, grant.view())
