"""Claude Code's own refresh lock, so that ccm-wsgi and a local `claude` never spend one refresh token twice.

Claude Code serialises its OAuth refreshes with the npm package `proper-lockfile` on its config
directory: the lock is the directory `<realpath of the config dir>.lock` (e.g. `~/.claude.lock`),
created with `mkdir` (atomic: exactly one creator wins). The holder touches its mtime every 5 s; a
lock whose mtime is older than 10 s is abandoned and may be removed by anyone; a waiter retries a few
times 1-2 s apart. This module speaks the same protocol: ccm-wsgi takes that lock around every refresh
of a credential file (in addition to its own `flock`, which orders ccm-wsgi's processes), keeps it
alive with the same heartbeat for as long as the refresh runs, and removes it when done. If ccm-wsgi
dies while holding it, the directory simply goes stale and Claude Code takes over 10 s later, as it
would after a crash of another `claude`.

Removal is careful: the directory is only removed if its mtime is still the one we set last, so a lock
that went stale under us and was taken over by someone else is never removed by us.
"""

from __future__ import annotations

import errno
import logging
import os
import random
import time
from collections.abc import Callable

import gevent

log = logging.getLogger("ccm_wsgi.credentials")

STALE_SECONDS = 10.0  # proper-lockfile's `stale`, as Claude Code configures it
HEARTBEAT_SECONDS = 5.0  # its `update`: half the stale time
RETRY_MIN, RETRY_MAX = 1.0, 2.0  # seconds between attempts while someone else holds it


class LockBusy(Exception):
    """Someone else (a local `claude`, another ccm-wsgi) held the lock for the whole wait."""


def lock_path(credential_file: str) -> str:
    """`<realpath of the directory holding the credential file>.lock`, the path Claude Code locks."""
    directory = os.path.dirname(os.path.abspath(credential_file))
    return os.path.realpath(directory) + ".lock"


class ClaudeLock:
    """One holding of the directory lock; use `acquire()` then `release()` (or `with`)."""

    def __init__(self, path: str):
        self.path = path
        self._mtime_ns: int | None = None
        self._heartbeat: gevent.Greenlet | None = None

    def try_acquire(self) -> bool:
        """One attempt: create the directory, or take it over when it is stale. Raises OSError on errors
        other than "someone holds it" (e.g. EACCES: the parent directory is not writable)."""
        for _ in range(2):  # a second attempt right after removing a stale lock
            try:
                os.mkdir(self.path, 0o700)
            except FileExistsError:
                if not self._remove_if_stale():
                    return False
                continue
            self._touch()
            self._heartbeat = gevent.spawn(self._beat)
            return True
        return False

    def acquire(self, wait: float, while_waiting: Callable[[], bool] | None = None) -> bool:
        """Take the lock, retrying 1-2 s apart for up to `wait` seconds. `while_waiting()` runs between
        attempts; when it returns True the caller no longer needs the lock and False is returned.
        Raises LockBusy when the wait is over."""
        deadline = time.monotonic() + wait
        while True:
            if self.try_acquire():
                return True
            if while_waiting is not None and while_waiting():
                return False
            left = deadline - time.monotonic()
            if left <= 0:
                raise LockBusy(f"{self.path} is held by another process (a local `claude` refreshing?)")
            gevent.sleep(min(left, random.uniform(RETRY_MIN, RETRY_MAX)))

    def release(self) -> None:
        heartbeat, self._heartbeat = self._heartbeat, None
        if heartbeat is not None:
            heartbeat.kill(block=False)
        if self._mtime_ns is None:
            return
        ours, self._mtime_ns = self._mtime_ns, None
        try:
            if os.stat(self.path).st_mtime_ns == ours:
                os.rmdir(self.path)
            else:
                log.warning("refresh lock %s was taken over while we held it; leaving it in place", self.path)
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                log.warning("cannot remove refresh lock %s: %s", self.path, exc.strerror)

    def __enter__(self) -> ClaudeLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _touch(self) -> None:
        now = time.time_ns()
        os.utime(self.path, ns=(now, now))
        self._mtime_ns = os.stat(self.path).st_mtime_ns

    def _beat(self) -> None:
        while self._mtime_ns is not None:
            gevent.sleep(HEARTBEAT_SECONDS)
            try:
                if os.stat(self.path).st_mtime_ns != self._mtime_ns:
                    log.warning("refresh lock %s was taken over while we held it", self.path)
                    self._mtime_ns = None
                    return
                self._touch()
            except OSError as exc:
                log.warning("cannot keep refresh lock %s alive: %s", self.path, exc.strerror)

    def _remove_if_stale(self) -> bool:
        """True when the lock was abandoned (older than STALE_SECONDS) and is now gone."""
        try:
            age = time.time() - os.stat(self.path).st_mtime
        except FileNotFoundError:
            return True  # released meanwhile
        if age <= STALE_SECONDS:
            return False
        try:
            os.rmdir(self.path)
            log.warning("removed an abandoned refresh lock %s (%.0fs old)", self.path, age)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            return False
        return True
