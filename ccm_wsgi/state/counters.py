"""Requests in flight and requests per minute across every node (the `Counters` of a service with Redis state).

* In flight: a sorted set of leases per user, scored by when each lease expires (Redis's own clock). A
  lease lives LEASE_SECONDS and this node renews the leases it holds every RENEW_SECONDS, so a stream of
  any length keeps its slot while a node that dies (SIGKILL, power loss) gives its slots back by itself
  within LEASE_SECONDS. Expired leases are dropped by whoever looks next.
* Per minute: a sorted set of admission times per user; the sliding minute is Redis's clock too, so
  nodes with skewed clocks still count one minute.
* Taking a lease and counting the minute are one Lua script, one round trip: a request refused for its
  rate gives its lease back in the same script, and a request refused for concurrency never counts.

While Redis is unreachable each node counts on its own (`MemoryCounters`), loudly: a user then gets up
to their limit per node, not per cluster, until Redis is back.
"""

from __future__ import annotations

import contextlib
import itertools
import time
from typing import Any

import gevent

from ..limits.counters import POLL, Lease, MemoryCounters
from .connection import SharedState, Unavailable

LEASE_SECONDS = 15.0
RENEW_SECONDS = 5.0
MINUTE_MS = 60_000

# KEYS: leases, hits. ARGV: most (0: no limit), member, lease ms, per minute (0: no limit), hit member.
# Returns {1 when a lease is held (or none was asked), ms to wait before the rate allows one (0: counted)}.
TAKE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local most, per_minute = tonumber(ARGV[1]), tonumber(ARGV[4])
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  if redis.call('ZCARD', KEYS[1]) >= most then return {0, 0} end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  local n = redis.call('ZCARD', KEYS[2])
  if n >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], n - per_minute, n - per_minute, 'WITHSCORES')
    return {1, math.max(1, tonumber(oldest[2]) + 60000 - now)}
  end
  redis.call('ZADD', KEYS[2], now, ARGV[5])
  redis.call('PEXPIRE', KEYS[2], 60000)
end
if most > 0 then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[3]))
end
return {1, 0}
"""

# KEYS: lease sets; ARGV: lease ms, then one member per key. Pushes back the expiry of the leases still held.
RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ms = tonumber(ARGV[1])
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', 'CH', now + ms, ARGV[i + 1]) == 1 then redis.call('PEXPIRE', key, ms) end
end
return 1
"""


class RedisCounters:
    """`Counters` on Redis, with this node's `MemoryCounters` while Redis is unreachable."""

    def __init__(self, state: SharedState):
        self.state = state
        self.local = MemoryCounters()
        self._take = state.redis.register_script(TAKE)
        self._renew = state.redis.register_script(RENEW)
        self._ids = itertools.count(1)
        self._held: dict[int, tuple[str, str]] = {}  # lease key -> (lease set, member)
        self._renewer: gevent.Greenlet | None = None

    def _keys(self, user: str) -> tuple[str, str]:
        return self.state.key("limits", user, "leases"), self.state.key("limits", user, "minute")

    def admit(self, user: str, most: int | None, per_minute: int | None, wait: float,
              now: float) -> tuple[Lease | None, float]:
        deadline = time.monotonic() + wait
        leases, hits = self._keys(user)
        key = next(self._ids)
        member = f"{self.state.node}:{key}"
        args: list[str | int] = [most or 0, member, int(LEASE_SECONDS * 1000), per_minute or 0, member]
        while True:
            try:
                held, wait_ms = self.state.run("admitting a request", lambda r: self._take([leases, hits], args))
            except Unavailable:
                return self.local.admit(user, most, per_minute, max(0.0, deadline - time.monotonic()), now)
            if wait_ms:
                return None, wait_ms / 1000
            if held:
                if not most:
                    return None, 0.0
                self._held[key] = (leases, member)
                self._start_renewing()
                return Lease(user, most, key), 0.0
            if time.monotonic() >= deadline:
                return None, 0.0
            gevent.sleep(POLL)

    def release(self, lease: Lease) -> None:
        held = self._held.pop(lease.key, None)
        if held is None:
            self.local.release(lease)  # taken while Redis was unreachable
            return
        leases, member = held
        self.state.defer(lambda pipe: pipe.zrem(leases, member), _ignore)  # or it expires by itself

    def in_flight(self, user: str) -> int:
        leases, _ = self._keys(user)
        try:
            return int(self.state.run("counting leases", lambda r: r.zcount(leases, time.time() * 1000, "+inf")))
        except Unavailable:
            return self.local.in_flight(user)

    def _start_renewing(self) -> None:
        if self._renewer is None:
            self._renewer = gevent.spawn(self._renew_held)

    def _renew_held(self) -> None:
        while self._held:
            gevent.sleep(RENEW_SECONDS)
            # when Redis cannot be reached they expire: requests keep running, Redis recounts once it is back
            with contextlib.suppress(Unavailable):
                self.state.run("renewing leases", self._renew_all)
        self._renewer = None

    def _renew_all(self, _: Any) -> Any:
        held = list(self._held.values())
        args: list[str | int] = [int(LEASE_SECONDS * 1000), *(member for _, member in held)]
        return self._renew([leases for leases, _ in held], args)

    def close(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.kill(block=False)


def _ignore(_: Any) -> None:
    """A lease that could not be given back expires by itself within LEASE_SECONDS."""
