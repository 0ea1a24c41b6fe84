"""Following a usage journal as it grows, so that every process sharing it sees every record, in order.

gunicorn workers (and any other process on the same usage file) each append their own records; the
ledger that budgets and window shares are checked against must count all of them, and in the same order
everywhere. A `Follower` keeps a descriptor on the live journal and reads what was appended since its last
look, with each record's identity (`journal.ident`). When the journal is sealed (renamed for a fold, a
fresh one created), the follower finishes the old file to its end - appenders never write to a journal
once it is sealed - and moves on to the new one. Whether the journal path still names the followed file is
asked of the file system when the seal count in the lock file (`seals.py`) has changed, and once every
RECHECK seconds in case the lock file itself was replaced by hand.

Every record reaches a process's ledger in journal order, its own included. Its store lists the lines it
appended (`mine`, in the order it wrote them), and a line read that is the next of those is taken as the
record it was written from, without decoding it; when the journal grew by exactly its lines (nobody else
appended: a single `ccm-wsgi serve`), they are taken all at once. (Two processes writing byte-identical
lines is harmless: the record taken is the same either way.) So a store need not ask where its line landed
(an `lseek` per record) and reads its own records in batches, or, when its ledger is read between records
(limits check every request against it), one at a time. With shared state it knows where each line landed
(the line's identity), and a line that landed exactly where the follower has read to is skipped, not read
back (`take`): that process counted the record when it recorded it; so is the line of a process that appends
alone (`members.py`), and then a ledger read reads nothing. Lines it appended that never show up
(the journal removed by hand) are forgotten when the follower stops, or by the store once too many are
unread.
"""

from __future__ import annotations

import logging
import operator
import os
import time
from collections import deque
from collections.abc import Callable

from .. import files
from . import journal, seals
from .reading import Located
from .records import Record

RECHECK = 1.0
# bytes asked for per `pread`: the buffer is allocated whole for every call, and a ledger read (every limited
# request) usually finds one line, so it is kept well under the size where the allocator maps fresh pages
READ_SIZE = 1 << 16
Mine = deque[tuple[bytes, Record, int]]  # lines this process appended and has not read back: line, record, time
_LINE = operator.itemgetter(0)


class Follower:
    def __init__(self, path: str, lock_path: str, apply: Callable[[list[Located]], None], log: logging.Logger,
                 shared: bool = False):
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
        self._opened = b""  # the seal count when the followed file was opened
        # Journals came and went unread (sealed and folded by another process while this one did not look):
        # what this follower applied misses their records, until its store rebuilds its state from the file.
        self.lost = False
        self._recheck = 0.0  # when to check the path whatever the count says (monotonic)
        self.mine: Mine = deque()
        # With shared state, records are applied with their identity, and this process's own were counted
        # when they were appended (their lines are only skipped here); without, identities are not needed.
        self.shared = shared

    def start(self) -> None:
        """Follow the journal as it is now, from its first record (call with appends excluded)."""
        self.stop()
        if self._seals is None:
            lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CLOEXEC)
            try:
                self._seals = seals.SealView(lock_fd)
            finally:
                files.close(lock_fd)  # the mapping stays
        self._seen = self._opened = self._seals.read()
        fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        st = os.fstat(fd)
        first = os.pread(fd, 4096, 0)
        end = first.find(b"\n")
        self.fd, self.identity = fd, (st.st_ino, st.st_dev)
        self.position = len(first) if end < 0 else end
        self.generation = journal.generation_of(first)

    def take(self, line: bytes, start: int, appended_to: tuple[int, int] | None) -> bool:
        """This process just appended `line` at `start` of the journal whose identity is `appended_to`. When that
        is where this follower has read to (so nothing, its own lines included, waits to be read before it), the
        line is the next record in journal order: it counts as read (True; with shared state the store counted it
        when recording). Otherwise the store lists it in `mine`, to be met when it is read."""
        if start != self.position or appended_to != self.identity:
            return False
        self.position = start + len(line)
        return True

    def stop(self) -> None:
        """Stop reading; lines of this process not read back yet are forgotten (nothing will read them)."""
        self.mine.clear()
        fd, self.fd = self.fd, None
        if fd is not None:
            files.close(fd)

    def close(self) -> None:
        self.stop()
        view, self._seals = self._seals, None
        if view is not None:
            view.close()

    def catch_up(self, read: bool = True) -> None:
        """Apply every complete record appended since the last look, following a sealed journal onto the new.
        Without `read` (a store that appends alone and took its own lines) only the latter."""
        if self.fd is None:
            return
        try:
            if read:
                self._read_to_end()
            assert self._seals is not None
            seen, now = self._seals.read(), time.monotonic()
            if seen != self._seen or now >= self._recheck:
                self._follow_path(seen, now)
        except OSError as exc:  # the journal cannot be read: a fold reads it instead
            self.log.error("usage: cannot follow %s: %s", self.path, exc.strerror or exc)
            self.stop()

    def _follow_path(self, seen: bytes, now: float) -> None:
        """The seal count changed (or RECHECK passed): when the journal path names another file now, finish the
        followed one and follow that."""
        counted, self._seen, self._recheck = seen != self._seen, seen, now + RECHECK
        current = files.identity(self.path)
        if current is not None and current != self.identity:
            self._read_to_end()  # the sealed journal: nothing is appended to it any more
            # the journal that follows it is the one there now only when the count moved by one since it was
            # opened; else others came (and may be folded and gone) in between
            self.lost = self.lost or not seals.successive(self._opened, seen)
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
        data = os.pread(self.fd, READ_SIZE, self.position)
        if len(data) == READ_SIZE:  # more than one read holds (a batch read back)
            data = self._read_rest(data)
        elif not data:
            return
        read = len(data)
        mine = self.mine
        found: list[Located] = []
        at = 0  # records are "\n{...}": each starts with its line break
        if mine:
            own = b"".join(map(_LINE, mine))
            if data.startswith(own):  # nobody else appended since the last look (a single `serve`): all at once
                if not self.shared:
                    found = [(rec, t_ns, "") for _, rec, t_ns in mine]
                mine.clear()
                at = len(own)
        while at < read:
            if mine and data.startswith(mine[0][0], at):  # the next line this process wrote: taken as it is
                line, rec, t_ns = mine.popleft()
                at += len(line)
                if not self.shared:
                    found.append((rec, t_ns, ""))
                continue
            end = data.find(b"\n", at + 1)
            raw = data[at:end if end >= 0 else read]
            blank = raw.isspace()
            entry = None if blank else journal.decode(raw)
            if end < 0 and entry is None:
                break  # still being written, or damaged at the very end: looked at again next time
            if entry is not None:
                found.append((*entry, self._ident(self.position + at)))
            elif not blank:
                self.log.warning("usage journal %s: skipped a damaged line (a write cut short)", self.path)
            at = end if end >= 0 else read
        self.position += at
        if found:
            self.apply(found)

    def _read_rest(self, first: bytes) -> bytes:
        """`first` and what follows it up to the end of the file as it is now (a later append is read next time)."""
        assert self.fd is not None
        chunks = [first]
        read = len(first)
        while len(chunks[-1]) == READ_SIZE:
            chunks.append(os.pread(self.fd, READ_SIZE, self.position + read))
            read += len(chunks[-1])
        return b"".join(chunks)

    def _ident(self, offset: int) -> str:
        return journal.ident(self.generation, offset) if self.shared else ""

