"""The connection to Redis: short timeouts, one health flag, and one round trip per request end.

Every call goes through `SharedState.run()`. A connection error or timeout marks the state unhealthy and
raises `Unavailable`, which each caller answers with its local fallback; while unhealthy, calls fail at
once (no request waits for a timeout again) and a probe greenlet pings Redis every second. When it answers
again, the callbacks registered with `on_recovery()` run (records kept locally are merged, a login
refreshed meanwhile is published). The transitions are logged as errors and counted (`fallbacks`,
`outages`), for the status page and for metrics.

redis-py is pure Python over the standard `socket`, `ssl`, `threading` and `time` modules, which gevent's
monkey-patching makes cooperative: a command waiting for Redis yields to the other greenlets (checked by
tests/test_state_redis.py, which keeps Redis paused in one greenlet while another one runs).

`batch()` lets the end of a request send everything it has for Redis (a lease given back, a usage record)
in one pipeline: inside it, `defer()` queues commands instead of sending each at once.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import gevent.local
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..config import RedisState

log = logging.getLogger("ccm_wsgi.state")

TIMEOUT = 1.0  # seconds for a connection or an answer: a slow Redis must not hold requests
PROBE_INTERVAL = 1.0  # seconds between pings while Redis is unreachable
FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

T = TypeVar("T")


class Unavailable(Exception):
    """Redis cannot be reached now; the caller falls back to local state."""


@dataclass(slots=True)
class Deferred:
    """A command queued in a batch: `add` puts it on the pipeline, `done` gets its answer (or the exception)."""

    add: Callable[[Any], Any]
    done: Callable[[Any], None]


def node_id() -> str:
    """This process among all nodes: host name, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def client(url: str, timeout: float | None = TIMEOUT) -> redis.Redis:
    """A client for `url` (redis://, rediss:// with TLS, unix://); one reconnect attempt per command, so a
    restarted Redis costs a request nothing."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=TIMEOUT,
                                retry=Retry(NoBackoff(), 1), health_check_interval=30)


class SharedState:
    """One service's connection to Redis, its key prefix, and whether it is usable right now."""

    def __init__(self, cfg: RedisState, name: str):
        self.url = cfg.url
        self.prefix = cfg.key_prefix + name + ":"
        self.redis = client(cfg.url)
        self.node = node_id()
        self.healthy = True
        self.fallbacks = 0  # calls answered locally because Redis could not be reached
        self.outages = 0  # times Redis became unreachable
        self.down_since = 0.0
        self.last_error = ""
        self._recovery: list[Callable[[], None]] = []
        self._probe: gevent.Greenlet | None = None
        self._local = gevent.local.local()

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    # -- calls -----------------------------------------------------------------------------------

    def run(self, what: str, call: Callable[[redis.Redis], T]) -> T:
        """`call(client)`, or Unavailable (logged once per outage) when Redis cannot answer."""
        if not self.healthy:
            self.fallbacks += 1
            raise Unavailable(self.last_error)
        try:
            return call(self.redis)
        except FAILURES as exc:
            self.down(what, exc)
            self.fallbacks += 1
            raise Unavailable(self.last_error) from None

    def down(self, what: str, exc: BaseException) -> None:
        """Redis failed `what`: fall back to local state until the probe reaches it again."""
        self.last_error = f"{type(exc).__name__}: {exc}"
        if not self.healthy:
            return
        self.healthy = False
        self.outages += 1
        self.down_since = time.time()
        log.error("shared state: Redis unreachable (%s while %s); serving from this node's local state until it "
                  "is back", self.last_error, what)
        if self._probe is None:
            self._probe = gevent.spawn(self._wait_for_redis)

    def on_recovery(self, callback: Callable[[], None]) -> None:
        self._recovery.append(callback)

    def _wait_for_redis(self) -> None:
        while not self.healthy:
            gevent.sleep(PROBE_INTERVAL)
            try:
                self.redis.ping()
            except FAILURES as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                continue
            log.error("shared state: Redis is reachable again after %.0fs; merging what was kept locally",
                      time.time() - self.down_since)
            self.healthy = True
            self._probe = None
            for callback in self._recovery:
                try:
                    callback()
                except Unavailable:
                    pass  # down again: the next recovery runs it again
                except Exception:
                    log.exception("shared state: catching up after an outage failed")

    # -- one round trip at the end of a request ----------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commands deferred inside are sent together, in one pipeline, when the block ends."""
        outer = getattr(self._local, "queue", None)
        if outer is not None:
            yield
            return
        queue: list[Deferred] = []
        self._local.queue = queue
        try:
            yield
        finally:
            self._local.queue = None
            self._send(queue)

    def defer(self, add: Callable[[Any], Any], done: Callable[[Any], None]) -> None:
        """Send one command (`add(pipeline)`) now, or with the batch open in this greenlet."""
        queue = getattr(self._local, "queue", None)
        if queue is None:
            self._send([Deferred(add, done)])
        else:
            queue.append(Deferred(add, done))

    def _send(self, queue: list[Deferred]) -> None:
        if not queue:
            return

        def execute(r: redis.Redis) -> list[Any]:
            pipe = r.pipeline(transaction=False)
            for item in queue:
                item.add(pipe)
            return list(pipe.execute(raise_on_error=False))

        try:
            answers = self.run("sending " + ("a batch" if len(queue) > 1 else "a command"), execute)
        except Unavailable as exc:
            answers = [exc] * len(queue)
        for item, answer in zip(queue, answers, strict=True):
            try:
                item.done(answer)
            except Exception:
                log.exception("shared state: handling an answer failed")

    # -- status and shutdown ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For the admin status: whether Redis is used right now, and how often it was not."""
        return {"type": "redis", "healthy": self.healthy, "outages": self.outages, "fallbacks": self.fallbacks,
                "down_since": self.down_since if not self.healthy else None,
                "error": self.last_error if not self.healthy else None}

    def close(self) -> None:
        probe, self._probe = self._probe, None
        if probe is not None:
            probe.kill(block=False)
        with contextlib.suppress(Exception):
            self.redis.close()
