"""Per-user token and cost accounting in sing-box's usage file, without ever losing a record.

sing-box keeps the totals in memory and rewrites `usages_path` at most once a minute, so a crash loses
up to a minute of usage, a crash during the write can leave a truncated file, a corrupt file is
silently replaced by an empty one, and two processes sharing the path overwrite each other
(reference §8.11, §15 #13-#15). This store keeps the file format (CONTRACT §5, key for key, with one
extra top-level key) and changes how it gets there:

* **Journal.** Every completed response is appended at once, as one line, to `<path>.journal`
  (one `os.write` on an `O_APPEND` descriptor). Once `record()` returns, a SIGKILL loses nothing.
  The journal starts with a header line holding a random *generation* id. Each record is written as
  `"\\n" + json`, so a line cut short (a full disk) stays its own line and is skipped with a warning.
* **Fold.** `save()` (every 60 s when something was recorded, at shutdown, and in `open()`) holds an
  exclusive `flock` on `<path>.lock` and: reads the file; reads the journal; applies the journal lines
  the file has not absorbed yet; writes the file atomically (unique temp name in the same directory,
  fsync, rename, fsync of the directory) with `"journal": {"generation": G, "offset": N}` meaning
  "journal G is folded up to byte N"; then rotates the journal (a new header with a new generation,
  written to a temp name and renamed over it). Which lines are new: if the journal's generation is
  the file's G, those after byte N; otherwise (rotated since, or a sing-box file without the key) all.
* **Crash points.** Killed before the file rename: the old file plus the intact journal, folded again
  later. Killed between the file rename and the journal rotation: the new file says the journal is
  folded up to its end, so nothing is applied twice. Killed during rotation: the same. Every state
  on disk is either "old file + journal" or "new file + matching marker"; none counts a line twice or
  drops one. Stale temp files are removed by the next fold (under the lock, so none is in use).
* **Several processes** (gunicorn workers) may share one path. Appenders hold a *shared* flock while
  they open and write the journal, the fold holds it *exclusively*, so a rotation never races an
  append; each line is appended once and folded once, whoever folds it. Lock attempts are
  non-blocking and retried with `gevent.sleep`, so waiting never blocks the hub. Each lock is taken
  on a fresh descriptor, so greenlets of one process exclude each other exactly like processes.
* **Corrupt file.** A usage file that is not valid JSON or has the wrong shape is never overwritten:
  it is renamed to `<path>.corrupt-<unix ts>` (kept byte for byte), an error is logged, and the store
  starts from empty plus the whole journal (the records since the last fold, which the corrupt file
  cannot have), so the two files together still hold every record. If it cannot be renamed, `open()`
  raises `UsageFileError` and `save()` leaves everything as it is.
* **sing-box files** load as they are (no `journal` key: the whole journal is new); costs are always
  recomputed from the token counters (§8.10) and the file stays loadable by sing-box.

Writes are not fsynced per record (SIGKILL-safe, not power-loss-safe between folds); folds are.
"""

from __future__ import annotations

import calendar
import errno
import fcntl
import json
import logging
import math
import operator
import os
import re
import secrets
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, fields
from typing import Any

import gevent
from gevent.event import Event

from .. import files
from .pricing import LONG_CONTEXT, Pricing, round_cents, sum_cents
from .sse import Usage

STANDARD_CONTEXT = 200_000
WEEK_SECONDS = 604_800
SAVE_INTERVAL = 60.0
APPEND_LOCK_TIMEOUT = 10.0
LOCK_RECHECK = 1.0  # seconds between checks that the kept lock descriptor is still the lock file's
FOLD_LOCK_TIMEOUT = 60.0
FILE_MODE = 0o644
_INT64_MAX = (1 << 63) - 1
_JOURNAL_FORMAT = "ccm-wsgi usage journal v1"


class UsageFileError(Exception):
    """The usage file, journal or lock cannot be used; the message says which and why."""



# --- records ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Record:
    """One completed response, ready to be added to a bucket."""

    user: str
    model: str
    context_window: int
    week_start_unix: int
    messages_count: int
    input_tokens: int
    output_tokens: int
    cache_read_input_tokens: int
    cache_creation_input_tokens: int
    cache_creation_5m_input_tokens: int
    cache_creation_1h_input_tokens: int


_RECORD_TYPES = tuple((f.name, str if f.type == "str" else int) for f in fields(Record))
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


def has_context_1m(anthropic_beta: str | None) -> bool:
    """§8.3: a comma-separated beta item that starts with `context-1m`."""
    return any(item.strip().startswith("context-1m") for item in (anthropic_beta or "").split(","))


def week_start(ratelimit_7d_reset: str | None) -> int:
    """§8.5: reset - 7 days from `anthropic-ratelimit-unified-7d-reset`; 0 (no week) when unusable."""
    text = (ratelimit_7d_reset or "").strip()
    if not _INTEGER.fullmatch(text):
        return 0
    reset = int(text)
    if reset <= 0 or reset > _INT64_MAX:
        return 0
    return max(reset - WEEK_SECONDS, 0)


def make_record(
    user: str,
    usage: Usage,
    request_model: str,
    messages_count: int,
    anthropic_beta: str,
    ratelimit_7d_reset: str | None,
) -> Record | None:
    """The record for one response, or None when sing-box would not count it (§8.1-§8.6)."""
    model = usage.model or request_model or ""
    if not model or (usage.input_tokens <= 0 and usage.output_tokens <= 0):
        return None
    split = usage.cache_creation_5m_input_tokens + usage.cache_creation_1h_input_tokens
    cache_creation = usage.cache_creation_input_tokens or split
    total_input = usage.input_tokens + cache_creation + usage.cache_read_input_tokens
    long = total_input > STANDARD_CONTEXT and has_context_1m(anthropic_beta)
    return Record(
        user=user or "",
        model=model,
        context_window=LONG_CONTEXT if long else STANDARD_CONTEXT,
        week_start_unix=week_start(ratelimit_7d_reset),
        messages_count=max(messages_count, 0),
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens,
        cache_creation_input_tokens=cache_creation,
        cache_creation_5m_input_tokens=usage.cache_creation_5m_input_tokens,
        cache_creation_1h_input_tokens=usage.cache_creation_1h_input_tokens,
    )


# --- the totals (what the file holds) --------------------------------------------------------

_OMIT_ZERO = frozenset({"cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens"})


class _Shape(Exception):
    """The usage file does not have the sing-box shape."""


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise _Shape(f"{where} must be an integer")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _Shape(f"{where} must be an object")
    return value


@dataclass(slots=True)
class Stats:
    request_count: int = 0
    messages_count: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    def add(self, rec: Record) -> None:
        self.request_count += 1
        self.messages_count += rec.messages_count
        self.input_tokens += rec.input_tokens
        self.output_tokens += rec.output_tokens
        self.cache_read_input_tokens += rec.cache_read_input_tokens
        self.cache_creation_input_tokens += rec.cache_creation_input_tokens or (
            rec.cache_creation_5m_input_tokens + rec.cache_creation_1h_input_tokens
        )
        self.cache_creation_5m_input_tokens += rec.cache_creation_5m_input_tokens
        self.cache_creation_1h_input_tokens += rec.cache_creation_1h_input_tokens

    def merge(self, other: Stats, sign: int = 1) -> None:
        for key in _STAT_KEYS:
            setattr(self, key, getattr(self, key) + sign * getattr(other, key))

    def is_zero(self) -> bool:
        return not any(getattr(self, key) for key in _STAT_KEYS)

    def cost(self, pricing: Pricing, model: str, context_window: int) -> float:
        """The rounded per-bucket cost (§8.7)."""
        return round_cents(
            pricing.cost(
                model,
                context_window,
                self.input_tokens,
                self.output_tokens,
                self.cache_read_input_tokens,
                self.cache_creation_input_tokens,
                self.cache_creation_5m_input_tokens,
                self.cache_creation_1h_input_tokens,
            )
        )

    def document(self, cost: float) -> dict[str, Any]:
        doc: dict[str, Any] = {}
        for key in _STAT_KEYS:
            value = getattr(self, key)
            if value or key not in _OMIT_ZERO:
                doc[key] = value
        doc["cost_usd"] = _number(cost)
        return doc

    @classmethod
    def parse(cls, raw: Any, where: str) -> Stats:
        raw = _obj(raw, where)
        return cls(*(_int(raw.get(key, 0), f"{where}.{key}") for key in _STAT_KEYS))


# the file's stats keys, in the file's order: the dataclass fields
_STAT_KEYS = tuple(f.name for f in fields(Stats))


@dataclass(slots=True)
class Bucket:
    model: str
    context_window: int
    week_start_unix: int
    total: Stats = field(default_factory=Stats)
    by_user: dict[str, Stats] = field(default_factory=dict)

    def merge(self, other: Bucket) -> None:
        self.total.merge(other.total)
        for user, stats in other.by_user.items():
            self.by_user.setdefault(user, Stats()).merge(stats)


@dataclass(slots=True)
class Marker:
    """The file's `journal` key: journal `generation` is folded in up to byte `offset`."""

    generation: str
    offset: int


class Totals:
    """Buckets by (model, context window, week) in first-seen order, as in sing-box (§8.6)."""

    def __init__(self, last_updated_ns: int) -> None:
        self.last_updated_ns = last_updated_ns
        self.buckets: dict[tuple[str, int, int], Bucket] = {}

    def add(self, rec: Record, t_ns: int) -> None:
        if not rec.model or rec.context_window <= 0:
            return
        key = (rec.model, rec.context_window, rec.week_start_unix)
        bucket = self.buckets.get(key)
        if bucket is None:
            bucket = self.buckets[key] = Bucket(*key)
        bucket.total.add(rec)
        if rec.user:
            user = bucket.by_user.get(rec.user)
            if user is None:
                user = bucket.by_user[rec.user] = Stats()
            user.add(rec)
        self.last_updated_ns = max(self.last_updated_ns, t_ns)

    def add_all(self, entries: Iterable[tuple[Record, int]]) -> None:
        for rec, t_ns in entries:
            self.add(rec, t_ns)

    @classmethod
    def parse(cls, doc: Any, now_ns: int) -> tuple[Totals, Marker | None]:
        """Totals and marker of a usage document (ours or sing-box's); raises _Shape."""
        if not isinstance(doc, dict):
            raise _Shape("the top level must be an object")
        stamp = doc.get("last_updated")
        parsed = parse_time(stamp) if isinstance(stamp, str) else None
        totals = cls(parsed if parsed is not None and parsed > _GO_ZERO_TIME_NS else now_ns)
        combinations = doc.get("combinations")
        if combinations is None:
            combinations = []
        if not isinstance(combinations, list):
            raise _Shape("combinations must be an array")
        for i, raw in enumerate(combinations):
            totals._merge_bucket(_parse_bucket(raw, f"combinations[{i}]"))
        return totals, _parse_marker(doc.get("journal"))

    def _merge_bucket(self, bucket: Bucket) -> None:
        key = (bucket.model, bucket.context_window, bucket.week_start_unix)
        if key in self.buckets:
            self.buckets[key].merge(bucket)
        else:
            self.buckets[key] = bucket


def _parse_bucket(raw: Any, where: str) -> Bucket:
    raw = _obj(raw, where)
    model = raw.get("model", "")
    if not isinstance(model, str):
        raise _Shape(f"{where}.model must be a string")
    users = _obj(raw.get("by_user"), f"{where}.by_user")
    return Bucket(
        model=model,
        context_window=_int(raw.get("context_window", 0), f"{where}.context_window"),
        week_start_unix=_int(raw.get("week_start_unix", 0), f"{where}.week_start_unix"),
        total=Stats.parse(raw.get("total"), f"{where}.total"),
        by_user={name: Stats.parse(stats, f"{where}.by_user.{name}") for name, stats in users.items()},
    )


def _parse_marker(raw: Any) -> Marker | None:
    if isinstance(raw, dict):
        generation, offset = raw.get("generation"), raw.get("offset")
        if isinstance(generation, str) and type(offset) is int and offset >= 0:
            return Marker(generation, offset)
    return None


# --- serialising -----------------------------------------------------------------------------

_GO_ZERO_TIME_NS = -62135596800 * 10**9
_RFC3339 = re.compile(r"(\d{4})-(\d\d)-(\d\d)[Tt](\d\d):(\d\d):(\d\d)(?:\.(\d{1,9})\d*)?(?:([Zz])|([+-])(\d\d):(\d\d))")


def parse_time(text: str) -> int | None:
    """RFC 3339 (Go's `time.Time` JSON form) to Unix nanoseconds; None if it is not one."""
    m = _RFC3339.fullmatch(text)
    if m is None:
        return None
    year, month, day, hour, minute, second = (int(g) for g in m.group(1, 2, 3, 4, 5, 6))
    try:
        seconds = calendar.timegm((year, month, day, hour, minute, second, 0, 0, 0))
    except (ValueError, OverflowError):
        return None
    if m.group(9):
        offset = int(m.group(10)) * 3600 + int(m.group(11)) * 60
        seconds -= offset if m.group(9) == "+" else -offset
    return seconds * 10**9 + int((m.group(7) or "").ljust(9, "0"))


def _utc_offset(offset: int, clock: bool) -> str:
    sign = "-" if offset < 0 else "+"
    hours, minutes = divmod(abs(offset) // 60, 60)
    if clock:
        return f"{sign}{hours:02d}:{minutes:02d}"
    return f"UTC{sign}{hours}" + (f":{minutes:02d}" if minutes else "")


def _clock(lt: time.struct_time) -> str:
    return f"{lt.tm_hour:02d}:{lt.tm_min:02d}:{lt.tm_sec:02d}"


def _date(lt: time.struct_time) -> str:
    return f"{lt.tm_year:04d}-{lt.tm_mon:02d}-{lt.tm_mday:02d}"


def format_time(ns: int) -> str:
    """Go's RFC 3339 with nanoseconds in the local zone (`Z` for a zero offset)."""
    seconds, frac = divmod(ns, 10**9)
    try:
        lt = time.localtime(seconds)
    except (OverflowError, OSError, ValueError):
        return "0001-01-01T00:00:00Z"
    text = f"{_date(lt)}T{_clock(lt)}"
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + ("Z" if lt.tm_gmtoff == 0 else _utc_offset(lt.tm_gmtoff, clock=True))


def week_key(week_start_unix: int) -> str:
    """§8.9: the week start in the server's local zone, `YYYY-MM-DD HH:MM:SS UTC+H[:MM]`."""
    lt = time.localtime(week_start_unix)
    return f"{_date(lt)} {_clock(lt)} {_utc_offset(lt.tm_gmtoff, clock=False)}"


def _number(x: float) -> float | int:
    """Go writes 10, not 10.0."""
    return int(x) if math.isfinite(x) and x.is_integer() else x


def _cents(values: list[float]) -> float | int:
    return _number(sum_cents(values))


def render(totals: Totals, pricing: Pricing, marker: Marker | None = None) -> dict[str, Any]:
    """The usage-file document, key for key and in sing-box's order (§8.9); the one serialiser."""
    bucket_costs: list[float] = []
    by_user: defaultdict[str, list[float]] = defaultdict(list)
    by_week: defaultdict[str, list[float]] = defaultdict(list)
    by_user_week: defaultdict[str, defaultdict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    combinations = []
    for b in totals.buckets.values():
        cost = b.total.cost(pricing, b.model, b.context_window)
        bucket_costs.append(cost)
        week = week_key(b.week_start_unix) if b.week_start_unix > 0 else None
        if week:
            by_week[week].append(cost)
        users = {}
        for name in sorted(b.by_user):
            user_cost = b.by_user[name].cost(pricing, b.model, b.context_window)
            users[name] = b.by_user[name].document(user_cost)
            by_user[name].append(user_cost)
            if week:
                by_user_week[name][week].append(user_cost)
        combo: dict[str, Any] = {"model": b.model, "context_window": b.context_window}
        if b.week_start_unix:
            combo["week_start_unix"] = b.week_start_unix
        combo["total"] = b.total.document(cost)
        combo["by_user"] = users
        combinations.append(combo)
    costs: dict[str, Any] = {
        "total_usd": _cents(bucket_costs),
        "by_user": {name: _cents(by_user[name]) for name in sorted(by_user)},
    }
    if by_week:
        costs["by_week"] = {week: _cents(by_week[week]) for week in sorted(by_week)}
    if by_user_week:
        costs["by_user_and_week"] = {
            name: {week: _cents(weeks[week]) for week in sorted(weeks)} for name, weeks in sorted(by_user_week.items())
        }
    doc: dict[str, Any] = {"last_updated": format_time(totals.last_updated_ns), "costs": costs}
    doc["combinations"] = combinations
    if marker is not None:
        doc["journal"] = {"generation": marker.generation, "offset": marker.offset}
    return doc


def dumps(doc: dict[str, Any]) -> str:
    return json.dumps(doc, indent=2, ensure_ascii=False) + "\n"


# --- the journal -----------------------------------------------------------------------------


def _journal_line(rec: Record, t_ns: int) -> bytes:
    values = _record_values(rec)
    if type(t_ns) is int and tuple(map(type, values)) == _RECORD_KINDS:
        # the bytes json.dumps gives below, without building a dict and walking it (the hot path)
        fields = list(values)
        for i in _STR_FIELDS:
            fields[i] = _encode_str(fields[i])
        return (_LINE_FORMAT % (t_ns, *fields)).encode()
    entry: dict[str, Any] = {"t": t_ns}
    for (name, _), value in zip(_RECORD_TYPES, values, strict=True):
        entry[name] = value
    return b"\n" + json.dumps(entry, ensure_ascii=False, separators=(",", ":")).encode()


_record_values = operator.attrgetter(*(name for name, _ in _RECORD_TYPES))
_RECORD_KINDS = tuple(kind for _, kind in _RECORD_TYPES)
_STR_FIELDS = tuple(i for i, (_, kind) in enumerate(_RECORD_TYPES) if kind is str)
_encode_str = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) does with a str
_LINE_FORMAT = "\n{" + ",".join(
    ['"t":%d'] + [f'"{name}":{"%s" if kind is str else "%d"}' for name, kind in _RECORD_TYPES]
) + "}"


def _decode_entry(line: bytes) -> tuple[Record, int] | None:
    try:
        entry = json.loads(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or type(entry.get("t")) is not int:
        return None
    values = [entry.get(name) for name, _ in _RECORD_TYPES]
    if any(type(v) is not kind for v, (_, kind) in zip(values, _RECORD_TYPES, strict=True)):
        return None
    return Record(*values), entry["t"]


@dataclass(slots=True)
class Journal:
    generation: str  # "" when the header is missing or damaged
    data: bytes
    body: int  # where the records start (end of the header line)

    def entries(self, marker: Marker | None, log: logging.Logger, path: str) -> list[tuple[Record, int]]:
        """The records the file (with `marker`) has not absorbed yet."""
        start = self.body
        if marker is not None and marker.generation == self.generation:
            if marker.offset > len(self.data):
                log.warning("usage journal %s is shorter than the usage file says; nothing new in it", path)
            start = max(start, min(marker.offset, len(self.data)))
        entries, damaged = [], 0
        for line in self.data[start:].split(b"\n"):
            if line.strip():
                entry = _decode_entry(line)
                if entry is None:
                    damaged += 1
                else:
                    entries.append(entry)
        if damaged:
            log.warning("usage journal %s: skipped %d damaged line(s) (a write cut short)", path, damaged)
        return entries


def read_journal(path: str) -> Journal | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    end = data.find(b"\n")
    if end < 0:
        end = len(data)
    try:
        header = json.loads(data[:end])
    except (ValueError, RecursionError):
        header = None
    generation = header.get("generation") if isinstance(header, dict) else None
    return Journal(generation if isinstance(generation, str) else "", data, end)


def _journal_header() -> bytes:
    header = {"format": _JOURNAL_FORMAT, "generation": secrets.token_hex(16)}
    return json.dumps(header, separators=(",", ":")).encode()


# --- files and locks -------------------------------------------------------------------------


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def _file_mode(path: str) -> int:
    try:
        return os.stat(path).st_mode & 0o7777
    except OSError:
        return FILE_MODE


def _parse_document(raw: bytes, now_ns: int) -> tuple[Totals, Marker | None]:
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise _Shape(f"not JSON ({exc})") from None
    return Totals.parse(doc, now_ns)


def load_totals(path: str, log: logging.Logger, extra: Iterable[tuple[Record, int]] = ()) -> Totals:
    """Read-only view of file + journal (+ `extra`) under a shared lock; for reports and snapshots.

    Raises FileNotFoundError when neither the file nor its journal exists, UsageFileError when the
    file is corrupt. Never writes anything (the lock file is not even created)."""
    with files.locked(path + ".lock", fcntl.LOCK_SH, FOLD_LOCK_TIMEOUT, create=False):
        raw = _read(path)
        journal = read_journal(path + ".journal")
    if raw is None and journal is None:
        raise FileNotFoundError(errno.ENOENT, "no usage file", path)
    now = time.time_ns()
    marker = None
    totals = Totals(now)
    if raw is not None:
        try:
            totals, marker = _parse_document(raw, now)
        except _Shape as exc:
            raise UsageFileError(f"usage file {path} is corrupt: {exc}") from None
    if journal is not None:
        totals.add_all(journal.entries(marker, log, path + ".journal"))
    totals.add_all(extra)
    return totals


# --- the store -------------------------------------------------------------------------------


class UsageStore:
    """One `usages_path`: durable `record()`, periodic `save()` (fold), read-only `snapshot()`."""

    def __init__(self, path: str, pricing: Pricing, log: logging.Logger, interval: float = SAVE_INTERVAL) -> None:
        self.path = path
        self.pricing = pricing
        self.log = log
        self.interval = interval
        self.journal_path = path + ".journal"
        self.lock_path = path + ".lock"
        self._pending: list[tuple[Record, int]] = []  # records the journal refused, folded at the next save
        self._changes = 0
        self._saved_changes = 0
        self._stop = Event()
        self._saver: gevent.Greenlet | None = None
        # descriptors kept open from one record() to the next (see _append_shared)
        self._lock_fd: int | None = None
        self._journal_fd: int | None = None
        self._journal_id: tuple[int, int] | None = None
        self._lock_id: tuple[int, int] | None = None
        self._lock_checked = 0.0
        self._fds_pid = 0

    # public API

    def open(self) -> None:
        """Load the file and fold the journal into it now (creating the file, and its directory, if missing)."""
        try:
            os.makedirs(os.path.dirname(self.path) or ".", exist_ok=True)
            with files.locked(self.lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                self._fold()
        except OSError as exc:
            raise UsageFileError(f"usage file {self.path}: {exc.strerror or exc}") from exc

    def record(self, rec: Record) -> None:
        """Append one record to the journal; durable when this returns. Never raises."""
        t_ns = time.time_ns()
        try:
            line = _journal_line(rec, t_ns)
        except (TypeError, ValueError) as exc:
            self.log.error("usage: dropping a malformed record %r: %s", rec, exc)
            return
        self._changes += 1
        try:
            self._append_shared(line)
        except Exception as exc:
            self._close_fds()  # start from fresh descriptors next time
            self._pending.append((rec, t_ns))
            self.log.error(
                "usage: cannot append to %s (%s); keeping the record in memory until the next save",
                self.journal_path,
                exc,
            )

    def save(self) -> bool:
        """Fold the journal (and any record kept in memory) into the file; False (logged) on failure."""
        changes = self._changes
        try:
            with files.locked(self.lock_path, fcntl.LOCK_EX, FOLD_LOCK_TIMEOUT):
                self._fold()
        except Exception as exc:
            self.log.error("usage: saving %s failed: %s", self.path, exc)
            return False
        self._saved_changes = changes
        return True

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

    def _flush_pending(self) -> None:
        """Last resort when the final save failed: records kept in memory go to the journal, else to the log."""
        pending, self._pending = self._pending, []
        for rec, t_ns in pending:
            line = _journal_line(rec, t_ns)
            try:
                with files.locked(self.lock_path, fcntl.LOCK_SH, APPEND_LOCK_TIMEOUT):
                    self._append(line)
            except Exception as exc:
                self.log.error(
                    "usage: a record cannot be saved (%s); add this as a line of its own to %s to keep it: %s",
                    exc, self.journal_path, line.decode("utf-8").strip(),
                )

    def snapshot(self) -> dict[str, Any]:
        """Current totals (file + journal + records kept in memory) as a usage document."""
        return render(load_totals(self.path, self.log, list(self._pending)), self.pricing)

    @property
    def dirty(self) -> bool:
        return self._changes != self._saved_changes

    # internals

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.dirty:
                self.save()

    def _append_shared(self, line: bytes) -> None:
        """`_append` under the shared lock, with the lock file and journal kept open between records.

        Same protocol as `files.locked(LOCK_SH)` + `_append`, minus two opens and two closes per record:
        the lock is taken and released on a kept descriptor (no greenlet switch can happen while it
        is held, so greenlets sharing it never overlap), and the journal descriptor is used only
        while the journal path still names the same file, checked under the shared lock, so a fold
        (here or in another process) cannot rotate it between the check and the write. Nothing here
        ever replaces the lock file; should someone delete or replace it, that is noticed within
        LOCK_RECHECK seconds and the file the others lock is opened. After a fork, everything is
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
            fcntl.flock(lock_fd, fcntl.LOCK_SH | fcntl.LOCK_NB)  # the usual case: no fold in progress
            locked = True
        except OSError:
            locked = False
        if not locked and not files.acquire(lock_fd, fcntl.LOCK_SH, APPEND_LOCK_TIMEOUT):
            raise UsageFileError(f"timed out after {APPEND_LOCK_TIMEOUT:g}s waiting for the lock {self.lock_path}")
        try:
            journal = files.identity(self.journal_path)
            fd = self._journal_fd
            if fd is not None and journal != self._journal_id:
                self._journal_fd = None  # rotated (or removed) since the last record
                files.close(fd)
                fd = None
            if fd is None:
                if journal is None:
                    files.create_if_missing(self.journal_path, _journal_header(), _file_mode(self.path))
                fd = os.open(self.journal_path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
                st = os.fstat(fd)
                self._journal_fd, self._journal_id = fd, (st.st_ino, st.st_dev)
            written = os.write(fd, line)
            if written != len(line):  # the cut line is skipped when folding; the record is kept in memory
                raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")
        finally:
            fcntl.flock(lock_fd, fcntl.LOCK_UN)

    def _close_fds(self) -> None:
        lock_fd, journal_fd = self._lock_fd, self._journal_fd
        self._lock_fd = self._journal_fd = None
        if self._fds_pid == os.getpid():
            for fd in (journal_fd, lock_fd):
                if fd is not None:
                    files.close(fd)

    def _append(self, line: bytes) -> None:
        flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
        try:
            fd = os.open(self.journal_path, flags)
        except FileNotFoundError:
            files.create_if_missing(self.journal_path, _journal_header(), _file_mode(self.path))
            fd = os.open(self.journal_path, flags)
        try:
            written = os.write(fd, line)
        finally:
            files.close(fd)  # an error closing after a good write must not make the record look lost
        if written != len(line):  # the cut line is skipped when folding; the record is kept in memory
            raise OSError(errno.ENOSPC, f"short write ({written} of {len(line)} bytes)")

    def _fold(self) -> None:
        """Under the exclusive lock: file + new journal lines + pending -> file; rotate the journal."""
        self._remove_stale_temps()
        pending = list(self._pending)
        totals, marker, mode, exists = self._load_for_fold()
        journal = read_journal(self.journal_path)
        new = journal.entries(marker, self.log, self.journal_path) if journal else []
        if exists and not new and not pending:
            return
        totals.add_all(new)
        totals.add_all(pending)
        folded = Marker(journal.generation, len(journal.data)) if journal else None
        files.replace_atomically(self.path, dumps(render(totals, self.pricing, folded)).encode(), mode)
        del self._pending[: len(pending)]
        try:
            files.replace_atomically(self.journal_path, _journal_header(), mode)
        except OSError as exc:  # harmless: the marker says where the old journal was folded up to
            self.log.warning("usage: cannot rotate %s: %s", self.journal_path, exc)

    def _load_for_fold(self) -> tuple[Totals, Marker | None, int, bool]:
        now = time.time_ns()
        raw = _read(self.path)
        mode = _file_mode(self.path)
        if raw is None:
            return Totals(now), None, mode, False
        try:
            totals, marker = _parse_document(raw, now)
        except _Shape as exc:
            self._set_aside(str(exc))
            return Totals(now), None, mode, False
        return totals, marker, mode, True

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
        """Temp files of folds or journal creations that were killed (we hold the exclusive lock)."""
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
