"""Who is looking at the status page: a signed, expiring session cookie, checked against the live config.

Flask's session makes the cookie: its content is signed (itsdangerous, HMAC) with the session key and carries
the time it was signed, and it is not signed again while the page refreshes, so a session ends `LIFETIME`
after its sign-in. It holds no token: a user's session names the user, and both kinds hold a MAC (under the
session key) of the digest of the token that signed in. Every request checks that MAC against the config as
it is now, so a session ends as soon as its token no longer grants access: the user removed, disabled,
expired or given another token, the admin token removed. The cookie is `HttpOnly`, `SameSite=Strict`, for
`/ccm/` only, and `Secure` when the service speaks TLS.

The key: `ccm-wsgi serve` draws one when it starts; gunicorn's workers read the one the master wrote into the
run's shared directory, so that a cookie one worker made is good on every other. Either way a restart makes a
new key and people sign in again.

Forms (sign in, sign out) carry a random token the session also holds: another site's page can neither read it
nor, with `SameSite=Strict`, send the cookie along; and a request the browser marks as coming from another
site is refused before anything else.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from .rundir import SESSION_KEY

if TYPE_CHECKING:
    from flask import Flask
    from flask.sessions import SessionMixin

    from ..config import User
    from ..http.auth import Authenticator

LIFETIME = timedelta(hours=12)
COOKIE = "ccm_session"


def key(shared: str | None) -> bytes:
    """The session key: the one in the directory gunicorn's workers share, else a new one for this process."""
    if not shared:
        return secrets.token_bytes(32)
    with open(os.path.join(shared, SESSION_KEY), "rb") as f:
        return f.read()


def configure(app: Flask, secret: bytes, tls: bool) -> None:
    app.secret_key = secret
    app.config.update(SESSION_COOKIE_NAME=COOKIE, SESSION_COOKIE_PATH="/ccm/", SESSION_COOKIE_HTTPONLY=True,
                      SESSION_COOKIE_SAMESITE="Strict", SESSION_COOKIE_SECURE=tls,
                      PERMANENT_SESSION_LIFETIME=LIFETIME, SESSION_REFRESH_EACH_REQUEST=False)


@dataclass(frozen=True, slots=True)
class Viewer:
    """Who the page is for: a user (their own view), or None for everyone's (an admin, or an open service)."""

    user: User | None
    admin: bool = False


def _mac(secret: bytes, digest: bytes) -> str:
    return hmac.new(secret, b"ccm-session\0" + digest, hashlib.sha256).hexdigest()


def usable(user: User, now: float) -> bool:
    return not user.disabled and (user.expires is None or user.expires.timestamp() > now)


def sign_in(auth: Authenticator, secret: bytes, session: SessionMixin, token: str,
            now: float) -> Viewer | None:
    """Open a session for the holder of `token` (a new one: nothing of the form's session is kept)."""
    admin = auth.admin_with(token)
    user = None if admin is not None else auth.user_with(token)
    if admin is None and (user is None or not usable(user, now)):
        return None
    session.clear()
    if admin is not None:
        session["admin"] = _mac(secret, admin)
    else:
        assert user is not None
        session["user"], session["mac"] = user.name, _mac(secret, user.digest)
    session.permanent = True
    form_token(session)
    return Viewer(user, admin is not None)


def viewer(auth: Authenticator, secret: bytes, session: SessionMixin, now: float) -> Viewer | None:
    """Who this session is, if its token still grants access."""
    if auth.open:
        return Viewer(None)
    admin = session.get("admin")
    if isinstance(admin, str):
        good = False
        for digest in auth.admins:  # every one compared: the time does not tell which matched
            good |= hmac.compare_digest(_mac(secret, digest), admin)
        return Viewer(None, admin=True) if good else None
    name, mac = session.get("user"), session.get("mac")
    if not isinstance(name, str) or not isinstance(mac, str):
        return None
    user = auth.user_named(name)
    if user is None or not hmac.compare_digest(_mac(secret, user.digest), mac) or not usable(user, now):
        return None
    return Viewer(user)


def form_token(session: SessionMixin) -> str:
    """The token this session's forms carry (made on first use)."""
    token = session.get("form")
    if not isinstance(token, str):
        token = session["form"] = secrets.token_urlsafe(24)
    return token


def form_ok(session: SessionMixin, environ: dict[str, Any], sent: str | None) -> bool:
    """A form posted from this site's own page, with this session's form token."""
    if environ.get("HTTP_SEC_FETCH_SITE", "same-origin") not in ("same-origin", "none"):
        return False
    token = session.get("form")
    return isinstance(token, str) and isinstance(sent, str) and hmac.compare_digest(token.encode(), sent.encode())
