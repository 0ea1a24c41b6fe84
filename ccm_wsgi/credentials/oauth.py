"""The Claude subscription credential: read Claude Code's OAuth login, keep its access token fresh.

Refresh tokens rotate and a spent one is refused (`invalid_grant`): whoever spends the same refresh token
second logs the subscription out, for every user and for the local `claude` too. So a refresh runs under
four guards, and the token endpoint is only called when all of them agree:

* one greenlet at a time in this process (a gevent lock);
* one ccm-wsgi process at a time on this file (an `flock` on `<file>.lock`);
* Claude Code's own lock (`<config dir>.lock`, see `locks.py`), so a local `claude` waits for us and we
  wait for it; while it is held elsewhere we never call the token endpoint, we re-read and adopt;
* a re-read of the file under the locks: whoever refreshed first has written the new token, and everyone
  after adopts it instead of refreshing again.

Timing follows Claude Code: a token is refreshed when less than five minutes remain, and a refresh that
fails while the token still works leaves requests using it. A 429 from the token endpoint holds refreshes
of that credential until its `Retry-After`; an upstream 401 causes at most one refresh per minute, and
only when the token that got the 401 is still the current one. A refresh whose answer was lost (sent, no
reply) is not sent again while the current access token still works: only when it is about to expire,
when there is nothing left to lose.

With shared state (several nodes on Redis: `cluster.py`, `state/credentials.py`), a refresh also needs the cluster's
lock, taken first; Redis is re-read under it, a login another node refreshed is adopted (and written
through to the file), and only nodes that hold the file ever refresh.

The space for the refreshed file is reserved before the refresh token is spent (no space: no refresh).
If the save still fails (I/O error, read-only remount), the new login stays authoritative in memory and in
a private in-memory pending file that this host's other ccm-wsgi processes adopt; the stale file is never
allowed to replace it, and the save is retried, with an error logged each time, until it succeeds.
"""

from __future__ import annotations

import fcntl
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.lock
import urllib3

from .. import files
from ..anthropic import CLIENT_ID
from ..state.credentials import SharedCredential
from ..upstream.outbounds import Route
from . import locks
from .cluster import ClusterMember
from .endpoint import post_token, refusal, retry_after_seconds, token_answer
from .errors import CredentialError, RefreshRejected
from .store import OAUTH_KEY, CredentialStore

REFRESH_MARGIN_MS = 5 * 60_000  # refresh when less than this remains (Claude Code's own margin)
RENEW_INTERVAL = 60.0  # an upstream 401 refreshes a credential at most this often
LOCK_WAIT_SECONDS = 30.0  # for our flock and for Claude Code's lock
BACKOFF_MIN, BACKOFF_MAX = 5.0, 300.0
SAVE_RETRY_MIN, SAVE_RETRY_MAX = 5.0, 60.0
# Failures that happen before the refresh request leaves: only these are retried at once.
NOT_SENT = (urllib3.exceptions.ConnectTimeoutError, urllib3.exceptions.ProxyError)

log = logging.getLogger("ccm_wsgi.credentials")


def now_ms() -> int:
    return int(time.time() * 1000)


class OAuthCredential(ClusterMember):
    """One subscription login. `access_token()` is cheap when the token is fresh (one stat call).

    `on_refresh(tag, result)` hears how each refresh that was needed ended: "success" (this process got a new
    token), "failure" (none; refreshes are then held back for a while) or "adopted" (someone else, another
    process, node or a local `claude`, had refreshed meanwhile and its token is used)."""

    def __init__(self, tag: str, store: CredentialStore, token_url: str, route: Route,
                 shared: SharedCredential | None = None, on_refresh: Callable[[str, str], None] | None = None):
        self.tag = tag
        self.shared = shared
        self._cluster: dict[str, Any] | None = None  # the login Redis held when last read, if newer than the file
        self._holder = False  # this node holds the credential file (shared state: only holders refresh)
        self.store = store
        self.token_url = token_url
        self.route = route
        self.on_refresh = on_refresh
        self._document: dict[str, Any] | None = None
        self._signature: tuple[int, int, int] | None = None
        self._error: str | None = "not loaded yet"
        self._checked = 0.0
        self._lock = gevent.lock.RLock()
        self._unsaved: dict[str, Any] | None = None  # refreshed, not on disk yet: authoritative
        self._spent = ""  # the refresh token `_unsaved` replaced (the stale file still holds it)
        self._next_save = 0.0
        self._save_delay = SAVE_RETRY_MIN
        self._hold: CredentialError | None = None  # refreshes are held (failure back-off, 429, lost answer)
        self._hold_until = 0.0
        self._hold_signature: tuple[int, int, int] | None = None
        self._backoff = BACKOFF_MIN
        self._last_renew = -RENEW_INTERVAL
        self._no_claude_lock = False
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
            document: dict[str, Any] | None = self.store.read()
            error = None
        except ValueError as exc:
            document, error = None, str(exc)
        if self._unsaved is not None:
            document, error = self._reconcile(document), None
        if self._cluster is not None:
            document, error = self._with_cluster(document), None
        if error is not None:
            if self._error != error:
                log.warning("credential %s unavailable: %s", self.tag, error)
            self._document, self._error = None, error
            return
        if self._error and self._document is None:
            log.info("credential %s loaded from %s", self.tag, self.store.describe())
        self._document, self._error = document, None

    def _reconcile(self, on_disk: dict[str, Any] | None) -> dict[str, Any]:
        """The unsaved login wins over a stale (or unreadable) file; a file that holds it, or a new login, wins."""
        assert self._unsaved is not None
        disk_refresh = on_disk[OAUTH_KEY].get("refreshToken") if on_disk is not None else None
        if on_disk is None or disk_refresh == self._spent:
            return self._unsaved
        if disk_refresh != self._unsaved[OAUTH_KEY].get("refreshToken"):
            log.warning("credential %s: a new login appeared in %s; it replaces the unsaved refreshed one",
                        self.tag, self.store.describe())
        self._saved()
        return on_disk

    @property
    def oauth(self) -> dict[str, Any]:
        assert self._document is not None
        oauth: dict[str, Any] = self._document[OAUTH_KEY]
        return oauth

    def available(self) -> bool:
        self._refresh_view()
        return self._document is not None

    def info(self) -> dict[str, Any]:
        """Non-secret facts for status pages: subscription type, tier, expiry."""
        if not self.available():
            return {"available": False, "error": self._error}
        oauth = self.oauth
        found: dict[str, Any] = {
            "available": True,
            "subscription_type": oauth.get("subscriptionType") or "",
            "rate_limit_tier": oauth.get("rateLimitTier") or "",
            "expires_at": oauth.get("expiresAt") or 0,
            "unsaved": self._unsaved is not None,
        }
        if self.shared is not None:  # which refresh rule this node follows while Redis is down
            found["shared"] = {"holder": self._holder, "sole_holder": self.shared.sole}
        return found

    def _refresh_view(self) -> None:
        if self.store.keychain is None:
            self.load()
        elif time.monotonic() - self._checked >= 5.0:
            self.load(force=True)  # keychain items have no stat signature: poll them

    def _unavailable(self) -> CredentialError:
        return CredentialError(
            503,
            f"ccm-wsgi has no usable Claude subscription credential ({self._error}). "
            "Log in (`ccm-wsgi login`, or `claude` on the proxy host) or fix the file; "
            "it is picked up without a restart.",
        )

    def _remaining_ms(self) -> float:
        expires = self.oauth.get("expiresAt") or 0
        return float("inf") if not expires else expires - now_ms()

    def _fresh(self) -> bool:
        return self._remaining_ms() > REFRESH_MARGIN_MS

    def _valid(self) -> bool:
        return self._remaining_ms() > 0

    # -- the token -----------------------------------------------------------------------------

    def access_token(self) -> str:
        """A token valid for at least five minutes, refreshed (once, across processes) when needed; while a
        refresh cannot happen, the current token as long as it has not expired."""
        self._refresh_view()
        if self._document is None:
            raise self._unavailable()
        if self._unsaved is not None:
            self._retry_save()
        token: str = self.oauth["accessToken"]
        if self._fresh():
            return token
        try:
            return self._refresh(token, force=False)
        except CredentialError:
            if self._document is not None and self._valid():
                return str(self.oauth["accessToken"])
            raise

    def renew(self, rejected: str) -> str | None:
        """The upstream answered 401 to `rejected`: the token to retry with, or None to pass the 401 on
        (the token was refreshed less than a minute ago; refreshing again would not help)."""
        with self._lock:
            self.load(force=True)
            if self._document is not None and self.oauth["accessToken"] != rejected and self._valid():
                return str(self.oauth["accessToken"])  # someone refreshed since: try the current one
            if time.monotonic() - self._last_renew < RENEW_INTERVAL:
                return None
            self._last_renew = time.monotonic()
            return self._refresh(rejected, force=True)

    def _refresh(self, stale: str, force: bool) -> str:
        with self._lock:
            self.load(force=True)
            if self.shared is not None:
                self._sync_cluster(locked=False)  # another node may have refreshed already
            if self._document is None:
                raise self._unavailable()
            if self.oauth["accessToken"] != stale and self._fresh():
                return self._adopt()  # another greenlet, process or node already did it
            if self.shared is not None and not self._holder:
                raise self._fail(503, f"credential {self.tag}: this node does not hold the credential file; it "
                                      "waits for a node that does to refresh the login")
            if self._unsaved is None and self._adopt_pending(self.oauth.get("refreshToken") or ""):
                return self._adopt()
            self._check_hold()
            reason = self.store.unwritable()
            if reason:
                raise self._fail(
                    503,
                    f"the subscription token of credential {self.tag} needs a refresh, but {reason}; "
                    "ccm-wsgi refuses to refresh a token it cannot save (that would log out `claude`)",
                )
            try:
                with self._cluster_lock(), \
                        files.locked(self.store.lock_path(), fcntl.LOCK_EX, LOCK_WAIT_SECONDS, mode_if_created=0o600):
                    return self._under_claude_lock(stale, force)
            except files.LockTimeout as exc:
                raise self._fail(503, f"credential {self.tag}: {exc}") from None
            except OSError as exc:
                message = f"credential {self.tag}: cannot lock {self.store.lock_path()}: {exc.strerror}"
                raise self._fail(503, message) from None

    def _under_claude_lock(self, stale: str, force: bool) -> str:
        lock = locks.ClaudeLock(locks.lock_path(self.store.path))
        try:
            held = lock.acquire(LOCK_WAIT_SECONDS, while_waiting=lambda: self._adopted(stale))
        except locks.LockBusy as exc:
            raise self._fail(503, f"credential {self.tag}: not refreshing while {exc}") from None
        except OSError as exc:
            if not self._no_claude_lock:
                log.warning("credential %s: cannot take Claude Code's refresh lock %s (%s); refreshing "
                            "under ccm-wsgi's own lock only", self.tag, lock.path, exc.strerror)
                self._no_claude_lock = True
            return self._refresh_locked(stale, force)
        if not held:
            return self._adopt()  # adopted while waiting
        with lock:
            return self._refresh_locked(stale, force)

    def _adopted(self, stale: str) -> bool:
        """While waiting for the lock: has someone else refreshed meanwhile?"""
        self.load(force=True)
        return self._document is not None and self.oauth["accessToken"] != stale and self._fresh()

    def _refresh_locked(self, stale: str, force: bool) -> str:
        self.load(force=True)  # under the locks: the other side may have written a new token
        if self.shared is not None:
            self._sync_cluster(locked=True)  # under the cluster's lock: Redis has the last word
        if self._document is None:
            raise self._unavailable()
        oauth = self.oauth
        if oauth["accessToken"] != stale and self._fresh():
            return self._adopt()
        if not force and self._fresh():
            return self._adopt()
        refresh_token = oauth.get("refreshToken")
        if not refresh_token:
            raise self._fail(503, self._login_message("the credential has no refresh token"))
        try:
            reservation = self.store.reserve(self._document)
        except OSError as exc:
            raise self._fail(503, f"credential {self.tag}: not refreshing: there is no room to save the new "
                                  f"login beside {self.store.path} ({exc.strerror})") from None
        if self.shared is not None:
            try:
                self._declare_intent(refresh_token)
            except CredentialError:
                if reservation is not None:
                    reservation.abandon()
                raise
        try:
            answer = self._post_refresh(refresh_token, oauth.get("scopes"))
        except RefreshRejected as rejected:
            if reservation is not None:
                reservation.abandon()
            # A local `claude` may have rotated the token outside our locks: adopt its login if so.
            self.load(force=True)
            if self._document is not None and self.oauth.get("refreshToken") != refresh_token and self._fresh():
                return self._adopt()
            raise self._fail(503, self._login_message(str(rejected)), long=True) from None
        except BaseException:
            if reservation is not None:
                reservation.abandon()
            raise
        document = self._refreshed(answer)
        try:
            self.store.write(document, reservation)
        except OSError as exc:
            self._keep_unsaved(document, refresh_token, exc)
        else:
            self._saved()
        self._document, self._error = document, None
        self._signature = self.store.signature()
        self._cluster = None
        self._hold, self._backoff = None, BACKOFF_MIN
        log.info("credential %s: access token refreshed (valid for %ss)", self.tag, answer.get("expires_in"))
        if self.shared is not None:
            self._publish()
        self._report("success")
        return str(document[OAUTH_KEY]["accessToken"])

    def _adopt(self) -> str:
        """The token someone else refreshed meanwhile, taken instead of refreshing."""
        self._report("adopted")
        return str(self.oauth["accessToken"])

    def _report(self, result: str) -> None:
        if self.on_refresh is not None:
            self.on_refresh(self.tag, result)

    def _refreshed(self, answer: dict[str, Any]) -> dict[str, Any]:
        assert self._document is not None
        document: dict[str, Any] = json.loads(json.dumps(self._document))  # a deep copy keeping foreign keys
        new = document[OAUTH_KEY]
        new["accessToken"] = answer["access_token"]
        if answer.get("refresh_token"):
            new["refreshToken"] = answer["refresh_token"]
        new["expiresAt"] = now_ms() + int(answer.get("expires_in") or 3600) * 1000
        scope = answer.get("scope")
        if isinstance(scope, str) and scope.strip():
            new["scopes"] = scope.split()
        return document

    # -- a refreshed login that could not be saved ---------------------------------------------

    def _keep_unsaved(self, document: dict[str, Any], spent: str, exc: OSError) -> None:
        self._unsaved, self._spent = document, spent
        self._save_delay = SAVE_RETRY_MIN
        self._next_save = time.monotonic() + self._save_delay
        log.error("credential %s: refreshed, but saving %s failed (%s); the new login is kept in memory and "
                  "saved as soon as possible - do not log in or out meanwhile", self.tag, self.store.describe(),
                  exc.strerror)
        try:
            self.store.write_pending(document, spent)
        except OSError as pending_exc:
            log.error("credential %s: cannot keep the unsaved login for this host's other ccm-wsgi processes "
                      "either (%s)", self.tag, pending_exc.strerror)
        gevent.spawn_later(self._save_delay, self._retry_save)

    def _retry_save(self) -> None:
        if self._unsaved is None or time.monotonic() < self._next_save:
            return
        with self._lock:
            unsaved = self._unsaved
            if unsaved is None:
                return
            try:
                with files.locked(self.store.lock_path(), fcntl.LOCK_EX, 1.0, mode_if_created=0o600):
                    self.store.write(unsaved)
            except OSError as exc:
                self._save_delay = min(self._save_delay * 2, SAVE_RETRY_MAX)
                self._next_save = time.monotonic() + self._save_delay
                log.error("credential %s: the refreshed login is still not saved to %s (%s); retrying in %gs",
                          self.tag, self.store.describe(), exc.strerror, self._save_delay)
                gevent.spawn_later(self._save_delay, self._retry_save)
                return
            self._saved()
            self._signature = self.store.signature()
            log.info("credential %s: the refreshed login is now saved to %s", self.tag, self.store.describe())

    def _saved(self) -> None:
        if self._unsaved is not None:
            self.store.clear_pending()
        self._unsaved, self._spent = None, ""

    def _adopt_pending(self, on_disk_refresh: str) -> bool:
        """Another process of this host refreshed but could not save: take its login instead of spending
        the refresh token the stale file still holds (that would log the subscription out)."""
        try:
            pending = self.store.read_pending(on_disk_refresh)
        except OSError:
            return False
        if pending is None:
            return False
        log.warning("credential %s: adopting a refreshed login another process could not save", self.tag)
        self._unsaved, self._spent, self._document = pending, on_disk_refresh, pending
        self._next_save = 0.0
        self._retry_save()
        return True

    # -- the token endpoint ----------------------------------------------------------------------

    def _post_refresh(self, refresh_token: str, scopes: Any) -> dict[str, Any]:
        body: dict[str, Any] = {"grant_type": "refresh_token", "refresh_token": refresh_token, "client_id": CLIENT_ID}
        if isinstance(scopes, list) and scopes:
            body["scope"] = " ".join(str(s) for s in scopes)
        last_error = ""
        for attempt in range(3):
            if attempt:
                gevent.sleep(0.2 * attempt)
            try:
                resp = post_token(self.route, self.token_url, body)
            except urllib3.exceptions.HTTPError as exc:
                last_error = self.route.describe(exc)
                if isinstance(exc, NOT_SENT):
                    continue
                # The endpoint may have spent the refresh token already: never send it again while the
                # current access token still works.
                raise self._hold_after_lost_answer(last_error) from None
            return self._refresh_answer(resp)
        raise self._fail(502, f"credential {self.tag}: the token endpoint is unreachable ({last_error})")

    def _refresh_answer(self, resp: urllib3.BaseHTTPResponse) -> dict[str, Any]:
        answer = token_answer(resp)
        if resp.status == 200 and answer is not None:
            return answer
        reason = refusal(resp)
        if resp.status == 429:
            wait = retry_after_seconds(resp.headers.get("retry-after"))
            raise self._hold_for(wait, CredentialError(
                503, f"credential {self.tag}: the token endpoint refused more refreshes for now ({reason}); "
                     f"not asking again for {wait:.0f}s", retry_after=wait))
        if resp.status in (400, 401, 403):
            raise RefreshRejected(f"the token endpoint refused the refresh ({reason})")
        raise self._fail(502, f"credential {self.tag}: the token endpoint failed ({reason})")

    def _login_message(self, reason: str) -> str:
        return (
            f"the Claude subscription login of credential {self.tag} must be renewed: {reason}. "
            "Run `ccm-wsgi login` (or `claude` and /login) on the proxy host; the new login is picked up "
            "without a restart."
        )

    # -- holding refreshes back: no storms, no second spending of a refresh token -----------------

    def _fail(self, status: int, message: str, long: bool = False) -> CredentialError:
        log.error("credential %s: refresh failed: %s", self.tag, message)
        error = self._hold_for(BACKOFF_MAX if long else self._backoff, CredentialError(status, message))
        self._backoff = min(self._backoff * 2, BACKOFF_MAX)
        return error

    def _hold_for(self, seconds: float, error: CredentialError) -> CredentialError:
        """A refresh failed: hold the next ones back for `seconds`, answering `error` meanwhile."""
        self._report("failure")
        self._hold = error
        self._hold_signature = self.store.signature()
        self._hold_until = time.monotonic() + seconds
        return error

    def _hold_after_lost_answer(self, why: str) -> CredentialError:
        """The refresh token may be spent with its answer lost. While the current access token still works,
        sending it again could only log the subscription out; once less than a minute remains there is
        nothing left to lose, and it is sent again after the usual back-off."""
        remaining = self._remaining_ms() / 1000 if self._document is not None else 0.0
        if remaining > 60.0 + BACKOFF_MIN:
            wait, when = remaining - 60.0, "while the current access token still works"
        else:
            wait, when = BACKOFF_MIN, f"for {BACKOFF_MIN:g}s"
        message = f"credential {self.tag}: the refresh request was sent but its answer was lost ({why}); " \
                  f"it is not sent again {when}"
        log.error("credential %s: refresh failed: %s", self.tag, message)
        return self._hold_for(wait, CredentialError(502, message))

    def _check_hold(self) -> None:
        if self._hold is None or time.monotonic() >= self._hold_until:
            return
        if self.store.signature() != self._hold_signature:
            return  # the file changed (a new login, or someone else refreshed): look again at once
        raise self._hold
