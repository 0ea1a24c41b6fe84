"""Whether a process is the only one appending to a usage journal, known without a system call per request.

A store whose ledger is read before every limited request must see every record appended up to then, by
any process: it reads the journal from where it stopped, a `pread` per ledger read, even when the only
lines there are its own (a single `ccm-wsgi serve`). A system call is dear on a virtual machine, so a
process that knows it appends alone takes its own lines as written instead (`follow.py`). It knows it so:

* Every process holds, from before its first append for as long as it appends, a read lock on one byte of
  the lock file: an open file description lock (`F_OFD_SETLK`), which the kernel drops when the descriptor
  is closed or the process dies. A forked child opens its own (`appender.py`).
* Having taken it, and before its first append, a process writes a fresh random *join mark* into the lock
  file, next to the seal count.
* A process is alone when it can turn its read lock into a write lock (no other holder); it turns it back
  at once. From then on it counts as alone for as long as the join mark is the one it read before asking,
  read through the lock file's shared mapping (a memory read). A process that joins later changes the mark
  before its first append, so the one that was alone reads the journal again from its next ledger read, and
  asks again later (`ALONE_RECHECK`).

Where open file description locks do not exist (not Linux, or a file system without them), `join` takes
nothing and `alone` says no: every ledger read reads the journal.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import time
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .appender import Appender
    from .follow import Follower

MARK = 16  # the join mark's offset in the lock file (after the seal count and the wanted byte)
MARK_SIZE = 8
LOCKED = MARK + MARK_SIZE  # the byte every appending process holds a read lock on
SIZE = LOCKED + 1  # what the lock file holds at least
ALONE_RECHECK = 1.0  # seconds between two tries of a process that was not alone (one system call each)
JOIN_ATTEMPTS = 200  # a try finds the byte write-locked only for the microseconds a probe holds it
JOIN_PAUSE = 0.001

_SETLK = getattr(fcntl, "F_OFD_SETLK", None)
_FLOCK = struct.Struct("hhqqi")  # struct flock on Linux: type, whence, start, length, pid (0 for OFD locks)


def _lock(fd: int, kind: int) -> bool | None:
    """Set the lock `kind` on the byte; False when another process's lock stands in the way, None when the
    file system has no such locks (then no process on it ever counts as alone)."""
    assert _SETLK is not None
    try:
        fcntl.fcntl(fd, _SETLK, _FLOCK.pack(kind, os.SEEK_SET, LOCKED, 1, 0))
    except OSError as exc:
        return False if exc.errno in (errno.EAGAIN, errno.EACCES) else None
    return True


def join(fd: int) -> None:
    """Take the read lock on `fd` (the lock file, opened read-write, its own open file description) and write
    a fresh join mark; call before the first append through it. Raises OSError when it cannot."""
    if _SETLK is None:
        return
    for _ in range(JOIN_ATTEMPTS):
        if _lock(fd, fcntl.F_RDLCK) is not False:
            os.pwrite(fd, os.urandom(MARK_SIZE), MARK)
            return
        time.sleep(JOIN_PAUSE)  # another process is asking whether it is alone
    raise OSError(errno.EAGAIN, "another process holds the usage journal's appenders lock")


def alone(fd: int) -> bool:
    """Whether no other process holds the read lock (`fd` holds it, from `join`). Read the join mark first."""
    if _SETLK is None or _lock(fd, fcntl.F_WRLCK) is not True:
        return False
    _lock(fd, fcntl.F_RDLCK)
    return True


class Alone:
    """What a store knows of appending alone: the join mark it read when it found it so (None: it does not)."""

    __slots__ = ("after", "mark")

    def __init__(self) -> None:
        self.mark: bytes | None = None
        self.after = 0.0  # when to ask again (monotonic)

    def holds(self, appender: Appender, follower: Follower) -> bool:
        """Whether the process still appends alone (nobody joined since), and its follower stands at the end of
        the journal: read after an append, its line is the next record, where the follower stands."""
        return self.mark is not None and follower.fd is not None and not follower.mine and \
            appender.mark() == self.mark

    def ask(self, appender: Appender, follower: Follower) -> None:
        """After a ledger read that read the journal: whether the process appends alone now (asked at most every
        ALONE_RECHECK seconds). If so, the journal is read to its end once more (what others appended before
        they left); from then on its own lines are all that come."""
        self.mark = None
        now = time.monotonic()
        if now < self.after:
            return
        self.after = now + ALONE_RECHECK
        mark = appender.alone()
        if mark is not None:
            follower.catch_up()
            if follower.fd is not None and not follower.mine and not follower.lost:
                self.mark = mark
