"""gunicorn settings for ccm-wsgi (`gunicorn -c conf/gunicorn.conf.py ccm_wsgi.wsgi:app`, config in CCM_CONFIG).

The gevent worker keeps hundreds of streams per worker; timeouts suit 10-minute streams; a worker
that exits (restart, SIGTERM) saves its usage first.
"""

import os

bind = os.environ.get("CCM_BIND", "127.0.0.1:8080")
workers = int(os.environ.get("CCM_WORKERS", "2"))
worker_class = "gevent"
worker_connections = 4096
backlog = 4096
timeout = 120  # heartbeat of the gevent worker, not a request timeout
graceful_timeout = 630  # let a 10-minute stream finish on SIGTERM/SIGHUP
keepalive = 75
accesslog = None  # ccm-wsgi writes its own access line (user, tokens, cost)
errorlog = "-"
preload_app = False  # each worker builds its own pools and usage saver after the fork


def worker_exit(server, worker):
    from ccm_wsgi import wsgi

    wsgi.shutdown()
