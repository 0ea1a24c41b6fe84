"""The directory one gunicorn run shares among its workers: metrics files, the session key, recent refusals.

gunicorn's workers are separate processes, replaced at will (a crash, a SIGHUP). What they must agree on lives
in one private directory (mode 0700) that the master creates when it starts (`prepare`, from the `on_starting`
hook), that every worker finds through the environment it inherits, and that the master removes when it exits:

* `metrics/` (`PROMETHEUS_MULTIPROC_DIR`): prometheus_client's multiprocess files, fresh for every run (the
  files of an earlier run would be added to this one's counters). When a worker exits the master marks it
  dead (`worker_gone`): that drops its live gauges (its requests in flight) and keeps its counters, so a sum
  over the workers never goes back when one is replaced.
* `session.key`: 32 random bytes that sign the status page's session cookies, so that a cookie one worker
  made is accepted by every other. A new run makes a new key: people sign in again after a restart, and the
  key is never kept anywhere else.
* `refusals.log`: the last requests a limit refused, appended to by every worker (see `refusals.py`).

`ccm-wsgi serve` is one process and needs none of this: it keeps all three in memory.

Nothing here imports prometheus_client at module level: the master sets the environment before any worker
imports it (prometheus_client picks its storage when it is first imported).
"""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile

ENV = "CCM_SHARED_DIR"
METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SESSION_KEY = "session.key"
REFUSALS = "refusals.log"


def prepare(base: str | None = None) -> str:
    """In the gunicorn master, before the first worker starts: a new private directory for this run, exported
    to the workers; `base` is where to make it (the system's temporary directory by default)."""
    path = tempfile.mkdtemp(prefix="ccm-wsgi-", dir=base)
    metrics = os.path.join(path, "metrics")
    os.mkdir(metrics, 0o700)
    fd = os.open(os.path.join(path, SESSION_KEY), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, secrets.token_bytes(32))
    finally:
        os.close(fd)
    os.environ[ENV] = path
    os.environ[METRICS_ENV] = metrics
    return path


def worker_gone(pid: int) -> None:
    """In the gunicorn master, when it reaped worker `pid`: its requests in flight no longer count."""
    metrics = os.environ.get(METRICS_ENV)
    if metrics and os.environ.get(ENV):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics)


def remove() -> None:
    """In the gunicorn master, when it exits: the run's directory goes."""
    path = os.environ.pop(ENV, None)
    os.environ.pop(METRICS_ENV, None)
    if path:
        shutil.rmtree(path, ignore_errors=True)


def forget() -> None:
    """`ccm-wsgi serve` is one process and keeps everything in memory, whatever its environment says."""
    os.environ.pop(ENV, None)
    os.environ.pop(METRICS_ENV, None)


def shared(name: str) -> str | None:
    """Where `name` is in this run's shared directory; None outside a gunicorn run (`serve`)."""
    path = os.environ.get(ENV)
    return os.path.join(path, name) if path else None


def multiprocess_dir() -> str | None:
    """The directory of the workers' metrics files; None when metrics stay in this process's memory."""
    return os.environ.get(METRICS_ENV) if os.environ.get(ENV) else None
