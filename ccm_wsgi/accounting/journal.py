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
import os
import secrets
import time
from dataclasses import dataclass
from typing import Any

from . import fastjson
from .records import Marker, Record
from .tokens import NAMES as TOKEN_NAMES
from .tokens import Tokens

FORMAT = "ccm-wsgi usage journal v1"
_FIELDS = ("user", "model", "context_window", "week_start_unix", "messages_count")
_INT_FIELDS = ("context_window", "week_start_unix", "messages_count", *TOKEN_NAMES)
_KEYS = ("t", *_FIELDS, *TOKEN_NAMES, "cost")  # a line's keys, in order


def line(rec: Record, t_ns: int) -> bytes:
    """The journal line of a record: "\n" and its JSON object (on the path of every response)."""
    entry = dict(zip(_KEYS, (t_ns, rec.user, rec.model, rec.context_window, rec.week_start_unix,
                             rec.messages_count, *rec.tokens.values(), float(rec.cost)), strict=True))
    if rec.readings:
        entry["readings"] = [float(v) for v in rec.readings]
    return b"\n" + fastjson.dumps(entry)


def decode(raw: bytes) -> tuple[Record, int] | None:
    try:
        entry: Any = fastjson.loads(raw)
    except (ValueError, RecursionError):
        return None
    if not isinstance(entry, dict) or type(entry.get("t")) is not int:
        return None
    user, model = entry.get("user"), entry.get("model")
    found = [entry.get(name) for name in _INT_FIELDS]
    ints = [v for v in found if type(v) is int]
    if type(user) is not str or type(model) is not str or len(ints) != len(found):
        return None
    cost = entry.get("cost", 0.0)
    readings = entry.get("readings", ())
    if not isinstance(cost, (int, float)) or isinstance(cost, bool) or not isinstance(readings, (list, tuple)):
        return None
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in readings):
        return None
    return Record(user, model, ints[0], ints[1], ints[2], Tokens(*ints[3:]), float(cost),
                  tuple(float(v) for v in readings)), entry["t"]


def header() -> bytes:
    return json.dumps({"format": FORMAT, "generation": secrets.token_hex(16)}, separators=(",", ":")).encode()


@dataclass(slots=True)
class Journal:
    generation: str  # "" when the header is missing or damaged
    data: bytes
    body: int  # where the records start (end of the header line)

    def entries(self, marker: Marker | None, log: logging.Logger, path: str) -> list[tuple[Record, int]]:
        """The records a file with `marker` has not absorbed yet."""
        start = self.body
        if marker is not None and marker.generation == self.generation:
            if marker.offset > len(self.data):
                log.warning("usage journal %s is shorter than the usage file says; nothing new in it", path)
            start = max(start, min(marker.offset, len(self.data)))
        return parse_lines(self.data[start:], log, path)


def parse_lines(data: bytes, log: logging.Logger, path: str) -> list[tuple[Record, int]]:
    entries, damaged = [], 0
    for raw in data.split(b"\n"):
        if raw.strip():
            entry = decode(raw)
            if entry is None:
                damaged += 1
            else:
                entries.append(entry)
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
    try:
        head = json.loads(data[:end])
    except (ValueError, RecursionError):
        head = None
    generation = head.get("generation") if isinstance(head, dict) else None
    return Journal(generation if isinstance(generation, str) else "", data, end)


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
