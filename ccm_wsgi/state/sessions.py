"""Which credential each conversation is pinned to, the same on every node.

A pool's balancer keeps its pins in this process (`pool/sessions.py`); with shared state that table is a
cache of Redis's, `pin:<pool>:<digest>` = the credential's tag, expiring after a day unused (the digest
is the SHA-256 of the user and the session id: a session id is chosen by the client, and never stored
as it is). A request that carries a session reads its pin in its one round trip before forwarding
(GETEX, which also pushes the expiry back) and the balancer adopts it, so a conversation stays on one
credential (and its prompt cache) whichever node serves it. A new or moved pin is written in the sender's
next pipeline, off the request's path. While Redis is unreachable each node goes on with its own table.
"""

from __future__ import annotations

import hashlib
from typing import Any

import gevent.local

from ..pool.sessions import Key, Pin, SessionPins
from .connection import SharedState, ignore

PENDING = object()  # a pin read that has not been answered yet
FAILED = object()  # one that Redis could not answer: this node's own pin holds


class SharedPins:
    """`Pins` over Redis, with this node's `SessionPins` as its cache."""

    def __init__(self, state: SharedState, pool: str, own: SessionPins):
        self.state = state
        self.pool = pool
        self.own = own
        self.ttl = int(own.ttl)
        self._local = gevent.local.local()  # the pin read for this greenlet's request: (key, answer)

    def _key(self, key: Key) -> str:
        user, session = key
        digest = hashlib.sha256(f"{user}\0{session}".encode("utf-8", "surrogateescape")).hexdigest()[:32]
        return self.state.key("pin", self.pool, digest)

    def __len__(self) -> int:
        return len(self.own)

    def recall(self, key: Key) -> None:
        found: list[Any] = [key, PENDING]
        self._local.recalled = found
        redis_key = self._key(key)

        def answered(answer: Any) -> None:
            found[1] = answer.decode() if isinstance(answer, bytes) else None if answer is None else FAILED
        self.state.defer(lambda pipe: pipe.getex(redis_key, ex=self.ttl), answered)

    def get(self, key: Key, now: float) -> Pin | None:
        found = getattr(self._local, "recalled", None)
        if found is not None and found[0] == key:
            self._local.recalled = None
            if found[1] is PENDING:
                self.state.flush()
            self._adopt(key, found[1], now)
        return self.own.get(key, now)

    def _adopt(self, key: Key, tag: Any, now: float) -> None:
        """The cluster's pin wins; a pin only this node knows (made while Redis was unreachable) is shared."""
        mine = self.own.get(key, now)
        if isinstance(tag, str) and tag:
            if mine is None or mine.tag != tag:
                self.own.pin(key, tag, now)
        elif tag is None and mine is not None:
            self._write(key, mine.tag)

    def touch(self, key: Key, now: float) -> None:
        self.own.touch(key, now)

    def pin(self, key: Key, tag: str, now: float) -> None:
        self.own.pin(key, tag, now)
        self._write(key, tag)

    def _write(self, key: Key, tag: str) -> None:
        redis_key = self._key(key)
        self.state.later(lambda pipe: pipe.set(redis_key, tag, ex=self.ttl), ignore)

    def drop(self, key: Key) -> None:
        self.own.drop(key)  # the pin that replaces it is written over it

    def purge(self, now: float) -> None:
        self.own.purge(now)

    def items(self) -> list[tuple[Key, Pin]]:
        return self.own.items()
