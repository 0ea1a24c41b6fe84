"""Reading a usage file and its journals, without writing anything: the records the file does not hold yet,
the totals and ledger of file + journals, as reports, snapshots and a fold see them.

A file holds a `journal` marker (which journal it is folded up to, and where) and, with shared state, a
`shared` cursor (how far into the cluster's usage stream); a record is counted once whichever of the file,
the journals and the stream holds it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import time
from collections.abc import Callable, Iterable
from typing import Any

from .. import files
from . import journal
from .ledger import Ledger
from .pricing import Pricing
from .records import Cursor, Marker, Record, Shape, Totals

FOLD_LOCK_TIMEOUT = 60.0
FILE_MODE = 0o644


class UsageFileError(Exception):
    """The usage file, journal or lock cannot be used; the message says which and why."""


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


def apply(ledger: Ledger, pricing: Pricing, rec: Record, t_ns: int) -> None:
    """Add one record to a ledger (the usage stream's, record by record)."""
    ledger.add(rec, t_ns, pricing)


def add_records(totals: Totals, ledger: Ledger, pricing: Pricing, entries: list[tuple[Record, int]]) -> None:
    """Add records, in journal order, to the totals and the ledger of a usage file."""
    totals.add_all(entries)
    ledger.add_all(entries, pricing)


def read_bytes(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def head(path: str) -> bytes:
    """The first line (and a little more) of a journal, b"" when it is gone."""
    try:
        with open(path, "rb") as f:
            return f.read(4096)
    except OSError:
        return b""


def file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return FILE_MODE


def parse(raw: bytes, now_ns: int) -> tuple[Totals, Marker | None, Ledger, Cursor | None]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise Shape(f"not JSON ({exc})") from None
    totals, marker = Totals.parse(doc, now_ns)
    return totals, marker, Ledger.from_json(doc.get("ledger")), Cursor.parse(doc.get("shared"))


Located = tuple[Record, int, str]  # a record, its time (ns) and its identity (`journal.ident`)


def unfolded(path: str, marker: Marker | None, log: logging.Logger, cursor: Cursor | None = None,
             sealed_only: bool = False, wanted: Callable[[str], bool] | None = None) -> list[Located]:
    """The records of the sealed journals and the live one that a file with `marker` (and `cursor`) does not
    hold, in order; with `wanted`, only those whose identity it accepts (the others are not even decoded)."""
    entries: list[Located] = []
    names = journal.sealed(path + ".journal")
    for name in names if sealed_only else [*names, path + ".journal"]:
        found = journal.read(name)
        if found is None:
            continue

        def keep(offset: int, generation: str = found.generation) -> bool:
            return (cursor is None or not cursor.holds(generation, offset)) and \
                (wanted is None or wanted(journal.ident(generation, offset)))
        entries += [(rec, t_ns, journal.ident(found.generation, offset))
                    for rec, t_ns, offset in found.located(marker, log, name, keep)]
    return entries


def stream_cursor(path: str) -> Cursor | None:
    """The shared-state cursor a usage file holds (None: none, or no readable file)."""
    raw = read_bytes(path)
    try:
        return parse(raw, 0)[3] if raw is not None else None
    except Shape:
        return None


def _load(path: str, log: logging.Logger, extra: Iterable[Located]) -> tuple[Totals, Ledger, list[Located]]:
    """The file's totals and ledger, and the records it does not hold yet: the journals' and `extra` (records
    the stream holds beyond the file; a journal record with the same identity is counted once). Read-only,
    under the shared fold lock.

    Raises FileNotFoundError when neither the file nor a journal exists, UsageFileError when the file is
    corrupt. Never writes anything (the lock file is not even created)."""
    with files.locked(path + ".fold.lock", fcntl.LOCK_SH, FOLD_LOCK_TIMEOUT, create=False):
        raw = read_bytes(path)
        now = time.time_ns()
        totals, marker, ledger, cursor = Totals(now), None, Ledger(), None
        if raw is not None:
            try:
                totals, marker, ledger, cursor = parse(raw, now)
            except Shape as exc:
                raise UsageFileError(f"usage file {path} is corrupt: {exc}") from None
        entries = unfolded(path, marker, log, cursor)
        if raw is None and not entries and not os.path.exists(path + ".journal"):
            raise FileNotFoundError(errno.ENOENT, "no usage file", path)
    extra = list(extra)
    known = {identity for _, _, identity in extra}
    return totals, ledger, [entry for entry in entries if entry[2] not in known] + extra


def load_totals(path: str, log: logging.Logger, extra: Iterable[Located] = ()) -> Totals:
    """Read-only view of file + journals (+ `extra`), for reports and snapshots (see `_load`)."""
    totals, _, entries = _load(path, log, extra)
    totals.add_all((rec, t_ns) for rec, t_ns, _ in entries)
    return totals


def load_ledger(path: str, log: logging.Logger, pricing: Pricing, extra: Iterable[Located] = ()) -> Ledger:
    """Read-only: the ledger of file + journals (+ `extra`), as a running store would hold it (see `_load`)."""
    _, ledger, entries = _load(path, log, extra)
    ledger.add_all([(rec, t_ns) for rec, t_ns, _ in entries], pricing)
    return ledger
