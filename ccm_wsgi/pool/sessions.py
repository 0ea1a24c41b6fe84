"""Which credential each conversation is pinned to, bounded so that no user can push the others out.

Session ids are chosen by clients, so the table is bounded three ways: pins unused for a day expire,
the whole table holds at most MAX_SESSIONS, and each user holds at most MAX_PER_USER of them. A user who
sends thousands of made-up session ids only evicts their own oldest pins; everybody else's conversations
keep their credential (and with it their prompt cache). Pure bookkeeping, no I/O.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

MAX_SESSIONS = 10_000
MAX_PER_USER = 1_000
SESSION_TTL = 86_400.0

Key = tuple[str, str]  # (user, session id)


@dataclass(slots=True)
class Pin:
    tag: str
    last_used: float


class Pins(Protocol):
    """The pin table a balancer keeps (this process's own, or one shared by several nodes)."""

    def __len__(self) -> int: ...
    def recall(self, key: Key) -> None:
        """`key`'s request is about to choose a credential: a shared table fetches the pin (in the request's
        one round trip before forwarding); `get` then sees it."""
        ...
    def get(self, key: Key, now: float) -> Pin | None: ...
    def touch(self, key: Key, now: float) -> None: ...
    def pin(self, key: Key, tag: str, now: float) -> None: ...
    def drop(self, key: Key) -> None: ...
    def purge(self, now: float) -> None: ...
    def items(self) -> list[tuple[Key, Pin]]: ...


class SessionPins:
    def __init__(self, ttl: float = SESSION_TTL, max_total: int = MAX_SESSIONS, max_per_user: int = MAX_PER_USER):
        self.ttl = ttl
        self.max_total = max(1, max_total)
        self.max_per_user = max(1, max_per_user)
        self._pins: OrderedDict[Key, Pin] = OrderedDict()  # least recently used first
        self._by_user: dict[str, OrderedDict[str, None]] = {}  # the same order, per user

    def __len__(self) -> int:
        return len(self._pins)

    def recall(self, key: Key) -> None:
        """Every pin is here already."""

    def get(self, key: Key, now: float) -> Pin | None:
        pin = self._pins.get(key)
        return pin if pin is not None and now - pin.last_used < self.ttl else None

    def touch(self, key: Key, now: float) -> None:
        pin = self._pins.get(key)
        if pin is not None:
            pin.last_used = now
            self._pins.move_to_end(key)
            self._by_user[key[0]].move_to_end(key[1])

    def pin(self, key: Key, tag: str, now: float) -> None:
        user, session = key
        self._pins[key] = Pin(tag, now)
        self._pins.move_to_end(key)
        own = self._by_user.setdefault(user, OrderedDict())
        own[session] = None
        own.move_to_end(session)
        while len(own) > self.max_per_user:
            self.drop((user, next(iter(own))))
        while len(self._pins) > self.max_total:
            self.drop(next(iter(self._pins)))

    def drop(self, key: Key) -> None:
        if self._pins.pop(key, None) is None:
            return
        own = self._by_user.get(key[0])
        if own is not None:
            own.pop(key[1], None)
            if not own:
                del self._by_user[key[0]]

    def purge(self, now: float) -> None:
        """Drop pins unused for `ttl`; the table is in last-use order."""
        while self._pins:
            key, oldest = next(iter(self._pins.items()))
            if now - oldest.last_used < self.ttl:
                break
            self.drop(key)

    def items(self) -> list[tuple[Key, Pin]]:
        return list(self._pins.items())
