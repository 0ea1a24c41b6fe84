"""The host's limit counters (gunicorn's workers share them in one SQLite file): workers that start at the
same instant on a new file all start (SQLite tells one of two such openers "locked" at once, without waiting;
a worker that gave up there would take the whole gunicorn down with "Worker failed to boot")."""

from __future__ import annotations

import multiprocessing
import queue
from pathlib import Path

from ccm_wsgi.limits.counters import HostCounters

WORKERS = 6
ROUNDS = 10


def _worker(path: str, start: multiprocessing.synchronize.Barrier, out: multiprocessing.Queue[str]) -> None:
    start.wait(timeout=30)
    try:
        counters = HostCounters(path)
        lease = counters.acquire("alice", WORKERS, 5.0)
        out.put("lease" if lease is not None else "no lease")
    except Exception as exc:  # reported to the test, which names it
        out.put(repr(exc))


def test_workers_opening_a_new_counts_file_together_all_start(tmp_path: Path) -> None:
    spawn = multiprocessing.get_context("spawn")  # fresh interpreters, as gunicorn's workers are fresh processes
    for round_ in range(ROUNDS):
        path = str(tmp_path / f"limits-{round_}.sqlite")
        start, out = spawn.Barrier(WORKERS), spawn.Queue()
        workers = [spawn.Process(target=_worker, args=(path, start, out)) for _ in range(WORKERS)]
        for worker in workers:
            worker.start()
        try:
            answers = [out.get(timeout=60) for _ in workers]
        except queue.Empty:
            answers = ["no answer"]
        for worker in workers:
            worker.join(timeout=30)
        assert answers == ["lease"] * WORKERS, f"round {round_}: {answers}"
        assert HostCounters(path).in_flight("alice") == WORKERS  # one file: every worker's lease is in it
