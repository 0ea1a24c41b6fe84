"""`ccm_wsgi.wsgi:app` for gunicorn (gevent worker): the service named by `CCM_SERVICE` in `CCM_CONFIG`.

gunicorn's gevent worker monkey-patches before it imports this module, so every worker builds its
own service here: its own pools, its own usage saver greenlet. Workers share the credential file
(refresh under a file lock) and the usage file (journal + locked fold), so they stay consistent.
`conf/gunicorn.conf.py` calls `shutdown()` when a worker exits, which saves usage.
"""

from __future__ import annotations

import os

from . import config as config_mod
from . import logs
from .app import create_app
from .outbounds import Outbounds
from .service import Service


def _load() -> tuple[Service, object]:
    path = os.environ.get("CCM_CONFIG")
    try:
        cfg = config_mod.load(path) if path else config_mod.default_config()
    except config_mod.ConfigError as exc:
        raise SystemExit("invalid config:\n" + "\n".join(exc.problems)) from None
    logs.setup(cfg.log)
    wanted = os.environ.get("CCM_SERVICE")
    services = [s for s in cfg.services if not wanted or s.tag == wanted]
    if not services:
        raise SystemExit(f"CCM_SERVICE={wanted!r}: no ccm service with that tag in {path}")
    if len(services) > 1:
        raise SystemExit(f"{path} has several ccm services: set CCM_SERVICE to one of their tags")
    service = Service(services[0], Outbounds(cfg.outbounds))
    service.start()
    return service, create_app(service)


service, app = _load()


def shutdown() -> None:
    service.close()
