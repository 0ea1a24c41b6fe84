"""Names that the config file and the runtime share, each declared once.

The config model checks a value against these; the runtime turns the same value into what a library
wants (a `logging` level, an `ssl.TLSVersion`, an OpenSSL cipher string). This module imports nothing:
the config is read in gunicorn's master and before gevent patches anything, so it must never pull in
`ssl`, `logging` handlers or the runtime packages.
"""

from __future__ import annotations

from collections.abc import Iterable

# sing-box's log levels, most verbose first; "warning" is read as "warn".
LOG_LEVELS = ("trace", "debug", "info", "warn", "error", "fatal", "panic")

# TLS versions as sing-box writes them -> the member name of Python's `ssl.TLSVersion`.
TLS_VERSIONS = {"1.0": "TLSv1", "1.1": "TLSv1_1", "1.2": "TLSv1_2", "1.3": "TLSv1_3"}

# Inbound `client_authentication` values ccm-wsgi can honour -> the `ssl.VerifyMode` member name. sing-box's
# "request" and "require-any" accept a certificate without checking it, which Python's ssl module cannot do.
CLIENT_AUTHENTICATION = {"no": "CERT_NONE", "verify-if-given": "CERT_OPTIONAL", "require-and-verify": "CERT_REQUIRED"}

# How a balancer picks a credential (sing-box also writes them with dashes).
STRATEGIES = ("least_used", "round_robin", "random", "fallback")

# Headers that describe one connection (RFC 9110 section 7.6.1 and the proxy ones): never forwarded,
# never configurable.
HOP_BY_HOP = frozenset((
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "trailers", "transfer-encoding", "upgrade",
))

# sing-box takes Go's crypto/tls cipher-suite names; this maps them to OpenSSL's, for `SSLContext.set_ciphers`.
# The TLS 1.3 suites map to "": like Go, ccm-wsgi cannot configure them (OpenSSL always enables them).
OPENSSL_CIPHERS = {
    "TLS_RSA_WITH_RC4_128_SHA": "RC4-SHA",
    "TLS_RSA_WITH_3DES_EDE_CBC_SHA": "DES-CBC3-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_CBC_SHA256": "AES128-SHA256",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_RC4_128_SHA": "ECDHE-ECDSA-RC4-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_RC4_128_SHA": "ECDHE-RSA-RC4-SHA",
    "TLS_ECDHE_RSA_WITH_3DES_EDE_CBC_SHA": "ECDHE-RSA-DES-CBC3-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA256": "ECDHE-ECDSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA256": "ECDHE-RSA-AES128-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_AES_128_GCM_SHA256": "",
    "TLS_AES_256_GCM_SHA384": "",
    "TLS_CHACHA20_POLY1305_SHA256": "",
}


def openssl_cipher_list(names: Iterable[str]) -> str:
    """Go cipher-suite names as an `SSLContext.set_ciphers` string ("" when only TLS 1.3 ones are named)."""
    return ":".join(c for c in (OPENSSL_CIPHERS.get(name, name) for name in names) if c)
