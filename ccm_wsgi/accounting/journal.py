"""The usage journal: one line per record, appended as each response ends, folded into the file later.

A journal file starts with a header line holding a random *generation* id. Each record is written as
`"\\n" + json`, so a line cut short (a full disk) stays its own line and is skipped with a warning. When a
fold begins, the journal is *sealed*: renamed to `<journal>.<sequence>-<generation>` (and a fresh journal
takes its place) so that appending never waits for the fold; sealed journals are folded in sequence order
and removed once the usage file holds them.
"""

from __future__ import annotations

import json
import logging
import operator
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import fastjson
from .records import Marker, Record
from .tokens import NAMES as TOKEN_NAMES
from .tokens import Tokens

FORMAT = "ccm-wsgi usage journal v1"
_INT_FIELDS = ("context_window", "week_start_unix", "messages_count", *TOKEN_NAMES)
# a line's keys, in order: t, user, model, the integers, cost (and readings when the response had them)
_LINE = b'\n{"t":%d,"user":%b,"model":%b,' + b",".join(b'"%b":%%d' % k.encode() for k in _INT_FIELDS) + b',"cost":%b'


def line(rec: Record, t_ns: int) -> bytes:
    """The journal line of a record: "\n" and its JSON object, filled into a template (on the path of every
    response: no dictionary is built for it)."""
    known = _QUOTED.get
    text = _LINE % (t_ns, known(rec.user) or _quoted(rec.user), known(rec.model) or _quoted(rec.model),
                    rec.context_window, rec.week_start_unix, rec.messages_count, *rec.tokens.values(),
                    fastjson.dumps(float(rec.cost)))
    if rec.readings:
        text += b',"readings":' + fastjson.dumps([float(v) for v in rec.readings])
    return text + b"}"


_QUOTED: dict[str, bytes] = {}
_QUOTED_KEPT = 1024  # user and model names recur; an unbounded stream of new ones is encoded each time


def _quoted(text: str) -> bytes:
    """`text` as a JSON string, remembered (`line` looks in `_QUOTED` first)."""
    quoted = fastjson.dumps(text)
    if len(_QUOTED) < _QUOTED_KEPT:
        _QUOTED[text] = quoted
    return quoted


def decode(raw: bytes) -> tuple[Record, int] | None:
    """The record and time of one line's JSON, None when it is not a record (a cut or damaged line). Run on
    every line a fold or a follower reads: a missing key or a value of the wrong type fails one lookup or
    one type test, not a series of them."""
    try:
        entry: Any = fastjson.loads(raw)
        t, user, model, cost = entry["t"], entry["user"], entry["model"], entry.get("cost", 0.0)
        ints = _ints(entry)
    except (ValueError, RecursionError, KeyError, TypeError, AttributeError):
        return None  # not JSON, not an object, or a key missing
    if type(t) is not int or type(user) is not str or type(model) is not str or \
            not _INT_TYPES.issuperset(map(type, ints)) or type(cost) not in _NUMBER_TYPES:
        return None
    readings = entry.get("readings", ())
    if readings:
        if type(readings) is not list or not _NUMBER_TYPES.issuperset(map(type, readings)):
            return None
        readings = tuple(map(float, readings))
    tokens = Tokens(*ints[3:])
    tokens.cache_creation_input_tokens = tokens.cache_creation  # a line with the split alone (written by hand)
    return Record(user, model, ints[0], ints[1], ints[2], tokens, float(cost), readings), t


_ints = operator.itemgetter(*_INT_FIELDS)
_INT_TYPES = frozenset({int})
_NUMBER_TYPES = frozenset({int, float})


def generation_of(head: bytes) -> str:
    """The generation named by a journal's first line ("" when it is missing or damaged)."""
    end = head.find(b"\n")
    try:
        parsed = json.loads(head[:end] if end >= 0 else head)
    except (ValueError, RecursionError):
        return ""
    generation = parsed.get("generation") if isinstance(parsed, dict) else None
    return generation if isinstance(generation, str) else ""


def header() -> bytes:
    return json.dumps({"format": FORMAT, "generation": secrets.token_hex(16)}, separators=(",", ":")).encode()


@dataclass(slots=True)
class Journal:
    generation: str  # "" when the header is missing or damaged
    data: bytes
    body: int  # where the records start (end of the header line)

    def entries(self, marker: Marker | None, log: logging.Logger, path: str) -> list[tuple[Record, int]]:
        """The records a file with `marker` has not absorbed yet."""
        return [(rec, t_ns) for rec, t_ns, _ in self.located(marker, log, path)]

    def located(self, marker: Marker | None, log: logging.Logger, path: str,
                keep: Callable[[int], bool] | None = None) -> list[tuple[Record, int, int]]:
        """The same records, each with the offset where its line starts (its identity within the journal);
        with `keep`, only those at the offsets it accepts."""
        start = self.body
        if marker is not None and marker.generation == self.generation:
            if marker.offset > len(self.data):
                log.warning("usage journal %s is shorter than the usage file says; nothing new in it", path)
            start = max(start, min(marker.offset, len(self.data)))
        return parse_lines(self.data, start, log, path, keep)


def ident(generation: str, offset: int) -> str:
    """A record's identity across nodes: its journal's random generation and where its line starts."""
    return f"{generation}:{offset}"


def parse_lines(data: bytes, start: int, log: logging.Logger, path: str,
                keep: Callable[[int], bool] | None = None) -> list[tuple[Record, int, int]]:
    """The records of `data` from `start` (a line boundary), with their offsets (with `keep`, only those at
    the offsets it accepts; the others are not decoded)."""
    entries, damaged = [], 0
    offset = start
    for raw in data[start:].split(b"\n"):
        if raw.strip() and (keep is None or keep(offset - 1)):
            entry = decode(raw)
            if entry is None:
                damaged += 1
            else:
                entries.append((*entry, offset - 1))
        offset += len(raw) + 1
    if damaged:
        log.warning("usage journal %s: skipped %d damaged line(s) (a write cut short)", path, damaged)
    return entries


def read(path: str) -> Journal | None:
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    end = data.find(b"\n")
    if end < 0:
        end = len(data)
    return Journal(generation_of(data[:end]), data, end)


def sealed_name(journal_path: str, generation: str) -> str:
    return f"{journal_path}.{time.time_ns():020d}-{generation or 'unknown'}"


def sealed(journal_path: str) -> list[str]:
    """The sealed journals waiting to be folded, oldest first."""
    directory = os.path.dirname(journal_path) or "."
    prefix = os.path.basename(journal_path) + "."
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    found = [n for n in names if n.startswith(prefix) and n[len(prefix):len(prefix) + 20].isdigit()]
    return [os.path.join(directory, n) for n in sorted(found)]
