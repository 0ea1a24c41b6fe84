"""The benchmark's fast paths give exactly what the code they replace gave (no timings asserted here)."""

from __future__ import annotations

import http.client
import io

from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_wsgi import patches


def state(message: http.client.HTTPMessage) -> dict:
    d = dict(vars(message))
    d["defects"] = [(type(x).__name__, str(x)) for x in d["defects"]]
    d["policy"] = repr(d["policy"])
    d["items"] = message.items()
    if isinstance(d["_payload"], list):  # a multipart or message/* block (left to the email parser)
        d["_payload"] = [state(part) for part in d["_payload"]]
    return d


def check(block: bytes) -> None:
    from gevent.pywsgi import headers_factory  # request headers: pywsgi's HTTPMessage subclass

    lines = http.client._read_headers(io.BytesIO(block))  # type: ignore[attr-defined]
    for cls in (http.client.HTTPMessage, headers_factory(io.BytesIO(b"\r\n")).__class__):
        expected = patches._email_parse(list(lines), cls)
        got = patches.parse_header_lines(list(lines), cls)
        assert type(got) is cls
        assert state(got) == state(expected)


ANTHROPIC = (
    b"date: Tue, 25 Nov 2026 21:42:39 GMT\r\ncontent-type: text/event-stream; charset=utf-8\r\n"
    b"transfer-encoding: chunked\r\nconnection: keep-alive\r\ncache-control: no-cache\r\n"
    b"anthropic-ratelimit-unified-status: allowed\r\nanthropic-ratelimit-unified-5h-utilization: 0.12\r\n"
    b"anthropic-ratelimit-unified-7d-reset: 1795900000\r\nrequest-id: req_011CV\r\n"
    b"strict-transport-security: max-age=31536000; includeSubDomains; preload\r\nvia: 1.1 google\r\n"
    b"cf-cache-status: DYNAMIC\r\nX-Robots-Tag: none\r\nServer: cloudflare\r\nCF-RAY: 9a0b-LHR\r\n\r\n"
)


def test_parse_headers_is_installed_at_start_up_only() -> None:
    patches.install()
    assert http.client.parse_headers is patches.parse_headers


def test_typical_and_odd_blocks() -> None:
    for block in (
        ANTHROPIC,
        b"\r\n",
        b"a: b\n\n",
        b"a:b\r\n\r\n",
        b"a:   \t \r\n\r\n",
        b"X-Empty:\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n",
        b"Folded: one\r\n two\r\n\r\n",
        b" leading: continuation\r\n\r\n",
        b"From nobody\r\nA: b\r\n\r\n",
        b": no name\r\n\r\n",
        b"no colon here\r\n\r\n",
        b"sp ace: x\r\n\r\n",
        b"A: cr\rinside\r\n\r\n",
        b"A: b\r\r\n\r\n",
        b"A: latin \xe9\xff\x85\x0b\x0c\x1c\r\n\r\n",
        b"Content-Type: multipart/mixed; boundary=x\r\n\r\n",
        b"content-type: message/rfc822\r\n\r\n",
        b"A: b\r\n",  # no blank line: EOF ends the block
        b"",
    ):
        check(block)


GOOD = st.tuples(  # mostly well-formed lines, so most blocks take the fast path
    st.text(alphabet="aZ09-_!~;", min_size=1, max_size=6),
    st.sampled_from([":", ": ", ":\t ", ":  "]),
    st.text(alphabet="ab :;,=/\t\x00\x7f\xe9\xff", max_size=8),
    st.sampled_from(["\r\n", "\r\n", "\n"]),
).map(lambda t: "".join(t))
LINE = st.one_of(
    GOOD,
    GOOD,
    GOOD,
    st.tuples(
        st.text(alphabet="aB-_:;!~ \t\x7f\xe9", min_size=0, max_size=6),
        st.sampled_from([":", ": ", ":\t ", "", " :"]),
        st.text(alphabet="ab :;\t\r\x00\x0b\x85\xe9\xff", max_size=8),
        st.sampled_from(["\r\n", "\n", "\r\r\n"]),
    ).map(lambda t: "".join(t)),
    st.sampled_from(["Content-Type: multipart/x\r\n", "content-type: text/plain\r\n", " cont\r\n", "From x\r\n"]),
)


@settings(max_examples=400, deadline=None)
@given(st.one_of(st.lists(GOOD, max_size=8), st.lists(LINE, max_size=6)), st.sampled_from(["\r\n", "\r\n", "\n", ""]))
def test_same_message_as_the_email_parser(lines: list[str], end: str) -> None:
    check(("".join(lines) + end).encode("latin-1"))


# --- the usage journal line ----------------------------------------------------------------------

TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=12) | st.sampled_from(["", "alice", 'a"b\\c\n\x00é☃'])
INT = st.integers(min_value=-(2**63), max_value=2**63 - 1)  # a journal line's integers are 64-bit


FLOAT = st.floats(allow_nan=False, allow_infinity=False)


@settings(max_examples=300, deadline=None)
@given(TEXT, TEXT, st.lists(INT, min_size=10, max_size=10), FLOAT, st.lists(FLOAT, max_size=6))
def test_journal_line_is_the_entry_in_json(user: str, model: str, ints: list[int], cost: float,
                                           readings: list[float]) -> None:
    import json

    from ccm_wsgi.accounting import journal
    from ccm_wsgi.accounting.records import Record
    from ccm_wsgi.accounting.tokens import NAMES, Tokens

    rec = Record(user, model, *ints[:3], Tokens(*ints[3:9]), cost, tuple(readings))
    t_ns = ints[9]
    entry = {"t": t_ns, "user": user, "model": model, "context_window": ints[0], "week_start_unix": ints[1],
             "messages_count": ints[2], **dict(zip(NAMES, ints[3:9], strict=True)), "cost": cost}
    if readings:
        entry["readings"] = readings
    line = journal.line(rec, t_ns)
    assert line.startswith(b"\n{") and b"\n" not in line[1:]  # one line, compact
    assert list(json.loads(line).items()) == list(entry.items())  # the standard parser reads it, keys in order
    total = Tokens(*ints[3:9])
    total.cache_creation_input_tokens = total.cache_creation  # read back with its cache writes as one total
    assert journal.decode(line.strip(b"\n")) == (Record(user, model, *ints[:3], total, cost, tuple(readings)), t_ns)


# --- the usage journal kept open between records ---------------------------------------------------


def _record(user: str):
    from ccm_wsgi.accounting.records import Record
    from ccm_wsgi.accounting.tokens import Tokens

    return Record(user, "claude-sonnet-4-5", 200_000, 0, 1, Tokens(10, 5))


def _store(path):
    import logging

    from ccm_wsgi.accounting.pricing import Pricing
    from ccm_wsgi.accounting.store import UsageStore

    log = logging.getLogger("test")
    return UsageStore(str(path), Pricing((), log), log)


def _users(path) -> dict[str, int]:
    import json

    doc = json.loads(path.read_text())
    return {user: stats["request_count"] for c in doc["combinations"] for user, stats in c["by_user"].items()}


def test_kept_journal_follows_rotation_by_another_store(tmp_path, monkeypatch) -> None:
    from ccm_wsgi.accounting import appender

    path = tmp_path / "u.json"
    a, b = _store(path), _store(path)
    a.open()
    a.record(_record("alice"))  # opens and keeps the journal
    b.save()  # another process folds: the journal is replaced (and the seal count in the lock file changes)
    a.record(_record("bob"))  # must go to the new journal, not the replaced one, without a recheck due
    a.record(_record("bob"))
    b.save()
    assert _users(path) == {"alice": 1, "bob": 2}
    monkeypatch.setattr(appender, "LOCK_RECHECK", 0.0)  # notice files removed by hand at once
    (tmp_path / "u.json.journal").unlink()  # removed: re-created on the next record
    a.record(_record("carol"))
    (tmp_path / "u.json.lock").unlink()  # a deleted lock file: the kept descriptor is dropped
    a.record(_record("carol"))
    assert (tmp_path / "u.json.lock").exists()  # re-created: the file a fold would lock
    a.close()
    assert _users(path) == {"alice": 1, "bob": 2, "carol": 2}


def _bob_today(store) -> int:
    import time

    from ccm_wsgi.accounting.periods import day_of

    return store.current_ledger().since("bob", day_of(time.time())).requests


def test_follower_sees_another_store_s_records_across_its_folds(tmp_path) -> None:
    path = tmp_path / "u.json"
    a, b = _store(path), _store(path)
    a.open()
    b.open()
    b.record(_record("bob"))
    assert _bob_today(a) == 1
    b.save()  # another process's fold seals the journal A follows (the seal count changes)
    b.record(_record("bob"))
    b.record(_record("bob"))
    assert _bob_today(a) == 3  # read on in the new journal at once, without waiting for a recheck
    a.close()
    b.close()


def test_follower_finds_the_journal_after_the_lock_file_was_replaced(tmp_path, monkeypatch) -> None:
    from ccm_wsgi.accounting import appender, follow

    monkeypatch.setattr(follow, "RECHECK", 0.0)  # look at the paths on every read and append
    monkeypatch.setattr(appender, "LOCK_RECHECK", 0.0)
    path = tmp_path / "u.json"
    a, b = _store(path), _store(path)
    a.open()
    b.record(_record("bob"))
    (tmp_path / "u.json.lock").unlink()  # replaced by hand: its count starts again in a new file
    b.save()  # sealed under the new lock file, whose count A does not map
    b.record(_record("bob"))
    assert _bob_today(a) == 2
    b.save()
    b.record(_record("bob"))
    assert _bob_today(a) == 3  # and it maps the new lock file's count
    a.close()
    b.close()


def test_own_records_are_read_back_once_among_byte_identical_lines(tmp_path, monkeypatch, caplog) -> None:
    import time

    from ccm_wsgi.accounting import store as store_module
    from ccm_wsgi.accounting.periods import day_of

    now = time.time_ns()
    monkeypatch.setattr(store_module.time, "time_ns", lambda: now)  # same record, same bytes, in both stores
    monkeypatch.setattr(store_module, "READ_BACK_MAX", 3)  # own records read back in small batches
    path = tmp_path / "u.json"
    a, b = _store(path), _store(path)
    a.open()
    b.open()
    for i in range(4):
        a.record(_record("bob"))
        b.record(_record("bob"))
        b.record(_record("carol"))
        if i % 2:
            a.record(_record("eve"))  # as long as bob's line: told apart by its bytes
    journal = (tmp_path / "u.json.journal").read_bytes()
    assert [journal.count(b'"user":"%s"' % u) for u in (b"bob", b"carol", b"eve")] == [8, 4, 2]
    for store in (a, b):
        ledger = store.current_ledger()
        assert [ledger.since(u, day_of(now / 1e9)).requests for u in ("bob", "carol", "eve")] == [8, 4, 2]
    assert "not in it any more" not in caplog.text  # every own line was found
    a.save()
    assert _users(path) == {"bob": 8, "carol": 4, "eve": 2}
    a.close()
    b.close()


def test_own_records_count_in_the_ledger_after_the_journal_was_removed_by_hand(tmp_path, monkeypatch) -> None:
    from ccm_wsgi.accounting import appender

    monkeypatch.setattr(appender, "LOCK_RECHECK", 0.0)
    path = tmp_path / "u.json"
    a = _store(path)
    a.open()
    a.record(_record("bob"))
    assert _bob_today(a) == 1
    (tmp_path / "u.json.journal").unlink()  # the appender re-creates it; the follower moves on to it
    a.record(_record("bob"))
    a.record(_record("bob"))
    assert _bob_today(a) == 3
    a.save()
    assert _users(path) == {"bob": 3}  # folded from the live state, which still holds the removed journal's record
    a.close()
