"""What gunicorn's workers share for the metrics and the status page, in the master's private directory.

gunicorn's workers are separate processes, replaced at will (a crash, a HUP). What they must agree on lives in
the directory the master keeps for its workers (`wsgi.host_state`, removed when the master exits); `prepare`
adds, once, before the first worker starts:

* `metrics/` (`PROMETHEUS_MULTIPROC_DIR`): prometheus_client's multiprocess files, fresh for every master (the
  files of an earlier run would be added to this one's counters). When a worker exits the master marks it dead
  (`worker_gone`): that drops its live gauges (its requests in flight) and keeps its counters, so a sum over
  the workers never goes back when one is replaced, a HUP included.
* `session.key`: 32 random bytes that sign the status page's session cookies, so that a cookie one worker made
  is accepted by every other. A new master makes a new key: people sign in again after a restart, and the key
  is never kept anywhere else.

The workers also note the last refusals there (`refusals.py`). `ccm-wsgi serve` is one process and keeps all of
it in memory (`forget`).

Nothing here imports prometheus_client at module level: the master sets the environment before any worker
imports it (prometheus_client picks its storage when it is first imported).
"""

from __future__ import annotations

import contextlib
import os
import secrets

METRICS_ENV = "PROMETHEUS_MULTIPROC_DIR"
SESSION_KEY = "session.key"
REFUSALS = "refusals.log"


def prepare(state: str) -> None:
    """In the gunicorn master, before the first worker starts: the metrics directory and the session key in the
    master's directory `state`, and the metrics directory in the environment the workers inherit."""
    metrics = os.path.join(state, "metrics")
    os.makedirs(metrics, 0o700, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        fd = os.open(os.path.join(state, SESSION_KEY), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, secrets.token_bytes(32))
        finally:
            os.close(fd)
    os.environ[METRICS_ENV] = metrics


def worker_gone(pid: int) -> None:
    """In the gunicorn master, when it reaped worker `pid`: its requests in flight no longer count."""
    metrics = os.environ.get(METRICS_ENV)
    if metrics:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics)


def forget() -> None:
    """`ccm-wsgi serve` is one process and keeps its metrics in memory, whatever its environment says."""
    os.environ.pop(METRICS_ENV, None)


def multiprocess_dir() -> str | None:
    """The directory of the workers' metrics files; None when the metrics stay in this process's memory."""
    return os.environ.get(METRICS_ENV) or None
