"""Inbound TLS: the sing-box `tls` object as a server context that follows certificate files.

* Versions, cipher suites (Go names, mapped to OpenSSL's), client authentication and the certificate
  and key (files or inline PEM) come from the config. TLS 1.3 suites cannot be chosen (OpenSSL always
  enables them, as Go does).
* ALPN: only HTTP/1.1 is served, so only `http/1.1` is advertised (sing-box 1.13 advertises h2 and
  then cannot speak it); the config loader refuses `h2`.
* `server_name`: a client that sends another name through SNI is refused with the TLS alert
  `unrecognized_name`; a client that sends no name (an IP address in its URL) is served.
* Reload: `certificate_path`, `key_path` and `client_certificate_path` are polled every
  `POLL_SECONDS`. On a change a whole new `SSLContext` is built from the files and, only if that
  succeeds, swapped in for new connections (connections already open keep theirs). Building a new
  context rather than loading into the live one matters: a certificate written before its key would
  otherwise leave the live context with a mismatched pair (OpenSSL drops the half that does not
  match) and every handshake would fail until the key lands; and a change of key type (RSA to ECDSA)
  would leave the old certificate in its slot, still served to some clients.

`ServerContext` is what gevent's servers (ours and gunicorn's gevent worker) need: a `wrap_socket`. It also
knows when the certificate it serves expires (`not_after`, for the metrics).
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from typing import TYPE_CHECKING, Any

import gevent

from ..certs import CertificateError, validity
from ..names import CLIENT_AUTHENTICATION, TLS_VERSIONS, openssl_cipher_list

if TYPE_CHECKING:
    from ..config import InboundTLS

log = logging.getLogger("ccm_wsgi.tls")

ALPN = ["http/1.1"]
POLL_SECONDS = 2.0


def _load_chain(ctx: ssl.SSLContext, cfg: InboundTLS) -> None:
    if cfg.certificate_path and cfg.key_path:
        ctx.load_cert_chain(cfg.certificate_path, cfg.key_path)
        return
    # Inline PEM (or one inline, one file): ssl wants files, so write private temp copies.
    with tempfile.TemporaryDirectory() as tmp:
        cert = cfg.certificate_path or _write(tmp, "cert.pem", cfg.certificate)
        key = cfg.key_path or _write(tmp, "key.pem", cfg.key)
        ctx.load_cert_chain(cert, key)


def _write(directory: str, name: str, text: str) -> str:
    path = os.path.join(directory, name)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text if text.endswith("\n") else text + "\n")
    return path


def build_context(cfg: InboundTLS) -> ssl.SSLContext:
    """A new server `SSLContext` from the `tls` config; raises OSError or ssl.SSLError."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cfg.min_version:
        ctx.minimum_version = ssl.TLSVersion[TLS_VERSIONS[cfg.min_version]]
    if cfg.max_version:
        ctx.maximum_version = ssl.TLSVersion[TLS_VERSIONS[cfg.max_version]]
    ciphers = openssl_cipher_list(cfg.cipher_suites)
    if ciphers:  # TLS 1.3 suites cannot be chosen this way (OpenSSL always enables them)
        ctx.set_ciphers(ciphers)
    ctx.set_alpn_protocols(ALPN)
    ctx.verify_mode = ssl.VerifyMode[CLIENT_AUTHENTICATION[cfg.client_authentication]]
    if cfg.client_certificate:
        ctx.load_verify_locations(cadata=cfg.client_certificate)
    for path in cfg.client_certificate_path:
        ctx.load_verify_locations(cafile=path)
    if cfg.server_name:
        ctx.sni_callback = _sni_checker(cfg.server_name)
    _load_chain(ctx, cfg)
    return ctx


def expiry(cfg: InboundTLS) -> float | None:
    """When the configured certificate expires (Unix time); None when it cannot be read as a certificate."""
    try:
        if cfg.certificate_path:
            with open(cfg.certificate_path, encoding="ascii", errors="replace") as f:
                pem = f.read()
        else:
            pem = cfg.certificate
        return validity(pem)[1].timestamp()
    except (OSError, CertificateError):
        return None


def _sni_checker(server_name: str) -> Any:
    def check(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
        if name and name.lower() != server_name.lower():
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    return check


class ServerContext:
    """Wraps accepted sockets with the newest context that loaded; `reload()` builds the next one."""

    def __init__(self, cfg: InboundTLS):
        self.cfg = cfg
        self.current = build_context(cfg)
        self.not_after = expiry(cfg)
        self.paths = [p for p in (cfg.certificate_path, cfg.key_path, *cfg.client_certificate_path) if p]
        self.watcher: gevent.Greenlet | None = None

    def wrap_socket(self, sock: Any, *args: Any, **kwargs: Any) -> Any:
        return self.current.wrap_socket(sock, *args, **kwargs)

    def __getattr__(self, name: str) -> Any:  # anything else a server may ask of an SSLContext
        if name == "current":  # not built (yet): no recursion
            raise AttributeError(name)
        return getattr(self.current, name)

    def reload(self) -> bool:
        """Swap in a context built from the files as they are now; keep the old one if that fails."""
        try:
            new = build_context(self.cfg)
        except (OSError, ssl.SSLError, ValueError) as exc:
            # e.g. the certificate landed before its key: the next change of either file retries
            log.error("TLS certificate reload failed (keeping the old one): %s", exc)
            return False
        self.current, self.not_after = new, expiry(self.cfg)
        log.info("TLS certificate reloaded from %s", self.cfg.certificate_path or self.cfg.key_path)
        return True

    def watch(self) -> gevent.Greenlet | None:
        """Poll the files and reload on every change; None when nothing comes from a file."""
        if not self.paths or self.watcher is not None:
            return self.watcher

        def loop() -> None:
            last = _stamp(self.paths)
            while True:
                gevent.sleep(POLL_SECONDS)
                now = _stamp(self.paths)
                if now != last:
                    last = now
                    self.reload()

        self.watcher = gevent.spawn(loop)
        return self.watcher


def server_context(cfg: InboundTLS) -> ServerContext:
    return ServerContext(cfg)


def _stamp(paths: list[str]) -> tuple[tuple[int, int, int, int] | None, ...]:
    stamp: list[tuple[int, int, int, int] | None] = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size, st.st_ctime_ns))
        except OSError:
            stamp.append(None)
    return tuple(stamp)
