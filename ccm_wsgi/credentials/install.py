"""Putting a login into its target (a credential file, or the keychain item) as Claude Code would, for
`ccm-wsgi login` and its `--import`.

The rules are the refresh's, so that a running ccm-wsgi or a local `claude` never sees half a login: the target
is checked before anything is asked of the person (it can be written, and what it holds can be kept); the space
is reserved before the code is spent; the document is re-read and written (atomically, mode 0600, every other key
kept, owner kept, through a symlink) under ccm-wsgi's `flock` and Claude Code's directory lock. SIGINT, SIGTERM
and SIGHUP end a login with KeyboardInterrupt, which leaves the target as it was and gives the reserved space
back; during the write itself they let the write finish.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
from collections.abc import Iterator
from types import FrameType
from typing import Any

import click

from .. import files
from . import locks
from .store import FILE_MODE, OAUTH_KEY, SIZE_SLACK, CredentialStore

LOCK_WAIT_SECONDS = 30.0  # for ccm-wsgi's flock and Claude Code's lock around the write


class LoginError(Exception):
    """A failure a person can act on; the message says what happened and what to do, and holds no secret."""


def current_document(store: CredentialStore) -> dict[str, Any]:
    """What the target holds now (every key of it), {} when nothing; refuses a file that is not a JSON object,
    so that a login never replaces something it cannot keep."""
    if store.keychain is not None:
        data = store.keychain.read()
        if data:
            with contextlib.suppress(ValueError):
                document = json.loads(data)
                if isinstance(document, dict):
                    return document
    try:
        with open(store.path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return {}
    except OSError as exc:
        raise LoginError(f"cannot read {store.path} ({exc.strerror}): fix its permissions, or log in with "
                         "--credential-path into another file") from None
    if not raw.strip():
        return {}
    try:
        document = json.loads(raw)
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise LoginError(f"{store.path} is not a JSON object, so its content could not be kept: move it away "
                         "and log in again")
    return document


class Installer:
    """Puts a login into its target: check first, reserve the space, then write under the locks."""

    def __init__(self, store: CredentialStore, signals: Signals):
        self.store = store
        self.signals = signals
        self.reservation: files.Reservation | None = None

    def check(self) -> None:
        """Before anything is asked of the person: the target can be written and its content kept."""
        current_document(self.store)
        if self.store.keychain is not None:
            return
        directory = os.path.dirname(os.path.realpath(self.store.path))
        existing = directory
        while not os.path.isdir(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        reason = files.unwritable_directory(existing)
        if reason:
            raise LoginError(f"cannot write the login into {directory} ({reason}): run this as the user the "
                             "service runs as, fix the directory's permissions, or choose --credential-path")

    def reserve(self) -> None:
        """The space for the new file, set aside before the code is spent (no room: no exchange)."""
        if self.store.keychain is not None:
            return
        target = os.path.realpath(self.store.path)
        try:
            os.makedirs(os.path.dirname(target), 0o700, exist_ok=True)
            size = os.path.getsize(target) if os.path.exists(target) else 0
            with self.signals.held():  # the temporary file is either not there or known to abandon()
                self.reservation = files.Reservation(target, size + SIZE_SLACK, FILE_MODE, keep_mode=False)
        except OSError as exc:
            raise LoginError(f"cannot write the login beside {target} ({exc.strerror}); nothing was changed") \
                from None

    def abandon(self) -> None:
        if self.reservation is not None:
            self.reservation.abandon()

    def commit(self, oauth: dict[str, Any]) -> None:
        """Write `oauth` as the target's Claude Code login, keeping the rest of the document."""
        with self.signals.held(deliver=False):
            try:
                with files.locked(self.store.lock_path(), fcntl.LOCK_EX, LOCK_WAIT_SECONDS, mode_if_created=0o600), \
                        claude_lock(self.store.path):
                    document = current_document(self.store)
                    document[OAUTH_KEY] = oauth
                    self.store.write(document, self.reservation)
            except files.LockTimeout as exc:
                raise LoginError(f"{exc}: another ccm-wsgi is writing this login; try again") from None
            except OSError as exc:
                raise LoginError(f"cannot write {self.store.path} ({exc.strerror}); nothing was changed") from None
            finally:
                self.abandon()


@contextlib.contextmanager
def claude_lock(path: str) -> Iterator[None]:
    """Claude Code's directory lock around the write, so that a local `claude` never reads half a login."""
    lock = locks.ClaudeLock(locks.lock_path(path))
    try:
        lock.acquire(LOCK_WAIT_SECONDS)
    except locks.LockBusy as exc:
        raise LoginError(f"{exc}; try again in a minute") from None
    except OSError as exc:
        click.echo(f"note: Claude Code's lock {lock.path} cannot be taken ({exc.strerror}); writing under "
                   "ccm-wsgi's own lock only", err=True)
        yield
        return
    with lock:
        yield


# -- Ctrl-C -------------------------------------------------------------------------------------------------


class Signals:
    """SIGINT, SIGTERM and SIGHUP (the ssh session closing) end the login with KeyboardInterrupt. While a file
    is being set aside they are held back and take effect right after (which gives it back); while the login
    itself is written they let the write finish, and the login ends as written."""

    NAMES = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._holding = False
        self._pending = False
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        for number in self.NAMES:
            self._previous[number] = signal.signal(number, self._handle)

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self._holding:
            self._pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self, deliver: bool = True) -> Iterator[None]:
        """No interrupt inside; one that came meanwhile is raised after the block when `deliver`, else dropped
        (the block finished what the person wanted)."""
        self._holding, self._pending = True, False
        try:
            yield
        finally:
            self._holding = False
        if self._pending and deliver:
            raise KeyboardInterrupt
