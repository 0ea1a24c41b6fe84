"""A graceful stop: what the server layer and the request handler share about the requests in flight.

Once a stop begins (SIGTERM to `ccm-wsgi serve`, or a gunicorn worker told to exit) no new request is
started: one that arrives on a kept-alive connection is refused without reaching the upstream, with
`Connection: close`, and every response still running ends its connection when it is done. When the
grace period is over, the relays still running are cut, and each is recorded as a partial stream (its
usage journaled, its access line written) before the process exits, exactly like a stream the client or
the upstream cut.
"""

from __future__ import annotations

import logging
import weakref
from typing import Protocol

log = logging.getLogger("ccm_wsgi.server")

SHUTDOWN = "shutdown"


class Cuttable(Protocol):
    def cut_short(self, reason: str) -> None: ...


class Drain:
    def __init__(self) -> None:
        self.draining = False
        self.active = 0  # requests inside the application (streams included)
        self._relays: weakref.WeakSet[Cuttable] = weakref.WeakSet()

    def begin(self) -> None:
        self.draining = True

    def track(self, relay: Cuttable) -> None:
        self._relays.add(relay)

    def cut(self) -> int:
        """Cut every response still running; each records what it used. Returns how many were cut."""
        relays = list(self._relays)
        for relay in relays:
            try:
                relay.cut_short(SHUTDOWN)
            except Exception:
                log.exception("cutting a response at shutdown failed")
        return len(relays)
