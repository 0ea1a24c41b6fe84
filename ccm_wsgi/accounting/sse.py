"""Read token usage out of Anthropic Messages responses without touching what the client receives.

The relay hands every chunk it has already written to the client to an `SSETap` (streaming answers)
or keeps a bounded copy for `parse_json_usage` (JSON answers). Neither can change, delay or hold
back a byte: they only look. Compressed bodies go through a `Decoder` first, on the side.

The tap works on whole events rather than lines, so the hot path is a few C-level searches per
chunk: line endings are normalised with `bytes.replace`, event boundaries are blank lines (`\\n\\n`),
and only events whose text contains `"message_` (message_start / message_delta / message_stop) are
split into fields and JSON-decoded. The bulk of a stream (content_block_delta) is never parsed.
Memory is bounded: only the current unterminated event is kept, and an event longer than
`max_event` bytes is dropped (usage events are about a kilobyte).

Field semantics follow the WHATWG event-stream format (LF, CRLF or CR line endings, `data:` with an
optional single space, multi-line data joined with LF, comments, unknown fields ignored), and the
usage rules fix sing-box's gaps (reference §15 #10): every field of `message_start.usage` is taken,
even when `input_tokens` is 0, and each field present in a later `message_delta.usage` overrides it.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import brotli
import zstandard

MAX_EVENT = 1 << 20
MAX_DECODED_PER_CHUNK = 64 << 20
_MARK = b'"message_'
_BOUNDARY = b"\n\n"
_COUNTERS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_SPLIT = (
    ("ephemeral_5m_input_tokens", "cache_creation_5m_input_tokens"),
    ("ephemeral_1h_input_tokens", "cache_creation_1h_input_tokens"),
)


@dataclass(slots=True)
class Usage:
    """What the upstream reported for one response (all zero when nothing was seen)."""

    model: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0
    stopped: bool = False  # message_stop seen (SSE), or a complete JSON message (non-streaming)


def _count(value: Any) -> bool:
    return type(value) is int and value >= 0


def _merge_usage(usage: Usage, raw: Any) -> None:
    """Every well-formed counter present in `raw` (a Messages `usage` object) overrides `usage`."""
    if not isinstance(raw, dict):
        return
    for key in _COUNTERS:
        value = raw.get(key)
        if _count(value):
            setattr(usage, key, value)
    split = raw.get("cache_creation")
    if isinstance(split, dict):
        for key, attr in _SPLIT:
            value = split.get(key)
            if _count(value):
                setattr(usage, attr, value)


def _apply_event(usage: Usage, event: Any) -> None:
    if not isinstance(event, dict):
        return
    kind = event.get("type")
    if kind == "message_start":
        message = event.get("message")
        if isinstance(message, dict):
            model = message.get("model")
            if isinstance(model, str) and model:
                usage.model = model
            _merge_usage(usage, message.get("usage"))
    elif kind == "message_delta":
        _merge_usage(usage, event.get("usage"))
    elif kind == "message_stop":
        usage.stopped = True


def _loads(data: bytes) -> Any:
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _event_data(text: bytes) -> bytes | None:
    """The joined `data` field of one event's text (LF-separated lines), or None if it has none."""
    lines: list[bytes] = []
    for line in text.split(b"\n"):
        if not line.startswith(b"data"):
            continue  # blank, comment (":..."), event:, id:, retry:, unknown fields
        if len(line) == 4:
            lines.append(b"")
        elif line[4] == 58:  # b":"
            value = line[5:]
            lines.append(value[1:] if value[:1] == b" " else value)
    if not lines:
        return None
    return lines[0] if len(lines) == 1 else b"\n".join(lines)


class SSETap:
    """Incremental, exact usage parser for a `text/event-stream` body; see the module docstring."""

    __slots__ = ("_cr", "_max", "_nl", "_skip", "_started", "_tail", "_tail_size", "usage")

    def __init__(self, max_event: int = MAX_EVENT) -> None:
        self.usage = Usage()
        self._max = max_event
        self._tail: list[bytes] = []  # the current unterminated event, LF-normalised, no leading LF
        self._tail_size = 0
        self._cr = False  # the previous chunk ended with CR: a leading LF belongs to it
        self._nl = False  # the previous (normalised) chunk ended with LF
        self._skip = False  # dropping an oversized event up to its end
        self._started = False

    def feed(self, chunk: bytes) -> None:
        """Look at one relayed chunk (already decompressed)."""
        chunk = self._normalise(chunk)
        if not chunk:
            return
        prev_nl, self._nl = self._nl, chunk[-1] == 10
        if self._skip:
            end = self._event_end(chunk, prev_nl)
            if end is None:
                return
            self._skip = False
            chunk = chunk[end[1] :]
        if self._tail:
            end = self._event_end(chunk, prev_nl)
            if end is None:
                self._append(chunk)
                return
            if end[0]:
                self._tail.append(chunk[: end[0]])
            self._event(b"".join(self._tail))
            self._tail.clear()
            self._tail_size = 0
            chunk = chunk[end[1] :]
        if chunk:
            self._scan(chunk)

    def finish(self) -> Usage:
        """Dispatch a final unterminated event (a cut stream) and return what was seen."""
        if self._tail:
            self._event(b"".join(self._tail))
            self._tail.clear()
            self._tail_size = 0
        return self.usage

    def _normalise(self, chunk: bytes) -> bytes:
        """LF line endings only; a CR ending one chunk swallows an LF starting the next."""
        if not chunk:
            return chunk
        if not self._started:
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        if self._cr:
            self._cr = False
            if chunk[:1] == b"\n":
                chunk = chunk[1:]
        if b"\r" in chunk:
            self._cr = chunk[-1] == 13
            chunk = chunk.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        return chunk

    @staticmethod
    def _event_end(chunk: bytes, prev_nl: bool) -> tuple[int, int] | None:
        """Where the pending event's text ends in `chunk` and where the next one starts, if it ends here."""
        if prev_nl and chunk[0] == 10:
            return 0, 1
        i = chunk.find(_BOUNDARY)
        return None if i < 0 else (i, i + 2)

    def _append(self, piece: bytes) -> None:
        if not self._tail:
            piece = piece.lstrip(b"\n")
            if not piece:
                return
        self._tail_size += len(piece)
        if self._tail_size > self._max + 1:  # the event text is longer than max_event whatever follows
            self._tail.clear()
            self._tail_size = 0
            self._skip = True
        else:
            self._tail.append(piece)

    def _scan(self, data: bytes) -> None:
        """`data` starts at a line start with no event pending: dispatch the complete events, keep the rest."""
        last = data.rfind(_BOUNDARY)
        if last < 0:
            self._append(data)
            return
        pos = data.find(_MARK, 0, last)
        while pos >= 0:
            start = data.rfind(_BOUNDARY, 0, pos)
            start = 0 if start < 0 else start + 2
            stop = data.find(_BOUNDARY, pos, last)
            if stop < 0:
                stop = last
            self._event(data[start:stop])
            pos = data.find(_MARK, stop, last)
        if last + 2 < len(data):
            self._append(data[last + 2 :])

    def _event(self, text: bytes) -> None:
        text = text.strip(b"\n")
        if len(text) > self._max or _MARK not in text:
            return
        data = _event_data(text)
        if data is not None and _MARK in data:
            _apply_event(self.usage, _loads(data))


def parse_json_usage(body: bytes) -> Usage:
    """Usage of a complete non-streaming Messages response; an empty Usage for anything else."""
    usage = Usage()
    message = _loads(body)
    if isinstance(message, dict):
        model = message.get("model")
        if isinstance(model, str):
            usage.model = model
        _merge_usage(usage, message.get("usage"))
        usage.stopped = True
    return usage


def request_info(body: bytes) -> tuple[str, int]:
    """(model, number of messages) of a Messages request body; ("", 0) for anything unparsable."""
    return request_fields(_loads(body))


def parse_request(body: bytes) -> Any:
    """The decoded request JSON, or None; for callers that need more than `request_fields`."""
    return _loads(body)


def request_fields(request: Any) -> tuple[str, int]:
    """(model, number of messages) of an already decoded request body."""
    if not isinstance(request, dict):
        return "", 0
    model = request.get("model")
    messages = request.get("messages")
    return (model if isinstance(model, str) else ""), (len(messages) if isinstance(messages, list) else 0)


# --- Content-Encoding -------------------------------------------------------------------------


class _Zlib:
    """gzip (possibly several members) or deflate (zlib-wrapped, or raw as some servers send it)."""

    def __init__(self, wbits: int, raw_fallback: bool) -> None:
        self._wbits = wbits
        self._obj = zlib.decompressobj(wbits)
        self._fallback = raw_fallback  # deflate: switch to raw deflate if the zlib header is wrong
        self._seen = b""

    def __call__(self, data: bytes) -> bytes:
        if self._fallback:
            self._seen += data
            try:
                out = self._obj.decompress(data)
            except zlib.error:
                self._fallback = False
                self._obj = zlib.decompressobj(-zlib.MAX_WBITS)
                return self._obj.decompress(self._seen)
            if len(self._seen) >= 2:
                self._fallback = False
                self._seen = b""
            return out
        out = self._obj.decompress(data)
        while self._obj.eof and self._obj.unused_data:  # another gzip member follows
            rest = self._obj.unused_data
            self._obj = zlib.decompressobj(self._wbits)
            out += self._obj.decompress(rest)
        return out


class _Zstd:
    def __init__(self) -> None:
        self._dctx = zstandard.ZstdDecompressor()
        self._obj = self._dctx.decompressobj()

    def __call__(self, data: bytes) -> bytes:
        out = self._obj.decompress(data)
        while self._obj.eof and self._obj.unused_data:  # another frame follows
            rest = self._obj.unused_data
            self._obj = self._dctx.decompressobj()
            out += self._obj.decompress(rest)
        return out


def _stage(encoding: str) -> Callable[[bytes], bytes] | None:
    if encoding in ("gzip", "x-gzip"):
        return _Zlib(16 + zlib.MAX_WBITS, raw_fallback=False)
    if encoding == "deflate":
        return _Zlib(zlib.MAX_WBITS, raw_fallback=True)
    if encoding == "br":
        return brotli.Decompressor().process
    if encoding == "zstd":
        return _Zstd()
    return None


class Decoder:
    """Incremental decoder for a `Content-Encoding` list (applied in reverse). Never raises: on a
    decoding error or an unknown coding it sets `.failed` and returns b"" from then on."""

    def __init__(self, encodings: list[str]) -> None:
        self.encodings = encodings
        self.failed = False
        self._stages: list[Callable[[bytes], bytes]] = []
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
        try:
            for stage in self._stages:
                chunk = stage(chunk)
                if len(chunk) > MAX_DECODED_PER_CHUNK:  # a compression bomb: stop counting, keep relaying
                    raise ValueError("decoded chunk too large")
        except Exception:  # zlib.error, brotli.error, zstandard.ZstdError, ...
            self.failed = True
            return b""
        return chunk


def decoder_for(content_encoding: str | None) -> Decoder | None:
    """A Decoder for a response's Content-Encoding, or None when the body is not encoded."""
    if not content_encoding:
        return None
    encodings = [e.strip().lower() for e in content_encoding.split(",")]
    encodings = [e for e in encodings if e and e != "identity"]
    return Decoder(encodings) if encodings else None
