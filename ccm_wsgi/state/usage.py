"""Every node's usage records in one Redis stream, exactly once, and the ledger every node derives from it.

The local journal stays the first, durable write of a record (see `accounting/store.py`). A record's
identity is where its journal line starts: `<journal generation>:<offset>` (the generation is random per
journal file, so no two nodes or processes share one). Records reach the stream through one Lua script,
`PUSH`, which adds an entry only when its offset is new in the set `pushed:<generation>`: a record pushed
twice (a node that retries after a lost answer, a fold after a crash, two gunicorn workers) is added once.

* At the end of each request, the node pushes its record (one round trip, together with the lease it gives
  back). Should that fail, the record is still in the journal, and the next fold pushes it.
* Each fold (every minute, at shutdown, at start, and as soon as Redis is back after an outage) seals the
  journal, pushes every record of the sealed journals, then reads the stream from the cursor saved in the
  usage file and adds what it finds: so the usage file holds the totals of all nodes, each record once,
  and a sealed journal is only removed once its records are in the stream.
* Every process follows the stream (a blocking XREAD on a connection of its own) into a `Ledger`, in stream
  order, so every node counts budgets and window shares from the same records in the same order. Records
  of this host that the stream does not show yet (just written, or kept through an outage) are added on top
  (the *overlay*), so a node always counts at least its own records, with Redis or without.

The stream keeps five weeks of entries (the longest budget period and a margin): a node that was off longer
than that misses the records of the other nodes from before, in its usage file only.
"""

from __future__ import annotations

import contextlib
import copy
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
from .connection import TIMEOUT, SharedState, Unavailable, client

log = logging.getLogger("ccm_wsgi.state")

KEEP_MS = 35 * 86_400_000  # stream entries older than this are trimmed
PUSHED_TTL = 7 * 86_400  # seconds an identity is remembered after its journal's last push
BLOCK_MS = 2000  # a follower's blocking read; its connection waits a little longer
PAGE = 1000  # stream entries read per call

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
    found: list[tuple[Record, int, str]] = []
    try:
        while True:
            page: Any = r.xrange(key, f"({after}", "+", count=PAGE)
            for stream_id, fields in page:
                entry = decoded(stream_id, fields)
                if entry is not None:
                    found.append((entry[2], entry[3], entry[1]))
                    after = entry[0]
            if len(page) < PAGE:
                return found
    finally:
        r.close()


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
        self._push = state.redis.register_script(PUSH)
        self._reader = client(state.url, timeout=BLOCK_MS / 1000 + TIMEOUT)
        self.ledger = Ledger()
        self.last_id = "0-0"
        self.local_generations: set[str] = set()  # of this host's journals still on disk
        self._overlay: dict[str, tuple[Record, int]] = {}  # this host's records the stream has not shown yet
        self._seen: set[str] = set()  # identities of this host's records the stream showed
        self._merged: Ledger | None = None
        self._follower: gevent.Greenlet | None = None

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
            keys, args = self._arguments(entries[start:start + PAGE])
            self.state.run("pushing usage records", functools.partial(self._run_push, keys, args))

    def _run_push(self, keys: list[str], args: list[str | int], _: Any) -> Any:
        return self._push(keys, args)

    def push_later(self, identity: str, line: bytes) -> None:
        """Push one record with the batch of the request that made it (one round trip at its end). If that
        fails, the record stays in the journal and in the overlay, and the next fold pushes it."""
        keys, args = self._arguments([(identity, line)])
        self.state.defer(lambda pipe: self._push(keys, args, client=pipe), _unconfirmed)

    # -- reading ---------------------------------------------------------------------------------

    def pull(self, after: str) -> list[Pulled]:
        """Every entry after stream id `after`, in order; raises Unavailable."""
        found: list[Pulled] = []
        while True:
            page: Any = self.state.run("reading usage records", functools.partial(self._page, after))
            for stream_id, fields in page:
                entry = decoded(stream_id, fields)
                if entry is not None:
                    found.append(entry)
                after = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
            if len(page) < PAGE:
                return found

    def _page(self, after: str, r: Any) -> Any:
        return r.xrange(self.stream, f"({after}", "+", count=PAGE)

    def start(self, ledger: Ledger, after: str) -> None:
        """Follow the stream from `after` into `ledger` (the one the usage file holds at that point)."""
        self.ledger, self.last_id, self._merged = ledger, after, None
        if self._follower is None:
            self._follower = gevent.spawn(self._follow)

    def stop(self) -> None:
        follower, self._follower = self._follower, None
        if follower is not None:
            follower.kill(block=False)
        self._reader.close()

    def sync(self) -> None:
        """Apply what the stream holds beyond what this process has seen (one round trip): a budget checked
        right after another node recorded a request counts that request."""
        with contextlib.suppress(Unavailable):
            self._absorb(self.pull(self.last_id))

    def _follow(self) -> None:
        while True:
            try:
                answer: Any = self.state.run("following usage records", lambda _: self._reader.xread(
                    {self.stream: self.last_id}, count=PAGE, block=BLOCK_MS))
            except Unavailable:
                gevent.sleep(1.0)
                continue
            for _, page in answer or ():
                self._absorb([e for e in (decoded(i, f) for i, f in page) if e is not None])

    def _absorb(self, entries: list[Pulled]) -> None:
        last = stream_order(self.last_id)
        for stream_id, identity, rec, t_ns in entries:
            order = stream_order(stream_id)
            if order <= last:
                continue  # the follower and a sync both read it
            self.apply(self.ledger, rec, t_ns)
            self._merged = None
            if identity.rpartition(":")[0] in self.local_generations:
                self._overlay.pop(identity, None)
                self._seen.add(identity)
            last, self.last_id = order, stream_id

    # -- this host's records ---------------------------------------------------------------------

    def local(self, rec: Record, t_ns: int, identity: str) -> None:
        """A record of this host (this process or another on the same usage file), from its journal."""
        generation = identity.rpartition(":")[0]
        self.local_generations.add(generation)
        if identity not in self._seen and identity not in self._overlay:
            self._overlay[identity] = (rec, t_ns)
            self._merged = None

    def forget(self, generations: set[str]) -> None:
        """Only `generations` are still on disk: identities of the others cannot come back."""
        self.local_generations = set(generations)
        self._seen = {i for i in self._seen if i.rpartition(":")[0] in generations}

    def view(self) -> Ledger:
        """The stream's ledger with this host's records it does not show yet."""
        if not self._overlay:
            return self.ledger
        if self._merged is None:
            merged = copy.deepcopy(self.ledger)
            for rec, t_ns in sorted(self._overlay.values(), key=lambda entry: entry[1]):
                self.apply(merged, rec, t_ns)
            self._merged = merged
        return self._merged


def decoded(stream_id: Any, fields: dict[Any, Any]) -> Pulled | None:
    identity, line = fields.get(b"id"), fields.get(b"r")
    entry = journal.decode(line) if isinstance(line, bytes) else None
    if entry is None or not isinstance(identity, bytes):
        log.warning("usage stream: skipped a damaged entry %s", stream_id)
        return None
    sid = stream_id.decode() if isinstance(stream_id, bytes) else str(stream_id)
    return sid, identity.decode("utf-8", "replace"), entry[0], entry[1]


def _unconfirmed(answer: Any) -> None:
    """The push at a request's end failed: the record waits in the journal for the next fold."""
