"""Inbound TLS: an `ssl.SSLContext` built from the sing-box `tls` object, reloaded when files change.

Only HTTP/1.1 is served, so only `http/1.1` is advertised through ALPN (sing-box 1.13 advertises h2
and then cannot speak it). Certificate and key files are polled; when either changes, the chain is
loaded into the same context, so new connections get the new certificate without a restart.
"""

from __future__ import annotations

import logging
import os
import ssl
import tempfile
from typing import Any

import gevent

from .config import openssl_cipher_list

log = logging.getLogger("ccm_wsgi.tls")

VERSIONS = {
    "1.0": ssl.TLSVersion.TLSv1, "1.1": ssl.TLSVersion.TLSv1_1,
    "1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3,
}
CLIENT_AUTH = {"no": ssl.CERT_NONE, "verify-if-given": ssl.CERT_OPTIONAL, "require-and-verify": ssl.CERT_REQUIRED}
POLL_SECONDS = 2.0


def _load_chain(ctx: ssl.SSLContext, cfg: Any) -> None:
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


def server_context(cfg: Any) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    if cfg.min_version:
        ctx.minimum_version = VERSIONS[cfg.min_version]
    if cfg.max_version:
        ctx.maximum_version = VERSIONS[cfg.max_version]
    ciphers = openssl_cipher_list(cfg.cipher_suites)
    if ciphers:  # TLS 1.3 suites cannot be chosen this way (OpenSSL always enables them)
        ctx.set_ciphers(ciphers)
    ctx.set_alpn_protocols(["http/1.1"])
    ctx.verify_mode = CLIENT_AUTH.get(cfg.client_authentication or "no", ssl.CERT_NONE)
    if cfg.client_certificate:
        ctx.load_verify_locations(cadata=cfg.client_certificate)
    for path in cfg.client_certificate_path:
        ctx.load_verify_locations(cafile=path)
    if cfg.server_name:
        ctx.sni_callback = _sni_checker(cfg.server_name)
    _load_chain(ctx, cfg)
    return ctx


def _sni_checker(server_name: str) -> Any:
    def check(sock: ssl.SSLObject, name: str | None, ctx: ssl.SSLContext) -> int | None:
        if name and name.lower() != server_name.lower():
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        return None

    return check


def _stamp(paths: list[str]) -> tuple[Any, ...]:
    stamp = []
    for path in paths:
        try:
            st = os.stat(path)
            stamp.append((st.st_ino, st.st_mtime_ns, st.st_size))
        except OSError:
            stamp.append(None)
    return tuple(stamp)


def watch(ctx: ssl.SSLContext, cfg: Any) -> gevent.Greenlet | None:
    """Reload the certificate files into `ctx` whenever they change; None when nothing is a file."""
    paths = [p for p in (cfg.certificate_path, cfg.key_path) if p]
    if not paths:
        return None

    def loop() -> None:
        last = _stamp(paths)
        while True:
            gevent.sleep(POLL_SECONDS)
            now = _stamp(paths)
            if now == last:
                continue
            last = now
            try:
                _load_chain(ctx, cfg)
            except (OSError, ssl.SSLError) as exc:
                # e.g. the certificate landed before its key: the next change of either file retries
                log.error("TLS certificate reload failed (keeping the old one): %s", exc)
                continue
            log.info("TLS certificate reloaded from %s", cfg.certificate_path or cfg.key_path)

    return gevent.spawn(loop)
