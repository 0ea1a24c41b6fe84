"""Usage and cost accounting end to end: a real `ccm-wsgi serve` with a `usages_path`, the fake upstream, the SDK.

Every check reads what is on disk: the usage file after a graceful SIGTERM (which must save), or
`ccm-wsgi usage -f FILE --json` against a live server (file + journal), and the access-log lines.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

import brotli
import pytest
import zstandard

from tests.support import clients
from tests.support.clients import client, conversation
from tests.support.constants import ACCESS, ALICE, BOB, MODEL, USERS
from tests.support.procs import service_config, wait_for

RESET = 1767225600  # anthropic-ratelimit-unified-7d-reset
WEEK = RESET - 604_800  # 1766620800 = 2025-12-25 00:00:00 UTC
WEEK_KEY = "2025-12-25 00:00:00 UTC+0"
NEXT_KEY = "2026-01-01 00:00:00 UTC+0"
FIXTURE = Path(__file__).parent / "fixtures" / "singbox-usages.json"
MSG_ID = re.compile(rb"msg_fake_[0-9a-f]{24}")
ACCESS_RE = re.compile(
    r"ccm_wsgi\.access: (?P<user>\S+) (?P<method>\S+) (?P<path>\S+) (?P<status>\d+) (?P<bytes>\d+)B \d+ms (?P<mode>\w+)"
    r"(?: model=(?P<model>\S+) in=(?P<in>\d+) out=(?P<out>\d+) cache_read=(?P<cr>\d+) cache_write=(?P<cw>\d+)"
    r"(?: cost=\$(?P<cost>[\d.]+))?)?(?: partial\((?P<partial>[^)]*)\))?$"
)

# USD per million tokens (the built-in price table): input, output, cache read, cache write 5m, cache write 1h.
RATES = {
    "claude-sonnet-4-5-20250929": ("3", "15", "0.3", "3.75", "6"),
    "claude-sonnet-4-6": ("3", "15", "0.3", "3.75", "6"),
    "claude-opus-4-6": ("5", "25", "0.5", "6.25", "10"),
    "claude-haiku-4-5-20251001": ("1", "5", "0.1", "1.25", "2"),
    "claude-3-5-haiku-20241022": ("0.8", "4", "0.08", "1", "1.6"),
}
PREMIUM = {
    "claude-sonnet-4-5-20250929": ("6", "22.5", "0.6", "7.5", "12"),
    "claude-sonnet-4-6": ("6", "22.5", "0.6", "7.5", "12"),
    "claude-opus-4-6": ("10", "37.5", "1", "12.5", "20"),
}
STAT_KEYS = [
    "request_count", "messages_count", "input_tokens", "output_tokens", "cache_read_input_tokens",
    "cache_creation_input_tokens", "cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens",
]
TOKEN_KEYS = STAT_KEYS[2:]
OAUTH = {"anthropic-beta": "oauth-2025-04-20"}  # what the upstream needs with an OAuth token (the proxy adds it)

pytestmark = pytest.mark.filterwarnings("ignore:The model .* is deprecated:DeprecationWarning")


# --------------------------------------------------------------------------------------------- helpers


def exact_usd(model: str, window: int, s: dict[str, int]) -> Decimal:
    """The cost rule (tokens x price per million, by kind) before rounding, from one stats object's counters."""
    table = PREMIUM if window >= 1_000_000 and model in PREMIUM else RATES
    r = [Decimal(x) for x in table[model]]
    c5, c1 = s.get("cache_creation_5m_input_tokens", 0), s.get("cache_creation_1h_input_tokens", 0)
    write = c5 * r[3] + c1 * r[4] if c5 or c1 else s["cache_creation_input_tokens"] * r[3]
    return (s["input_tokens"] * r[0] + s["output_tokens"] * r[1] + s["cache_read_input_tokens"] * r[2] + write) / 10**6


def cents(x: Decimal) -> float:
    return float(x.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def stats(n: int = 0, messages: int = 0, **tokens: int) -> dict[str, Any]:
    """A stats object as the file writes it (5m/1h omitted when 0), without cost_usd."""
    doc: dict[str, Any] = {"request_count": n, "messages_count": messages}
    for key in TOKEN_KEYS:
        short = key.removesuffix("_input_tokens").removesuffix("_tokens")
        value = tokens.get(short, 0)
        if value or key not in ("cache_creation_5m_input_tokens", "cache_creation_1h_input_tokens"):
            doc[key] = value
    return doc


def add(*items: dict[str, Any]) -> dict[str, Any]:
    total: dict[str, Any] = {}
    for item in items:
        for key in STAT_KEYS:
            if key in item:
                total[key] = total.get(key, 0) + item[key]
    return {key: total[key] for key in STAT_KEYS if key in total}


def without_cost(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "cost_usd"}


def combos(doc: dict[str, Any]) -> dict[tuple[str, int, int], dict[str, Any]]:
    return {(c["model"], c["context_window"], c.get("week_start_unix", 0)): c for c in doc["combinations"]}


def check_costs(doc: dict[str, Any]) -> None:
    """Every cost in a usage document follows the cost rule from its own counters, and the summaries add up."""
    by_user: dict[str, list[float]] = {}
    for c in doc["combinations"]:
        model, window = c["model"], c["context_window"]
        assert c["total"]["cost_usd"] == cents(exact_usd(model, window, c["total"])), c
        for name, s in c["by_user"].items():
            assert s["cost_usd"] == cents(exact_usd(model, window, s)), (name, c)
            by_user.setdefault(name, []).append(s["cost_usd"])
    total = sum(Decimal(repr(c["total"]["cost_usd"])) for c in doc["combinations"])
    assert doc["costs"]["total_usd"] == cents(total)
    assert doc["costs"]["by_user"] == {u: cents(sum(Decimal(repr(x)) for x in v)) for u, v in sorted(by_user.items())}


def knobs(reset: int | str | None = RESET, **kw: Any) -> dict[str, str]:
    """x-fake-* request headers; `reset` sets the 7d-reset response header (None removes it)."""
    headers = {"x-fake-" + k.replace("_", "-"): str(v) for k, v in kw.items()}
    headers["x-fake-ratelimit"] = json.dumps({"anthropic-ratelimit-unified-7d-reset": reset})
    return headers


def ask(proxy: Any, token: str, model: str, n_messages: int = 1, stream: bool = False, **kw: Any) -> Any:
    """One SDK request with knobs (and the 7d-reset header); streaming ones are read to the end of the body."""
    return clients.ask(proxy, token, model=model, n_messages=n_messages, stream=stream, headers=knobs(**kw),
                       max_tokens=64)


def raw_post(url: str, token: str, model: str = MODEL, stream: bool = True, n_messages: int = 1,
             headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, Any, bytes]:
    """A raw POST with knobs (and the 7d-reset header); the body exactly as it came (still compressed)."""
    reply = clients.post_messages(url, token, model=model, stream=stream, n_messages=n_messages,
                                  headers={**knobs(**kw), **(headers or {})})
    assert reply.ended is None, f"the body was cut: {reply.ended!r}"
    return tuple(reply)  # type: ignore[return-value]


def run_cli(*args: str, tz: str = "UTC") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": tz}
    return subprocess.run([sys.executable, "-m", "ccm_wsgi", *args], capture_output=True, text=True, timeout=30,
                          env=env)


def usage_json(path: Path, tz: str = "UTC") -> dict[str, Any]:
    out = run_cli("usage", "-f", str(path), "--json", tz=tz)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def stop(proxy: Any, path: Path) -> dict[str, Any]:
    """Graceful SIGTERM; the usage file it saved."""
    proxy.signal(signal.SIGTERM)
    assert proxy.wait(20) == 0, proxy.log()
    return json.loads(path.read_text())


def access_lines(proxy: Any) -> list[dict[str, Any]]:
    """The access lines, parsed (each must parse)."""
    lines = []
    for line in proxy.access_lines():
        m = ACCESS_RE.search(line)
        assert m, f"access line does not parse: {line!r}"
        lines.append(m.groupdict())
    return lines


def wait_access(proxy: Any, n: int, timeout: float = 10) -> list[dict[str, Any]]:
    return wait_for(lambda: (lambda lines: lines if len(lines) >= n else None)(access_lines(proxy)), timeout,
                    what=f"{n} access lines")


@pytest.fixture
def usages(tmp_path: Path) -> Path:
    return tmp_path / "usage" / "usages.json"


@pytest.fixture
def serve(fake: Any, creds: Path, start_proxy: Any, usages: Path) -> Any:
    """start(name=..., path=usages, **service fields) -> a serve process with alice and bob counting into `path`."""

    def start(name: str = "proxy", path: Path | None = usages, **fields: Any) -> Any:
        if path is not None:
            fields["usages_path"] = str(path)  # its directory need not exist yet
        cfg = service_config(fake.url, creds, users=USERS, **fields)
        return start_proxy({"log": {"level": "info"}, "services": [cfg]}, name=name)

    return start


# ----------------------------------------------------------------------------------------------- tests


def test_json_and_sse_with_cache_split_exact_file_report_and_log(serve: Any, usages: Path) -> None:
    assert not usages.parent.exists()
    proxy = serve()
    sonnet, opus = "claude-sonnet-4-5-20250929", "claude-opus-4-6"
    m = ask(proxy, ALICE, sonnet, 3, input_tokens=1000, output_tokens=500, cache_read_tokens=20000,
            cache_5m_tokens=3000)
    assert m.usage.input_tokens == 1000 and m.usage.cache_creation_input_tokens == 3000
    m = ask(proxy, BOB, opus, 1, stream=True, events=4, input_tokens=2000, output_tokens=800,
            cache_read_tokens=10000, cache_5m_tokens=1000, cache_1h_tokens=2000)
    assert m.usage.output_tokens == 800 and m.content[0].text == "Hello 1 2 3"
    # fast mode: no special handling, same bucket and prices
    c = client(proxy, ALICE)
    with c.messages.stream(model=opus, max_tokens=8, messages=conversation(2),
                           extra_headers={**knobs(input_tokens=3, output_tokens=7),
                                          "anthropic-beta": "fast-mode-2026-02-01"}) as s:
        s.until_done()

    # token counting and the model list are 200s without usage: never counted
    assert c.messages.count_tokens(model=opus, messages=conversation(5)).input_tokens > 0
    assert c.models.list().data

    live = usage_json(usages)  # a running server: file + journal
    doc = stop(proxy, usages)
    assert list(doc)[:3] == ["last_updated", "costs", "combinations"]
    assert set(doc) <= {"last_updated", "costs", "combinations", "journal", "ledger"}
    assert live == {k: v for k, v in doc.items() if k not in ("journal", "ledger")}
    assert usage_json(usages) == live

    alice_sonnet = stats(1, 3, input=1000, output=500, cache_read=20000, cache_creation=3000, cache_creation_5m=3000)
    bob_opus = stats(1, 1, input=2000, output=800, cache_read=10000, cache_creation=3000, cache_creation_5m=1000,
                     cache_creation_1h=2000)
    alice_opus = stats(1, 2, input=3, output=7)
    assert [(c["model"], c["context_window"], c["week_start_unix"]) for c in doc["combinations"]] == [
        (sonnet, 200_000, WEEK), (opus, 200_000, WEEK)]
    first, second = doc["combinations"]
    assert list(first) == ["model", "context_window", "week_start_unix", "total", "by_user"]
    assert list(second["total"]) == [*STAT_KEYS, "cost_usd"]
    assert list(first["total"]) == [*STAT_KEYS[:7], "cost_usd"]  # no 1h writes: the key is omitted
    assert list(second["by_user"]["alice"]) == [*STAT_KEYS[:6], "cost_usd"]
    assert first["total"] == {**alice_sonnet, "cost_usd": 0.03}  # the cost rule's worked example: 0.02775
    assert first["by_user"] == {"alice": {**alice_sonnet, "cost_usd": 0.03}}
    assert second["total"] == {**add(bob_opus, alice_opus), "cost_usd": 0.06}  # 0.06125 + 0.00019
    assert second["by_user"] == {"alice": {**alice_opus, "cost_usd": 0}, "bob": {**bob_opus, "cost_usd": 0.06}}
    assert doc["costs"] == {
        "total_usd": 0.09, "by_user": {"alice": 0.03, "bob": 0.06}, "by_week": {WEEK_KEY: 0.09},
        "by_user_and_week": {"alice": {WEEK_KEY: 0.03}, "bob": {WEEK_KEY: 0.06}},
    }
    check_costs(doc)

    lines = access_lines(proxy)
    assert [(x["user"], x["path"], x["mode"], x["model"], x["in"], x["out"], x["cr"], x["cw"]) for x in lines] == [
        ("alice", "/v1/messages", "whole", sonnet, "1000", "500", "20000", "3000"),
        ("bob", "/v1/messages", "stream", opus, "2000", "800", "10000", "3000"),
        ("alice", "/v1/messages", "stream", opus, "3", "7", "0", "0"),
        ("alice", "/v1/messages/count_tokens", "whole", None, None, None, None, None),
        ("alice", "/v1/models", "whole", None, None, None, None, None),
    ]
    assert abs(float(lines[0]["cost"]) - 0.02775) < 1e-4 and abs(float(lines[1]["cost"]) - 0.06125) < 1e-4
    assert all(x["partial"] is None for x in lines)
    for secret in (ALICE, BOB, ACCESS):
        assert secret not in proxy.log()


def test_context_1m_both_ways(serve: Any, usages: Path) -> None:
    proxy = serve()
    model = "claude-sonnet-4-6"
    big = {"input_tokens": 150_000, "cache_read_tokens": 60_000}  # 210k in total
    c = client(proxy, ALICE)
    m = c.beta.messages.create(model=model, max_tokens=8, messages=conversation(1), betas=["context-1m-2025-08-07"],
                               extra_headers=knobs(**big))
    assert m.usage.input_tokens == 150_000
    ask(proxy, ALICE, model, **big)  # > 200k but no context-1m beta
    with client(proxy, BOB).messages.stream(model=model, max_tokens=8, messages=conversation(1), extra_headers={
            **knobs(input_tokens=100_000, cache_5m_tokens=100_001),
            "anthropic-beta": "fine-grained-tool-streaming-2025-05-14, context-1m-2025-08-07"}) as s:
        s.until_done()
    # exactly 200k is not more than 200k: standard window, without and even with the beta
    ask(proxy, BOB, model, input_tokens=199_000, cache_read_tokens=1_000)
    c = client(proxy, BOB)
    c.messages.create(model=model, max_tokens=8, messages=conversation(1), extra_headers={
        **knobs(input_tokens=199_000, cache_read_tokens=1_000), "anthropic-beta": "context-1m-2025-08-07"})

    doc = usage_json(usages)
    by = combos(doc)
    assert set(by) == {(model, 1_000_000, WEEK), (model, 200_000, WEEK)}
    long, std = by[(model, 1_000_000, WEEK)], by[(model, 200_000, WEEK)]
    assert without_cost(long["by_user"]["alice"]) == stats(1, 1, input=150_000, output=5, cache_read=60_000)
    assert without_cost(long["by_user"]["bob"]) == stats(1, 1, input=100_000, output=5, cache_creation=100_001,
                                                         cache_creation_5m=100_001)
    assert without_cost(std["by_user"]["alice"]) == stats(1, 1, input=150_000, output=5, cache_read=60_000)
    assert without_cost(std["by_user"]["bob"]) == stats(2, 2, input=398_000, output=10, cache_read=2_000)
    # the 1M window is priced at the premium rates, the same tokens in 200k at the standard ones
    assert long["by_user"]["alice"]["cost_usd"] == 0.94  # 0.9361125
    assert std["by_user"]["alice"]["cost_usd"] == 0.47  # 0.468075
    check_costs(doc)
    costs = [float(x["cost"]) for x in wait_access(proxy, 5) if x["user"] == "alice"]
    assert costs[0] == pytest.approx(0.9361, abs=1e-4) and costs[1] == pytest.approx(0.4681, abs=1e-4)


def test_week_hint_from_the_7d_reset_header(serve: Any, usages: Path) -> None:
    proxy = serve()
    model = "claude-haiku-4-5-20251001"
    ask(proxy, ALICE, model, reset=RESET)
    ask(proxy, ALICE, model, reset=f" {RESET + 604_800} ", stream=True)  # trimmed
    ask(proxy, BOB, model, reset=RESET + 604_800)
    ask(proxy, BOB, model, reset=None)  # no header: no week
    ask(proxy, ALICE, model, reset="soon")  # unparsable: no week
    ask(proxy, ALICE, model, reset="-5")
    doc = stop(proxy, usages)
    by = combos(doc)
    assert list(by) == [(model, 200_000, WEEK), (model, 200_000, WEEK + 604_800), (model, 200_000, 0)]
    assert "week_start_unix" not in doc["combinations"][2]
    assert by[(model, 200_000, WEEK)]["total"]["request_count"] == 1
    nxt = by[(model, 200_000, WEEK + 604_800)]
    assert {u: s["request_count"] for u, s in nxt["by_user"].items()} == {"alice": 1, "bob": 1}
    none = by[(model, 200_000, 0)]
    assert {u: s["request_count"] for u, s in none["by_user"].items()} == {"alice": 2, "bob": 1}
    assert set(doc["costs"]["by_week"]) == {WEEK_KEY, NEXT_KEY}
    assert set(doc["costs"]["by_user_and_week"]["bob"]) == {NEXT_KEY}
    # week keys are in the server's zone: the same file read in Kolkata
    kolkata = usage_json(usages, tz="Asia/Kolkata")
    assert set(kolkata["costs"]["by_week"]) == {"2025-12-25 05:30:00 UTC+5:30", "2026-01-01 05:30:00 UTC+5:30"}


def test_compressed_responses_are_counted(serve: Any, usages: Path, fake: Any) -> None:
    proxy = serve()
    models = {"gzip": "claude-sonnet-4-6", "br": "claude-opus-4-6", "zstd": "claude-haiku-4-5-20251001",
              "deflate": "claude-sonnet-4-5-20250929"}
    decode = {"gzip": lambda b: zlib.decompress(b, 31), "deflate": zlib.decompress, "br": brotli.decompress,
              "zstd": lambda b: zstandard.ZstdDecompressor().decompressobj().decompress(b)}
    accept = {"Accept-Encoding": "gzip, deflate, br, zstd"}
    for i, (encoding, model) in enumerate(models.items()):
        tokens = {"input_tokens": 100 + i, "output_tokens": 20 + i, "cache_read_tokens": 7, "encoding": encoding}
        if encoding in ("gzip", "br"):  # the SDK asks for these itself
            c = client(proxy, ALICE)
            raw = c.messages.with_raw_response.create(model=model, max_tokens=8, messages=conversation(2),
                                                      extra_headers=knobs(**tokens))
            assert raw.headers["content-encoding"] == encoding
            assert raw.parse().usage.input_tokens == 100 + i
            sent = fake.requests(path="/v1/messages")[-1]
            assert encoding in dict((k.lower(), v) for k, v in sent["headers"])["accept-encoding"]
            with c.messages.with_streaming_response.create(model=model, max_tokens=8, messages=conversation(2),
                                                           stream=True, extra_headers=knobs(**tokens)) as resp:
                assert resp.headers["content-encoding"] == encoding
                events = list(resp.parse())
            assert events[-1].type == "message_stop" and events[-2].usage.output_tokens == 20 + i
        else:
            status, headers, body = raw_post(proxy.url, ALICE, model, stream=False, n_messages=2, headers=accept,
                                             **tokens)
            assert status == 200 and headers["content-encoding"] == encoding
            assert json.loads(decode[encoding](body))["usage"]["input_tokens"] == 100 + i
            status, headers, body = raw_post(proxy.url, ALICE, model, n_messages=2, headers=accept, **tokens)
            assert status == 200 and headers["content-encoding"] == encoding
            assert b"event: message_stop" in decode[encoding](body)
        # and the bytes on the wire really are compressed
        status, headers, body = raw_post(proxy.url, BOB, model, headers=accept, events=30, delta_bytes=500, **tokens)
        assert status == 200 and headers["content-encoding"] == encoding
        assert b"message_start" not in body
        text = decode[encoding](body)
        assert text.count(b"event: content_block_delta") == 30 and text.rstrip().endswith(b'{"type":"message_stop"}')

    doc = stop(proxy, usages)
    by = combos(doc)
    for i, (encoding, model) in enumerate(models.items()):
        combo = by[(model, 200_000, WEEK)]
        assert without_cost(combo["by_user"]["alice"]) == stats(2, 4, input=2 * (100 + i), output=2 * (20 + i),
                                                                cache_read=14), encoding
        assert without_cost(combo["by_user"]["bob"]) == stats(1, 1, input=100 + i, output=20 + i, cache_read=7)
    check_costs(doc)


def test_sse_bytes_identical_with_and_without_tracking(serve: Any, usages: Path, fake: Any) -> None:
    on, off = serve("on"), serve("off", path=None)
    cases = [
        {"events": 5},
        {"events": 40, "delta_bytes": 5000},  # events larger than any read, crossing chunk boundaries
        {"events": 25, "framing": "close", "delta_bytes": 300},
        {"events": 12, "framing": "length"},
        {"events": 8, "input_tokens": 5, "cache_1h_tokens": 9},
    ]
    for case in cases:
        bodies = []
        for url, token in ((on.url, ALICE), (off.url, ALICE), (fake.url, ACCESS)):
            status, headers, body = raw_post(url, token, headers=OAUTH, **case)
            assert status == 200 and headers["content-type"].startswith("text/event-stream")
            bodies.append(MSG_ID.sub(b"msg_ID", body))
        assert bodies[0] == bodies[1] == bodies[2], case
        assert bodies[0].endswith(b'event: message_stop\ndata: {"type":"message_stop"}\n\n')
    # compressed: the client gets the upstream's compressed stream, which decodes to the same events
    accept = {"Accept-Encoding": "gzip"}
    _, headers, body = raw_post(on.url, ALICE, headers=accept, encoding="gzip", events=20)
    _, _, plain = raw_post(fake.url, ACCESS, headers=OAUTH, events=20)
    assert headers["content-encoding"] == "gzip"
    assert MSG_ID.sub(b"msg_ID", zlib.decompress(body, 31)) == MSG_ID.sub(b"msg_ID", plain)
    doc = stop(on, usages)
    assert doc["combinations"][0]["by_user"]["alice"]["request_count"] == len(cases) + 1


def test_tracking_never_holds_back_an_event(serve: Any, fake: Any) -> None:
    """The first delta reaches the client while the upstream still holds the second."""
    proxy = serve()
    seen = clients.stream_events(proxy, "u1", on_first_delta=lambda: clients.first_delta_only(fake, "u1"))
    assert seen.count("content_block_delta") == 3 and seen[-1] == "message_stop"


def test_client_gone_mid_stream_counts_what_was_reported(serve: Any, usages: Path, fake: Any) -> None:
    proxy = serve()
    body = json.dumps({"model": "claude-opus-4-6", "max_tokens": 5, "stream": True, "messages": conversation(3)})
    hdrs = "".join(f"{k}: {v}\r\n" for k, v in knobs(events=200, delay_ms=30, input_tokens=321, cache_read_tokens=5,
                                                        cache_1h_tokens=4, output_tokens=900).items())
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=10)
    sock.sendall((f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {BOB}\r\n"
                  f"Content-Type: application/json\r\n{hdrs}Content-Length: {len(body)}\r\n\r\n{body}").encode())
    received = b""
    deadline = time.monotonic() + 10
    while b"content_block_delta" not in received and time.monotonic() < deadline:
        received += sock.recv(65536)
    assert b"message_start" in received
    sock.close()
    line = wait_for(lambda: [x for x in access_lines(proxy) if x["partial"]], 10, what="the cut stream's log line")[0]
    assert line["partial"] == "client gone" and line["user"] == "bob"
    assert (line["model"], line["in"], line["out"], line["cr"], line["cw"]) == ("claude-opus-4-6", "321", "1", "5", "4")
    assert line["cost"] is not None
    doc = usage_json(usages)
    (combo,) = doc["combinations"]
    assert without_cost(combo["by_user"]["bob"]) == stats(1, 3, input=321, output=1, cache_read=5, cache_creation=4,
                                                          cache_creation_1h=4)
    wait_for(lambda: fake.stats()["active_streams"] == 0, 10, what="upstream stream closed")


def test_upstream_drop_and_idle_timeout_count_what_was_reported(serve: Any, usages: Path) -> None:
    proxy = serve(stream_idle_timeout="1s")
    model = "claude-sonnet-4-6"
    status, _, body = raw_post(proxy.url, ALICE, model, drop_after=2, input_tokens=77, output_tokens=50)
    assert status == 200 and body.count(b"event: content_block_delta") == 2 and b"event: error" in body
    status, _, body = raw_post(proxy.url, ALICE, model, stall_after=1, input_tokens=88, cache_5m_tokens=3)
    assert status == 200 and b"event: error" in body
    # the upstream ends the body itself with an error event: not cut, counted as reported
    status, _, body = raw_post(proxy.url, BOB, model, error_after=2, input_tokens=99)
    assert status == 200 and b"overloaded_error" in body
    # a JSON answer lost half-way is a 502: nothing was reported, nothing is counted
    status, _, body = raw_post(proxy.url, BOB, model, stream=False, drop_after=1, input_tokens=1000)
    assert status == 502
    # an error status is never counted (only 200s are)
    status, _, body = raw_post(proxy.url, BOB, model, status=529, input_tokens=1000)
    assert status == 529
    # a compressed stream dropped mid-way: the decoder hands the tap what arrived
    status, headers, body = raw_post(proxy.url, BOB, model, headers={"Accept-Encoding": "gzip"}, encoding="gzip",
                                     drop_after=3, input_tokens=55, cache_read_tokens=6)
    assert status == 200 and headers["content-encoding"] == "gzip"

    lines = wait_access(proxy, 6)
    assert [(x["user"], x["status"], x["partial"], x["in"], x["out"], x["cr"], x["cw"]) for x in lines] == [
        ("alice", "200", "upstream dropped", "77", "1", "0", "0"),
        ("alice", "200", "idle timeout", "88", "1", "0", "3"),
        ("bob", "200", None, "99", "1", "0", "0"),
        ("bob", "502", None, None, None, None, None),
        ("bob", "529", None, None, None, None, None),
        ("bob", "200", "upstream dropped", "55", "1", "6", "0"),
    ]
    doc = stop(proxy, usages)
    (combo,) = doc["combinations"]
    assert without_cost(combo["by_user"]["alice"]) == stats(2, 2, input=165, output=2, cache_creation=3,
                                                            cache_creation_5m=3)
    assert without_cost(combo["by_user"]["bob"]) == stats(2, 2, input=154, output=2, cache_read=6)


def test_sigkill_right_after_completed_requests_loses_nothing(serve: Any, usages: Path) -> None:
    model = "claude-sonnet-4-6"
    expected = {"alice": 0, "bob": 0}
    total_in = 0
    # the last request of each round is read raw to its very last byte, then the server is killed at once
    last = [{}, {"stream": False, "bytes": 1_500_000}, {"framing": "close"}, {"encoding": "gzip"}, {}]
    for round_, extra in enumerate(last):
        proxy = serve(f"round{round_}")
        for i in range(3 if round_ else 5):
            user, token = (("alice", ALICE), ("bob", BOB))[i % 2]
            ask(proxy, token, model, stream=i % 2 == 0, input_tokens=1000 + i)
            expected[user] += 1
            total_in += 1000 + i
        status, headers, body = raw_post(proxy.url, ALICE, model, input_tokens=7, **extra,
                                         headers={"Accept-Encoding": "gzip"})
        if extra.get("stream") is False:  # a JSON answer over 1 MB is relayed, not buffered
            assert status == 200 and len(body) == int(headers["content-length"]) > 1_000_000
        else:
            body = zlib.decompress(body, 31) if "encoding" in extra else body
            assert status == 200 and body.endswith(b'message_stop"}\n\n')
        proxy.kill()
        expected["alice"] += 1
        total_in += 7
    proxy = serve("last")
    doc = stop(proxy, usages)
    (combo,) = doc["combinations"]
    assert {u: s["request_count"] for u, s in combo["by_user"].items()} == expected
    assert combo["total"]["request_count"] == 22 and combo["total"]["input_tokens"] == total_in
    assert sorted(p.name for p in usages.parent.iterdir()) == ["usages.json", "usages.json.fold.lock",
                                                               "usages.json.journal", "usages.json.lock"]
    check_costs(doc)


def test_sigkill_during_the_shutdown_save_never_corrupts_or_loses(serve: Any, usages: Path) -> None:
    n = 0
    for round_, delay in enumerate((0.0, 0.003, 0.01, 0.03)):
        proxy = serve(f"k{round_}")
        for i in range(4):
            ask(proxy, (ALICE, BOB)[i % 2], "claude-sonnet-4-6", stream=i % 2 == 1, input_tokens=10 + i)
            n += 1
        proxy.signal(signal.SIGTERM)
        time.sleep(delay)
        proxy.kill()
        json.loads(usages.read_text())  # whole, whatever moment the save was cut at
    doc = stop(serve("final"), usages)
    (combo,) = doc["combinations"]
    assert combo["total"]["request_count"] == n and combo["total"]["input_tokens"] == n // 4 * 46
    assert {u: s["request_count"] for u, s in combo["by_user"].items()} == {"alice": n // 2, "bob": n // 2}
    assert not [p.name for p in usages.parent.iterdir() if ".tmp-" in p.name]


def test_two_serve_processes_share_one_usages_path(serve: Any, usages: Path) -> None:
    procs = [serve("p1"), serve("p2")]
    models = ("claude-sonnet-4-6", "claude-opus-4-6")
    jobs = [(procs[i % 2], (ALICE, BOB)[i // 2 % 2], models[i // 4 % 2], i % 3 == 0, i) for i in range(32)]

    def run(job: tuple[Any, str, str, bool, int]) -> None:
        proxy, token, model, stream, i = job
        ask(proxy, token, model, n_messages=1 + i % 4, stream=stream, input_tokens=10 + i, output_tokens=1 + i,
            cache_read_tokens=i, cache_1h_tokens=i % 5)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(run, jobs))

    want: dict[tuple[str, str], dict[str, Any]] = {}
    for _, token, model, _, i in jobs:
        one = stats(1, 1 + i % 4, input=10 + i, output=1 + i, cache_read=i, cache_creation=i % 5,
                    cache_creation_1h=i % 5)
        key = (model, "alice" if token == ALICE else "bob")
        want[key] = add(want.get(key, {}), one)

    def check(doc: dict[str, Any]) -> None:
        by = combos(doc)
        assert set(by) == {(m, 200_000, WEEK) for m in models}
        for (model, user), s in want.items():
            assert without_cost(by[(model, 200_000, WEEK)]["by_user"][user]) == s, (model, user)
        assert sum(c["total"]["request_count"] for c in doc["combinations"]) == 32
        check_costs(doc)

    check(usage_json(usages))  # live, while both run
    for p in procs:
        p.signal(signal.SIGTERM)
    assert [p.wait(20) for p in procs] == [0, 0]
    check(json.loads(usages.read_text()))


def test_singbox_file_keeps_its_totals_and_gains_new_ones(serve: Any, usages: Path, tmp_path: Path) -> None:
    usages.parent.mkdir(parents=True)
    shutil.copy(FIXTURE, usages)
    before = json.loads(FIXTURE.read_text())
    proxy = serve()
    week2 = 1767225600  # the fixture's opus bucket
    ask(proxy, BOB, "claude-opus-4-6", 4, reset=week2 + 604_800, input_tokens=1000, output_tokens=2000,
        cache_1h_tokens=500)
    ask(proxy, ALICE, "claude-haiku-4-5-20251001", 2, stream=True, input_tokens=30, output_tokens=40)
    doc = stop(proxy, usages)

    assert doc["last_updated"] != before["last_updated"]
    old = before["combinations"]
    new = doc["combinations"]
    assert [(c["model"], c["context_window"], c.get("week_start_unix")) for c in new] == [
        *[(c["model"], c["context_window"], c.get("week_start_unix")) for c in old],
        ("claude-haiku-4-5-20251001", 200_000, WEEK)]
    for i in (0, 1, 3):  # untouched buckets: counters and costs exactly as sing-box wrote them
        assert new[i] == old[i]
    opus = new[2]
    assert without_cost(opus["by_user"]["alice"]) == without_cost(old[2]["by_user"]["alice"])
    assert without_cost(opus["by_user"]["bob"]) == add(
        old[2]["by_user"]["bob"], stats(1, 4, input=1000, output=2000, cache_creation=500, cache_creation_1h=500))
    assert without_cost(opus["total"]) == add(
        old[2]["total"], stats(1, 4, input=1000, output=2000, cache_creation=500, cache_creation_1h=500))
    assert without_cost(new[4]["by_user"]["alice"]) == stats(1, 2, input=30, output=40)
    check_costs(doc)
    assert doc["costs"]["by_user"]["bob"] == cents(
        Decimal("0.01") + Decimal(repr(opus["by_user"]["bob"]["cost_usd"])))
    assert set(doc["costs"]["by_week"]) == {WEEK_KEY, NEXT_KEY}
    assert usage_json(usages) == {k: v for k, v in doc.items() if k not in ("journal", "ledger")}

    # the human table, from the file and from the config
    out = run_cli("usage", "-f", str(usages))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert f"Week from {NEXT_KEY}" in text and f"Week from {WEEK_KEY}" in text and "No week" in text
    assert text.index(f"Week from {NEXT_KEY}") < text.index(f"Week from {WEEK_KEY}") < text.index("No week")
    header = next(line for line in text.splitlines() if line.strip().startswith("User"))
    assert header.split() == ["User", "Model", "Requests", "Messages", "Input", "Output", "Cache", "read", "Cache",
                              "write", "USD"]
    bob_row = next(line for line in text.splitlines() if line.split()[:2] == ["bob", "claude-opus-4-6"])
    assert bob_row.split() == ["bob", "claude-opus-4-6", "6", "54", "6,000", "12,000", "400,000", "30,500",
                               f"{opus['by_user']['bob']['cost_usd']:.2f}"]
    assert any(line.split()[:3] == ["alice", "claude-sonnet-4-5-20250929", "(1M)"] for line in text.splitlines())
    report, spend = text.split("\nSpend in UTC calendar periods - ")
    assert report.strip().splitlines()[-1].startswith("All weeks: 24 requests, 265 messages, ")
    assert report.strip().endswith(f"USD {doc['costs']['total_usd']:.2f}")
    # then what each user spent this UTC day, week and month (the fixture's old records count in none)
    rows = {line.split()[0]: line.split()[1:] for line in spend.splitlines()[4:]}
    assert rows == {"alice": ["0.00", "0.00", "0.00"],
                    "bob": [f"{opus['by_user']['bob']['cost_usd'] - old[2]['by_user']['bob']['cost_usd']:.2f}"] * 3}
    cfg = run_cli("usage", "-c", str(proxy.config_path))
    assert cfg.returncode == 0 and cfg.stdout.split("\nSpend in")[0].splitlines()[1:] == report.splitlines()[1:]
    assert json.loads(run_cli("usage", "-c", str(proxy.config_path), "--json").stdout)["costs"] == doc["costs"]


def test_usage_command_errors(tmp_path: Path) -> None:
    out = run_cli("usage", "-f", str(tmp_path / "none.json"))
    assert out.returncode == 1 and "no usage file" in out.stderr
    bad = tmp_path / "bad.json"
    bad.write_text('{"combinations": 5}')
    out = run_cli("usage", "-f", str(bad), "--json")
    assert out.returncode == 1 and "corrupt" in out.stderr and bad.read_text() == '{"combinations": 5}'


def test_graceful_shutdown_saves_a_stream_that_finishes_during_it(serve: Any, usages: Path, fake: Any) -> None:
    proxy = serve()
    done: list[Any] = []
    thread = threading.Thread(target=lambda: done.append(
        ask(proxy, ALICE, "claude-sonnet-4-6", stream=True, events=20, delay_ms=40, input_tokens=4242)))
    thread.start()
    wait_for(lambda: fake.stats()["active_streams"] == 1, 10, what="the stream under way")
    doc = stop(proxy, usages)
    thread.join(10)
    assert done and done[0].usage.input_tokens == 4242
    assert doc["combinations"][0]["by_user"]["alice"]["input_tokens"] == 4242
