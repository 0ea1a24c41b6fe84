"""One ccm service assembled from the typed config: the same for `ccm-wsgi serve` and for a gunicorn worker.

Both entry points call `service()` after gevent's monkey-patching; it installs the library patches
(`patches.py`), builds the runtime objects (`Service`: credentials, pools, usage stores, the proxy) and the
WSGI application that serves them.
"""

from __future__ import annotations

from flask import Flask

from . import config, patches
from .accounting.store import SAVE_INTERVAL
from .http.app import create_app
from .limits.counters import Counters
from .service import Service
from .upstream.outbounds import Outbounds


def service(cfg: config.Config, service_cfg: config.Service, outbounds: Outbounds | None = None,
            save_interval: float = SAVE_INTERVAL, counters: Counters | None = None,
            shared: str | None = None) -> tuple[Service, Flask]:
    """`counters`: where the limits count requests (default: in this process); `shared`: the directory this
    process shares with the other workers of a gunicorn master (None: `serve`, everything in memory)."""
    patches.install()
    built = Service(service_cfg, outbounds or Outbounds(cfg.outbounds), save_interval, counters, shared)
    return built, create_app(built)
