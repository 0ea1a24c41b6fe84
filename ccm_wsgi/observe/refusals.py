"""The last requests a limit refused, for the status page: when, whose, which limit, what status.

The access log has them too (`refused(<limit>)`), but it may go to a journal or a remote syslog that a page
cannot read, so the proxy also notes each refusal here. `ccm-wsgi serve` is one process and keeps the last
ones in memory. gunicorn's workers append one JSON line per refusal to one file in the run's shared
directory (a single `O_APPEND` write, so lines never interleave), so that whichever worker renders the page
shows everyone's; the file is cut back to its newest lines when it grows past `MAX_BYTES`. Nothing a client
chose is kept: the user is a configured name and the limit one of the limits' own names.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from typing import Protocol

from .. import files
from .rundir import REFUSALS

log = logging.getLogger("ccm_wsgi.observe")

KEPT = 50  # refusals a page can show
MAX_BYTES = 64 * 1024  # the shared file is cut back to its last KEPT lines past this size
LINE_MAX = 512


@dataclass(frozen=True, slots=True)
class Refused:
    at: float  # Unix time
    user: str
    limit: str
    status: int


class Recent(Protocol):
    def add(self, refused: Refused) -> None: ...

    def last(self) -> list[Refused]:
        """The newest refusals, oldest first (at most KEPT)."""
        ...


class MemoryRecent:
    def __init__(self) -> None:
        self._ring: collections.deque[Refused] = collections.deque(maxlen=KEPT)

    def add(self, refused: Refused) -> None:
        self._ring.append(refused)

    def last(self) -> list[Refused]:
        return list(self._ring)


class SharedRecent:
    """One file that every worker of a gunicorn run appends to."""

    def __init__(self, path: str):
        self.path = path

    def add(self, refused: Refused) -> None:
        line = (json.dumps(asdict(refused), separators=(",", ":")) + "\n").encode()
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.write(fd, line)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > MAX_BYTES:
                self._cut_back()
        except OSError as exc:  # the page then misses this one; the access log still has it
            log.warning("cannot note a refusal in %s: %s", self.path, exc.strerror)

    def _cut_back(self) -> None:
        """Keep the newest lines (a worker appending meanwhile may lose its line to the rename: a page entry)."""
        kept = b"".join(json.dumps(asdict(r), separators=(",", ":")).encode() + b"\n" for r in self.last())
        files.replace_atomically(self.path, kept, 0o600)

    def last(self) -> list[Refused]:
        try:
            with open(self.path, "rb") as f:
                f.seek(max(0, os.fstat(f.fileno()).st_size - KEPT * LINE_MAX))
                data = f.read()
        except FileNotFoundError:
            return []
        found: list[Refused] = []
        for line in data.splitlines()[-KEPT:]:
            with contextlib.suppress(ValueError, TypeError, KeyError):
                raw = json.loads(line)
                found.append(Refused(float(raw["at"]), str(raw["user"]), str(raw["limit"]), int(raw["status"])))
        return found


def recent(shared: str | None) -> Recent:
    """In the directory the workers of a gunicorn master share, else in this process's memory."""
    return SharedRecent(os.path.join(shared, REFUSALS)) if shared else MemoryRecent()
