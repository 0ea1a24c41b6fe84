"""The connection to Redis: short timeouts, one health flag, one round trip before a request is forwarded and
one after it ends.

Every call goes through `SharedState.run()`. A connection error or timeout marks the state unhealthy and
raises `Unavailable`, which each caller answers with its local fallback; while unhealthy, calls fail at
once (no request waits for a timeout again) and a probe greenlet pings Redis every second. When it answers
again, the callbacks registered with `on_recovery()` run (records kept locally are merged, a login
refreshed meanwhile is published). The transitions are logged as errors and counted (`fallbacks`,
`outages`), for the status page and for metrics.

redis-py works over the standard `socket`, `ssl`, `threading` and `time` modules (hiredis, when installed,
only parses the replies it read), which gevent's monkey-patching makes cooperative: a command waiting for
Redis yields to the other greenlets (checked by tests/test_state.py, which keeps an answer back for a second
in one greenlet while another one runs).

A request talks to Redis at most twice, and never waits for Redis after it was forwarded:

* before it is forwarded, inside `batch()`: reads whose answers can wait (`defer`: the usage stream's tail
  for a budget, a session's pin) are queued, and go out in one pipeline with the first command whose answer
  is needed at once (`now`: the admission script), or when one of their answers is needed (`flush`), or
  when the block ends;
* after it ends, `later()` hands its commands (a lease given back, its usage record) to this process's one
  sender greenlet, which puts everything handed to it since its last pipeline into the next one, and sends
  at most one pipeline per LINGER: under load, many requests share one round trip (group commit). Nobody
  waits for it: what it carries is either durable elsewhere (a usage record is in the journal first, and a
  fold pushes what Redis did not confirm) or expires by itself (a lease).

Scripts are sent by their SHA-1 alone (EVALSHA); a Redis that does not know them (it restarted) answers
NOSCRIPT, and they are loaded and those commands sent again. (redis-py's own pipelined scripts ask Redis
with SCRIPT EXISTS before every pipeline: one more round trip each time.)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.local
import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry

from ..config import RedisState

log = logging.getLogger("ccm_wsgi.state")

TIMEOUT = 1.0  # seconds for a connection or an answer: a slow Redis must not hold requests
PROBE_INTERVAL = 1.0  # seconds between pings while Redis is unreachable
LINGER = 0.005  # seconds between two pipelines of the sender at most, so that under load they carry more
FAILURES = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError)

T = TypeVar("T")
Pipeline = Any  # redis-py's pipeline (its type is generic over a response type it does not export)


class Unavailable(Exception):
    """Redis cannot be reached now; the caller falls back to local state."""


@dataclass(slots=True)
class Deferred:
    """A command queued for a pipeline: `add` puts it on the pipeline, `done` gets its answer (or the exception)."""

    add: Callable[[Pipeline], Any]
    done: Callable[[Any], None]


class Script:
    """A Lua script, run by its SHA-1 (see the module's docstring)."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def add(self, pipe: Pipeline, keys: Sequence[str], args: Sequence[str | int | float]) -> Any:
        return pipe.evalsha(self.sha, len(keys), *keys, *args)


def node_id() -> str:
    """This process among all nodes: host name, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def client(url: str, timeout: float | None = TIMEOUT) -> redis.Redis:
    """A client for `url` (redis://, rediss:// with TLS, unix://); one reconnect attempt per command, so a
    restarted Redis costs a request nothing."""
    return redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=TIMEOUT,
                                retry=Retry(NoBackoff(), 1), health_check_interval=30)


def ignore(_: Any) -> None:
    """For commands whose answer changes nothing (what they do expires by itself when they fail)."""


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
        self._scripts: list[Script] = []
        self._recovery: list[Callable[[], None]] = []
        self._probe: gevent.Greenlet | None = None
        self._local = gevent.local.local()
        self._outbox: list[Deferred] = []
        self._wake = gevent.event.Event()
        self._sender: gevent.Greenlet | None = None

    def key(self, *parts: str) -> str:
        return self.prefix + ":".join(parts)

    def script(self, source: str) -> Script:
        found = Script(source)
        self._scripts.append(found)
        return found

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

    # -- before forwarding: one pipeline -----------------------------------------------------------

    @contextlib.contextmanager
    def batch(self) -> Iterator[None]:
        """Commands deferred inside go out together: with the first `now()` or `flush()`, else at the end."""
        if getattr(self._local, "queue", None) is not None:
            yield
            return
        self._local.queue = []
        try:
            yield
        finally:
            queue, self._local.queue = self._local.queue, None
            self._send(queue, "reading before a request")

    def defer(self, add: Callable[[Pipeline], Any], done: Callable[[Any], None]) -> None:
        """Send one command (`add(pipeline)`) with the batch open in this greenlet, or now when there is none."""
        queue = getattr(self._local, "queue", None)
        if queue is None:
            self._send([Deferred(add, done)], "reading")
        else:
            queue.append(Deferred(add, done))

    def flush(self) -> None:
        """Send what this greenlet's batch holds now (an answer it holds is needed)."""
        queue = getattr(self._local, "queue", None)
        if queue:
            self._local.queue = []
            self._send(queue, "reading before a request")

    def now(self, what: str, add: Callable[[Pipeline], Any]) -> Any:
        """The answer to one command, sent at once with whatever this greenlet's batch holds; raises
        Unavailable (a script's own error is raised as it is)."""
        queue = getattr(self._local, "queue", None) or []
        if queue:
            self._local.queue = []
        answer: list[Any] = []
        self._send([*queue, Deferred(add, answer.append)], what)
        if isinstance(answer[0], BaseException):
            raise answer[0]
        return answer[0]

    # -- after a request: group commit ---------------------------------------------------------------

    def later(self, add: Callable[[Pipeline], Any], done: Callable[[Any], None] = ignore) -> None:
        """Hand one command to the sender greenlet (see the module's docstring); never waits."""
        self._outbox.append(Deferred(add, done))
        if self._sender is None:
            self._sender = gevent.spawn(self._send_outbox)
        else:
            self._wake.set()

    def _send_outbox(self) -> None:
        last = 0.0
        while True:
            while not self._outbox:
                self._wake.clear()
                self._wake.wait()
            pause = last + LINGER - time.monotonic()
            if pause > 0:  # the last pipeline left a moment ago: under load, the next one takes what comes
                gevent.sleep(pause)
            last = time.monotonic()
            queue, self._outbox = self._outbox, []
            self._send(queue, "sending what requests left")

    # -- pipelines -----------------------------------------------------------------------------------

    def _send(self, queue: list[Deferred], what: str) -> None:
        """One pipeline (two when Redis had to learn a script first); every `done` gets its answer."""
        if not queue:
            return
        try:
            answers = self.run(what, lambda r: self._execute(r, queue))
        except Unavailable as exc:
            answers = [exc] * len(queue)
        for item, answer in zip(queue, answers, strict=True):
            try:
                item.done(answer)
            except Exception:
                log.exception("shared state: handling an answer failed")

    def _execute(self, r: redis.Redis, queue: list[Deferred]) -> list[Any]:
        answers = _pipeline(r, queue)
        missing = [i for i, answer in enumerate(answers) if isinstance(answer, NoScriptError)]
        if missing:
            pipe = r.pipeline(transaction=False)
            for found in self._scripts:
                pipe.script_load(found.source)
            pipe.execute()
            for i, answer in zip(missing, _pipeline(r, [queue[i] for i in missing]), strict=True):
                answers[i] = answer
        return answers

    # -- status and shutdown ---------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """For the admin status: whether Redis is used right now, and how often it was not."""
        return {"type": "redis", "healthy": self.healthy, "outages": self.outages, "fallbacks": self.fallbacks,
                "down_since": self.down_since if not self.healthy else None,
                "error": self.last_error if not self.healthy else None}

    def close(self) -> None:
        """Send what requests left (if Redis answers), then stop."""
        queue, self._outbox = self._outbox, []
        self._send(queue, "sending what requests left")
        for attr in ("_probe", "_sender"):
            greenlet = getattr(self, attr)
            setattr(self, attr, None)
            if greenlet is not None:
                greenlet.kill(block=False)
        with contextlib.suppress(Exception):
            self.redis.close()


def _pipeline(r: redis.Redis, queue: list[Deferred]) -> list[Any]:
    pipe = r.pipeline(transaction=False)
    for item in queue:
        item.add(pipe)
    return list(pipe.execute(raise_on_error=False))
