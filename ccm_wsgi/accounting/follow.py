"""Following a usage journal as it grows, so that every process sharing it sees every record, in order.

gunicorn workers (and any other process on the same usage file) each append their own records; the
ledger that budgets and window shares are checked against must count all of them, and in the same order
everywhere. A `Follower` keeps a descriptor on the live journal and reads what was appended since its last
look, with each record's identity (`journal.ident`). When the journal is sealed (renamed for a fold, a
fresh one created), the follower finishes the old file to its end - appenders never write to a journal
once it is sealed - and moves on to the new one. Whether the journal path still names the followed file is
asked of the file system when the seal count in the lock file (`seals.py`) has changed, and once every
RECHECK seconds in case the lock file itself was replaced by hand.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

from .. import files
from . import journal, seals
from .records import Record

RECHECK = 1.0


class Follower:
    def __init__(self, path: str, lock_path: str, apply: Callable[[Record, int, str], None], log: logging.Logger):
        self.path = path
        self.lock_path = lock_path
        self.apply = apply
        self.log = log
        self.fd: int | None = None
        self.identity: tuple[int, int] | None = None
        self.position = 0
        self.generation = ""
        self._seals: seals.SealView | None = None
        self._seen = b""  # the seal count when the followed file was last checked against the path
        self._recheck = 0.0  # when to check the path whatever the count says (monotonic)

    def start(self) -> None:
        """Follow the journal as it is now, from its first record (call with appends excluded)."""
        self.stop()
        if self._seals is None:
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                self._seals = seals.SealView(lock_fd)
            finally:
                files.close(lock_fd)  # the mapping stays
        self._seen = self._seals.read()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        first = os.pread(fd, 4096, 0)
        end = first.find(b"\n")
        self.fd, self.identity = fd, (st.st_ino, st.st_dev)
        self.position = len(first) if end < 0 else end
        self.generation = journal.generation_of(first)

    def stop(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            files.close(fd)

    def close(self) -> None:
        self.stop()
        view, self._seals = self._seals, None
        if view is not None:
            view.close()

    def at(self, identity: tuple[int, int] | None, end: int) -> bool:
        """Whether this follower has read everything up to `end` of the journal `identity` (a record just
        appended there starts at `end`: it can be applied directly, no other process wrote in between)."""
        return self.fd is not None and self.identity == identity and self.position == end

    def advance(self, end: int) -> None:
        self.position = end

    def catch_up(self) -> None:
        """Apply every complete record appended since the last look, following a sealed journal onto the new."""
        if self.fd is None:
            return
        self._read_to_end()
        assert self._seals is not None
        seen, now = self._seals.read(), time.monotonic()
        if seen == self._seen and now < self._recheck:
            return
        counted, self._seen, self._recheck = seen != self._seen, seen, now + RECHECK
        current = files.identity(self.path)
        if current is not None and current != self.identity:
            self._read_to_end()  # the sealed journal: nothing is appended to it any more
            if not counted:  # replaced without a change of the count: map the lock file that is there now
                self.close()
            try:
                self.start()
            except OSError as exc:
                self.log.error("usage: cannot follow %s: %s", self.path, exc.strerror)
                self.stop()
                return
            self._read_to_end()

    def _read_to_end(self) -> None:
        assert self.fd is not None
        chunks: list[bytes] = []
        read = 0
        while True:
            chunk = os.pread(self.fd, 1 << 20, self.position + read)
            if not chunk:
                break
            chunks.append(chunk)
            read += len(chunk)
        if not chunks:
            return
        data = b"".join(chunks)
        done = 0
        for raw in _complete_lines(data):
            offset = self.position + done
            done += len(raw)
            line = raw.strip(b"\n")
            if line:
                entry = journal.decode(line)
                if entry is None:
                    self.log.warning("usage journal %s: skipped a damaged line (a write cut short)", self.path)
                else:
                    self.apply(*entry, journal.ident(self.generation, offset))
        self.position += done


def _complete_lines(data: bytes) -> list[bytes]:
    """The complete records in `data` (each `\\n{...}`); the last one only if it already decodes, since an
    append may be under way."""
    parts = data.split(b"\n")
    lines = [b"\n" + p for p in parts[1:]]
    if parts[0]:
        lines.insert(0, parts[0])  # the rest of a line started before (never happens: we stop on boundaries)
    if lines and journal.decode(lines[-1].strip(b"\n")) is None:
        lines.pop()  # still being written, or damaged at the very end: looked at again next time
    return lines
