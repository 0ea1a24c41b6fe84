"""The SSE usage tap: exact on any chunking, bounded, and indifferent to compression."""

from __future__ import annotations

import gzip
import json
import zlib
from dataclasses import dataclass
from typing import Any

import brotli
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ccm_wsgi.accounting.decoding import Decoder, decoder_for
from ccm_wsgi.accounting.sse import SSETap, Usage, parse_json_usage
from ccm_wsgi.http.request import Facts, facts
from tests.support.usage_store import usage

COUNTERS = ("input_tokens", "output_tokens", "cache_read_input_tokens", "cache_creation_input_tokens")


def sse(obj: Any, event: str | None = None, nl: str = "\n") -> bytes:
    head = f"event: {event}{nl}" if event else ""
    return f"{head}data: {json.dumps(obj)}{nl}{nl}".encode()


def start(model: str = "claude-sonnet-4-5", **usage: Any) -> dict[str, Any]:
    return {"type": "message_start", "message": {"id": "msg_1", "model": model, "content": [], "usage": usage}}


def delta(**usage: Any) -> dict[str, Any]:
    return {"type": "message_delta", "delta": {"stop_reason": "end_turn"}, "usage": usage}


STOP = {"type": "message_stop"}
PING = {"type": "ping"}


def text_delta(text: str) -> dict[str, Any]:
    return {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": text}}


def tap(*chunks: bytes, **kwargs: Any) -> Usage:
    t = SSETap(**kwargs)
    for chunk in chunks:
        t.feed(chunk)
    return t.finish()


def pieces(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


STREAM = (
    sse(start(input_tokens=10, output_tokens=1, cache_read_input_tokens=300), "message_start")
    + sse({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}})
    + sse(PING, "ping")
    + sse(text_delta("hello"))
    + sse(delta(output_tokens=42), "message_delta")
    + sse(STOP, "message_stop")
)


def test_basic_stream_any_chunk_size() -> None:
    want = usage("claude-sonnet-4-5", 10, 42, 300, 0, 0, 0, stopped=True)
    for size in (1, 2, 3, 5, 64, len(STREAM)):
        assert tap(*pieces(STREAM, size)) == want


@pytest.mark.parametrize("nl", ["\n", "\r\n", "\r"])
def test_line_endings(nl: str) -> None:
    data = STREAM.replace(b"\n", nl.encode())
    for size in (1, 7, len(data)):
        assert tap(*pieces(data, size)).tokens.output_tokens == 42


def test_cr_at_chunk_end_then_lf() -> None:
    event = sse(start(input_tokens=5), nl="\r\n")
    cut = event.index(b"\r") + 1  # "...\r" | "\n..."
    assert tap(event[:cut], event[cut:]).tokens.input_tokens == 5
    # CR CR LF is two line ends: the blank line ends the event even when split between CRs
    two = b'data: {"type":"message_start","message":{"usage":{"input_tokens":7}}}\r'
    assert tap(two, b"\r", b"\n").tokens.input_tokens == 7


def test_lone_cr_then_lf_in_next_chunk_is_one_line_end() -> None:
    # "data: a\r" + "\ndata: b\n\n": one event with two data lines (not two events)
    first = b'data: {"type":"message_delta",\r'
    rest = b'\ndata: "usage":{"output_tokens":9}}\n\n'
    assert tap(first, rest).tokens.output_tokens == 9
    assert tap(first + rest).tokens.output_tokens == 9


def test_multi_line_data_is_joined_with_lf() -> None:
    pretty = json.dumps(start(input_tokens=11, cache_creation_input_tokens=4), indent=2).splitlines()
    event = "".join(f"data: {line}\n" for line in pretty) + "\n"
    assert tap(event.encode()).tokens.input_tokens == 11
    assert tap(*pieces(event.encode(), 3)).tokens.cache_creation_input_tokens == 4


def test_data_field_variants() -> None:
    no_space = b'data:{"type":"message_delta","usage":{"output_tokens":3}}\n\n'
    assert tap(no_space).tokens.output_tokens == 3
    # "dataX:" is another field and a bare "data" line adds an empty line (making the JSON invalid here)
    other_field = b'datax: {"type":"message_delta","usage":{"output_tokens":4}}\n\n'
    assert tap(other_field).tokens.output_tokens == 0
    two_spaces = b'data:  {"type":"message_delta","usage":{"output_tokens":5}}\n\n'
    assert tap(two_spaces).tokens.output_tokens == 5  # JSON ignores the second space


def test_comments_unknown_fields_and_events_are_ignored() -> None:
    data = (
        b': comment mentioning "message_start"\n'
        b"id: 7\nretry: 1000\nfoo: bar\n"
        + sse({"type": "message_start_v2", "message": {"usage": {"input_tokens": 99}}})
        + sse({"type": "unknown_event", "usage": {"output_tokens": 99}}, "weird")
        + sse({"type": "error", "error": {"type": "overloaded_error", "message": "message_start"}})
        + sse(start(input_tokens=1))
    )
    assert tap(data) == usage("claude-sonnet-4-5", 1, 0, 0, 0, 0, 0, stopped=False)


def test_message_start_with_zero_input_keeps_cache_numbers() -> None:
    got = tap(
        sse(
            start(
                input_tokens=0,
                cache_read_input_tokens=50_000,
                cache_creation_input_tokens=700,
                cache_creation={"ephemeral_5m_input_tokens": 300, "ephemeral_1h_input_tokens": 400},
            )
        )
    )
    assert (got.tokens.cache_read_input_tokens, got.tokens.cache_creation_input_tokens) == (50_000, 700)
    assert (got.tokens.cache_creation_5m_input_tokens, got.tokens.cache_creation_1h_input_tokens) == (300, 400)


def test_message_delta_overrides_each_field_present() -> None:
    got = tap(
        sse(start(input_tokens=10, output_tokens=1, cache_read_input_tokens=5, cache_creation_input_tokens=6)),
        sse(delta(output_tokens=20)),
        sse(delta(output_tokens=30, input_tokens=12, cache_read_input_tokens=None)),  # null is not a number
        sse(delta(cache_creation={"ephemeral_1h_input_tokens": 8})),
    )
    assert (got.tokens.input_tokens, got.tokens.output_tokens, got.tokens.cache_read_input_tokens) == (12, 30, 5)
    assert (got.tokens.cache_creation_input_tokens, got.tokens.cache_creation_1h_input_tokens) == (6, 8)


def test_bad_values_are_ignored() -> None:
    got = tap(
        sse(start(input_tokens=-1, output_tokens="7", cache_read_input_tokens=True)), sse(delta(output_tokens=2.5))
    )
    assert got == usage("claude-sonnet-4-5")


COUNTER_VALUES = st.one_of(st.integers(0, 2**63 - 1), st.integers(-5, -1), st.integers(2**63, 2**64),
                           st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.none())


@settings(max_examples=300)
@given(raw=st.dictionaries(st.sampled_from(COUNTERS), COUNTER_VALUES), before=st.integers(0, 9))
def test_each_counter_is_taken_when_it_is_a_count(raw: dict[str, Any], before: int) -> None:
    """All four counters at once (the usual answer) or any mix of missing and bad ones: each well-formed
    counter overrides, anything else leaves what was there."""
    body = json.dumps({"type": "message", "model": "m", "usage": raw}).encode()
    got = tap(sse(start(**dict.fromkeys(COUNTERS, before))), sse({"type": "message_delta", "usage": raw}))
    for key in COUNTERS:
        value = raw.get(key)
        good = type(value) is int and 0 <= value < 2**63
        assert getattr(got.tokens, key) == (value if good else before)
        assert getattr(parse_json_usage(body).tokens, key) == (value if good else 0)


def test_garbage_json_and_done() -> None:
    data = (
        b'data: {"type":"message_start", broken\n\n'
        b"data: [DONE]\n\n"
        b'data: ["message_start"]\n\n'
        b'data: {"type":"message_delta","usage":'
        + b"[" * 100_000
        + b"\n\n"  # deep nesting: no RecursionError
        + sse(delta(output_tokens=4))
        + b"\xff\xfe garbage \x00\n\n"
    )
    assert tap(data).tokens.output_tokens == 4
    assert tap(*pieces(data, 1000)).tokens.output_tokens == 4


def test_final_unterminated_event_is_flushed_by_finish() -> None:
    cut = sse(start(input_tokens=3)) + b'data: {"type":"message_delta","usage":{"output_tokens":17}}'
    t = SSETap()
    t.feed(cut)
    assert t.usage.tokens.output_tokens == 0
    assert t.finish().tokens.output_tokens == 17
    assert t.finish().tokens.output_tokens == 17  # idempotent
    truncated = sse(start(input_tokens=3)) + b'data: {"type":"message_delta","usage":{"output_tok'
    assert tap(truncated) == usage("claude-sonnet-4-5", 3)


def test_bom_and_empty_chunks() -> None:
    assert tap(b"", b"\xef\xbb\xbf" + sse(start(input_tokens=2)), b"").tokens.input_tokens == 2


def test_huge_event_is_capped_and_memory_stays_bounded() -> None:
    cap = 4096
    t = SSETap(max_event=cap)
    big = b'data: {"type":"message_start","message":{"model":"x","usage":{"input_tokens":1},"pad":"'
    t.feed(big)
    for _ in range(100):
        t.feed(b"A" * 1000)
        assert sum(map(len, t._tail)) <= cap + 1
    t.feed(b'"}}\n\n' + sse(delta(output_tokens=5)))
    got = t.finish()
    assert got.model == "" and got.tokens.input_tokens == 0  # the oversized event was dropped as a whole
    assert got.tokens.output_tokens == 5  # and the stream continues normally after it


def test_cap_boundary_does_not_depend_on_chunking() -> None:
    cap = 200
    head = b'data: {"type":"message_delta","usage":{"output_tokens":6},"pad":"'
    event = head + b"x" * (cap - len(head) - 2) + b'"}'
    assert len(event) == cap  # exactly at the cap: kept, however the blank line arrives
    assert tap(event + b"\n\n", max_event=cap).tokens.output_tokens == 6
    assert tap(event + b"\n", b"\n", max_event=cap).tokens.output_tokens == 6
    assert tap(event + b"x\n", b"\n", max_event=cap).tokens.output_tokens == 0


def test_default_cap_keeps_large_but_sane_events() -> None:
    padded = start(input_tokens=8)
    padded["message"]["pad"] = "x" * 200_000
    assert tap(*pieces(sse(padded), 65536)).tokens.input_tokens == 8


def test_bytes_are_not_touched() -> None:
    chunks = pieces(STREAM, 13)
    copies = [bytes(c) for c in chunks]
    tap(*chunks)
    assert chunks == copies


def test_a_long_stream_in_large_reads() -> None:
    """60,000 text deltas (about 7 MB) in 64 KiB reads, as the relay feeds them: the usage of the message's
    start and end events, whatever lies between (speed is `make bench`'s business, not a unit test's)."""
    deltas = b"".join(sse(text_delta("some streamed words " * 3), "content_block_delta") for _ in range(60_000))
    body = sse(start(input_tokens=321), "message_start") + deltas + sse(delta(output_tokens=60_000), "message_delta")
    got = tap(*pieces(body + sse(STOP, "message_stop"), 65536))
    assert (got.tokens.input_tokens, got.tokens.output_tokens, got.model) == (321, 60_000, "claude-sonnet-4-5")


# --- property: any chunking gives the generated usage ------------------------------------------


@dataclass
class Ev:
    obj: Any  # JSON value, or bytes for raw (non-JSON) data
    name: str | None = None
    pretty: bool = False
    comment: str | None = None


counts = st.integers(min_value=0, max_value=2_000_000)
maybe = st.one_of(st.none(), counts)


@st.composite
def usage_objects(draw: Any) -> dict[str, Any]:
    usage = {key: draw(maybe) for key in COUNTERS if draw(st.booleans())}
    if draw(st.booleans()):
        split = {"ephemeral_5m_input_tokens": draw(maybe), "ephemeral_1h_input_tokens": draw(maybe)}
        usage["cache_creation"] = {k: v for k, v in split.items() if draw(st.booleans())}
    return usage


texts = st.text(alphabet=st.sampled_from('ab "\\\n\r:message_{}é€'), max_size=30)
models = st.sampled_from(["claude-opus-4-6", "claude-sonnet-5-5", "", "m\u00e9"])

events = st.one_of(
    st.builds(lambda m, u: {"type": "message_start", "message": {"model": m, "usage": u}}, models, usage_objects()),
    st.builds(lambda u: {"type": "message_delta", "usage": u}, usage_objects()),
    st.just(STOP),
    st.just(PING),
    st.builds(text_delta, texts),
    st.builds(lambda t: {"type": t, "usage": {"input_tokens": 1}}, st.sampled_from(["message_x", "foo", "message"])),
)
raw_data = st.sampled_from([b"[DONE]", b'{"type":"message_delta","usage":{"output_tokens":1', b"", b"message_"])


@st.composite
def streams(draw: Any) -> tuple[bytes, list[Ev]]:
    evs = draw(
        st.lists(
            st.one_of(
                st.builds(
                    Ev,
                    events,
                    st.one_of(st.none(), st.sampled_from(["message_start", "x"])),
                    st.booleans(),
                    st.one_of(st.none(), texts.map(lambda s: s.replace("\r", "").replace("\n", ""))),
                ),
                st.builds(Ev, raw_data),
            ),
            max_size=25,
        )
    )
    lines: list[str | bytes] = []
    for ev in evs:
        if ev.comment is not None:
            lines.append(":" + ev.comment)
        if ev.name:
            lines.append("event: " + ev.name)
        if isinstance(ev.obj, bytes):
            lines.append(b"data: " + ev.obj)
        else:
            text = json.dumps(ev.obj, indent=1 if ev.pretty else None, ensure_ascii=draw(st.booleans()))
            lines += ["data:" + draw(st.sampled_from(["", " "])) + line for line in text.splitlines()]
        lines += [""] * draw(st.integers(1, 2))
    out, previous = b"", ""
    for line in lines:
        raw = line if isinstance(line, bytes) else line.encode()
        # a CR line end followed by an empty LF-terminated line would read as one CRLF: avoid generating it
        choices = ["\r\n", "\r"] if previous == "\r" and not raw else ["\n", "\r\n", "\r"]
        previous = draw(st.sampled_from(choices))
        out += raw + previous.encode()
    return out, evs


def expected_usage(evs: list[Ev]) -> Usage:
    """An independent statement of the rules: message_start sets the model and every usage field,
    message_delta overrides the fields present, only non-negative integers count."""
    want: dict[str, Any] = {"model": "", "stopped": False}
    fields = {**{k: k for k in COUNTERS}}
    split = {"ephemeral_5m_input_tokens": "cache_creation_5m_input_tokens"}
    split["ephemeral_1h_input_tokens"] = "cache_creation_1h_input_tokens"

    def apply(usage: dict[str, Any]) -> None:
        for key, attr in fields.items():
            if isinstance(usage.get(key), int):
                want[attr] = usage[key]
        for key, attr in split.items():
            if isinstance(usage.get("cache_creation", {}).get(key), int):
                want[attr] = usage["cache_creation"][key]

    for ev in evs:
        obj = ev.obj
        if not isinstance(obj, dict):
            continue
        if obj["type"] == "message_start":
            if obj["message"]["model"]:
                want["model"] = obj["message"]["model"]
            apply(obj["message"]["usage"])
        elif obj["type"] == "message_delta":
            apply(obj["usage"])
        elif obj["type"] == "message_stop":
            want["stopped"] = True
    return usage(want.pop("model", ""), stopped=want.pop("stopped", False), **want)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(stream=streams(), data=st.data())
def test_any_split_gives_the_generated_usage(stream: tuple[bytes, list[Ev]], data: st.DataObject) -> None:
    body, evs = stream
    want = expected_usage(evs)
    assert tap(body) == want
    cuts = sorted(data.draw(st.lists(st.integers(0, len(body)), max_size=40)))
    chunks = [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]
    assert tap(*chunks) == want


@settings(max_examples=100, deadline=None)
@given(stream=streams(), size=st.integers(1, 9), cap=st.integers(20, 400))
def test_split_invariance_with_a_small_cap(stream: tuple[bytes, list[Ev]], size: int, cap: int) -> None:
    body, _ = stream
    assert tap(*pieces(body, size), max_event=cap) == tap(body, max_event=cap)


# --- compression ---------------------------------------------------------------------------------


def compress_per_event(encoding: str, events: list[bytes]) -> list[bytes]:
    """What a server flushing after every event sends: one compressed block per event."""
    if encoding in ("gzip", "deflate", "raw-deflate"):
        wbits = {"gzip": 31, "deflate": 15, "raw-deflate": -15}[encoding]
        c = zlib.compressobj(wbits=wbits)
        blocks = [c.compress(e) + c.flush(zlib.Z_SYNC_FLUSH) for e in events]
        return [*blocks, c.flush()]
    if encoding == "br":
        c = brotli.Compressor()
        return [c.process(e) + c.flush() for e in events] + [c.finish()]
    c = zstandard.ZstdCompressor().compressobj()
    return [c.compress(e) + c.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK) for e in events] + [c.flush()]


@pytest.mark.parametrize("encoding", ["gzip", "deflate", "raw-deflate", "br", "zstd"])
@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 200))
def test_compressed_streams_decode_incrementally(encoding: str, size: int) -> None:
    events = [sse(start(input_tokens=10 + i)) if i == 0 else sse(text_delta("x" * i)) for i in range(20)]
    events += [sse(delta(output_tokens=77)), sse(STOP)]
    blocks = compress_per_event(encoding, events)
    decoder = decoder_for("deflate" if encoding == "raw-deflate" else encoding)
    assert decoder is not None
    t = SSETap()
    first = pieces(blocks[0], size)
    for piece in first:
        t.feed(decoder.decompress(piece))
    assert t.usage.tokens.input_tokens == 10  # the first event is usable as soon as its block arrived
    for piece in pieces(b"".join(blocks[1:]), size):
        t.feed(decoder.decompress(piece))
    assert not decoder.failed
    assert t.finish() == usage("claude-sonnet-4-5", 10, 77, 0, 0, 0, 0, stopped=True)


def test_decoder_edge_cases() -> None:
    assert decoder_for(None) is None and decoder_for("") is None and decoder_for("identity") is None
    unknown = decoder_for("compress")
    assert unknown is not None and unknown.failed and unknown.decompress(b"abc") == b""
    stacked = decoder_for("gzip, br")  # br applied last, so decoded first
    assert stacked is not None
    assert stacked.decompress(gzip.compress(brotli.compress(b"hi"))) != b"hi"  # wrong order: never raises
    for encoding in ("br", "zstd", "deflate"):
        garbage = Decoder([encoding])
        assert garbage.decompress(b"\xff" * 64) == b"" and garbage.failed
    stacked = decoder_for("GZip, br")
    assert stacked is not None and stacked.decompress(brotli.compress(gzip.compress(b"hi"))) == b"hi"
    members = gzip.compress(b"one ") + gzip.compress(b"two")
    assert Decoder(["gzip"]).decompress(members) == b"one two"
    frames = zstandard.ZstdCompressor().compress(b"a") + zstandard.ZstdCompressor().compress(b"b")
    assert Decoder(["zstd"]).decompress(frames) == b"ab"
    broken = Decoder(["gzip"])
    assert broken.decompress(b"not gzip at all") == b"" and broken.failed
    assert broken.decompress(gzip.compress(b"later")) == b""  # stays stopped


def test_parse_json_usage() -> None:
    body = {
        "id": "msg",
        "type": "message",
        "model": "claude-haiku-4-5",
        "usage": {
            "input_tokens": 0,
            "output_tokens": 12,
            "cache_read_input_tokens": 900,
            "cache_creation_input_tokens": 30,
            "cache_creation": {"ephemeral_5m_input_tokens": 10, "ephemeral_1h_input_tokens": 20},
        },
    }
    want = usage("claude-haiku-4-5", 0, 12, 900, 30, 10, 20, stopped=True)
    assert parse_json_usage(json.dumps(body).encode()) == want
    for garbage in (b"", b"nope", b"[1,2]", b'"x"', b"\xff\xfe", b"{" * 50_000, b'{"usage": 5, "model": 3}'):
        assert parse_json_usage(garbage).tokens.input_tokens == 0
    # what the fast parser refuses and the standard one reads (a 70-bit integer, NaN) still counts
    for odd in (2**70, float("nan")):
        assert parse_json_usage(json.dumps({**body, "extra": odd}).encode()) == want


def test_request_facts() -> None:
    body = b'{"model":"claude-opus-4-6","messages":[{"role":"user"},{"role":"assistant"}]}'
    assert (facts(body, None).model, facts(body, None).messages_count) == ("claude-opus-4-6", 2)
    assert (facts(b'{"model": 5, "messages": {}}', None).model, facts(b'{"model": 5}', None).messages_count) == ("", 0)
    for garbage in (b"", b"garbage", b"[]", b"null", b"\x00\xff", b"[" * 100_000):
        assert (facts(garbage, None).model, facts(garbage, None).messages_count) == ("", 0)
    # a session id that is JSON nested too deep for any decoder: no session, and no error
    nested = json.dumps({"model": "m", "metadata": {"user_id": '{"a":' + "[" * 100_000}}).encode()
    assert facts(nested, None) == Facts("m", 0, "")
    # what orjson refuses and the standard library reads (a lone surrogate) is read all the same
    assert facts(b'{"model":"m\\ud800","messages":[{}]}', None) == Facts("m\ud800", 1, "")
