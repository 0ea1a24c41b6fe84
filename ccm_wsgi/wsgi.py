"""`ccm_wsgi.wsgi:app` for gunicorn (gevent worker): the service named by `CCM_SERVICE` in `CCM_CONFIG`.

Importing this module is cheap and patches nothing: `conf/gunicorn.conf.py` imports it in the
gunicorn master to read the config (bind address, TLS, grace period) and to fail fast on a bad one.
The service itself is built on first access to `app`, which gunicorn does in each worker after the
fork and after the gevent worker has monkey-patched, so every worker has its own connection pools,
its own usage saver greenlet and its own certificate watcher. Workers share the credential file
(refresh under a file lock: one refresh for all of them) and the usage file (journal + locked fold:
exact totals), so they stay consistent. `conf/gunicorn.conf.py` calls `shutdown()` when a worker
exits, which saves usage.

`CCM_USAGE_SAVE_INTERVAL` (seconds, default 60) changes how often each worker folds its usage into
the file; records are durable in the journal either way.

The master also keeps what its workers share on the host in a private directory (`host_state`): the
config it checked (workers read that copy, never a file that changed after the check) and the limits'
counters (requests in flight and per minute of each user, for the whole host). gunicorn's HUP runs the
config file again in the master: a new config that passes `check` replaces the copy and new workers
start with it; one that fails is refused, logged, and the new workers start with the running one.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import config as config_mod

if TYPE_CHECKING:
    from flask import Flask

    from .service import Service

STOP_POLL = 0.1  # seconds between looks at whether gunicorn told the worker to stop
LISTENER_CLOSE = 1.5  # seconds gunicorn's gevent worker may still accept after being told to stop
HOST_STATE = "CCM_HOST_STATE"  # the master's directory for what its workers share (set by the master)
SNAPSHOT = "CCM_CONFIG_SNAPSHOT"  # the config the master checked, in that directory
_built: tuple[Service, Flask] | None = None


class ConfigProblem(Exception):
    """The config cannot be served; `lines` say why, one problem per line."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def load_config(path: str | None = None) -> tuple[config_mod.Config, config_mod.Service]:
    """The whole config and the service to serve (`CCM_SERVICE`), from `path`, else the master's checked
    copy, else `CCM_CONFIG` (else the embedded default)."""
    path = path or os.environ.get(SNAPSHOT) or os.environ.get("CCM_CONFIG")
    try:
        cfg = config_mod.load(path) if path else config_mod.default_config()
    except config_mod.ConfigError as exc:
        raise ConfigProblem(list(exc.problems)) from None
    wanted = os.environ.get("CCM_SERVICE")
    services = [s for s in cfg.services if not wanted or s.tag == wanted]
    if not services:
        raise ConfigProblem([f"CCM_SERVICE={wanted!r}: no ccm service with that tag in {path}"])
    if len(services) > 1:
        tags = ", ".join(s.tag for s in services)
        raise ConfigProblem([f"{path} has several ccm services ({tags}): set CCM_SERVICE to one of their tags"])
    return cfg, services[0]


def host_state() -> str:
    """The master's private directory (mode 0700, in memory where the host has a runtime directory) for what
    its workers share; made once per master and kept across HUP."""
    state = os.environ.get(HOST_STATE, "")
    owner = os.path.join(state, "master.pid")
    try:
        with open(owner) as f:
            if int(f.read()) == os.getpid():
                return state
    except (OSError, ValueError):
        pass
    from .files import runtime_dir

    state = tempfile.mkdtemp(prefix="gunicorn-", dir=runtime_dir())
    with open(os.path.join(state, "master.pid"), "w") as f:
        f.write(str(os.getpid()))
    os.environ[HOST_STATE] = state
    os.environ.pop(SNAPSHOT, None)
    return state


def master_config() -> tuple[config_mod.Config, config_mod.Service]:
    """In the gunicorn master, at start and on every HUP: the config of `CCM_CONFIG`, checked, and kept as
    the copy its workers read. On HUP, a config that fails is refused (each problem on standard error) and
    the running one stays; at start it raises ConfigProblem."""
    source = os.environ.get("CCM_CONFIG")
    if not source:
        return load_config()  # the embedded default: nothing to re-read
    state = host_state()
    snapshot = os.path.join(state, "config.json")
    staged = snapshot + ".new"
    try:
        with open(source, "rb") as f:
            raw = f.read()
    except OSError:
        staged = source  # load_config says why it cannot be read
    else:
        from .files import replace_atomically

        replace_atomically(staged, raw, 0o600)
    try:
        chosen = load_config(staged)
    except ConfigProblem as problem:
        running = os.environ.get(SNAPSHOT)
        if running is None:
            raise
        for line in problem.lines:
            sys.stderr.write(f"ccm-wsgi: reload refused, the running config stays: {line}\n")
        return load_config(running)
    os.replace(staged, snapshot)
    os.environ[SNAPSHOT] = snapshot
    return chosen


def limit_counters(service: config_mod.Service) -> str | None:
    """Where the workers of this master count the limits of `service` (None: not under gunicorn, or the
    service counts cluster-wide on its shared state, which already spans the workers)."""
    state = os.environ.get(HOST_STATE)
    return os.path.join(state, f"limits-{service.tag}.sqlite") if state and service.state is None else None


def worker_gone(pid: int) -> None:
    """In the master, when a worker ended: the requests it held in flight are over."""
    state = os.environ.get(HOST_STATE)
    if not state:
        return
    from .limits.counters import HostCounters

    for name in os.listdir(state):
        if name.startswith("limits-") and name.endswith(".sqlite"):
            HostCounters.forget(os.path.join(state, name), pid)


def master_exit() -> None:
    """In the master, when gunicorn stops: its directory goes."""
    state = os.environ.get(HOST_STATE)
    if state and os.path.exists(os.path.join(state, "master.pid")):
        shutil.rmtree(state, ignore_errors=True)


def _build() -> tuple[Service, Flask]:
    from . import assemble, logs
    from .accounting.store import SAVE_INTERVAL
    from .limits.counters import HostCounters

    try:
        cfg, service_cfg = load_config()
    except ConfigProblem as exc:
        raise SystemExit("invalid config:\n" + str(exc)) from None
    logs.setup(cfg.log)
    interval = float(os.environ.get("CCM_USAGE_SAVE_INTERVAL") or SAVE_INTERVAL)
    counters = limit_counters(service_cfg)
    service, app = assemble.service(cfg, service_cfg, save_interval=interval,
                                    counters=HostCounters(counters) if counters else None,
                                    shared=os.environ.get(HOST_STATE))
    service.start()
    logging.getLogger("ccm_wsgi.server").info("service %s ready in worker %d", service.tag, os.getpid())
    return service, app


def __getattr__(name: str) -> Any:
    """`app` and `service`, built on first use (in the worker, after the fork)."""
    global _built
    if name not in ("app", "service"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _built is None:
        _built = _build()
    return _built[0] if name == "service" else _built[1]


def drain_when_stopping(alive: Callable[[], bool]) -> None:
    """In a worker (a greenlet started by `post_worker_init`): once gunicorn tells the worker to stop, refuse
    new requests and, when `shutdown_grace` is over, cut the responses still running so that they are
    recorded before the master's SIGKILL (its `graceful_timeout` is set a few seconds later).

    gunicorn's gevent worker stops accepting within a second of being told (it looks once a second), and a
    connection accepted meanwhile was meant for this worker (a HUP's new workers are already serving): its
    request is served, and its connection closed after it (`post_request`). Refusing starts after that."""
    import gevent

    while alive():
        gevent.sleep(STOP_POLL)
    if _built is None:
        return
    service = _built[0]
    gevent.sleep(LISTENER_CLOSE)
    service.drain.begin()
    gevent.sleep(max(0.0, service.cfg.shutdown_grace - LISTENER_CLOSE))
    cut = service.drain.cut()
    if cut:
        logging.getLogger("ccm_wsgi.server").warning(
            "grace period of %gs over: cut %d response(s) still in flight", service.cfg.shutdown_grace, cut)


def shutdown() -> None:
    """Save usage (a worker exits); nothing to do where the service was never built."""
    if _built is not None:
        _built[0].close()
