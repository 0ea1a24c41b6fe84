"""Requests in flight and requests per minute across every node (the `Counters` of a service with Redis state).

* In flight: a sorted set of leases per user, scored by when each lease expires (Redis's own clock). A
  lease lives LEASE_SECONDS and this node renews the leases it holds every RENEW_SECONDS, so a stream of
  any length keeps its slot while a node that dies (SIGKILL, power loss) gives its slots back by itself
  within LEASE_SECONDS. Expired leases are dropped by whoever looks next.
* Per minute: a sorted set of admission times per user; the sliding minute is Redis's clock too, so
  nodes with skewed clocks still count one minute.
* Waiting for a slot, first come first served across nodes: a request that finds none joins the user's
  queue (a sorted set by arrival) and takes a slot only when fewer requests are ahead of it than slots are
  free, so a newcomer never overtakes a waiter. A slot given back wakes the waiters it frees (a push on each
  one's own list, which it waits on with BLPOP: no polling). A waiter says it is alive every ALIVE_SECONDS
  (when its BLPOP times out it asks again); one that stops (its node died) is dropped from the queue.
* Taking a lease (or a place in the queue) and counting the minute are one Lua script, one round trip,
  which goes with the request's other reads (see `connection.py`): a request refused for its rate leaves
  the queue and holds no lease, and a request refused for concurrency never counts.

While Redis is unreachable each node counts on its own (`MemoryCounters`), loudly: a user then gets up
to their limit per node, not per cluster, until Redis is back.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import time
from collections.abc import Callable
from typing import Any

import gevent

from ..limits.counters import Lease, MemoryCounters
from .connection import TIMEOUT, Pipeline, SharedState, Unavailable, client, ignore

LEASE_SECONDS = 15.0
RENEW_SECONDS = 5.0
ALIVE_SECONDS = 1.0  # a waiter asks again at least this often; one silent for three times as long is gone

# Keys of a user: leases, minute, queue (waiters by arrival), alive (waiters by when they count as gone).
# What Redis's clock says, in ms, and the helpers both scripts use.
COMMON = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function drop_gone(queue, alive)
  for _, m in ipairs(redis.call('ZRANGEBYSCORE', alive, '-inf', now)) do
    redis.call('ZREM', queue, m)
    redis.call('ZREM', alive, m)
  end
end
local function wake(leases, queue, most, prefix, ms)
  local free = most - redis.call('ZCARD', leases)
  if free > 0 then
    for _, m in ipairs(redis.call('ZRANGE', queue, 0, free - 1)) do
      redis.call('RPUSH', prefix .. m, 1)
      redis.call('PEXPIRE', prefix .. m, ms)
    end
  end
end
"""

# KEYS: leases, minute, queue, alive. ARGV: most (0: no limit), member, lease ms, per minute (0: no limit),
# queue (1: join the queue when no slot is free), alive ms, wake-list prefix.
# Returns {1 when a lease is held (or none was asked), ms to wait before the rate allows one (0: counted)}.
TAKE = COMMON + """
local most, member, lease, per_minute = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local queue, alive, prefix = KEYS[3], KEYS[4], ARGV[7]
local function leave()
  redis.call('ZREM', queue, member)
  redis.call('ZREM', alive, member)
  redis.call('DEL', prefix .. member)
end
if most > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
  drop_gone(queue, alive)
  local ahead = redis.call('ZRANK', queue, member) or redis.call('ZCARD', queue)
  if redis.call('ZCARD', KEYS[1]) + ahead >= most then
    if ARGV[5] == '1' then
      redis.call('ZADD', queue, 'NX', now, member)
      redis.call('ZADD', alive, now + 3 * tonumber(ARGV[6]), member)
      redis.call('PEXPIRE', queue, lease)
      redis.call('PEXPIRE', alive, lease)
    else
      leave()
    end
    return {0, 0}
  end
end
if per_minute > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - 60000)
  local n = redis.call('ZCARD', KEYS[2])
  if n >= per_minute then
    local oldest = redis.call('ZRANGE', KEYS[2], n - per_minute, n - per_minute, 'WITHSCORES')
    if most > 0 then
      leave()
      wake(KEYS[1], queue, most, prefix, lease)
    end
    return {1, math.max(1, tonumber(oldest[2]) + 60000 - now)}
  end
  redis.call('ZADD', KEYS[2], now, member)
  redis.call('PEXPIRE', KEYS[2], 60000)
end
if most > 0 then
  leave()
  redis.call('ZADD', KEYS[1], now + lease, member)
  redis.call('PEXPIRE', KEYS[1], lease)
  wake(KEYS[1], queue, most, prefix, lease)
end
return {1, 0}
"""

# KEYS: leases, minute, queue, alive. ARGV: member, most, wake-list prefix, lease ms, refund (1: the request
# was refused after all: its minute is given back too). Gives back a lease or a place in the queue, and wakes
# the waiters the freed slot lets in.
GIVE_BACK = COMMON + """
local member = ARGV[1]
redis.call('ZREM', KEYS[1], member)
redis.call('ZREM', KEYS[3], member)
redis.call('ZREM', KEYS[4], member)
redis.call('DEL', ARGV[3] .. member)
if ARGV[5] == '1' then redis.call('ZREM', KEYS[2], member) end
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
drop_gone(KEYS[3], KEYS[4])
wake(KEYS[1], KEYS[3], tonumber(ARGV[2]), ARGV[3], tonumber(ARGV[4]))
return 1
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
        self._take = state.script(TAKE)
        self._give_back = state.script(GIVE_BACK)
        self._renew = state.script(RENEW)
        self._waiting = client(state.url, timeout=ALIVE_SECONDS + TIMEOUT)  # BLPOP holds its connection
        self._ids = itertools.count(1)
        self._held: dict[int, tuple[str, str]] = {}  # lease key -> (lease set, member)
        self._renewer: gevent.Greenlet | None = None

    def _keys(self, user: str) -> list[str]:
        return [self.state.key("limits", user, part) for part in ("leases", "minute", "queue", "alive")]

    def admit(self, user: str, most: int | None, per_minute: int | None, wait: float, now: float,
              check: Callable[[], None]) -> tuple[Lease | None, float]:
        deadline = time.monotonic() + wait
        keys = self._keys(user)
        key = next(self._ids)
        member = f"{self.state.node}:{key}"
        prefix = self.state.key("limits", user, "wake") + ":"
        lease_ms = int(LEASE_SECONDS * 1000)

        def take(pipe: Pipeline, queue: bool) -> Any:
            args: list[str | int] = [most or 0, member, lease_ms, per_minute or 0, int(queue),
                                     int(ALIVE_SECONDS * 1000), prefix]
            return self._take.add(pipe, keys, args)

        def give_back(refund: bool) -> None:
            args: list[str | int] = [member, most or 0, prefix, lease_ms, int(refund)]
            self.state.later(lambda pipe: self._give_back.add(pipe, keys, args))

        try:
            held, wait_ms = self.state.now("admitting a request", lambda pipe: take(pipe, wait > 0))
        except Unavailable:
            return self.local.admit(user, most, per_minute, wait, now, check)
        try:
            check()  # with the answers read in the same trip (a budget); refusing gives back what was taken
        except BaseException:
            give_back(refund=True)
            raise
        while True:
            if wait_ms:
                return None, wait_ms / 1000
            if held:
                if not most:
                    return None, 0.0
                self._held[key] = (keys[0], member)
                self._start_renewing()
                return Lease(user, most, key), 0.0
            left = deadline - time.monotonic()
            if left <= 0:
                give_back(refund=False)  # out of the queue
                return None, 0.0
            try:
                self.state.run("waiting for a slot", functools.partial(self._wait, prefix + member, left))
                held, wait_ms = self.state.now("admitting a request", lambda pipe: take(pipe, True))
            except Unavailable:
                return self.local.admit(user, most, per_minute, max(0.0, deadline - time.monotonic()), now,
                                        lambda: None)

    def _wait(self, wake: str, left: float, _: Any) -> Any:
        """Until a slot given back wakes this waiter, or ALIVE_SECONDS (it then says it is still there)."""
        return self._waiting.blpop([wake], min(left, ALIVE_SECONDS))

    def release(self, lease: Lease) -> None:
        held = self._held.pop(lease.key, None)
        if held is None:
            self.local.release(lease)  # taken while Redis was unreachable
            return
        leases, member = held
        keys = [leases, *self._keys(lease.user)[1:]]
        prefix = self.state.key("limits", lease.user, "wake") + ":"
        args: list[str | int] = [member, lease.most, prefix, int(LEASE_SECONDS * 1000), 0]
        self.state.later(lambda pipe: self._give_back.add(pipe, keys, args), ignore)  # else it expires

    def in_flight(self, user: str) -> int:
        leases = self._keys(user)[0]
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
            held = list(self._held.values())
            if not held:
                break
            args: list[str | int] = [int(LEASE_SECONDS * 1000), *(member for _, member in held)]
            # when Redis cannot be reached they expire: requests keep running, Redis recounts once it is back
            with contextlib.suppress(Unavailable):
                self.state.now("renewing leases", functools.partial(self._renew.add, keys=[s for s, _ in held],
                                                                    args=args))
        self._renewer = None

    def close(self) -> None:
        renewer, self._renewer = self._renewer, None
        if renewer is not None:
            renewer.kill(block=False)
        with contextlib.suppress(Exception):
            self._waiting.close()
