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
  shared for one write, or under gevent until their event loop's next turn, which they cut short when a seal
  says that it waits (`appender.py`), so neither side waits for more than a few writes. Then, under
  `<path>.fold.lock` (one fold at a time; readers hold it shared), each sealed journal in turn is added
  to the file, which is written atomically (unique temp name, fsync, rename, fsync of the directory)
  with `"journal": {"generation": G, "offset": N}` ("journal G is folded up to byte N"), and the sealed
  journal is removed.
* **Fold from memory.** Each store keeps a live state, the file's totals and ledger plus every record
  journaled since (its own, and other processes' through the follower). When the file is still exactly
  what this store last wrote, and the one sealed journal is the one it just sealed, the live state at the
  seal *is* the folded file: it is written without reading the journal back (a single `ccm-wsgi serve`,
  every minute). Otherwise (another process folded, perhaps with records it kept in memory) the journals
  are folded as described, and the live state goes on from what that fold wrote. Records reach the live
  state in batches as they are read back, or at once when the ledger is read between records (`follow.py`),
  and are summed into it at most READ_BACK_MAX at a time, per user, day and bucket in one pass; the ledger is
  brought up to date whenever it is read (before every limited request). A process that appends alone
  (`members.py`: a single `ccm-wsgi serve`) counts its records as it writes them, and its ledger reads read
  nothing until another process joins.
* **Crash points.** Killed before the file rename: the old file plus the sealed journal, folded again
  later. Killed after it: the file's marker names the sealed journal, which is then removed unread. Every
  state on disk is "old file + journals" or "new file + a marker that says what it holds": none counts a
  line twice or drops one. Stale temp files are removed by the next fold.
* **Several processes** (gunicorn workers) may share one path: each line is appended once and folded once,
  whoever folds it. Lock attempts never block the gevent hub. A process that was not reading while others
  sealed and folded journals (two seals or more: one of them went by unread) folds at its next ledger read,
  so that its live state is the file's again, with their records.
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

import fcntl
import logging
import operator
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import gevent
from gevent.event import Event

from .. import files
from ..state.connection import Unavailable
from ..state.usage import decoded
from . import journal, members, seals
from .appender import Appender
from .follow import Follower
from .housekeeping import remove_stale_temps, set_aside
from .ledger import Ledger
from .pricing import Pricing
from .reading import (
    FOLD_LOCK_TIMEOUT,
    Located,
    UsageFileError,
    add_records,
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

_PAIR = operator.itemgetter(0, 1)  # (record, time) of a record read
READ_BACK_MAX = 512  # records this process appended or read before they are summed into the live state anyway
SAVE_INTERVAL = 60.0
RECOVER_RETRY = 10.0


@dataclass(slots=True)
class _Seal:
    """What a seal did: whether it renamed the live journal aside (`all`, False when the journal is folded
    where it is); the count of records applied to the live state when the live state was exactly "every
    record journaled up to the seal" (None when it cannot be: shared state, a journal folded where it is, no
    follower); and the file to write from the live state (`_quick_document`), when it can."""

    all: bool = True
    applied: int | None = None
    quick: _Quick | None = None


@dataclass(frozen=True, slots=True)
class _Quick:
    doc: dict[str, Any]  # the usage file to write
    sealed_name: str  # the sealed journal it holds, removed once it is written
    pending: int  # how many of the records kept in memory it holds (the first ones)


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
        self.totals = Totals(0)  # with the ledger, the live state: the file as folded + every record since
        self._file_bytes: bytes | None = None  # the file when it held exactly the live state (see _quick_document)
        self._applied = 0  # records applied to the live state so far
        self._unsettled: list[tuple[Record, int]] = []  # applied, not yet in the totals (nor in the ledger,
        self._ledger_at = 0  # from this index on)
        self._follower = Follower(self.journal_path, self.lock_path, self._apply, log, shared=shared is not None)
        self._pending: list[Located] = []  # records the journal refused, folded at the next save
        self._kept = 0  # how many records were kept in memory (their identities)
        self._changes = 0
        self._saved_changes = 0
        self._stop = Event()
        self._saver: gevent.Greenlet | None = None
        self._appender = Appender(self.journal_path, self.lock_path, path)
        self._recover_after = 0.0  # when the next `_recover` may fold (monotonic)
        self._alone = members.Alone()

    # public API

    def open(self) -> None:
        """Fold the journals into the file now (creating the file, and its directory, if missing), and load
        the ledger it holds."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with files.locked(self.fold_lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                self.totals, self.ledger = self._fold(start_following=True)
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
        shared = self.shared
        appender = self._appender
        start = -1  # with shared state, where the line landed: its identity, and the follower skips it
        try:
            fd = appender.append(line)
            if shared is not None:
                start = os.lseek(fd, 0, os.SEEK_CUR) - len(line)
        except Exception as exc:
            appender.close()  # start from fresh descriptors next time
            self._kept += 1
            identity = journal.ident(f"kept-{os.getpid()}-{id(self):x}", self._kept)
            self._pending.append((rec, t_ns, identity))
            self._follower.catch_up()  # what was journaled before it comes first
            self._apply([(rec, t_ns, identity)])  # this process counts it now; the others once it is folded
            if shared is not None:
                shared.push_later(identity, line[1:])
            self.log.error(
                "usage: cannot append to %s (%s); keeping the record in memory until the next save",
                self.journal_path,
                exc,
            )
            return
        follower = self._follower
        if self._alone.holds(appender, follower) and follower.take(line, follower.position, appender.journal_id):
            # alone, and nobody joined before this append (a joiner changes the mark first): the line is where
            # the follower stands, and the record is the next in journal order
            self._apply([(rec, t_ns, "")])
            if len(self._unsettled) >= READ_BACK_MAX:
                self._settle()
        elif follower.fd is not None and not (start >= 0 and follower.take(line, start, appender.journal_id)):
            # read back in journal order, with the records other processes appended before it (recognised by
            # its bytes: no `lseek` per record to learn where it landed)
            mine = follower.mine
            mine.append((line, rec, t_ns))
            if len(mine) >= READ_BACK_MAX:
                follower.catch_up()
                self._settle()
                if len(mine) >= READ_BACK_MAX:  # not in the journal followed (removed or replaced by hand)
                    self.log.warning("usage: %d records appended to %s are not in it any more", len(mine),
                                     self.journal_path)
                    mine.clear()
        if shared is not None:
            identity = journal.ident(appender.generation, start)  # (of the journal appended to)
            shared.local(rec, t_ns, identity)
            shared.push_later(identity, line[1:])

    def current_ledger(self) -> Ledger:
        """The ledger with every record appended so far, by any process (and with shared state, every
        record the usage stream has shown, by any node)."""
        follower = self._follower
        if self.shared is not None:
            follower.catch_up()
            return self.shared.view()  # what the follower missed reaches it through the usage stream
        alone = self._alone.holds(self._appender, follower)
        follower.catch_up(read=not alone)
        if not alone:
            self._alone.ask(self._appender, follower)
        if follower.lost:
            self._recover()
        self._settle(totals=False)
        return self.ledger

    def _recover(self) -> None:
        """The follower missed journals (sealed and folded by other processes while this one did not look), so
        the live state lacks their records: a fold now makes it the file's again. A fold that did so leaves
        the next loss to be recovered at once; one that failed, or left the follower behind, is tried again
        after RECOVER_RETRY seconds (not on every limited request)."""
        now = time.monotonic()
        if now >= self._recover_after:
            self.log.info("usage: journals of %s were folded by another process unread here; folding to count them",
                          self.path)
            if not self.save() or self._follower.lost:
                self._recover_after = now + RECOVER_RETRY

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
        self._appender.close()
        self._follower.close()
        if self.shared is not None:
            self.shared.stop()

    def snapshot(self) -> dict[str, Any]:
        """Current totals (file + journals + records kept in memory) as a usage document."""
        return render(load_totals(self.path, self.log, list(self._pending)), self.pricing)

    @property
    def dirty(self) -> bool:
        return self._changes != self._saved_changes

    # internals

    def _apply(self, entries: list[Located]) -> None:
        if self.shared is None:
            self._unsettled += map(_PAIR, entries)
            self._applied += len(entries)
            return
        for rec, t_ns, identity in entries:  # the shared ledger counts it when the stream shows it
            self.shared.local(rec, t_ns, identity)

    def _settle(self, totals: bool = True) -> None:
        """Add the records applied since the last look to the live ledger, and to the live totals when `totals`
        or when many wait (the ledger is read before every limited request, the totals at a fold), each in one
        pass: records read together mostly share a user, a day and a bucket."""
        unsettled = self._unsettled
        if self._ledger_at < len(unsettled):
            self.ledger.add_all(unsettled[self._ledger_at:], self.pricing)
            self._ledger_at = len(unsettled)
        if unsettled and (totals or len(unsettled) >= READ_BACK_MAX):
            self.totals.add_all(unsettled)
            self._unsettled, self._ledger_at = [], 0

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
                self._appender.append(line)
            except Exception as exc:
                self.log.error(
                    "usage: a record cannot be saved (%s); add this as a line of its own to %s to keep it: %s",
                    exc, self.journal_path, line.decode("utf-8").strip(),
                )

    def _seal(self, start_following: bool) -> _Seal:
        """Rename the live journal aside (if it holds records) and start a fresh one, appends excluded (`all`
        False when it cannot be renamed, an immutable file: it is then folded where it is, as it grows). The
        live state is brought to this instant (see `_Seal`)."""
        with seals.excluding(self.lock_path, FOLD_LOCK_TIMEOUT, file_mode(self.path)) as lock_fd:
            remove_stale_temps(self.path)
            live = journal.read(self.journal_path)
            seal, renamed = _Seal(), None
            if live is not None and len(live.data) > live.body:
                name = journal.sealed_name(self.journal_path, live.generation)
                try:
                    os.rename(self.journal_path, name)
                    renamed, live = (name, Marker(live.generation, len(live.data))), None
                except OSError as exc:
                    self.log.warning("usage: cannot seal %s (%s); folding it where it is", self.journal_path,
                                     exc.strerror)
                    seal.all = False
            if live is None:
                files.create_if_missing(self.journal_path, journal.header(), file_mode(self.path))
                seals.bump(lock_fd)  # appenders move to the new journal
            if start_following:
                self._follower.start()
                if seal.all:
                    seal.applied = self._applied  # the live state starts as what this fold writes
            elif self.shared is None and seal.all and self._follower.fd is not None:
                self._follower.catch_up()  # the sealed journal to its end (nobody appends to it), then the new one
                if self._follower.fd is not None:
                    seal.applied = self._applied
                    if renamed is not None and self._file_bytes is not None and not self._follower.lost:
                        seal.quick = self._quick_document(*renamed)
            return seal

    def _quick_document(self, sealed_name: str, marker: Marker) -> _Quick | None:
        """The usage file as folded up to the seal just made, from the live state instead of the journals,
        when the live state is exactly that: the file is still what this store last wrote or read (had
        another process folded since, the file would differ, and could hold records that process kept in
        memory) and the one journal sealed is the one just sealed (what was journaled since). The `journal`
        marker names the sealed journal, so a crash before it is removed never counts it twice."""
        if journal.sealed(self.journal_path) != [sealed_name]:
            return None
        self._settle()
        doc = render(self.totals, self.pricing, marker, {"ledger": self.ledger.to_json(time.time())})
        return _Quick(doc, sealed_name, len(self._pending))

    def _fold(self, start_following: bool = False) -> tuple[Totals, Ledger]:
        """Under the fold lock: seal the journal, then add each sealed journal (and the records kept in memory)
        to the file, writing it atomically after each; returns the totals and ledger the file now holds."""
        if self._file_bytes is not None and read_bytes(self.path) != self._file_bytes:
            self._file_bytes = None  # another process folded: the live state no longer tells what the file holds
        seal = self._seal(start_following)
        if self.shared is not None:
            return self._fold_stream(seal.all)
        if seal.quick is not None:
            return self._quick_fold(seal.quick)
        self._file_bytes = None
        totals, marker, ledger, mode, exists, _ = self._load_for_fold()
        sealed = journal.sealed(self.journal_path)
        for name in sealed:
            found = journal.read(name)
            new = found.entries(marker, self.log, name) if found is not None else []
            if found is not None and (new or not exists):
                add_records(totals, ledger, self.pricing, new)
                marker = Marker(found.generation, len(found.data))
                self._write(totals, marker, ledger, mode)
                exists = True
            files.unlink(name)
        pending = [(rec, t_ns) for rec, t_ns, _ in self._pending]
        if not seal.all:
            with seals.excluding(self.lock_path, FOLD_LOCK_TIMEOUT, file_mode(self.path)):
                live = journal.read(self.journal_path)
                if live is not None:
                    pending = live.entries(marker, self.log, self.journal_path) + pending
                    marker = Marker(live.generation, len(live.data))
                self._fold_rest(totals, marker, ledger, mode, exists, pending)
        else:
            self._fold_rest(totals, marker, ledger, mode, exists, pending)
        if seal.applied is not None and seal.applied == self._applied:
            # nothing was applied since the seal: the file now holds exactly the live state; go on from it
            self.totals, self.ledger, self._file_bytes = totals, ledger, read_bytes(self.path)
            self._unsettled, self._ledger_at = [], 0  # applied before the seal: the file holds them
            self._follower.lost = False  # whatever it missed is in the file
        return totals, ledger

    def _quick_fold(self, quick: _Quick) -> tuple[Totals, Ledger]:
        """Write the file `_quick_document` made, then remove the sealed journal: a fold without reading the
        journal back (every record is in the live state already)."""
        data = dumps(quick.doc).encode()
        files.replace_atomically(self.path, data, file_mode(self.path))
        self._file_bytes = data
        files.unlink(quick.sealed_name)
        del self._pending[:quick.pending]
        return self.totals, self.ledger

    def _fold_rest(self, totals: Totals, marker: Marker | None, ledger: Ledger, mode: int, exists: bool,
                   entries: list[tuple[Record, int]]) -> None:
        """Add `entries` (unsealed records and those kept in memory) and write the file if anything changed."""
        if entries or not exists:
            add_records(totals, ledger, self.pricing, entries)
            self._write(totals, marker, ledger, mode)
        kept = {(id(rec), t_ns) for rec, t_ns in entries}
        self._pending[:] = [entry for entry in self._pending if (id(entry[0]), entry[1]) not in kept]

    def _fold_stream(self, sealed_all: bool) -> tuple[Totals, Ledger]:
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
            return totals, ledger
        self.shared.absorb(pulled)  # the live ledger moves on with what the fold read anyway
        live = journal.generation_of(head(self.journal_path))
        on_disk = {live} if sealed_all else {live, *(journal.generation_of(head(name)) for name in sealed)}
        records = decoded(pulled)
        add_records(totals, ledger, self.pricing, [(rec, t_ns) for _, _, rec, t_ns in records])
        for stream_id, identity, _, _ in records:
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
        return totals, ledger

    def _write(self, totals: Totals, marker: Marker | None, ledger: Ledger, mode: int,
               cursor: Cursor | None = None) -> None:
        extra: dict[str, Any] = {"ledger": ledger.to_json(time.time())}
        if cursor is not None:
            extra["shared"] = cursor.to_json()
        data = dumps(render(totals, self.pricing, marker, extra)).encode()
        files.replace_atomically(self.path, data, mode)
        if self._file_bytes is not None:
            self._file_bytes = data  # what the live state (exact until now) was folded into

    def _load_for_fold(self) -> tuple[Totals, Marker | None, Ledger, int, bool, Cursor | None]:
        now = time.time_ns()
        raw = read_bytes(self.path)
        mode = file_mode(self.path)
        if raw is None:
            return Totals(now), None, Ledger(), mode, False, None
        try:
            totals, marker, ledger, cursor = parse(raw, now)
        except Shape as exc:
            set_aside(self.path, str(exc), self.log)
            return Totals(now), None, Ledger(), mode, False, None
        return totals, marker, ledger, mode, True, cursor
