"""Per-user token and cost accounting in sing-box's usage file, without ever losing a record.

sing-box keeps the totals in memory and rewrites `usages_path` at most once a minute, so a crash loses
up to a minute of usage, a crash during the write can leave a truncated file, a corrupt file is silently
replaced by an empty one, and two processes sharing the path overwrite each other. This store keeps the
file format (key for key, plus two keys of its own, `journal` and `ledger`) and changes how it gets there:

* **Journal.** Every response is appended at once, as one line, to `<path>.journal` (one `os.write` on an
  `O_APPEND` descriptor) before the response's last byte is sent. Once `record()` returns, a SIGKILL loses
  nothing (a power loss may lose what the page cache held: the file itself is fsynced at every fold).
* **Fold.** `save()` (every 60 s when something was recorded, at shutdown, and in `open()`) first *seals*
  the journal: under an exclusive `flock` on `<path>.lock`, held for two renames, the journal becomes
  `<path>.journal.<sequence>-<generation>` and a fresh one takes its place. Appenders hold the same lock
  shared for one write, so they never wait for more than that. Then, under `<path>.fold.lock` (one fold at
  a time; readers hold it shared), each sealed journal in turn is added to the file, which is written
  atomically (unique temp name, fsync, rename, fsync of the directory) with `"journal": {"generation": G,
  "offset": N}` ("journal G is folded up to byte N"), and the sealed journal is removed.
* **Crash points.** Killed before the file rename: the old file plus the sealed journal, folded again
  later. Killed after it: the file's marker names the sealed journal, which is then removed unread. Every
  state on disk is "old file + journals" or "new file + a marker that says what it holds": none counts a
  line twice or drops one. Stale temp files are removed by the next fold.
* **Several processes** (gunicorn workers) may share one path: each line is appended once and folded once,
  whoever folds it. Lock attempts never block the gevent hub.
* **Corrupt file.** A usage file that is not valid JSON or has the wrong shape is never overwritten: it is
  renamed to `<path>.corrupt-<unix ts>` (kept byte for byte), an error is logged, and the store starts
  from empty plus every journal, so the two files together still hold every record. If it cannot be
  renamed, `open()` raises `UsageFileError` and `save()` leaves everything as it is.
* **The ledger** (what each user spent per day, and their share of the subscription's windows; see
  `ledger.py`) is derived from the same records in journal order and saved in the file with them. Each
  store follows the live journal, so its ledger also counts what other processes record, at once.
* **Several nodes** (shared state, `state/usage.py`): the journal stays the first write, but a fold folds
  the cluster's usage stream instead of the journal: it pushes the sealed journals' records to the
  stream, then adds the stream's entries after the cursor saved in the file (`"shared"`). The file then
  holds every node's records, each once, and its ledger is the stream's.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from .. import files
from ..state.connection import Unavailable
from ..state.usage import decoded
from . import journal
from .follow import Follower
from .ledger import Ledger
from .pricing import Pricing
from .reading import (
    FILE_MODE,
    FOLD_LOCK_TIMEOUT,
    Located,
    UsageFileError,
    apply,
    dumps,
    file_mode,
    head,
    load_totals,
    parse,
    read_bytes,
    stream_cursor,
    unfolded,
)
from .records import Cursor, Marker, Record, Shape, Totals, render

if TYPE_CHECKING:
    from ..state.usage import SharedUsage

UNAPPLIED_MAX = 512  # own records kept for the ledger before they are applied anyway
SAVE_INTERVAL = 60.0
APPEND_LOCK_TIMEOUT = 10.0
LOCK_RECHECK = 1.0  # seconds between checks that the kept lock descriptor is still the lock file's
class UsageStore:
    """One `usages_path`: durable `record()`, periodic `save()` (fold), read-only `snapshot()`, and a ledger."""

    def __init__(self, path: str, pricing: Pricing, log: logging.Logger, interval: float = SAVE_INTERVAL,
                 shared: SharedUsage | None = None, on_save_failure: Callable[[], None] | None = None) -> None:
        self.path = path
        self.shared = shared
        self.pricing = pricing
        self.log = log
        self.interval = interval
        self.on_save_failure = on_save_failure  # told of every failed save (metrics)
        self.journal_path = path + ".journal"
        self.lock_path = path + ".lock"
        self.fold_lock_path = path + ".fold.lock"
        self.ledger = Ledger()
        self._follower = Follower(self.journal_path, self._apply, log)
        self._pending: list[Located] = []  # records the journal refused, folded at the next save
        self._kept = 0  # how many records were kept in memory (their identities)
        self._unapplied: list[Located] = []  # own records in the journal, not in the ledger yet
        self._changes = 0
        self._saved_changes = 0
        self._stop = Event()
        self._saver: gevent.Greenlet | None = None
        # descriptors kept open from one record() to the next (see _append_shared)
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._journal_id: tuple[int, int] | None = None
        self._generation = ""  # of the journal `_journal_fd` appends to
        self._lock_id: tuple[int, int] | None = None
        self._lock_checked = 0.0
        self._fds_pid = 0

    # public API

    def open(self) -> None:
        """Fold the journals into the file now (creating the file, and its directory, if missing), and load
        the ledger it holds."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with files.locked(self.fold_lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                self.ledger = self._fold(start_following=True)
        except OSError as exc:
            raise UsageFileError(f"usage file {self.path}: {exc.strerror or exc}") from exc
        if self.shared is not None:
            cursor = stream_cursor(self.path) or Cursor()
            self.shared.start(self.ledger, cursor.stream)
            for rec, t_ns, identity in unfolded(self.path, None, self.log, cursor):
                self.shared.local(rec, t_ns, identity)  # kept through an outage: counted until the stream has them
            self.shared.state.on_recovery(self._catch_up)

    def record(self, rec: Record) -> None:
        """Append one record to the journal; durable when this returns. Never raises."""
        t_ns = time.time_ns()
        try:
            line = journal.line(rec, t_ns)
        except (TypeError, ValueError) as exc:
            self.log.error("usage: dropping a malformed record %r: %s", rec, exc)
            return
        self._changes += 1
        try:
            end = self._append_shared(line)
        except Exception as exc:
            self._close_fds()  # start from fresh descriptors next time
            self._kept += 1
            identity = journal.ident(f"kept-{os.getpid()}-{id(self):x}", self._kept)
            self._pending.append((rec, t_ns, identity))
            self._apply_unapplied()
            self._apply(rec, t_ns, identity)  # this process counts it now; the others once it is folded
            if self.shared is not None:
                self.shared.push_later(identity, line[1:])
            self.log.error(
                "usage: cannot append to %s (%s); keeping the record in memory until the next save",
                self.journal_path,
                exc,
            )
            return
        identity = journal.ident(self._generation, end - len(line))
        follower = self._follower
        if follower.fd is not None:
            if follower.at(self._journal_id, end - len(line)):  # nothing else was appended since
                follower.advance(end)
                if self.shared is None:  # (with shared state, `local` below counts it)
                    self._unapplied.append((rec, t_ns, identity))
                    if len(self._unapplied) >= UNAPPLIED_MAX:
                        self._apply_unapplied()
            else:
                self._apply_unapplied()  # they come before what the follower reads next
                follower.catch_up()
        if self.shared is not None:
            self.shared.local(rec, t_ns, identity)
            self.shared.push_later(identity, line[1:])

    def current_ledger(self) -> Ledger:
        """The ledger with every record appended so far, by any process (and with shared state, every
        record the usage stream has shown, by any node)."""
        self._apply_unapplied()
        self._follower.catch_up()
        return self.ledger if self.shared is None else self.shared.view()

    def sync(self) -> None:
        """Before a budget is checked: with shared state, read what other nodes recorded (one round trip)."""
        if self.shared is not None:
            self.shared.sync()

    def save(self) -> bool:
        """Fold the journals (and any record kept in memory) into the file; False (logged) on failure."""
        changes = self._changes
        try:
            with files.locked(self.fold_lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                self._fold()
        except Exception as exc:
            self.log.error("usage: saving %s failed: %s", self.path, exc)
            if self.on_save_failure is not None:
                self.on_save_failure()
            return False
        self._saved_changes = changes
        return True

    def _catch_up(self) -> None:
        """Redis is back: push what was kept meanwhile and fold the stream now, not at the next interval."""
        self.save()

    def start(self) -> None:
        """Save every `interval` seconds when something was recorded since the last save."""
        if self._saver is None:
            self._stop.clear()
            self._saver = gevent.spawn(self._run)

    def close(self) -> None:
        """Stop the saver and save one last time (graceful shutdown)."""
        saver, self._saver = self._saver, None
        if saver is not None:
            self._stop.set()
            saver.join(timeout=FOLD_LOCK_TIMEOUT + 5)
        if not self.save():
            self._flush_pending()
        self._close_fds()
        self._follower.stop()
        if self.shared is not None:
            self.shared.stop()

    def snapshot(self) -> dict[str, Any]:
        """Current totals (file + journals + records kept in memory) as a usage document."""
        return render(load_totals(self.path, self.log, list(self._pending)), self.pricing)

    @property
    def dirty(self) -> bool:
        return self._changes != self._saved_changes

    # internals

    def _apply(self, rec: Record, t_ns: int, identity: str) -> None:
        if self.shared is None:
            apply(self.ledger, self.pricing, rec, t_ns)
        else:  # the shared ledger counts it when the stream shows it
            self.shared.local(rec, t_ns, identity)

    def _apply_unapplied(self) -> None:
        """This process's own records go into its ledger when the ledger is read (or a few hundred of them
        wait), in journal order: a service without limits never spends time on it."""
        if self._unapplied:
            unapplied, self._unapplied = self._unapplied, []
            for rec, t_ns, identity in unapplied:
                self._apply(rec, t_ns, identity)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.dirty:
                self.save()

    def _flush_pending(self) -> None:
        """Last resort when the final save failed: records kept in memory go to the journal, else to the log."""
        pending, self._pending = self._pending, []
        for rec, t_ns, _ in pending:
            line = journal.line(rec, t_ns)
            try:
                self._append_shared(line)
            except Exception as exc:
                self.log.error(
                    "usage: a record cannot be saved (%s); add this as a line of its own to %s to keep it: %s",
                    exc, self.journal_path, line.decode("utf-8").strip(),
                )

    def _append_shared(self, line: bytes) -> int:
        """Append `line` to the live journal under the shared lock; returns where the journal now ends.

        The lock file and journal descriptors are kept open between records (two opens and two closes per
        record saved): the lock is taken and released on the kept descriptor (no greenlet switch can happen
        while it is held, so greenlets sharing it never overlap), and the journal descriptor is used only
        while the journal path still names the same file, checked under the shared lock, so a seal (here or
        in another process) cannot move it between the check and the write. Should someone delete or
        replace the lock file, that is noticed within LOCK_RECHECK seconds. After a fork, everything is
        re-opened."""
        now = time.monotonic()
        if self._fds_pid != os.getpid():
            self._lock_fd = self._journal_fd = None  # the parent's: never unlock or close those
            self._fds_pid = os.getpid()
        lock_fd = self._lock_fd
        if lock_fd is not None and now - self._lock_checked >= LOCK_RECHECK:
            self._lock_checked = now
            if files.identity(self.lock_path) != self._lock_id:
                self._close_fds()
                lock_fd = None
        if lock_fd is None:
            lock_fd = self._lock_fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
            st = os.fstat(lock_fd)
            self._lock_id, self._lock_checked = (st.st_ino, st.st_dev), now
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the usual case: no seal in progress
            locked = True
        except OSError:
            locked = False
        if not locked and not files.acquire(lock_fd, fcntl.LOCK_SH, APPEND_LOCK_TIMEOUT):
            raise UsageFileError(f"timed out after {APPEND_LOCK_TIMEOUT:g}s waiting for the lock {self.lock_path}")
        try:
            current = files.identity(self.journal_path)
            fd = self._journal_fd
            if fd is not None and current != self._journal_id:
                self._journal_fd = None  # sealed (or removed) since the last record
                files.close(fd)
                fd = None
            if fd is None:
                if current is None:
                    files.create_if_missing(self.journal_path, journal.header(), file_mode(self.path))
                fd = os.open(self.journal_path, os.O_RDWR | os.O_APPEND | os.O_CLOEXEC)
                st = os.fstat(fd)
                self._journal_fd, self._journal_id = fd, (st.st_ino, st.st_dev)
                self._generation = journal.generation_of(os.pread(fd, 4096, 0))
            written = os.write(fd, line)
            if written != len(line):  # the cut line is skipped when folding; the record is kept in memory
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
            return os.lseek(fd, 0, os.SEEK_CUR)
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _close_fds(self) -> None:
        lock_fd, journal_fd = self._lock_fd, self._journal_fd
        self._lock_fd = self._journal_fd = None
        if self._fds_pid == os.getpid():
            for fd in (journal_fd, lock_fd):
                if fd is not None:
                    files.close(fd)

    def _seal(self, start_following: bool) -> bool:
        """Rename the live journal aside (if it holds records) and start a fresh one, appends excluded; False
        when it cannot be renamed (an immutable file): it is then folded where it is, as it grows."""
        with files.locked(self.lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT, mode_if_created=file_mode(self.path)):
            self._remove_stale_temps()
            live = journal.read(self.journal_path)
            sealed = True
            if live is not None and len(live.data) > live.body:
                try:
                    os.rename(self.journal_path, journal.sealed_name(self.journal_path, live.generation))
                    live = None
                except OSError as exc:
                    self.log.warning("usage: cannot seal %s (%s); folding it where it is", self.journal_path,
                                     exc.strerror)
                    sealed = False
            if live is None:
                files.create_if_missing(self.journal_path, journal.header(), file_mode(self.path))
            if start_following:
                self._follower.start()
            return sealed

    def _fold(self, start_following: bool = False) -> Ledger:
        """Under the fold lock: seal the journal, then add each sealed journal (and the records kept in memory)
        to the file, writing it atomically after each; returns the ledger the file now holds."""
        sealed_all = self._seal(start_following)
        if self.shared is not None:
            return self._fold_stream(sealed_all)
        totals, marker, ledger, mode, exists, _ = self._load_for_fold()
        sealed = journal.sealed(self.journal_path)
        for name in sealed:
            found = journal.read(name)
            new = found.entries(marker, self.log, name) if found is not None else []
            if found is not None and (new or not exists):
                for rec, t_ns in new:
                    totals.add(rec, t_ns)
                    apply(ledger, self.pricing, rec, t_ns)
                marker = Marker(found.generation, len(found.data))
                self._write(totals, marker, ledger, mode)
                exists = True
            files.unlink(name)
        pending = [(rec, t_ns) for rec, t_ns, _ in self._pending]
        if not sealed_all:
            with files.locked(self.lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                live = journal.read(self.journal_path)
                if live is not None:
                    pending = live.entries(marker, self.log, self.journal_path) + pending
                    marker = Marker(live.generation, len(live.data))
                self._fold_rest(totals, marker, ledger, mode, exists, pending)
        else:
            self._fold_rest(totals, marker, ledger, mode, exists, pending)
        return ledger

    def _fold_rest(self, totals: Totals, marker: Marker | None, ledger: Ledger, mode: int, exists: bool,
                   entries: list[tuple[Record, int]]) -> None:
        """Add `entries` (unsealed records and those kept in memory) and write the file if anything changed."""
        if entries or not exists:
            for rec, t_ns in entries:
                totals.add(rec, t_ns)
                apply(ledger, self.pricing, rec, t_ns)
            self._write(totals, marker, ledger, mode)
        kept = {(id(rec), t_ns) for rec, t_ns in entries}
        self._pending[:] = [entry for entry in self._pending if (id(entry[0]), entry[1]) not in kept]

    def _fold_stream(self, sealed_all: bool) -> Ledger:
        """Shared state: push the sealed journals' records (and those kept in memory) to the usage stream,
        add the stream's entries after the file's cursor, write the file, and only then remove the sealed
        journals. With Redis unreachable nothing changes: the journals wait for the next fold."""
        assert self.shared is not None
        totals, marker, ledger, mode, _, cursor = self._load_for_fold()
        cursor = cursor or Cursor()
        sealed = journal.sealed(self.journal_path)
        waiting = unfolded(self.path, marker, self.log, cursor, sealed_only=sealed_all, wanted=self.shared.unconfirmed)
        pending = list(self._pending)
        try:
            self.shared.push([(identity, journal.line(rec, t_ns)[1:]) for rec, t_ns, identity in waiting + pending
                              if self.shared.unconfirmed(identity)])
            pulled = self.shared.pull(cursor.stream)
        except Unavailable:
            return ledger
        self.shared.absorb(pulled)  # the live ledger moves on with what the fold read anyway
        live = journal.generation_of(head(self.journal_path))
        on_disk = {live} if sealed_all else {live, *(journal.generation_of(head(name)) for name in sealed)}
        for stream_id, identity, rec, t_ns in decoded(pulled):
            totals.add(rec, t_ns)
            apply(ledger, self.pricing, rec, t_ns)
            generation, _, offset = identity.rpartition(":")
            if generation in on_disk and offset.isdigit():
                cursor.absorbed.setdefault(generation, set()).add(int(offset))
            cursor.stream = stream_id
        cursor.absorbed = {g: offsets for g, offsets in cursor.absorbed.items() if g in on_disk}
        self._write(totals, None, ledger, mode, cursor)
        for name in sealed if sealed_all else ():
            files.unlink(name)
        self.shared.forget(on_disk)
        self._pending[:] = [entry for entry in self._pending if entry not in pending]
        return ledger

    def _write(self, totals: Totals, marker: Marker | None, ledger: Ledger, mode: int,
               cursor: Cursor | None = None) -> None:
        extra: dict[str, Any] = {"ledger": ledger.to_json(time.time())}
        if cursor is not None:
            extra["shared"] = cursor.to_json()
        doc = render(totals, self.pricing, marker, extra)
        files.replace_atomically(self.path, dumps(doc).encode(), mode)

    def _load_for_fold(self) -> tuple[Totals, Marker | None, Ledger, int, bool, Cursor | None]:
        now = time.time_ns()
        raw = read_bytes(self.path)
        mode = file_mode(self.path)
        if raw is None:
            return Totals(now), None, Ledger(), mode, False, None
        try:
            totals, marker, ledger, cursor = parse(raw, now)
        except Shape as exc:
            self._set_aside(str(exc))
            return Totals(now), None, Ledger(), mode, False, None
        return totals, marker, ledger, mode, True, cursor

    def _set_aside(self, problem: str) -> None:
        """Never overwrite a corrupt usage file: move it to `<path>.corrupt-<unix ts>`."""
        stamp = int(time.time())
        target = f"{self.path}.corrupt-{stamp}"
        suffix = 0
        while os.path.lexists(target):
            suffix += 1
            target = f"{self.path}.corrupt-{stamp}-{suffix}"
        try:
            os.rename(self.path, target)
        except OSError as exc:
            message = f"usage file {self.path} is corrupt ({problem}) and cannot be moved aside: {exc.strerror}"
            raise UsageFileError(message) from None
        self.log.error(
            "usage file %s is corrupt (%s); kept it as %s and started new totals", self.path, problem, target
        )
        files.fsync_dir(os.path.dirname(self.path) or ".")

    def _remove_stale_temps(self) -> None:
        """Temp files of folds or journal creations that were killed (we hold both locks: none is in use)."""
        directory = os.path.dirname(self.path) or "."
        base = os.path.basename(self.path)
        prefixes = (base + ".tmp-", base + ".journal.tmp-")
        try:
            names = os.listdir(directory)
        except OSError:
            return
        for name in names:
            if name.startswith(prefixes):
                files.unlink(os.path.join(directory, name))
