"""Usage records and the usage file's totals: sing-box's schema, key for key.

A `Record` is one completed (or cut) response. `Totals` are what the usage file holds: buckets by
(model, context window, week), each with a total and per-user `Stats`, in first-seen order, as sing-box
keeps them. `render` is the one serialiser (the file, `ccm-wsgi usage --json` and the report use it), and
`Totals.parse` reads our files and sing-box's alike. Costs in the file are always recomputed from the
token counters, so a price change reprices history the way sing-box does.
"""

from __future__ import annotations

import calendar
import functools
import math
import operator
import re
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pricing import LONG_CONTEXT, Pricing, round_cents, sum_cents
from .sse import Usage
from .tokens import NAMES as TOKEN_NAMES
from .tokens import Tokens

STANDARD_CONTEXT = 200_000
WEEK_SECONDS = 604_800
_INT64_MAX = (1 << 63) - 1
_INTEGER = re.compile(r"[+-]?[0-9]{1,19}")


class Shape(Exception):
    """The usage file does not have the sing-box shape."""


@dataclass(slots=True)
class Record:
    """One response, ready to be added to a bucket; `cost` and `readings` feed the ledger (spend and window
    shares) and are not part of the usage file. Its tokens' `cache_creation_input_tokens` is the total of its
    cache writes (`make_record` and `journal.decode` see to it), so that sums need no rule per record."""

    user: str
    model: str
    context_window: int
    week_start_unix: int
    messages_count: int
    tokens: Tokens
    cost: float = 0.0
    readings: tuple[float, ...] = ()  # 5h utilisation, reset, before; weekly utilisation, reset, before


_COLUMNS = operator.attrgetter("messages_count", *(f"tokens.{name}" for name in TOKEN_NAMES))


def column_sums(columns: Callable[[Record], tuple[int, ...]], recs: Sequence[Record]) -> tuple[int, ...]:
    """The sums over `recs` of the counts `columns` picks from a record (an `attrgetter` of several names), one
    C-level pass per column."""
    return tuple(map(sum, zip(*map(columns, recs), strict=True)))


def has_context_1m(anthropic_beta: str | None) -> bool:
    """A comma-separated beta item that starts with `context-1m` asks for the 1M context window."""
    return any(item.strip().startswith("context-1m") for item in (anthropic_beta or "").split(","))


@functools.lru_cache(maxsize=16)  # the same reset header on every response of a week
def week_start(ratelimit_7d_reset: str | None) -> int:
    """The week a record belongs to: the weekly window's reset minus 7 days; 0 (no week) when unusable."""
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
    """The record for one response, or None when sing-box would not count it (no model, or no input and no
    output tokens). A request over 200K input tokens with a `context-1m` beta is a 1M-window request. The
    record takes the usage's tokens (their cache writes as a total) rather than a copy: a usage is read once."""
    model = usage.model or request_model or ""
    tokens = usage.tokens
    if not model or not tokens.any:
        return None
    tokens.cache_creation_input_tokens = tokens.cache_creation
    total_input = tokens.input_tokens + tokens.cache_creation_input_tokens + tokens.cache_read_input_tokens
    long = total_input > STANDARD_CONTEXT and has_context_1m(anthropic_beta)
    return Record(user or "", model, LONG_CONTEXT if long else STANDARD_CONTEXT, week_start(ratelimit_7d_reset),
                  max(messages_count, 0), tokens)


# --- the totals (what the file holds) --------------------------------------------------------

_OMIT_ZERO = frozenset({"cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens"})


def _int(value: Any, where: str) -> int:
    if type(value) is not int:
        raise Shape(f"{where} must be an integer")
    return value


def _obj(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise Shape(f"{where} must be an object")
    return value


@dataclass(slots=True)
class Stats:
    request_count: int = 0
    messages_count: int = 0
    tokens: Tokens = field(default_factory=Tokens)

    def add_sums(self, count: int, sums: Sequence[int]) -> None:
        """Add `count` records whose messages and six token counters sum to `sums`."""
        messages, input_tokens, output, cache_read, cache_write, write_5m, write_1h = sums
        self.request_count += count
        self.messages_count += messages
        t = self.tokens
        t.input_tokens += input_tokens
        t.output_tokens += output
        t.cache_read_input_tokens += cache_read
        t.cache_creation_input_tokens += cache_write
        t.cache_creation_5m_input_tokens += write_5m
        t.cache_creation_1h_input_tokens += write_1h

    def merge(self, other: Stats, sign: int = 1) -> None:
        self.request_count += sign * other.request_count
        self.messages_count += sign * other.messages_count
        self.tokens.add(other.tokens, sign)

    def is_zero(self) -> bool:
        return not self.request_count and not self.messages_count and self.tokens.is_zero()

    def cost(self, pricing: Pricing, model: str, context_window: int) -> float:
        """The rounded per-bucket cost, as the usage file shows it."""
        return round_cents(pricing.cost(model, context_window, self.tokens))

    def document(self, cost: float) -> dict[str, Any]:
        doc: dict[str, Any] = {"request_count": self.request_count, "messages_count": self.messages_count}
        for key, value in zip(TOKEN_NAMES, self.tokens.values(), strict=True):
            if value or key not in _OMIT_ZERO:
                doc[key] = value
        doc["cost_usd"] = _number(cost)
        return doc

    @classmethod
    def parse(cls, raw: Any, where: str) -> Stats:
        raw = _obj(raw, where)
        count, messages = (_int(raw.get(key, 0), f"{where}.{key}") for key in ("request_count", "messages_count"))
        tokens = Tokens(*(_int(raw.get(key, 0), f"{where}.{key}") for key in TOKEN_NAMES))
        return cls(count, messages, tokens)


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


@dataclass(slots=True)
class Cursor:
    """The file's `shared` key (several nodes on Redis): the usage stream is folded in up to stream id
    `stream`; of this host's journals still on disk, the records at the offsets in `absorbed[generation]`
    came back from the stream, so they are in the file already."""

    stream: str = "0-0"
    absorbed: dict[str, set[int]] = field(default_factory=dict)

    def holds(self, generation: str, offset: int) -> bool:
        return offset in self.absorbed.get(generation, ())

    def to_json(self) -> dict[str, Any]:
        return {"stream": self.stream, "absorbed": {g: sorted(o) for g, o in sorted(self.absorbed.items()) if o}}

    @classmethod
    def parse(cls, raw: Any) -> Cursor | None:
        if not isinstance(raw, dict) or not isinstance(raw.get("stream"), str):
            return None
        absorbed = raw.get("absorbed")
        found = {g: {o for o in offsets if type(o) is int} for g, offsets in absorbed.items()
                 if isinstance(g, str) and isinstance(offsets, list)} if isinstance(absorbed, dict) else {}
        return cls(raw["stream"], found)


class Totals:
    """Buckets by (model, context window, week) in first-seen order, as in sing-box."""

    def __init__(self, last_updated_ns: int) -> None:
        self.last_updated_ns = last_updated_ns
        self.buckets: dict[tuple[str, int, int], Bucket] = {}

    def add_all(self, entries: Iterable[tuple[Record, int]]) -> None:
        """Add records (with their times): what adding them one by one does, summed per bucket and user in
        one pass (the records of a fold, or of a follower's read, mostly share both)."""
        groups: dict[tuple[str, int, int, str], list[Record]] = {}
        last = self.last_updated_ns
        for rec, t_ns in entries:
            if not rec.model or rec.context_window <= 0:
                continue
            key = (rec.model, rec.context_window, rec.week_start_unix, rec.user)
            group = groups.get(key)
            if group is None:
                groups[key] = [rec]
            else:
                group.append(rec)
            if t_ns > last:
                last = t_ns
        self.last_updated_ns = last
        buckets = self.buckets
        for key, recs in groups.items():  # in first-seen order, so buckets and users are too
            sums = column_sums(_COLUMNS, recs)
            bucket = buckets.get(key[:3])
            if bucket is None:
                bucket = buckets[key[:3]] = Bucket(*key[:3])
            bucket.total.add_sums(len(recs), sums)
            user = key[3]
            if user:
                stats = bucket.by_user.get(user)
                if stats is None:
                    stats = bucket.by_user[user] = Stats()
                stats.add_sums(len(recs), sums)

    @classmethod
    def parse(cls, doc: Any, now_ns: int) -> tuple[Totals, Marker | None]:
        """Totals and marker of a usage document (ours or sing-box's); raises Shape."""
        if not isinstance(doc, dict):
            raise Shape("the top level must be an object")
        stamp = doc.get("last_updated")
        parsed = parse_time(stamp) if isinstance(stamp, str) else None
        totals = cls(parsed if parsed is not None and parsed > _GO_ZERO_TIME_NS else now_ns)
        combinations = doc.get("combinations")
        if combinations is None:
            combinations = []
        if not isinstance(combinations, list):
            raise Shape("combinations must be an array")
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
        raise Shape(f"{where}.model must be a string")
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


# --- time, as sing-box writes it --------------------------------------------------------------

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
    """The week start as sing-box names it: the server's local zone, `YYYY-MM-DD HH:MM:SS UTC+H[:MM]`."""
    lt = time.localtime(week_start_unix)
    return f"{_date(lt)} {_clock(lt)} {_utc_offset(lt.tm_gmtoff, clock=False)}"


def _number(x: float) -> float | int:
    """Go writes 10, not 10.0."""
    return int(x) if math.isfinite(x) and x.is_integer() else x


def _cents(values: list[float]) -> float | int:
    return _number(sum_cents(values))


def render(totals: Totals, pricing: Pricing, marker: Marker | None = None,
           extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The usage-file document, key for key and in sing-box's order, with our extra keys (`journal`,
    `ledger`) last; the one serialiser."""
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
    if extra:
        doc.update(extra)
    return doc
