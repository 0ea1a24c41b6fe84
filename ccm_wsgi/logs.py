"""Logging set-up from the config's `log` object (sing-box levels mapped onto Python's)."""

from __future__ import annotations

import logging
import sys
from typing import Any

LEVELS = {
    "trace": logging.DEBUG, "debug": logging.DEBUG, "info": logging.INFO, "warn": logging.WARNING,
    "warning": logging.WARNING, "error": logging.ERROR, "fatal": logging.CRITICAL, "panic": logging.CRITICAL,
}


def setup(cfg: Any) -> None:
    root = logging.getLogger("ccm_wsgi")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.propagate = False
    if cfg.disabled:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    handler: logging.Handler = logging.FileHandler(cfg.output) if cfg.output else logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if cfg.timestamp else "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(LEVELS.get(cfg.level, logging.INFO))
