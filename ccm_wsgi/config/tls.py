"""The `tls` objects: inbound (a ccm service's listener) and outbound (TLS to an http proxy).

Both take sing-box's field names. What Python's ssl module cannot do is refused with the reason,
unless it is switched off (null, false, empty or `{"enabled": false}`). Certificate files must be
readable when TLS is enabled, so that a typo shows in `ccm-wsgi check` rather than at the first
handshake. The config never imports `ssl` at module level: under gevent, ssl must be imported after
monkey-patching, and the config is read before that.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, TypeVar

from pydantic import Field

from ..names import CLIENT_AUTHENTICATION, OPENSSL_CIPHERS, TLS_VERSIONS
from .base import Problem, Reading, Section, fail, quote
from .values import Bool, FilePath, FilePaths, Pem, Str, Strings, each, plain, string, strings, unsupported

_NO_ECH = "Python's ssl module has no Encrypted Client Hello"
_NO_REALITY = "REALITY needs sing-box's own TLS stack"
_NO_KTLS = "kernel TLS is not available through Python's ssl module"
_NO_FRAGMENT = "TLS fragmentation is not available through Python's ssl module"
_NO_CLIENT_CERT = "client certificates towards an HTTP proxy are not implemented"
_UNVERIFIED_CLIENT_AUTH = ("request", "require-any")


def tls_version(value: object) -> str:
    text = string(value)
    if text not in TLS_VERSIONS:
        fail(f"must be one of {', '.join(TLS_VERSIONS)}")
    return text


def openssl_has(cipher: str) -> bool:
    import ssl  # lazily: under gevent, ssl must be imported after monkey-patching, never by the config

    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(cipher)
    except ssl.SSLError:
        return False
    return True


def cipher_problem(suite: str) -> str | None:
    if suite not in OPENSSL_CIPHERS:
        return f"unknown cipher suite {quote(suite)} (use Go's names, e.g. TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256)"
    if OPENSSL_CIPHERS[suite] and not openssl_has(OPENSSL_CIPHERS[suite]):
        return f"cipher suite {quote(suite)} is not available in this Python's OpenSSL"
    return None


def alpn(peer: str) -> object:
    """Only HTTP/1.1 is served (and spoken to proxies), so only `http/1.1` may be offered."""

    def check(protocol: str) -> str | None:
        if protocol == "h2":
            return (f"HTTP/2 is not served: ccm-wsgi speaks HTTP/1.1 only with {peer}; "
                    'use ["http/1.1"] or leave alpn out')
        if protocol != "http/1.1":
            return f'unsupported protocol {quote(protocol)} (only "http/1.1")'
        return None

    return each(check)


def client_authentication(value: object) -> str:
    text = string(value)
    if text in _UNVERIFIED_CLIENT_AUTH:
        fail(f"{quote(text)} is not supported by ccm-wsgi (Python's ssl module verifies every client "
             "certificate it accepts); use verify-if-given or require-and-verify")
    if text not in CLIENT_AUTHENTICATION:
        fail(f"must be one of {', '.join(CLIENT_AUTHENTICATION)}")
    return text


def readable(path: str) -> str | None:
    """Why the file at `path` cannot be read now, or None."""
    try:
        with open(path, "rb") as file:
            file.read(1)
    except OSError as exc:
        return f"cannot read {quote(path)}: {exc.strerror or exc}"
    return None


TlsVersion = Annotated[str, plain(tls_version)]
ClientAlpn = Annotated[tuple[str, ...], plain(strings), alpn("clients")]
ProxyAlpn = Annotated[tuple[str, ...], plain(strings), alpn("proxies")]
ClientAuthentication = Annotated[str, plain(client_authentication)]
CipherSuites = Annotated[tuple[str, ...], plain(strings), each(cipher_problem)]


class _TLS(Section):
    """What inbound and outbound `tls` share."""

    enabled: Bool = Field(default=False, description="TLS is used only when true")
    server_name: Str = Field(
        default="", description="inbound: the only SNI name served; outbound: the name sent and verified")
    min_version: TlsVersion = Field(default="", description="1.0, 1.1, 1.2 or 1.3")
    max_version: TlsVersion = Field(default="", description="1.0, 1.1, 1.2 or 1.3")
    cipher_suites: CipherSuites = Field(default=(), description="Go's names of the TLS 1.0-1.2 suites allowed")
    certificate: Pem = Field(default="", description="inline PEM (a string or a list of lines)")
    certificate_path: FilePath = Field(default="", description="a PEM file")
    curve_preferences: Strings = Field(default=(), description="accepted for sing-box compatibility; not used")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if self.min_version and self.max_version and (
                list(TLS_VERSIONS).index(self.min_version) > list(TLS_VERSIONS).index(self.max_version)):
            yield Problem(("min_version",), "must not be above max_version")

    def _pem_source(self, read: Reading, inline: str, path: str, *, required: bool) -> Iterator[Problem]:
        """Inline PEM or a file for one certificate or key: not both; readable now when TLS is enabled; a
        `required` item needs one of the two (unless one was given but invalid)."""
        text, file = getattr(self, inline), getattr(self, path)
        if text and file:
            yield Problem((path,), f"{inline} and {path} are mutually exclusive")
        elif file and self.enabled:
            problem = readable(file)
            if problem:
                yield Problem((path,), problem)
        elif required and self.enabled and not text and read.valid(inline, path):
            yield Problem((path,), f"required (or {inline}) when TLS is enabled")


class InboundTLS(_TLS):
    """TLS on a ccm service's listener."""

    alpn: ClientAlpn = Field(
        default=(), description='only "http/1.1" (HTTP/2 is not served)')
    key: Pem = Field(default="", description="inline PEM private key (a string or a list of lines)")
    key_path: FilePath = Field(default="", description="a PEM private key file")
    client_authentication: ClientAuthentication = Field(
        default="no", description="no, verify-if-given or require-and-verify")
    client_certificate: Pem = Field(default="", description="inline PEM of the CAs that sign client certificates")
    client_certificate_path: FilePaths = Field(
        default=(), description="PEM files of the CAs that sign client certificates")
    acme: Annotated[object, unsupported(
        "no ACME client; obtain a certificate elsewhere and use certificate_path and key_path")] = None
    ech: Annotated[object, unsupported(_NO_ECH)] = None
    reality: Annotated[object, unsupported(_NO_REALITY)] = None
    kernel_tx: Annotated[object, unsupported(_NO_KTLS)] = None
    kernel_rx: Annotated[object, unsupported(_NO_KTLS)] = None
    client_certificate_public_key_sha256: Annotated[object, unsupported(
        "client certificates are verified against client_certificate(_path) only")] = None

    def relations(self, read: Reading) -> Iterator[Problem]:
        yield from super().relations(read)
        yield from self._pem_source(read, "certificate", "certificate_path", required=True)
        yield from self._pem_source(read, "key", "key_path", required=True)
        unreadable = list(self._unreadable_client_cas(read)) if self.enabled else []
        yield from unreadable
        has_ca = bool(self.client_certificate or (self.client_certificate_path and not unreadable))
        if self.client_authentication != "no" and not has_ca and self.enabled:
            yield Problem(("client_certificate_path",), f"required (or client_certificate) with "
                                                        f"client_authentication {quote(self.client_authentication)}")
        elif self.client_authentication == "no" and has_ca:
            yield Problem(("client_authentication",), "client certificates are configured but never asked for; "
                                                      "set verify-if-given or require-and-verify")

    def _unreadable_client_cas(self, read: Reading) -> Iterator[Problem]:
        """Each given path that cannot be read, also beside an item that is not a path (reported already)."""
        given = read.given.get("client_certificate_path")
        listed = isinstance(given, list)
        for index, file in enumerate(given if isinstance(given, list) else [given]):
            problem = readable(file) if isinstance(file, str) and file and "\0" not in file else None
            if problem:
                yield Problem(("client_certificate_path", index) if listed else ("client_certificate_path",), problem)


class OutboundTLS(_TLS):
    """TLS to an http proxy (an `https://` proxy)."""

    alpn: ProxyAlpn = Field(
        default=(), description='only "http/1.1"')
    insecure: Bool = Field(default=False, description="accept any certificate of the proxy")
    disable_sni: Bool = Field(default=False, description="send no server name (it is still verified)")
    utls: Annotated[object, unsupported("Python's ssl module cannot imitate another client's TLS fingerprint")] = None
    reality: Annotated[object, unsupported(_NO_REALITY)] = None
    ech: Annotated[object, unsupported(_NO_ECH)] = None
    fragment: Annotated[object, unsupported(_NO_FRAGMENT)] = None
    fragment_fallback_delay: Annotated[object, unsupported(_NO_FRAGMENT)] = None
    record_fragment: Annotated[object, unsupported(_NO_FRAGMENT)] = None
    certificate_public_key_sha256: Annotated[object, unsupported(
        "public key pinning is not implemented; use certificate or certificate_path")] = None
    client_certificate: Annotated[object, unsupported(_NO_CLIENT_CERT)] = None
    client_certificate_path: Annotated[object, unsupported(_NO_CLIENT_CERT)] = None
    client_key: Annotated[object, unsupported(_NO_CLIENT_CERT)] = None
    client_key_path: Annotated[object, unsupported(_NO_CLIENT_CERT)] = None

    def relations(self, read: Reading) -> Iterator[Problem]:
        yield from super().relations(read)
        yield from self._pem_source(read, "certificate", "certificate_path", required=False)


TLS = TypeVar("TLS", InboundTLS, OutboundTLS)


def if_enabled(tls: TLS | None) -> TLS | None:
    """A `tls` object that is not enabled stands for no TLS."""
    return tls if tls is not None and tls.enabled else None
