"""When a PEM certificate is valid: its `notBefore` and `notAfter`, read from the DER itself.

The standard library loads certificates into a context but does not say when one expires (outside a handshake),
and the X.509 validity is easy to reach: Certificate ::= SEQUENCE { tbsCertificate SEQUENCE { [0] version
OPTIONAL, serialNumber, signature, issuer, validity SEQUENCE { notBefore, notAfter }, ... }, ... }, each time a
UTCTime (YYMMDDHHMMSSZ, years 1950-2049) or a GeneralizedTime (YYYYMMDDHHMMSSZ).
"""

from __future__ import annotations

import re
import ssl
from datetime import datetime, timezone

PEM_BLOCK = re.compile(r"-----BEGIN CERTIFICATE-----.+?-----END CERTIFICATE-----", re.S)
UTC_TIME, GENERALIZED_TIME, SEQUENCE, VERSION = 0x17, 0x18, 0x30, 0xA0


class CertificateError(ValueError):
    """Not a PEM certificate this reader understands."""


def _element(der: bytes, offset: int) -> tuple[int, int, int]:
    """(tag, start of the content, end of the content) of the DER element at `offset`."""
    if offset + 2 > len(der):
        raise CertificateError("truncated certificate")
    tag, length, start = der[offset], der[offset + 1], offset + 2
    if length & 0x80:
        count = length & 0x7F
        if not 0 < count <= 4 or start + count > len(der):
            raise CertificateError("bad length in certificate")
        length, start = int.from_bytes(der[start:start + count], "big"), start + count
    if start + length > len(der):
        raise CertificateError("truncated certificate")
    return tag, start, start + length


def _time(der: bytes, offset: int) -> tuple[datetime, int]:
    tag, start, end = _element(der, offset)
    text = der[start:end].decode("ascii", "replace")
    if tag == UTC_TIME and re.fullmatch(r"\d{12}Z", text):
        year = int(text[:2])
        text = f"{year + (1900 if year >= 50 else 2000)}{text[2:]}"
    elif not (tag == GENERALIZED_TIME and re.fullmatch(r"\d{14}Z", text)):
        raise CertificateError("unexpected time in certificate")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=timezone.utc), end


def validity(pem: str) -> tuple[datetime, datetime]:
    """(notBefore, notAfter) of the first certificate in `pem` (the leaf of a chain)."""
    block = PEM_BLOCK.search(pem)
    if block is None:
        raise CertificateError("no PEM certificate found")
    try:
        der = ssl.PEM_cert_to_DER_cert(block.group())
    except ValueError as exc:
        raise CertificateError(f"not a PEM certificate ({exc})") from None
    tag, start, _ = _element(der, 0)  # Certificate
    if tag != SEQUENCE:
        raise CertificateError("not an X.509 certificate")
    tag, offset, _ = _element(der, start)  # tbsCertificate
    if tag != SEQUENCE:
        raise CertificateError("not an X.509 certificate")
    if der[offset] == VERSION:
        offset = _element(der, offset)[2]
    for _ in range(3):  # serialNumber, signature, issuer
        offset = _element(der, offset)[2]
    tag, start, _ = _element(der, offset)
    if tag != SEQUENCE:
        raise CertificateError("no validity in certificate")
    not_before, after = _time(der, start)
    not_after, _ = _time(der, after)
    return not_before, not_after
