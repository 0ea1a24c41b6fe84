"""The seal count: how many times the live journal has been replaced, kept in the first bytes of the lock file.

Every process appending to the journal keeps a descriptor on it from one record to the next, and must never
write to a journal that a fold has sealed (renamed aside) or that was removed. Asking the file system whether
the journal path still names the kept file costs a `stat` on every record; instead, whoever replaces the
journal (a seal, or creating a missing one) changes this count, under the lock file's lock, and appenders
read it through a shared mapping of the lock file: one memory read per record, no system call. A changed
count sends the appender to the file system; an unchanged one means the kept descriptor is the live journal.

The byte after the count says that someone waits for the exclusive lock (`excluding`): appenders that keep
the shared lock until their event loop's next turn (`appender.py`) give it back after each record while it
is set. Left set by a process that died while waiting, it only costs appenders that saving, until the next
wait clears it. The bytes after it hold the join mark and the byte of the appenders' read locks (`members.py`).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import struct
from collections.abc import Iterator

from .. import files
from . import members

SIZE = 8  # the count
WANTED = SIZE  # the offset of the byte that says an exclusive lock is waited for
_MAPPED = members.SIZE  # what the lock file holds at least
_COUNT = struct.Struct("<Q")


def _ensure_size(fd: int) -> None:
    """A lock file written before the count existed is empty, or holds the count alone: make room (only ever
    grows it, so what another process has already written stays as it is)."""
    if os.fstat(fd).st_size < _MAPPED:
        os.ftruncate(fd, _MAPPED)


def bump(fd: int) -> None:
    """Change the count (the journal path now names another file); `fd` is the lock file, opened read-write."""
    _ensure_size(fd)
    (count,) = _COUNT.unpack(os.pread(fd, SIZE, 0).ljust(SIZE, b"\0"))
    os.pwrite(fd, _COUNT.pack((count + 1) % (1 << 64)), 0)


def successive(before: bytes, after: bytes) -> bool:
    """Whether the count `after` is the one that follows `before` (one journal replaced between them)."""
    return len(before) == len(after) == SIZE and \
        _COUNT.unpack(after)[0] == (_COUNT.unpack(before)[0] + 1) % (1 << 64)


@contextlib.contextmanager
def excluding(lock_path: str, timeout: float, mode_if_created: int) -> Iterator[int]:
    """The exclusive lock of the lock file (appends excluded) on a descriptor that is yielded, waited for with
    the wanted byte set, so that appenders keeping the shared lock give it back after their next record."""
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, mode_if_created)
    try:
        _ensure_size(fd)
        os.pwrite(fd, b"\1", WANTED)
        try:
            if not files.acquire(fd, fcntl.LOCK_EX, timeout):
                raise files.LockTimeout(f"timed out after {timeout:g}s waiting for the lock {lock_path}")
            yield fd
        finally:
            os.pwrite(fd, b"\0", WANTED)
    finally:
        files.close(fd)  # (and the lock with it)


class SealView:
    """A read-only shared mapping of the count, the wanted byte and the join mark in the lock file `fd` (opened
    read-write)."""

    def __init__(self, fd: int) -> None:
        _ensure_size(fd)
        self._map = mmap.mmap(fd, _MAPPED, mmap.MAP_SHARED, mmap.PROT_READ)

    def read(self) -> bytes:
        return self._map[:SIZE]

    def wanted(self) -> bool:
        """Whether someone waits for the exclusive lock."""
        return self._map[WANTED] != 0

    def mark(self) -> bytes:
        """The join mark: another value once another process joined."""
        return self._map[members.MARK:members.LOCKED]

    def close(self) -> None:
        self._map.close()
