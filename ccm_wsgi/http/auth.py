"""Who is calling: match the user token from `Authorization: Bearer` or `x-api-key`.

Tokens are looked up by their SHA-256 digest, so the comparison time does not depend on how much of a
guessed token is right, and config may hold `token_sha256` instead of the token itself. A presented
token is never logged or echoed; failures are logged with the client address only.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Iterable
from typing import Any

from ..config import User, token_digest
from ..errors import ProxyError

log = logging.getLogger("ccm_wsgi.auth")


def presented_token(environ: dict[str, Any]) -> str | None:
    """The token the client sent: `Authorization: Bearer <t>` (scheme case-insensitive) or `x-api-key`."""
    authorization = environ.get("HTTP_AUTHORIZATION")
    if authorization:
        scheme, _, value = authorization.strip().partition(" ")
        if scheme.lower() == "bearer" and value.strip():
            return value.strip()
        return ""
    api_key = environ.get("HTTP_X_API_KEY")
    if api_key is not None:
        return api_key.strip()
    return None


class Authenticator:
    """Maps token digests to user names. With no users configured everyone is let in as ""."""

    def __init__(self, users: Iterable[User], admin_tokens: Iterable[str] = ()):
        self._users: dict[bytes, User] = {}
        self._stored: dict[int, bytes] = {}  # id(user) -> its token's digest, computed once (not per request)
        for user in users:
            key = user.digest
            self._users[key] = user
            self._stored[id(user)] = key
        self._named = {user.name: user for user in self._users.values()}
        self.admins = [token_digest(t) for t in admin_tokens]
        self.open = not self._users

    def authenticate(self, environ: dict[str, Any]) -> User | None:
        """The user object, None when the service is open; raises a 401 ProxyError otherwise."""
        if self.open:
            return None
        token = presented_token(environ)
        if token is None:
            self._reject(environ, "no token")
            raise ProxyError(401, "authentication_error", "missing ccm user token (set ANTHROPIC_AUTH_TOKEN)")
        user = self._lookup(token_digest(token)) if token else None
        if user is None:
            self._reject(environ, "unknown or malformed token")
            raise ProxyError(401, "authentication_error", "invalid ccm user token")
        return user

    def _lookup(self, key: bytes) -> User | None:
        user = self._users.get(key)
        if user is None:
            return None
        return user if hmac.compare_digest(self._stored[id(user)], key) else None

    def is_admin(self, environ: dict[str, Any]) -> bool:
        return self.admin_with(presented_token(environ) or "") is not None

    def admin_with(self, token: str) -> bytes | None:
        """The digest of the admin token `token` is; None when it is not one."""
        if not token or not self.admins:
            return None
        key = token_digest(token)
        found = None
        for admin in self.admins:  # every one compared: the time does not tell which matched
            if hmac.compare_digest(key, admin):
                found = admin
        return found

    def user_with(self, token: str) -> User | None:
        """The user whose token `token` is (the status page's sign-in form)."""
        return self._lookup(token_digest(token)) if token else None

    def user_named(self, name: str) -> User | None:
        return self._named.get(name)

    @staticmethod
    def _reject(environ: dict[str, Any], why: str) -> None:
        log.warning("rejected request from %s: %s", environ.get("REMOTE_ADDR", "?"), why)
