#!/usr/bin/env python3
"""`ccm-wsgi serve` with the CPU time of each step at the end of a request counted, for `steps.sh`.

    steps.py CONFIG OUT      # serves CONFIG; each SIGUSR1 appends the counts so far to OUT as one JSON line

The steps are the functions that usage tracking and limits add to a request (reading the response's usage,
the record, the journal append, the metrics; the limits' checks before forwarding, the per-user headers and
the lease's release) and the ones around them, each wrapped to add its thread CPU time (`time.thread_time_ns`,
the kernel's part included) and calls to a table, and the garbage collector's runs per generation (timed
from `gc.callbacks`). None of them switches greenlets, so the time counted is that step's own. The wrapper
costs well under a microsecond per call.
"""

from __future__ import annotations

import gc
import json
import signal
import sys
import time
from collections import defaultdict
from typing import Any

counts: defaultdict[str, list[int]] = defaultdict(lambda: [0, 0])  # name -> [ns, calls]


def timed(name: str, func: Any) -> Any:
    def step(*args: Any, **kwargs: Any) -> Any:
        start = time.thread_time_ns()
        try:
            return func(*args, **kwargs)
        finally:
            entry = counts[name]
            entry[0] += time.thread_time_ns() - start
            entry[1] += 1
    return step


def main() -> None:
    config, out = sys.argv[1], sys.argv[2]
    from gevent import monkey

    monkey.patch_all()  # what `ccm-wsgi serve` does first
    from ccm_wsgi.observe import rundir

    rundir.forget()
    from ccm_wsgi.accounting import store
    from ccm_wsgi.http import proxy, relay, server
    from ccm_wsgi.observe import metrics

    steps = [(proxy.Proxy, "_whole"), (proxy.Proxy, "_finish"), (relay.JSONTap, "finish"),
             (store.UsageStore, "record"), (store.UsageStore, "save"), (metrics.Metrics, "finished")]
    if hasattr(proxy.Proxy, "_tap"):  # older code: a tap for every counted response
        steps.append((proxy.Proxy, "_tap"))
    try:
        from ccm_wsgi.accounting import appender

        steps.append((appender.Appender, "append"))
    except ImportError:  # older code (CCM_BASE): the append was a method of the store
        steps.append((store.UsageStore, "_append_shared"))
    try:
        from ccm_wsgi.limits import engine

        steps += [(engine.Limits, "admit"), (engine.Limits, "screen"), (engine.Limits, "headers"),
                  (engine.Admission, "release")]
    except ImportError:  # older code: no limits
        pass
    for owner, name in steps:
        setattr(owner, name, timed(f"{owner.__name__}.{name}", getattr(owner, name)))
    for name in ("make_record", "access_line", "body_usage"):
        if hasattr(proxy, name):
            setattr(proxy, name, timed(name, getattr(proxy, name)))
    collecting = [0]

    def collection(phase: str, info: dict[str, int]) -> None:  # the garbage collector's runs, per generation
        if phase == "start":
            collecting[0] = time.thread_time_ns()
        else:
            entry = counts[f"gc generation {info['generation']}"]
            entry[0] += time.thread_time_ns() - collecting[0]
            entry[1] += 1

    gc.callbacks.append(collection)

    def dump(*_: Any) -> None:
        with open(out, "a") as f:
            f.write(json.dumps(counts) + "\n")

    signal.signal(signal.SIGUSR1, dump)
    sys.exit(server.run(config))


if __name__ == "__main__":
    main()
