"""Requests per minute and requests in flight, counted where all of a host's requests are seen.

`ccm-wsgi serve` is one process, so its counts live in memory (`MemoryCounters`). gunicorn's workers are
several processes on one host; they share one small SQLite database (`HostCounters`) that the master
creates for them, so that "2 at a time" means 2 on the whole host. Several hosts share Redis (the
`state` of a service). All of them count the same way:

* a request in flight holds a *lease*, given back exactly once when its response ends for any reason
  (completed, failed, client gone, cut at shutdown); a request over the limit waits for a lease, first
  come first served, for a short while before it is refused;
* a request counts towards the sliding minute when it is admitted, and only then (a request refused
  for concurrency does not use up the user's rate).
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
import sqlite3
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

import gevent
import gevent.lock

MINUTE = 60.0
TENTHS = 10  # a request's time in the sliding minute of one process: the end of its tenth of a second
POLL = 0.05  # seconds between looks for a free lease in a store shared by processes
SET_UP_ATTEMPTS = 200  # a worker's first use of the host's counts file, tried about 10 s


@dataclass(frozen=True, slots=True)
class Lease:
    user: str
    most: int
    key: int = 0  # the store's id for it (HostCounters)


class Counters(Protocol):
    def admit(self, user: str, most: int | None, per_minute: int | None, wait: float, now: float,
              check: Callable[[], None]) -> tuple[Lease | None, float]:
        """A lease among `most` (when given), then one request counted in the sliding minute (when
        `per_minute` is given): (the lease, 0) when admitted; (None, 0) when no lease freed within `wait`;
        (None, seconds until the rate allows one) when the rate refuses (no lease is then kept).

        `check` (the limits that need no count: budgets) runs before anything is waited for; when it raises,
        nothing stays taken or counted. (A store that counts elsewhere may already have asked for the lease
        in the same round trip that brought what `check` reads.)"""
        ...

    def release(self, lease: Lease) -> None: ...

    def in_flight(self, user: str) -> int: ...


class Steps(Protocol):
    def acquire(self, user: str, most: int, wait: float) -> Lease | None:
        """A lease among `most` for `user`, waiting up to `wait` seconds; None when none freed."""
        ...

    def release(self, lease: Lease) -> None: ...

    def hit(self, user: str, per_minute: int, now: float) -> float:
        """Count one request in the sliding minute: 0 when allowed, else seconds until one would be."""
        ...


class OneAtATime:
    """`admit` as a lease then a hit, for stores where each is its own short step."""

    def admit(self: Steps, user: str, most: int | None, per_minute: int | None, wait: float, now: float,
              check: Callable[[], None]) -> tuple[Lease | None, float]:
        check()
        lease, started = None, time.monotonic()
        if most is not None:
            lease = self.acquire(user, most, wait)
            if lease is None:
                return None, 0.0
        if per_minute is not None:
            delay = self.hit(user, per_minute, now + time.monotonic() - started)  # after any wait
            if delay > 0:
                if lease is not None:
                    self.release(lease)
                return None, delay
        return lease, 0.0


class Minute:
    """One user's admitted requests in the sliding minute, counted per tenth of a second and each dated at the end
    of its tenth, so a request leaves the minute at most a tenth of a second late (never early). A busy user
    keeps at most 600 counts, where a time per request kept a minute's worth of objects alive (100,000 at 1,700
    requests a second), which slowed every request of the process."""

    __slots__ = ("counts", "tenths", "total")

    def __init__(self) -> None:
        self.tenths: collections.deque[int] = collections.deque()  # each count's tenth (its end, in tenths)
        self.counts: collections.deque[int] = collections.deque()
        self.total = 0

    def hit(self, per_minute: int, now: float) -> float:
        tenths, counts = self.tenths, self.counts
        gone = (now - MINUTE) * TENTHS
        while tenths and tenths[0] <= gone:
            tenths.popleft()
            self.total -= counts.popleft()
        if self.total >= per_minute:
            need = self.total - per_minute + 1  # requests that must leave the minute before one more fits
            for tenth, count in zip(tenths, counts, strict=True):
                need -= count
                if need <= 0:
                    return tenth / TENTHS + MINUTE - now
        tenth = math.ceil(now * TENTHS)
        if tenths and tenths[-1] == tenth:
            counts[-1] += 1
        else:
            tenths.append(tenth)
            counts.append(1)
        self.total += 1
        return 0.0


class MemoryCounters(OneAtATime):
    def __init__(self) -> None:
        # per user and limit value (a reload that changes it starts a new count): the slots, and the one lease
        # every request holding one of them shows (it only names them)
        self._slots: dict[tuple[str, int], tuple[gevent.lock.BoundedSemaphore, Lease]] = {}
        self._minutes: dict[str, Minute] = {}

    def acquire(self, user: str, most: int, wait: float) -> Lease | None:
        found = self._slots.get((user, most))
        if found is None:
            found = self._slots[(user, most)] = (gevent.lock.BoundedSemaphore(most), Lease(user, most))
        slots, lease = found
        return lease if slots.acquire(timeout=wait) else None

    def release(self, lease: Lease) -> None:
        self._slots[(lease.user, lease.most)][0].release()

    def hit(self, user: str, per_minute: int, now: float) -> float:
        minute = self._minutes.get(user)
        if minute is None:
            minute = self._minutes[user] = Minute()
        return minute.hit(per_minute, now)

    def in_flight(self, user: str) -> int:
        return sum(most - slots.counter for (name, most), (slots, _) in self._slots.items() if name == user)


class HostCounters(OneAtATime):
    """The same counts in a SQLite file that every process of the host opens (gunicorn's workers).

    Each lease records the process that holds it; the leases of a process that died are dropped (by the
    gunicorn master when it reaps a worker, and by anyone who finds the limit reached), so a killed worker
    never keeps a user's slots. Transactions last microseconds; a lock held by another process is waited
    for cooperatively (a few milliseconds of gevent sleeps), never by blocking the hub."""

    def __init__(self, path: str):
        self.path = path
        # set-up, once per worker at its start, may wait for the other workers' (blocking: nothing runs yet)
        self._db = sqlite3.connect(path, isolation_level=None, timeout=10, check_same_thread=False)
        for attempt in range(SET_UP_ATTEMPTS):
            try:
                self._set_up()
                break
            except sqlite3.OperationalError as exc:
                # workers starting together: SQLite answers "locked" at once, without waiting, to the one of
                # two that would otherwise wait for each other (switching the new file to WAL); it tries again
                if not _contended(exc) or attempt == SET_UP_ATTEMPTS - 1:
                    raise
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                time.sleep(POLL)
        self._db.execute("PRAGMA busy_timeout=0")  # from now on a lock is waited for cooperatively

    def _set_up(self) -> None:
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=OFF")  # counts of the moment: nothing to keep across a crash
        self._db.executescript("""
            BEGIN IMMEDIATE;
            CREATE TABLE IF NOT EXISTS leases (id INTEGER PRIMARY KEY, user TEXT, pid INTEGER);
            CREATE TABLE IF NOT EXISTS hits (user TEXT, t REAL);
            CREATE INDEX IF NOT EXISTS leases_user ON leases (user);
            CREATE INDEX IF NOT EXISTS hits_user ON hits (user, t);
            COMMIT;""")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        for attempt in range(2000):  # a bounded wait (about 10 s) for a lock another process holds
            try:
                self._db.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as exc:
                if not _contended(exc):
                    raise
                gevent.sleep(0.005 if attempt < 100 else POLL)
        else:
            raise TimeoutError(f"the host's limit counters in {self.path} stayed locked")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def acquire(self, user: str, most: int, wait: float) -> Lease | None:
        deadline = time.monotonic() + wait
        while True:
            with self._transaction() as db:
                held = db.execute("SELECT pid FROM leases WHERE user = ?", (user,)).fetchall()
                if len(held) >= most:
                    dead = {pid for (pid,) in held if not _alive(pid)}
                    for pid in dead:
                        db.execute("DELETE FROM leases WHERE pid = ?", (pid,))
                    held = [row for row in held if row[0] not in dead]
                if len(held) < most:
                    key = db.execute("INSERT INTO leases (user, pid) VALUES (?, ?)", (user, os.getpid())).lastrowid
                    return Lease(user, most, key or 0)
            if time.monotonic() >= deadline:
                return None
            gevent.sleep(POLL)

    def release(self, lease: Lease) -> None:
        with self._transaction() as db:
            db.execute("DELETE FROM leases WHERE id = ?", (lease.key,))

    def hit(self, user: str, per_minute: int, now: float) -> float:
        with self._transaction() as db:
            db.execute("DELETE FROM hits WHERE user = ? AND t <= ?", (user, now - MINUTE))
            times = [t for (t,) in db.execute("SELECT t FROM hits WHERE user = ? ORDER BY t", (user,))]
            if len(times) >= per_minute:
                return float(times[len(times) - per_minute] + MINUTE - now)
            db.execute("INSERT INTO hits (user, t) VALUES (?, ?)", (user, now))
            return 0.0

    def in_flight(self, user: str) -> int:
        (count,) = self._db.execute("SELECT COUNT(*) FROM leases WHERE user = ?", (user,)).fetchone()
        return int(count)

    @staticmethod
    def forget(path: str, pid: int) -> None:
        """Drop the leases of a process that ended (the gunicorn master, when it reaps a worker)."""
        with contextlib.closing(sqlite3.connect(path, timeout=5)) as db:
            db.execute("DELETE FROM leases WHERE pid = ?", (pid,))
            db.commit()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _contended(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused because another process holds the file's lock (worth trying again)."""
    return "locked" in str(exc) or "busy" in str(exc)
