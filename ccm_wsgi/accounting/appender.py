"""Appending records to the live usage journal, shared by every process on one usage file.

A record is one `os.write` of one line on an `O_APPEND` descriptor, under a shared `flock` on the lock
file that a seal (`store.py`) takes exclusively for its renames. This runs at the end of every response, so
it is kept to the system calls it needs (lock, write, unlock; the store may then ask where the line landed):

* The lock file and journal descriptors stay open from one record to the next.
* Under gevent (`ccm-wsgi serve`, gunicorn's workers) the shared lock, once taken, is kept until the event
  loop's next turn, so the responses that end in one turn (several under load: about five at 16 requests in
  flight) take and release it once between them; its records are written as they come, so each is in the
  journal before its response's last byte, as before. A seal that waits for the exclusive lock says so in the
  lock file (`seals.excluding`); an appender that sees it gives the lock back after each record, so a busy
  process never holds a fold up for longer than its current turn. Without gevent the lock is released after
  each record.
* The journal descriptor is used only while the seal count (`seals.py`) is the one seen when it was checked,
  read under the shared lock, so a seal (here or in another process) cannot move the journal between the
  check and the write. Reading the count is a memory read, not a `stat`; while the lock is kept, no seal can
  happen, so the count is not read again.
* Should someone delete or replace the lock file or the journal by hand, that is noticed within
  LOCK_RECHECK seconds (a record appended meanwhile may go to the removed file, or to a journal that a
  fold under the new lock file has sealed, and be lost with it). After a fork (gunicorn's workers),
  everything is re-opened.
* The lock file descriptor also holds this process's place among the journal's appenders (`members.py`),
  taken before its first record: the store asks through it whether the process appends alone.
"""

from __future__ import annotations

import errno
import fcntl
import os
import time

import gevent
import gevent.monkey

from .. import files
from . import journal, members, seals
from .reading import FILE_MODE, UsageFileError, file_mode

APPEND_LOCK_TIMEOUT = 10.0
LOCK_RECHECK = 1.0  # seconds between checks that the kept descriptors are still the lock file's and journal's


class _Pid:
    """This process's id, kept current across forks without a system call per record."""

    value = os.getpid()


os.register_at_fork(after_in_child=lambda: setattr(_Pid, "value", os.getpid()))


class Appender:
    def __init__(self, journal_path: str, lock_path: str, usage_path: str) -> None:
        self.journal_path = journal_path
        self.lock_path = lock_path
        self.usage_path = usage_path  # new journals get its mode
        self.journal_id: tuple[int, int] | None = None  # (inode, device) of the journal appended to
        self.generation = ""  # of that journal
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._lock_id: tuple[int, int] | None = None
        self._checked = -LOCK_RECHECK  # when the lock file path was last looked at (monotonic)
        self._seals: seals.SealView | None = None
        self._seals_seen = b""
        self._pid = 0
        self._held: int | None = None  # the lock file descriptor while the shared lock is kept on it
        self._defer = False  # keep the lock until the event loop's next turn (set with the descriptors)
        self._scheduled = False  # a callback at that turn will give it back

    def append(self, line: bytes) -> int:
        """Append `line` to the live journal under the shared lock; returns the journal's descriptor (its
        offset is the line's end)."""
        view, kept = self._seals, self._journal_fd
        if self._held is None or view is None or kept is None or view.wanted() or self._pid != _Pid.value:
            self._release()
            fd = self._lock()
        else:  # still under the lock taken for an earlier record of this turn
            fd = kept
        try:
            written = os.write(fd, line)
            if written != len(line):  # the cut line is skipped when folding; the record is kept in memory
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        except BaseException:
            self._release()
            raise
        if not self._defer or self._seals is None or self._seals.wanted():
            self._release()
        elif not self._scheduled:
            self._scheduled = True
            gevent.get_hub().loop.run_callback(self._end_of_turn)
        return fd

    def _lock(self) -> int:
        """Take the shared lock (held until `_release`) and find the live journal's descriptor."""
        lock_fd, view, fd = self._lock_fd, self._seals, self._journal_fd
        now = time.monotonic()
        if lock_fd is None or view is None or fd is None or self._pid != _Pid.value or \
                now - self._checked >= LOCK_RECHECK:
            lock_fd, view = self._check(now)
            fd = None  # the journal path is asked about under the lock
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the usual case: no seal in progress
        except OSError:
            if not files.acquire(lock_fd, fcntl.LOCK_SH, APPEND_LOCK_TIMEOUT):
                raise UsageFileError(
                    f"timed out after {APPEND_LOCK_TIMEOUT:g}s waiting for the lock {self.lock_path}") from None
        self._held = lock_fd
        try:
            if fd is None or view.read() != self._seals_seen:
                fd = self._live_journal(lock_fd, view)
        except BaseException:
            self._release()
            raise
        return fd

    def _release(self) -> None:
        """Give the shared lock back, when this process holds it on the kept descriptor."""
        fd, self._held = self._held, None
        if fd is not None and fd == self._lock_fd and self._pid == _Pid.value:
            fcntl.flock(fd, fcntl.LOCK_UN)

    def _end_of_turn(self) -> None:
        self._scheduled = False
        self._release()

    def _check(self, now: float) -> tuple[int, seals.SealView]:
        """The kept lock file descriptor and seal view, re-opened after a fork, when missing, or when the lock
        file path names another file (looked at every LOCK_RECHECK seconds)."""
        if self._pid != _Pid.value:
            # the parent's: never unlock or close those (nor count on a callback the parent's loop was to run)
            self._lock_fd = self._journal_fd = self._seals = self._held = None
            self._pid, self._scheduled = _Pid.value, False
        if now - self._checked >= LOCK_RECHECK:
            self._checked = now
            if self._lock_fd is not None and files.identity(self.lock_path) != self._lock_id:
                self.close()
        lock_fd, view = self._lock_fd, self._seals
        if lock_fd is None or view is None:
            lock_fd, view = self._open_lock()
        return lock_fd, view

    def close(self) -> None:
        """Close the kept descriptors (the next append opens fresh ones)."""
        self._release()
        lock_fd, journal_fd, view = self._lock_fd, self._journal_fd, self._seals
        self._lock_fd = self._journal_fd = self._seals = None
        if self._pid == _Pid.value:
            if view is not None:
                view.close()
            for fd in (journal_fd, lock_fd):
                if fd is not None:
                    files.close(fd)

    def mark(self) -> bytes | None:
        """The journal's join mark now (`members.py`); None before this process's first record."""
        view = self._seals
        return view.mark() if view is not None and self._pid == _Pid.value else None

    def alone(self) -> bytes | None:
        """The join mark, read before the kernel is asked whether this process appends alone (one system call);
        None when it does not, or has not appended yet."""
        view, fd = self._seals, self._lock_fd
        if view is None or fd is None or self._pid != _Pid.value:
            return None
        mark = view.mark()
        return mark if members.alone(fd) else None

    def _open_lock(self) -> tuple[int, seals.SealView]:
        self.close()
        lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        view = None
        try:
            view = seals.SealView(lock_fd)
            members.join(lock_fd)
        except BaseException:
            if view is not None:
                view.close()
            files.close(lock_fd)
            raise
        self._lock_fd, self._seals = lock_fd, view
        self._defer = gevent.monkey.is_module_patched("socket")  # the hub runs whenever a greenlet waits
        st = os.fstat(lock_fd)
        self._lock_id = (st.st_ino, st.st_dev)
        return lock_fd, view

    def _live_journal(self, lock_fd: int, view: seals.SealView) -> int:
        """The descriptor of the file the journal path names now (creating it if missing), under the shared
        lock; remembers the seal count it is valid for."""
        seen = view.read()
        current = files.identity(self.journal_path)
        fd = self._journal_fd
        if fd is not None and current != self.journal_id:
            self._journal_fd = None  # sealed (or removed) since the last record
            files.close(fd)
            fd = None
        if fd is None:
            if current is None:
                files.create_if_missing(self.journal_path, journal.header(), file_mode(self.usage_path))
                seals.bump(lock_fd)  # others' kept descriptors may name a removed journal
                seen = view.read()
            fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
            st = os.fstat(fd)
            self._journal_fd, self.journal_id = fd, (st.st_ino, st.st_dev)
            self.generation = journal.generation_of(os.pread(fd, 4096, 0))
        self._seals_seen = seen
        return fd
