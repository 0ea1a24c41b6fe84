"""Decompressing a response for the usage tap, within a bound; the client always gets the original bytes.

A response with a `Content-Encoding` is relayed as it came; only the tap that reads its usage sees the
decoded bytes. Decoding is bounded so that a compression bomb (brotli reaches 600,000:1) costs neither
memory nor CPU: every step decodes at most what is left of the response's budget - DECODE_SLACK plus
DECODE_RATIO times the encoded bytes seen so far, far above what text compresses to - and a response
that would decode to more is not inspected any further (its usage is not counted; the relay goes on).
"""

from __future__ import annotations

import zlib
from typing import Protocol

import brotli
import zstandard

DECODE_RATIO = 200
DECODE_SLACK = 8 << 20
_ZSTD_PIECE = 256  # zstd has no output bound per call: feed it slices whose output is bounded by the format


class TooLarge(Exception):
    """More decoded output than the budget allows."""


class _Stage(Protocol):
    def __call__(self, data: bytes, limit: int) -> bytes: ...


class _Zlib:
    """gzip (possibly several members) or deflate (zlib-wrapped, or raw as some servers send it)."""

    def __init__(self, wbits: int, raw_fallback: bool) -> None:
        self._wbits = wbits
        self._obj = zlib.decompressobj(wbits)
        self._fallback = raw_fallback  # deflate: switch to raw deflate if the zlib header is wrong
        self._seen = b""

    def __call__(self, data: bytes, limit: int) -> bytes:
        if self._fallback:
            self._seen += data
            try:
                out = self._bounded(self._obj, data, limit)
            except zlib.error:
                self._fallback = False
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._bounded(self._obj, self._seen, limit)
            if len(self._seen) >= 2:
                self._fallback, self._seen = False, b""
            return out
        out = self._bounded(self._obj, data, limit)
        while self._obj.eof and self._obj.unused_data:  # another gzip member follows
            rest = self._obj.unused_data
            self._obj = zlib.decompressobj(self._wbits)
            out += self._bounded(self._obj, rest, limit - len(out))
        return out

    @staticmethod
    def _bounded(obj: zlib._Decompress, data: bytes, limit: int) -> bytes:
        out = obj.decompress(data, max(limit, 0) + 1)
        if len(out) > limit or obj.unconsumed_tail:
            raise TooLarge
        return out


class _Brotli:
    def __init__(self) -> None:
        self._obj = brotli.Decompressor()

    def __call__(self, data: bytes, limit: int) -> bytes:
        out: bytes = self._obj.process(data, output_buffer_limit=max(limit, 0) + 1)
        if len(out) > limit or not self._obj.can_accept_more_data():
            raise TooLarge
        return out


class _Zstd:
    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()

    def __call__(self, data: bytes, limit: int) -> bytes:
        out = bytearray()
        for start in range(0, len(data), _ZSTD_PIECE):
            piece = data[start : start + _ZSTD_PIECE]
            out += self._obj.decompress(piece)
            while self._obj.eof and self._obj.unused_data:  # another frame follows
                rest = self._obj.unused_data
                self._obj = self._dctx.decompressobj()
                out += self._obj.decompress(rest)
            if len(out) > limit:
                raise TooLarge
        return bytes(out)


def _stage(encoding: str) -> _Stage | None:
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, raw_fallback=False)
    if encoding == "deflate":
        return _Zlib(zlib.MAX_WBITS, raw_fallback=True)
    if encoding == "br":
        return _Brotli()
    if encoding == "zstd":
        return _Zstd()
    return None


class Decoder:
    """Incremental decoder for a `Content-Encoding` list (applied in reverse). Never raises: on a decoding
    error, an unknown coding or an exhausted budget it sets `.failed` and returns b"" from then on."""

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = encodings
        self.failed = False
        self.encoded = 0
        self.decoded = 0
        self._stages: list[_Stage] = []
        for encoding in reversed(encodings):
            if encoding == "identity":
                continue
            stage = _stage(encoding)
            if stage is None:
                self.failed = True
                break
            self._stages.append(stage)

    def decompress(self, chunk: bytes) -> bytes:
        if self.failed:
            return b""
        self.encoded += len(chunk)
        limit = DECODE_SLACK + DECODE_RATIO * self.encoded - self.decoded
        try:
            for stage in self._stages:
                chunk = stage(chunk, limit)
        except Exception:  # TooLarge, zlib.error, brotli.error, zstandard.ZstdError, ...
            self.failed = True
            return b""
        self.decoded += len(chunk)
        return chunk


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A Decoder for a response's Content-Encoding, or None when the body is not encoded."""
    if not content_encoding:
        return None
    encodings = [e.strip().lower() for e in content_encoding.split(",")]
    encodings = [e for e in encodings if e and e != "identity"]
    return Decoder(encodings) if encodings else None
