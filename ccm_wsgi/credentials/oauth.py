"""The Claude subscription credential: read Claude Code's OAuth file, keep the access token fresh.

Refresh tokens rotate and a spent one is rejected (`invalid_grant`), so two refreshers sharing one
file (two gunicorn workers, two `ccm-wsgi serve`, or a local `claude`) must never both spend the same
refresh token. A refresh therefore runs under three guards:

* one greenlet at a time in this process (a gevent lock),
* one process at a time on this file (an `fcntl.flock` on `<file>.lock`),
* a re-read of the file under the lock: whoever refreshed first has already written the new token,
  and everyone after adopts it instead of refreshing again.

The file is written back atomically (temp file, fsync, rename, mode 0600) and every key we do not
own is kept, so the local `claude` keeps working with the same file. A missing or broken file never
stops the service: requests get a clear error until the file becomes valid, which is noticed
without a restart (the file's stat signature is checked on every use).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pwd
import re
import time
from typing import Any

import gevent
import gevent.lock
import urllib3

from .. import files
from .keychain import Keychain

CLIENT_ID = "9d1c250a-e61b-44d9-88ed-5944d1962f5e"
REFRESH_MARGIN_MS = 60_000
LOCK_WAIT_SECONDS = 30.0
BACKOFF_MIN, BACKOFF_MAX = 5.0, 300.0
USER_AGENT = "claude-code/2.1.72"
OAUTH_KEY = "claudeAiOauth"
# Failures that happen before the refresh request leaves: only these are retried.
NOT_SENT = (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ProxyError)
OAUTH_ERROR = re.compile(r"[a-z_]{1,40}")

log = logging.getLogger("ccm_wsgi.credentials")


class CredentialError(Exception):
    """The credential cannot give a token. `status` is what the client gets; the message is safe to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class RefreshRejected(Exception):
    """The token endpoint answered 4xx (e.g. invalid_grant): the refresh token is spent or revoked."""


def real_home() -> str:
    """The home of the user who ran sudo, else ours (Claude Code's own rule)."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(sudo_user).pw_dir
    return os.path.expanduser("~")


def default_path() -> str:
    """`$CLAUDE_CONFIG_DIR/.credentials.json`, else `~/.claude/.credentials.json` of the real user."""
    config_dir = os.environ.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        return os.path.join(config_dir, ".credentials.json")
    return os.path.join(real_home(), ".claude", ".credentials.json")


class CredentialStore:
    """Where the OAuth JSON lives: a file, or (macOS) the keychain with the file as fallback."""

    def __init__(self, path: str, keychain: Keychain | None = None):
        self.path = path
        self.keychain = keychain

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced or rewritten; None when it is missing."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, Any]:
        """The whole JSON document (all keys); raises ValueError with a message that names the source."""
        if self.keychain is not None:
            data = self.keychain.read()
            if data is not None:
                with contextlib.suppress(ValueError):
                    return parse_document(data, "the keychain item " + self.keychain.service)
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValueError(f"{self.path}: file not found") from None
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror}") from None
        return parse_document(raw, self.path)

    def writable(self) -> str | None:
        """Why a refresh could not be saved (so it must not happen), or None when it can be."""
        if self.keychain is not None:
            return None
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.access(directory, os.W_OK):
            return f"the directory {directory} is not writable"
        if os.path.exists(self.path) and not os.access(self.path, os.W_OK):
            return f"{self.path} is not writable"
        return None

    def write(self, document: dict[str, Any]) -> None:
        data = json.dumps(document, indent=2).encode()
        if self.keychain is not None and self.keychain.write(data):
            return
        files.replace_atomically(self.path, data, 0o600)

    def lock_path(self) -> str:
        return self.path + ".lock"


def parse_document(raw: bytes, source: str) -> dict[str, Any]:
    """Validate the Claude Code credentials JSON; the message names `source`, never a token."""
    if not raw.strip():
        raise ValueError(f"{source}: file is empty")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise ValueError(f"{source}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(document, dict) or not isinstance(document.get(OAUTH_KEY), dict):
        raise ValueError(f"{source}: no {OAUTH_KEY} object (log in with `claude` first)")
    oauth = document[OAUTH_KEY]
    if not isinstance(oauth.get("accessToken"), str) or not oauth["accessToken"]:
        raise ValueError(f"{source}: {OAUTH_KEY}.accessToken is missing")
    if not isinstance(oauth.get("expiresAt", 0), (int, float)):
        raise ValueError(f"{source}: {OAUTH_KEY}.expiresAt is not a number")
    return document


def now_ms() -> int:
    return int(time.time() * 1000)


class OAuthCredential:
    """One subscription login. `access_token()` is cheap when the token is fresh (one stat call)."""

    def __init__(self, tag: str, store: CredentialStore, token_url: str, http: urllib3.PoolManager):
        self.tag = tag
        self.store = store
        self.token_url = token_url
        self.http = http
        self._document: dict[str, Any] | None = None
        self._signature: tuple[int, int, int] | None = None
        self._error: str | None = "not loaded yet"
        self._checked = 0.0
        self._lock = gevent.lock.RLock()
        self._failure: CredentialError | None = None
        self._failure_until = 0.0
        self._failure_signature: tuple[int, int, int] | None = None
        self._backoff = BACKOFF_MIN
        self.load(force=True)

    # -- reading -------------------------------------------------------------------------------

    def load(self, force: bool = False) -> None:
        """Re-read the store when it changed (or always with `force`); remember why it is unusable."""
        signature = self.store.signature()
        if not force and signature == self._signature and self._error != "not loaded yet":
            return
        self._signature = signature
        self._checked = time.monotonic()
        try:
            document = self.store.read()
        except ValueError as exc:
            if self._error != str(exc):
                log.warning("credential %s unavailable: %s", self.tag, exc)
            self._document, self._error = None, str(exc)
            return
        if self._error and self._document is None:
            log.info("credential %s loaded from %s", self.tag, self.source())
        self._document, self._error = document, None

    def source(self) -> str:
        return self.store.path if self.store.keychain is None else "keychain " + self.store.keychain.service

    @property
    def oauth(self) -> dict[str, Any]:
        assert self._document is not None
        return self._document[OAUTH_KEY]

    def available(self) -> bool:
        self._refresh_view()
        return self._document is not None

    def info(self) -> dict[str, Any]:
        """Non-secret facts for status pages: subscription type, tier, expiry."""
        if not self.available():
            return {"available": False, "error": self._error}
        oauth = self.oauth
        return {
            "available": True,
            "subscription_type": oauth.get("subscriptionType") or "",
            "rate_limit_tier": oauth.get("rateLimitTier") or "",
            "expires_at": oauth.get("expiresAt") or 0,
        }

    def _refresh_view(self) -> None:
        if self.store.keychain is None:
            self.load()
        elif time.monotonic() - self._checked >= 5.0:
            self.load(force=True)  # keychain items have no stat signature: poll them

    def _unavailable(self) -> CredentialError:
        return CredentialError(
            503,
            f"ccm-wsgi has no usable Claude subscription credential ({self._error}). "
            "Log in with `claude` on the proxy host or fix the file; it is picked up without a restart.",
        )

    def _fresh(self, margin_ms: int = REFRESH_MARGIN_MS) -> bool:
        expires = self.oauth.get("expiresAt") or 0
        return expires == 0 or now_ms() < expires - margin_ms

    # -- the token -----------------------------------------------------------------------------

    def access_token(self) -> str:
        """A token valid for at least a minute, refreshing it (once, across processes) when needed."""
        self._refresh_view()
        if self._document is None:
            raise self._unavailable()
        token = self.oauth["accessToken"]
        if self._fresh():
            return token
        return self._refresh(token, force=False)

    def renew(self, rejected: str) -> str:
        """The upstream rejected `rejected` (401): adopt a newer token from storage, or refresh once."""
        return self._refresh(rejected, force=True)

    def _refresh(self, stale: str, force: bool) -> str:
        with self._lock:
            self.load(force=True)
            if self._document is None:
                raise self._unavailable()
            if self.oauth["accessToken"] != stale and self._fresh():
                return self.oauth["accessToken"]  # another greenlet or process already did it
            self._check_backoff()
            reason = self.store.writable()
            if reason:
                raise self._fail(
                    503,
                    f"the subscription token of credential {self.tag} needs a refresh, but {reason}; "
                    "ccm-wsgi refuses to refresh a token it cannot save (that would log out `claude`)",
                )
            try:
                with files.locked(self.store.lock_path(), fcntl.LOCK_EX, LOCK_WAIT_SECONDS, mode_if_created=0o600):
                    return self._refresh_locked(stale, force)
            except TimeoutError as exc:
                raise CredentialError(503, f"credential {self.tag}: {exc}") from None
            except OSError as exc:
                message = f"credential {self.tag}: cannot lock {self.store.lock_path()}: {exc.strerror}"
                raise self._fail(503, message) from None

    def _refresh_locked(self, stale: str, force: bool) -> str:
        self.load(force=True)  # under the lock: the other side may have written a new token
        if self._document is None:
            raise self._unavailable()
        oauth = self.oauth
        if oauth["accessToken"] != stale and self._fresh():
            return oauth["accessToken"]
        if not force and self._fresh():
            return oauth["accessToken"]
        refresh_token = oauth.get("refreshToken")
        if not refresh_token:
            raise self._fail(503, self._login_message("the credential has no refresh token"))
        try:
            answer = self._post_refresh(refresh_token, oauth.get("scopes"))
        except RefreshRejected as rejected:
            # A local `claude` may have rotated the token outside our lock: adopt its login if so.
            self.load(force=True)
            if self._document is not None and self.oauth.get("refreshToken") != refresh_token and self._fresh():
                return self.oauth["accessToken"]
            raise self._fail(503, self._login_message(str(rejected)), long=True) from None
        document = json.loads(json.dumps(self._document))  # a deep copy that keeps every foreign key
        new = document[OAUTH_KEY]
        new["accessToken"] = answer["access_token"]
        if answer.get("refresh_token"):
            new["refreshToken"] = answer["refresh_token"]
        new["expiresAt"] = now_ms() + int(answer.get("expires_in") or 3600) * 1000
        try:
            self.store.write(document)
        except OSError as exc:
            log.error("credential %s: refreshed, but saving %s failed: %s", self.tag, self.source(), exc.strerror)
        self._document, self._error = document, None
        self._signature = self.store.signature()
        self._failure, self._backoff = None, BACKOFF_MIN
        log.info("credential %s: access token refreshed (valid for %ss)", self.tag, answer.get("expires_in"))
        return new["accessToken"]

    def _post_refresh(self, refresh_token: str, scopes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": CLIENT_ID}
        if isinstance(scopes, list) and scopes:
            body["scope"] = " ".join(str(s) for s in scopes)
        headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": USER_AGENT}
        last_error = ""
        for attempt in range(3):
            if attempt:
                gevent.sleep(0.2 * attempt)
            try:
                resp = self.http.request(
                    "POST", self.token_url, body=json.dumps(body).encode(), headers=headers,
                    timeout=urllib3.Timeout(connect=10.0, read=30.0), retries=False, redirect=False,
                )
            except urllib3.exceptions.HTTPError as exc:
                describe = getattr(self.http, "ccm_describe_error", None)  # names the outbound (detour)
                last_error = describe(exc) if describe is not None else type(exc).__name__
                if isinstance(exc, NOT_SENT):
                    continue
                break  # the endpoint may have spent the refresh token already: never send it twice
            return self._refresh_answer(resp)
        raise self._fail(502, f"credential {self.tag}: the token endpoint is unreachable ({last_error})")

    def _refresh_answer(self, resp: urllib3.BaseHTTPResponse) -> dict[str, Any]:
        try:
            answer = json.loads(resp.data)
        except ValueError:
            answer = None
        if resp.status == 200 and isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
            return answer
        code = answer.get("error") if isinstance(answer, dict) else None
        # only an OAuth error code (invalid_grant, ...): whatever else the endpoint says is never repeated
        reason = f"HTTP {resp.status}" + (f" {code}" if isinstance(code, str) and OAUTH_ERROR.fullmatch(code) else "")
        if resp.status in (400, 401, 403):
            raise RefreshRejected(f"the token endpoint refused the refresh ({reason})")
        raise self._fail(502, f"credential {self.tag}: the token endpoint failed ({reason})")

    def _login_message(self, reason: str) -> str:
        return (
            f"the Claude subscription login of credential {self.tag} must be renewed: {reason}. "
            "Run `claude` and /login on the proxy host; the new login is picked up without a restart."
        )

    # -- failure back-off: no refresh storms ----------------------------------------------------

    def _fail(self, status: int, message: str, long: bool = False) -> CredentialError:
        log.error("credential %s: refresh failed: %s", self.tag, message)
        error = CredentialError(status, message)
        self._failure = error
        self._failure_signature = self.store.signature()
        self._failure_until = time.monotonic() + (BACKOFF_MAX if long else self._backoff)
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return error

    def _check_backoff(self) -> None:
        if self._failure is None or time.monotonic() >= self._failure_until:
            return
        if self.store.signature() != self._failure_signature:
            return  # the file changed: try again at once
        raise self._failure
