"""The seal count: how many times the live journal has been replaced, kept in the first bytes of the lock file.

Every process appending to the journal keeps a descriptor on it from one record to the next, and must never
write to a journal that a fold has sealed (renamed aside) or that was removed. Asking the file system whether
the journal path still names the kept file costs a `stat` on every record; instead, whoever replaces the
journal (a seal, or creating a missing one) changes this count, under the lock file's lock, and appenders
read it through a shared mapping of the lock file: one memory read per record, no system call. A changed
count sends the appender to the file system; an unchanged one means the kept descriptor is the live journal.
"""

from __future__ import annotations

import mmap
import os
import struct

SIZE = 8
_COUNT = struct.Struct("<Q")


def _ensure_size(fd: int) -> None:
    """A lock file written before the count existed is empty: make room (only ever grows it, so a count
    another process has already written stays as it is)."""
    if os.fstat(fd).st_size < SIZE:
        os.ftruncate(fd, SIZE)


def bump(fd: int) -> None:
    """Change the count (the journal path now names another file); `fd` is the lock file, opened read-write."""
    _ensure_size(fd)
    (count,) = _COUNT.unpack(os.pread(fd, SIZE, 0).ljust(SIZE, b"\0"))
    os.pwrite(fd, _COUNT.pack((count + 1) % (1 << 64)), 0)


def successive(before: bytes, after: bytes) -> bool:
    """Whether the count `after` is the one that follows `before` (one journal replaced between them)."""
    return len(before) == len(after) == SIZE and \
        _COUNT.unpack(after)[0] == (_COUNT.unpack(before)[0] + 1) % (1 << 64)


class SealView:
    """A read-only shared mapping of the count in the lock file `fd` (opened read-write)."""

    def __init__(self, fd: int) -> None:
        _ensure_size(fd)
        self._map = mmap.mmap(fd, SIZE, mmap.MAP_SHARED, mmap.PROT_READ)

    def read(self) -> bytes:
        return self._map[:SIZE]

    def close(self) -> None:
        self._map.close()
