"""Response compression (gzip, deflate, br, zstd) with a flush per write, and Accept-Encoding negotiation."""

from __future__ import annotations

import zlib
from typing import Protocol

from .common import ENCODINGS, HttpError


class Encoder(Protocol):
    name: str

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class ZlibEncoder:
    """gzip (wbits 31) or zlib-wrapped deflate (wbits 15); every feed ends with a sync flush."""

    def __init__(self, name: str, wbits: int) -> None:
        self.name = name
        self._c = zlib.compressobj(6, zlib.DEFLATED, wbits)

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(zlib.Z_SYNC_FLUSH)

    def finish(self) -> bytes:
        return self._c.flush(zlib.Z_FINISH)


class BrotliEncoder:
    name = "br"

    def __init__(self) -> None:
        import brotli

        self._c = brotli.Compressor()

    def feed(self, data: bytes) -> bytes:
        return self._c.process(data) + self._c.flush()

    def finish(self) -> bytes:
        return self._c.finish()


class ZstdEncoder:
    name = "zstd"

    def __init__(self) -> None:
        import zstandard

        self._flush_block = zstandard.COMPRESSOBJ_FLUSH_BLOCK
        self._c = zstandard.ZstdCompressor().compressobj()

    def feed(self, data: bytes) -> bytes:
        return self._c.compress(data) + self._c.flush(self._flush_block)

    def finish(self) -> bytes:
        return self._c.flush()


def make_encoder(name: str) -> Encoder:
    if name == "gzip":
        return ZlibEncoder("gzip", 31)
    if name == "deflate":
        return ZlibEncoder("deflate", 15)
    if name == "br":
        return BrotliEncoder()
    if name == "zstd":
        return ZstdEncoder()
    raise HttpError(400, f"unknown x-fake-encoding {name!r}; use one of {', '.join(ENCODINGS)}")


def accepts_encoding(accept_encoding: str | None, name: str) -> bool:
    """Whether an Accept-Encoding value allows `name` (q=0 forbids; `*` matches anything not listed)."""
    weights: dict[str, float] = {}
    for item in (accept_encoding or "").split(","):
        token, _, params = item.strip().partition(";")
        if not token:
            continue
        q = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        weights[token.strip().lower()] = q
    if name in weights:
        return weights[name] > 0
    return weights.get("*", 0.0) > 0
