"""Every node's usage records in one Redis stream, exactly once, and the ledger every node derives from it.

The local journal stays the first, durable write of a record (see `accounting/store.py`). A record's
identity is where its journal line starts: `<journal generation>:<offset>` (the generation is random per
journal file, so no two nodes or processes share one). Records reach the stream through one Lua script,
`PUSH`, which adds an entry only when its offset is new in the set `pushed:<generation>`: a record pushed
twice (a node that retries after a lost answer, a fold after a crash, two gunicorn workers) is added once.

* At the end of each request the node hands its record to the sender of the after-trips (see
  `connection.py`): it is in the stream a few milliseconds later. Should that fail (or the node die first),
  the record is still in the journal, and the next fold (at the latest when the node starts again) pushes it.
* Each fold (every minute, at shutdown, at start, and as soon as Redis is back after an outage) seals the
  journal, pushes the records of the sealed journals that Redis has not confirmed yet, then reads the
  stream from the cursor saved in the usage file and adds what it finds: so the usage file holds the totals
  of all nodes, each record once, and a sealed journal is only removed once its records are in the stream.
* Every process keeps a `Ledger` of the stream, in stream order, so every node counts budgets and window
  shares from the same records in the same order. It reads the stream's new entries when a ledger must be
  exact (a user with a budget or a window share is admitted: in that request's one trip before
  forwarding; a status view; a fold) and otherwise once a second, off the request path. Entries of this
  host's own records are not decoded: the record is at hand (the *overlay*: this host's records the stream
  has not shown yet, counted on top of the stream's ledger, so a node always counts at least its own
  records, with Redis or without).

The stream keeps five weeks of entries (the longest budget period and a margin): a node that was off longer
than that misses the records of the other nodes from before, in its usage file only.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import gevent

from ..accounting import journal
from ..accounting.ledger import Ledger
from ..accounting.records import Record
from ..config import DefaultCredential, ExternalCredential
from ..config import Service as ServiceConfig
from .connection import Pipeline, SharedState, Unavailable, client

log = logging.getLogger("ccm_wsgi.state")

KEEP_MS = 35 * 86_400_000  # stream entries older than this are trimmed
PUSHED_TTL = 7 * 86_400  # seconds an identity is remembered after its journal's last push
PAGE = 1000  # stream entries read or records pushed per call
SYNC_SECONDS = 1.0  # the ledger reads the stream at least this often, off the request path

# KEYS: the stream, then a `pushed` set per generation. ARGV: oldest id to keep, ttl, then per record:
# index of its set in KEYS, its offset, its identity, its journal line. Returns how many were new.
PUSH = """
local added = 0
for i = 3, #ARGV, 4 do
  local pushed = KEYS[tonumber(ARGV[i])]
  if redis.call('SADD', pushed, ARGV[i + 1]) == 1 then
    redis.call('XADD', KEYS[1], 'MINID', '~', ARGV[1], '*', 'id', ARGV[i + 2], 'r', ARGV[i + 3])
    added = added + 1
  end
  redis.call('EXPIRE', pushed, ARGV[2])
end
return added
"""

Entry = tuple[str, bytes]  # identity, journal line (without its leading newline)
Pulled = tuple[str, str, Record, int]  # stream id, identity, record, time (ns)
Raw = tuple[Any, dict[Any, Any]]  # a stream entry as Redis gives it: id, fields


def stream_name(service: ServiceConfig, path: str) -> str:
    """One stream per usage file, named after the credentials that record into it (the same on every node)."""
    tags = sorted(c.tag for c in service.effective_credentials
                  if isinstance(c, DefaultCredential | ExternalCredential) and c.usages_path == path)
    return "+".join(tags)


def stream_key(prefix: str, name: str) -> str:
    return prefix + ":".join(("usage", name, "stream"))


def tail(service: ServiceConfig, path: str, after: str) -> list[tuple[Record, int, str]]:
    """What the stream of `path` holds after `after`, read with a plain client (for `ccm-wsgi usage`);
    raises redis' errors."""
    assert service.state is not None
    r = client(service.state.url)
    key = stream_key(service.state.key_prefix + service.tag + ":", stream_name(service, path))
    try:
        return [(rec, t_ns, identity) for _, identity, rec, t_ns in decoded(_read_all(r, key, after))]
    finally:
        r.close()


def _read_all(r: Any, key: str, after: str) -> list[Raw]:
    found: list[Raw] = []
    while True:
        page: list[Raw] = r.xrange(key, f"({after}", "+", count=PAGE)
        found += page
        if len(page) < PAGE:
            return found
        after = _text(page[-1][0])


def stream_order(stream_id: str) -> tuple[int, int]:
    ms, _, seq = stream_id.partition("-")
    return int(ms or 0), int(seq or 0)


class SharedUsage:
    """The stream of one usage store (named after the credentials that record into it)."""

    def __init__(self, state: SharedState, name: str, apply: Callable[[Ledger, Record, int], None]):
        self.state = state
        self.name = name
        self.apply = apply  # prices a record into a ledger (the usage file's own rule)
        self.stream = stream_key(state.prefix, name)
        self._push = state.script(PUSH)
        self.ledger = Ledger()
        self.last_id = "0-0"
        self.local_generations: set[str] = set()  # of this host's journals still on disk
        self._overlay: dict[str, tuple[Record, int]] = {}  # this host's records the stream has not shown yet
        self._seen: set[str] = set()  # identities of this host's records the stream showed
        self._confirmed: set[str] = set()  # identities of records whose push Redis answered
        self._merged: Ledger | None = None
        self._synced = 0.0  # when the ledger last read the stream (monotonic)
        self._syncer: gevent.Greenlet | None = None

    # -- pushing ---------------------------------------------------------------------------------

    def _arguments(self, entries: Iterable[Entry]) -> tuple[list[str], list[str | int]]:
        keys = [self.stream]
        index: dict[str, int] = {}
        args: list[str | int] = [int(time.time() * 1000) - KEEP_MS, PUSHED_TTL]
        for identity, line in entries:
            generation, _, offset = identity.rpartition(":")
            if generation not in index:
                keys.append(self.state.key("usage", self.name, "pushed", generation))
                index[generation] = len(keys)
            args += [index[generation], offset, identity, line.decode("utf-8")]
        return keys, args

    def push(self, entries: list[Entry]) -> None:
        """Add `entries` to the stream, each at most once ever; raises Unavailable."""
        for start in range(0, len(entries), PAGE):
            page = entries[start:start + PAGE]
            keys, args = self._arguments(page)
            self.state.now("pushing usage records", functools.partial(self._push.add, keys=keys, args=args))
            self._confirmed.update(identity for identity, _ in page)

    def push_later(self, identity: str, line: bytes) -> None:
        """Push one record in the after-trip of the request that made it. If that fails, the record stays in
        the journal and in the overlay, and the next fold pushes it."""
        keys, args = self._arguments([(identity, line)])

        def confirmed(answer: Any) -> None:
            if not isinstance(answer, BaseException):
                self._confirmed.add(identity)
        self.state.later(lambda pipe: self._push.add(pipe, keys, args), confirmed)

    def unconfirmed(self, identity: str) -> bool:
        """Whether a fold must (still) push this record."""
        return identity not in self._confirmed

    # -- reading ---------------------------------------------------------------------------------

    def pull(self, after: str) -> list[Raw]:
        """Every entry after stream id `after`, in order; raises Unavailable."""
        return self.state.run("reading usage records", lambda r: _read_all(r, self.stream, after))

    def _xrange(self, pipe: Pipeline) -> Any:
        return pipe.xrange(self.stream, f"({self.last_id}", "+", count=PAGE)

    def sync(self) -> None:
        """Read the stream's new entries into the ledger, with the trip of the request's batch (the answer is
        awaited by the next `view()`): a budget checked right after another node recorded a request counts
        that request."""
        self.state.defer(self._xrange, self._answered)

    def _answered(self, page: Any) -> None:
        if isinstance(page, BaseException):
            return  # unreachable: the ledger stays as it is, with this host's records on top
        self.absorb(page)
        if len(page) == PAGE:  # a long gap: the rest now
            with contextlib.suppress(Unavailable):
                self.absorb(self.pull(self.last_id))

    def start(self, ledger: Ledger, after: str) -> None:
        """Keep `ledger` (the one the usage file holds at stream id `after`) up to date from the stream."""
        self.ledger, self.last_id, self._merged = ledger, after, None
        if self._syncer is None:
            self._syncer = gevent.spawn(self._sync_often)

    def stop(self) -> None:
        syncer, self._syncer = self._syncer, None
        if syncer is not None:
            syncer.kill(block=False)

    def _sync_often(self) -> None:
        while True:
            gevent.sleep(SYNC_SECONDS)
            if self.state.healthy and time.monotonic() - self._synced >= SYNC_SECONDS:
                with contextlib.suppress(Unavailable):
                    self.absorb(self.pull(self.last_id))

    def absorb(self, entries: list[Raw]) -> None:
        """Apply the entries past `last_id`, in stream order (the entries of this host's records from the
        overlay, not decoded)."""
        self._synced = time.monotonic()
        last = stream_order(self.last_id)
        for raw_id, fields in entries:
            stream_id = _text(raw_id)
            order = stream_order(stream_id)
            if order <= last:
                continue  # read twice (a sync and a fold, two requests)
            identity = _text(fields.get(b"id", b""))
            local = identity.rpartition(":")[0] in self.local_generations
            found = self._overlay.pop(identity, None) if local else None
            if found is None:
                entry = _decode(raw_id, fields)
                found = (entry[2], entry[3]) if entry is not None else None
            if local:
                self._seen.add(identity)
            if found is not None:
                self.apply(self.ledger, *found)
                self._merged = None
            last, self.last_id = order, stream_id

    # -- this host's records ---------------------------------------------------------------------

    def local(self, rec: Record, t_ns: int, identity: str) -> None:
        """A record of this host (this process or another on the same usage file), from its journal."""
        generation = identity.rpartition(":")[0]
        self.local_generations.add(generation)
        if identity not in self._seen and identity not in self._overlay:
            self._overlay[identity] = (rec, t_ns)
            if self._merged is not None:
                self.apply(self._merged, rec, t_ns)

    def forget(self, generations: set[str]) -> None:
        """Only `generations` are still on disk: identities of the others cannot come back."""
        self.local_generations = set(generations)
        self._seen = {i for i in self._seen if i.rpartition(":")[0] in generations}
        self._confirmed = {i for i in self._confirmed if i.rpartition(":")[0] in generations}

    def view(self) -> Ledger:
        """The stream's ledger (with the entries this request's batch read, if any) and this host's records it
        does not show yet."""
        self.state.flush()
        if not self._overlay:
            return self.ledger
        if self._merged is None:
            merged = self.ledger.copy()
            for rec, t_ns in sorted(self._overlay.values(), key=lambda entry: entry[1]):
                self.apply(merged, rec, t_ns)
            self._merged = merged
        return self._merged


def decoded(entries: list[Raw]) -> list[Pulled]:
    """The records of stream entries, in order (a damaged entry is skipped and logged)."""
    return [entry for entry in (_decode(i, f) for i, f in entries) if entry is not None]


def _decode(stream_id: Any, fields: dict[Any, Any]) -> Pulled | None:
    identity, line = fields.get(b"id"), fields.get(b"r")
    entry = journal.decode(line) if isinstance(line, bytes) else None
    if entry is None or not isinstance(identity, bytes):
        log.warning("usage stream: skipped a damaged entry %s", stream_id)
        return None
    return _text(stream_id), identity.decode("utf-8", "replace"), entry[0], entry[1]


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
