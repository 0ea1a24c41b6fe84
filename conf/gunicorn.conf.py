"""gunicorn settings for ccm-wsgi: `CCM_CONFIG=/etc/ccm-wsgi/config.json gunicorn -c conf/gunicorn.conf.py
ccm_wsgi.wsgi:app`. With several ccm services in the config, `CCM_SERVICE` picks one.

The config is read here, in the master, so a bad one stops gunicorn at once with the same lines as
`ccm-wsgi check`, and the service's own settings apply as with `ccm-wsgi serve`:

* bind: the service's `listen` and `listen_port` (`-b` on the command line or `CCM_BIND` win);
* TLS: the service's `tls` object (the same context, ALPN `http/1.1` only, certificate files
  reloaded when they change), through gunicorn's `ssl_context` hook, in every worker;
* graceful shutdown: each worker refuses new requests as soon as it is told to stop, lets its responses
  run for `shutdown_grace`, then cuts and records the ones still running; gunicorn's `graceful_timeout`
  is a few seconds longer, so its SIGKILL never comes before the records are written.

Timeouts and long streams: gunicorn never limits a request's duration with the gevent worker (its
`timeout` is a heartbeat the worker sends from its own greenlet, however long the responses are), so a
10-minute stream runs to its end; the upstream side is bounded by the service's `response_timeout`
and `stream_idle_timeout`. On SIGTERM (and on SIGHUP, which replaces the workers) a worker stops
accepting, lets its streams finish for up to `shutdown_grace` (set it to "10m" to let the longest
ones end) and then runs `worker_exit`, which saves usage. SIGINT and SIGQUIT are gunicorn's fast
shutdown: streams are cut, usage is still saved.

Each worker builds its own service after the fork (`preload_app = False`): its own pools, its own
usage saver greenlet, its own certificate watcher. They share the credential file (one refresh for
all, under a file lock), the usage file (journal + locked fold: totals stay exact) and the limits'
counts, in a private directory of the master (so "2 at a time" means 2 on the host). The same directory
holds the workers' metrics files (a scrape of any worker shows the sums over all of them, a replaced
worker's counts included), the key that signs the status page's cookies (a cookie one worker made is
good on every other) and the last refusals the page lists.

Reload: `kill -HUP <master>` runs this file again. A config that passes `ccm-wsgi check` is copied for
the new workers, which gunicorn starts at once; the old ones finish their requests (as on SIGTERM:
up to `shutdown_grace`) and exit. Everything in the config applies, listener and credentials included.
A config that fails is refused (the problems on standard error) and the new workers run the old one.
"""

import contextlib
import os
import socket
import sys

from ccm_wsgi import wsgi as _ccm  # reads the config only; nothing is patched or built in the master
from ccm_wsgi.observe import rundir as _rundir  # imports nothing else: prometheus_client is imported later

try:
    _config, _service = _ccm.master_config()  # on HUP: a bad config is refused and the running one stays
except _ccm.ConfigProblem as _problem:
    sys.stderr.write("ccm-wsgi: invalid config:\n" + "\n".join(_problem.lines) + "\n")
    raise SystemExit(1) from None


def _address(host, port):
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


bind = [os.environ.get("CCM_BIND") or _address(_service.listen, _service.listen_port)]
workers = int(os.environ.get("CCM_WORKERS", "2"))
worker_class = "gevent"
worker_connections = 4096  # streams per worker: each one is a greenlet
backlog = 4096
timeout = 120  # heartbeat of the worker process (see above), not a request timeout
STOP_MARGIN = 5  # seconds for a worker to record its cut responses and save usage after shutdown_grace
graceful_timeout = max(1, round(_service.shutdown_grace)) + STOP_MARGIN
keepalive = 5  # idle keep-alive connections delay a graceful stop by at most this long
max_requests = 0  # never recycle a worker in the middle of someone's stream
preload_app = False
http_protocols = "h1"  # newer gunicorn could offer h2 through ALPN; only HTTP/1.1 is served (as serve)
control_socket_disable = True  # newer gunicorn: no control socket under $HOME (a service user has none)
accesslog = None  # ccm-wsgi writes its own access line (user, tokens, cost) to the error log
errorlog = "-"
proc_name = f"ccm-wsgi[{_service.tag}]"

if _service.tls is not None:
    # gunicorn turns TLS on when `certfile` is set and checks that the file exists; the context
    # itself comes from `ssl_context` below (inline PEM included), so any existing file will do.
    certfile = _service.tls.certificate_path or os.environ.get("CCM_CONFIG")
    keyfile = _service.tls.key_path or None

    def ssl_context(conf, default_ssl_context_factory):
        """In the worker, once its service is built: the context the service watches and reports on."""
        return _ccm.service.tls


def post_request(worker, req, environ, resp):
    """A response that was in flight when the worker was told to stop: close its connection now
    instead of waiting `keepalive` seconds for a next request that will not be served."""
    if not worker.alive:
        sock = environ.get("gunicorn.socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def post_worker_init(worker):
    """In the worker, with its service built: follow gunicorn's stop (see `wsgi.drain_when_stopping`), and leave
    what was built out of the garbage collector's full collections (it lasts as long as the worker)."""
    import gc

    import gevent

    gevent.spawn(sys.modules["ccm_wsgi.wsgi"].drain_when_stopping, lambda: worker.alive)
    gc.freeze()


def on_starting(server):
    """In the master, once, before the first worker: the metrics files' directory and the session key."""
    _rundir.prepare(_ccm.host_state())


def child_exit(server, worker):
    """In the master, when a worker ended (even killed): the requests it held in flight no longer count (its
    counts in the metrics stay)."""
    _ccm.worker_gone(worker.pid)
    _rundir.worker_gone(worker.pid)


def on_exit(server):
    _ccm.master_exit()


def worker_exit(server, worker):
    """In the worker, after it stopped serving: save usage (the journal already holds every record)."""
    module = sys.modules.get("ccm_wsgi.wsgi")
    if module is not None:
        module.shutdown()
