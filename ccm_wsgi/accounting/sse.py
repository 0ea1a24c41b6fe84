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
usage rules avoid sing-box's undercounting: every field of `message_start.usage` is taken,
even when `input_tokens` is 0, and each field present in a later `message_delta.usage` overrides it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from . import fastjson
from .tokens import Tokens

MAX_EVENT = 1 << 20
MAX_COUNT = 1 << 63
_MARK = b'"message_'
_BOUNDARY = b"\n\n"
_COUNTERS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")
_SPLIT_ATTRS = ("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens")  # the Tokens they go to


@dataclass(slots=True)
class Usage:
    """What the upstream reported for one response (all zero when nothing was seen)."""

    model: str = ""
    tokens: Tokens = field(default_factory=Tokens)
    stopped: bool = False  # message_stop seen (SSE), or a complete JSON message (non-streaming)


def _merge_usage(usage: Usage, raw: Any) -> None:
    """Every well-formed counter present in `raw` (a Messages `usage` object) overrides `usage`. A counter is
    an integer from 0 below 2**63 (what a journal line holds; more is no real answer). Plain comparisons: for
    four values they cost a quarter of what `map`, `min` and `max` over them cost."""
    if not isinstance(raw, dict):
        return
    tokens = usage.tokens
    get = raw.get
    a, b, c, d = get("input_tokens"), get("output_tokens"), get("cache_read_input_tokens"), \
        get("cache_creation_input_tokens")
    if type(a) is int and type(b) is int and type(c) is int and type(d) is int and \
            0 <= a < MAX_COUNT and 0 <= b < MAX_COUNT and 0 <= c < MAX_COUNT and 0 <= d < MAX_COUNT:  # all, as usual
        tokens.input_tokens, tokens.output_tokens, tokens.cache_read_input_tokens, \
            tokens.cache_creation_input_tokens = a, b, c, d
    else:
        for key, value in zip(_COUNTERS, (a, b, c, d), strict=True):
            if type(value) is int and 0 <= value < MAX_COUNT:
                setattr(tokens, key, value)
    split = get("cache_creation")
    if isinstance(split, dict):
        e, f = split.get("ephemeral_5m_input_tokens"), split.get("ephemeral_1h_input_tokens")
        if type(e) is int and type(f) is int and 0 <= e < MAX_COUNT and 0 <= f < MAX_COUNT:  # both, as usual
            tokens.cache_creation_5m_input_tokens, tokens.cache_creation_1h_input_tokens = e, f
            return
        for attr, value in zip(_SPLIT_ATTRS, (e, f), strict=True):
            if type(value) is int and 0 <= value < MAX_COUNT:
                setattr(tokens, attr, value)


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
        return fastjson.loads(data)
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
