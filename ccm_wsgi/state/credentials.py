"""A credential's login shared by every node: one refresh for the whole cluster, never two spends.

Redis holds, per credential tag, the current OAuth object (`claudeAiOauth`: access and refresh token,
expiry, scopes) - the only secrets Redis ever holds unhashed. The credential file stays the bootstrap:
a node that has it registers as a *holder*, publishes its login when Redis has none (or an older one),
and writes a newer login from Redis through to its file, so a local `claude` on that host sees it too.

The rules a refresh follows (see `OAuthCredential`, which calls these):

* only a holder refreshes (a node without the file adopts what Redis has, and has nowhere to save a new
  login anyway); it does so under the Redis lock `cred:<tag>:lock` (`SET NX PX` with a random token,
  released by compare-and-delete, extended every few seconds while the refresh runs), then under this
  host's file locks (gunicorn's other workers, a local `claude`);
* inside the locks it re-reads Redis: a login another node refreshed meanwhile is adopted, never refreshed
  again (claude-relay-service read the refresh token before taking its lock and never re-read it);
* before sending a refresh token it writes an intent (`cred:<tag>:spending` = the token's SHA-256 and the
  node) and clears it when it publishes the answer. A node that finds an intent for the refresh token Redis
  still holds knows that token may already be spent by a node whose answer was lost, and does not send it
  while the current access token still works;
* while Redis is unreachable, only a *sole holder* (a node that holds the file and that Redis, when last
  asked, listed as the only one) refreshes, under its file locks, and publishes when Redis is back. Every
  other node waits. A holder asks at start, whenever Redis is back, before each refresh and every
  HOLDERS_SECONDS; a node that registers later sees the first and is never sole. So no other node
  refreshes while there is a sole holder, and this cannot spend a refresh token twice, even when the sole
  holder is the only node cut off from Redis.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
from collections.abc import Iterator
from typing import Any

import gevent
from redis.exceptions import LockError
from redis.lock import Lock

from .connection import SharedState, Unavailable

log = logging.getLogger("ccm_wsgi.state")

LOCK_SECONDS = 20.0  # the lock's lifetime; renewed while the refresh runs, so only a dead holder lets it lapse
LOCK_RENEW = 5.0
LOCK_WAIT = 30.0  # as long as a refresh may take (the token endpoint's read timeout)
HOLDERS_SECONDS = 5.0  # how often a holder asks who else holds the file


class LockBusy(Exception):
    """Another node held the refresh lock for the whole wait."""


def digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).hexdigest()


def expires(oauth: dict[str, Any] | None) -> float:
    value = (oauth or {}).get("expiresAt") or 0
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else 0.0


def newer(candidate: dict[str, Any] | None, current: dict[str, Any] | None) -> bool:
    """Whether `candidate` is a later login than `current` (a refresh always moves the expiry on)."""
    if candidate is None or not isinstance(candidate.get("accessToken"), str):
        return False
    if current is None:
        return True
    return candidate.get("accessToken") != current.get("accessToken") and expires(candidate) > expires(current)


class SharedCredential:
    def __init__(self, state: SharedState, tag: str, path: str):
        self.state = state
        self.tag = tag
        self.key = state.key("cred", tag)
        self.lock_key = state.key("cred", tag, "lock")
        self.intent_key = state.key("cred", tag, "spending")
        self.holders_key = state.key("cred", tag, "holders")
        self.holder = f"{socket.gethostname()}:{path}"  # the same for every process of this host
        self.registered = False  # this node holds the file, and said so
        self.sole = False  # ... and was the only holder when Redis last said
        self._watcher: gevent.Greenlet | None = None

    def _learn(self, holders: set[Any]) -> None:
        self.sole = self.registered and holders == {self.holder.encode()}

    def read(self) -> dict[str, Any] | None:
        """The OAuth object Redis holds (None: none yet); raises Unavailable."""
        def get(r: Any) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            pipe.get(self.key)
            pipe.smembers(self.holders_key)
            return list(pipe.execute())
        raw, holders = self.state.run(f"reading credential {self.tag}", get)
        self._learn(set(holders))
        try:
            oauth = json.loads(raw) if raw else None
        except ValueError:
            oauth = None
        return oauth if isinstance(oauth, dict) and isinstance(oauth.get("accessToken"), str) else None

    def register(self) -> None:
        """This host holds the credential file: count it among the holders, and learn whether it is alone."""
        def add(r: Any) -> set[bytes]:
            pipe = r.pipeline(transaction=False)
            pipe.sadd(self.holders_key, self.holder)
            pipe.smembers(self.holders_key)
            return set(pipe.execute()[1])
        holders = self.state.run(f"registering credential {self.tag}", add)
        self.registered = True
        self._learn(holders)
        if self._watcher is None:
            self._watcher = gevent.spawn(self._watch)

    def _watch(self) -> None:
        """Keep `sole` current: another node that gets the file makes this one share the rule."""
        while True:
            gevent.sleep(HOLDERS_SECONDS)
            with contextlib.suppress(Unavailable):
                self._learn(self.state.run(f"watching credential {self.tag}", self._holders))

    def _holders(self, r: Any) -> set[bytes]:
        return set(r.smembers(self.holders_key))

    def stop(self) -> None:
        watcher, self._watcher = self._watcher, None
        if watcher is not None:
            watcher.kill(block=False)

    def publish(self, oauth: dict[str, Any]) -> None:
        """Make `oauth` the cluster's login and clear the intent to refresh; raises Unavailable."""
        data = json.dumps(oauth, separators=(",", ":"))

        def store(r: Any) -> None:
            pipe = r.pipeline(transaction=True)
            pipe.set(self.key, data)
            pipe.delete(self.intent_key)
            pipe.execute()
        self.state.run(f"publishing credential {self.tag}", store)

    def intent(self) -> dict[str, Any] | None:
        raw = self.state.run(f"reading credential {self.tag}", lambda r: r.get(self.intent_key))
        try:
            found = json.loads(raw) if raw else None
        except ValueError:
            return None
        return found if isinstance(found, dict) else None

    def intend(self, refresh_token: str) -> None:
        """Say, before sending it, that this node is about to spend `refresh_token`."""
        data = json.dumps({"sha256": digest(refresh_token), "node": self.state.node})
        self.state.run(f"refreshing credential {self.tag}", lambda r: r.set(self.intent_key, data))

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """The cluster's refresh lock for this credential, kept alive for as long as the block runs.
        Raises Unavailable (Redis unreachable) or LockBusy."""
        lock = Lock(self.state.redis, self.lock_key, timeout=LOCK_SECONDS, sleep=0.1, blocking_timeout=LOCK_WAIT,
                    thread_local=False)
        if not self.state.run(f"locking credential {self.tag}", lambda _: lock.acquire()):
            raise LockBusy(f"another node held the refresh lock of credential {self.tag} for {LOCK_WAIT:g}s")
        keeper = gevent.spawn(self._keep, lock)
        try:
            yield
        finally:
            keeper.kill(block=False)
            with contextlib.suppress(Unavailable, LockError):  # else it expires within LOCK_SECONDS
                self.state.run(f"unlocking credential {self.tag}", lambda _: lock.release())

    def _keep(self, lock: Lock) -> None:
        while True:
            gevent.sleep(LOCK_RENEW)
            try:
                self.state.run(f"keeping the refresh lock of credential {self.tag}",
                               lambda _: lock.extend(LOCK_SECONDS, replace_ttl=True))
            except (Unavailable, LockError) as exc:
                log.error("credential %s: the cluster's refresh lock could not be kept (%s)", self.tag, exc)
                return
