"""Logging set-up from the config's `log` object (sing-box levels mapped onto Python's)."""

from __future__ import annotations

import logging
import sys
from typing import TYPE_CHECKING

from .names import LOG_LEVELS

if TYPE_CHECKING:
    from .config import LogConfig

# sing-box's levels (as the config normalised them), most verbose first, onto Python's
PYTHON_LEVELS = dict(zip(LOG_LEVELS, (logging.DEBUG, logging.DEBUG, logging.INFO, logging.WARNING, logging.ERROR,
                                      logging.CRITICAL, logging.CRITICAL), strict=True))


def setup(cfg: LogConfig) -> None:
    root = logging.getLogger("ccm_wsgi")
    for old in list(root.handlers):
        root.removeHandler(old)
    root.propagate = False
    if cfg.disabled:
        root.addHandler(logging.NullHandler())
        root.setLevel(logging.CRITICAL + 1)
        return
    handler: logging.Handler = logging.FileHandler(cfg.output) if cfg.output else logging.StreamHandler(sys.stderr)
    fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s" if cfg.timestamp else "%(levelname)s %(name)s: %(message)s"
    handler.setFormatter(logging.Formatter(fmt))
    root.addHandler(handler)
    root.setLevel(PYTHON_LEVELS[cfg.level])
