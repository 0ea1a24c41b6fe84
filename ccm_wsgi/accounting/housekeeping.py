"""Keeping a usage file's directory in order during a fold: a corrupt file is set aside, never overwritten,
and the temp files of folds or journal creations that were killed are removed."""

from __future__ import annotations

import logging
import os
import time

from .. import files
from .reading import UsageFileError


def set_aside(path: str, problem: str, log: logging.Logger) -> None:
    """Move the corrupt usage file `path` to `<path>.corrupt-<unix ts>` (kept byte for byte)."""
    stamp = int(time.time())
    target = f"{path}.corrupt-{stamp}"
    suffix = 0
    while os.path.lexists(target):
        suffix += 1
        target = f"{path}.corrupt-{stamp}-{suffix}"
    try:
        os.rename(path, target)
    except OSError as exc:
        message = f"usage file {path} is corrupt ({problem}) and cannot be moved aside: {exc.strerror}"
        raise UsageFileError(message) from None
    log.error("usage file %s is corrupt (%s); kept it as %s and started new totals", path, problem, target)
    files.fsync_dir(os.path.dirname(path) or ".")


def remove_stale_temps(path: str) -> None:
    """Temp files of folds or journal creations that were killed (call with both of the usage file's locks
    held: none is in use)."""
    directory = os.path.dirname(path) or "."
    base = os.path.basename(path)
    prefixes = (base + ".tmp-", base + ".journal.tmp-")
    try:
        names = os.listdir(directory)
    except OSError:
        return
    for name in names:
        if name.startswith(prefixes):
            files.unlink(os.path.join(directory, name))
