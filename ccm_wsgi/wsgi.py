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
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from . import config as config_mod

if TYPE_CHECKING:
    from flask import Flask

    from .service import Service

STOP_POLL = 0.1  # seconds between looks at whether gunicorn told the worker to stop
_built: tuple[Service, Flask] | None = None


class ConfigProblem(Exception):
    """The config cannot be served; `lines` say why, one problem per line."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


def load_config() -> tuple[config_mod.Config, config_mod.Service]:
    """The whole config and the service to serve, from `CCM_CONFIG` and `CCM_SERVICE`."""
    path = os.environ.get("CCM_CONFIG")
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


def _build() -> tuple[Service, Flask]:
    from . import assemble, logs
    from .accounting.store import SAVE_INTERVAL

    try:
        cfg, service_cfg = load_config()
    except ConfigProblem as exc:
        raise SystemExit("invalid config:\n" + str(exc)) from None
    logs.setup(cfg.log)
    interval = float(os.environ.get("CCM_USAGE_SAVE_INTERVAL") or SAVE_INTERVAL)
    service, app = assemble.service(cfg, service_cfg, save_interval=interval)
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
    new requests at once and, when `shutdown_grace` is over, cut the responses still running so that they
    are recorded before the master's SIGKILL (its `graceful_timeout` is set a few seconds later)."""
    import gevent

    while alive():
        gevent.sleep(STOP_POLL)
    if _built is None:
        return
    service = _built[0]
    service.drain.begin()
    gevent.sleep(service.cfg.shutdown_grace)
    cut = service.drain.cut()
    if cut:
        logging.getLogger("ccm_wsgi.server").warning(
            "grace period of %gs over: cut %d response(s) still in flight", service.cfg.shutdown_grace, cut)


def shutdown() -> None:
    """Save usage (a worker exits); nothing to do where the service was never built."""
    if _built is not None:
        _built[0].close()
