"""The usage store: sing-box's file format, exact totals, and no lost or doubled record whatever happens."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import gevent
import gevent.event
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from ccm_wsgi.accounting import members
from ccm_wsgi.accounting.ledger import Ledger
from ccm_wsgi.accounting.periods import day_number
from ccm_wsgi.accounting.pricing import Pricing
from ccm_wsgi.accounting.reading import UsageFileError, load_totals
from ccm_wsgi.accounting.records import Record, format_time, make_record, parse_time, render, week_key
from ccm_wsgi.accounting.tokens import Tokens
from tests.support.usage_store import FIXTURE, W1, rec, requests, store_at, usage

log = logging.getLogger("test-usage")


@pytest.fixture
def tz(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    def use(zone: str) -> None:
        monkeypatch.setenv("TZ", zone)
        time.tzset()

    use("UTC")
    yield use
    monkeypatch.undo()
    time.tzset()


# --- make_record ---------------------------------------------------------------------------------


def test_make_record_rules() -> None:
    u = usage("claude-opus-4-6", 150_000, 10, 40_000, 0, 6_000, 5_000)
    r = make_record("alice", u, "ignored", 4, "context-1m-2025-08-07", " 1767225600 ")
    assert r == Record("alice", "claude-opus-4-6", 1_000_000, W1, 4, Tokens(150_000, 10, 40_000, 11_000, 6_000, 5_000))
    assert make_record("", usage(input_tokens=1), "req-model", 0, "", None).model == "req-model"  # type: ignore[union-attr]
    assert make_record("a", usage(input_tokens=1), "", 0, "", None) is None  # no model at all
    assert make_record("a", usage("m", cache_read_input_tokens=5), "", 0, "", None) is None  # no input/output


@pytest.mark.parametrize(
    ("tokens", "beta", "window"),
    [
        (200_000, "context-1m-2025-08-07", 200_000),  # not more than 200k
        (200_001, "context-1m-2025-08-07", 1_000_000),
        (200_001, "oauth-2025-04-20, context-1m-2025-08-07 ,x", 1_000_000),
        (200_001, "fast-mode-2026-01-01", 200_000),
        (200_001, "xcontext-1m", 200_000),
        (200_001, "", 200_000),
    ],
)
def test_context_window(tokens: int, beta: str, window: int) -> None:
    r = make_record("a", usage("m", input_tokens=tokens - 1, cache_read_input_tokens=1), "", 1, beta, None)
    assert r is not None and r.context_window == window


@pytest.mark.parametrize(
    ("header", "week"),
    [("1767225600", W1), (" 1767225600\t", W1), ("+1767225600", W1), (None, 0), ("", 0), ("abc", 0), ("0", 0)],
)
def test_week_hint(header: str | None, week: int) -> None:
    assert make_record("a", usage("m", 1), "", 1, "", header).week_start_unix == week  # type: ignore[union-attr]


@pytest.mark.parametrize("header", ["-5", "1.5e9", "1_767_225_600", "9" * 30, "100", "١٢٣"])
def test_week_hint_never_raises(header: str) -> None:
    assert make_record("a", usage("m", 1), "", 1, "", header).week_start_unix == 0  # type: ignore[union-attr]


def test_cache_creation_falls_back_to_the_split() -> None:
    u = usage("m", 1, 0, 0, 0, 30, 12)
    assert make_record("a", u, "", 1, "", None).tokens.cache_creation_input_tokens == 42  # type: ignore[union-attr]


# --- time formats --------------------------------------------------------------------------------


def test_week_keys_and_timestamps_in_local_time(tz: Any) -> None:
    reset = 1767225600
    for zone, key in [
        ("UTC", "2025-12-25 00:00:00 UTC+0"),
        ("CST-8", "2025-12-25 08:00:00 UTC+8"),
        ("IST-5:30", "2025-12-25 05:30:00 UTC+5:30"),
        ("NST+3:30", "2025-12-24 20:30:00 UTC-3:30"),
    ]:
        tz(zone)
        assert week_key(reset - 604800) == key
    tz("UTC")
    assert format_time(1767225600 * 10**9 + 120_000_000) == "2026-01-01T00:00:00.12Z"
    tz("CST-8")
    assert format_time(1767225600 * 10**9) == "2026-01-01T08:00:00+08:00"
    assert parse_time("2026-01-02T18:04:05.123456789+08:00") == 1767348245123456789
    assert parse_time("2026-01-02T10:04:05Z") == 1767348245 * 10**9
    assert parse_time("yesterday") is None


# --- the document --------------------------------------------------------------------------------


def test_records_fold_into_the_exact_schema(tmp_path: Path, tz: Any) -> None:
    path = tmp_path / "usages.json"
    store = store_at(path)
    store.open()
    sonnet = {"model": "claude-sonnet-4-5-20250929"}
    store.record(rec("alice", **sonnet, messages_count=3, input_tokens=1000, output_tokens=500,
                     cache_read_input_tokens=20000, cache_creation_input_tokens=3000,
                     cache_creation_5m_input_tokens=3000))  # fmt: skip
    store.record(rec("bob", **sonnet, input_tokens=100, output_tokens=100))
    store.record(rec("", **sonnet, input_tokens=2000))
    store.record(rec("alice", "claude-opus-4-6", context_window=1_000_000, week_start_unix=0,
                     messages_count=7, input_tokens=300_000, output_tokens=1000))  # fmt: skip
    assert store.save()
    text = path.read_text()
    doc = json.loads(text)
    stats = {"request_count": 1, "messages_count": 3, "input_tokens": 1000, "output_tokens": 500}
    stats |= {"cache_read_input_tokens": 20000, "cache_creation_input_tokens": 3000}
    stats |= {"cache_creation_5m_input_tokens": 3000, "cost_usd": 0.03}
    bob = {"request_count": 1, "messages_count": 1, "input_tokens": 100, "output_tokens": 100}
    bob |= {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cost_usd": 0}
    opus = {"request_count": 1, "messages_count": 7, "input_tokens": 300_000, "output_tokens": 1000}
    opus |= {"cache_read_input_tokens": 0, "cache_creation_input_tokens": 0, "cost_usd": 3.04}  # premium
    week = "2025-12-25 00:00:00 UTC+0"
    assert doc == {
        "last_updated": doc["last_updated"],
        "costs": {
            "total_usd": 3.08,
            "by_user": {"alice": 3.07, "bob": 0},
            "by_week": {week: 0.04},
            "by_user_and_week": {"alice": {week: 0.03}, "bob": {week: 0}},
        },
        "combinations": [
            {
                "model": "claude-sonnet-4-5-20250929",
                "context_window": 200_000,
                "week_start_unix": W1,
                "total": {
                    **stats,
                    "request_count": 3,
                    "messages_count": 5,
                    "input_tokens": 3100,
                    "output_tokens": 600,
                    "cost_usd": 0.04,
                },
                "by_user": {"alice": stats, "bob": bob},
            },
            {"model": "claude-opus-4-6", "context_window": 1_000_000, "total": opus, "by_user": {"alice": opus}},
        ],
        "journal": doc["journal"],
        "ledger": doc["ledger"],  # ours: what each user spent per UTC day, and their window shares
    }
    assert list(doc) == ["last_updated", "costs", "combinations", "journal", "ledger"]
    assert list(doc["combinations"][0]["total"]) == [
        "request_count",
        "messages_count",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
        "cache_creation_5m_input_tokens",
        "cost_usd",
    ]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", doc["last_updated"])
    assert '"bob": 0\n' in text and not re.search(r"\.0[,\n]", text)  # Go writes 0, not 0.0
    spend = {user: round(sum(days.values()), 6) for user, days in doc["ledger"]["spend"].items()}
    # unrounded, per record, as the file prices them; a record without a user under ""
    assert spend == {"alice": 3.06525, "bob": 0.0018, "": 0.006}
    counts = {user: [sum(n) for n in zip(*days.values(), strict=True)]
              for user, days in doc["ledger"]["counts"].items()}
    # requests, input, output, cache read, cache write per user (the page's today / this week / this month)
    assert counts == {"alice": [2, 301_000, 1500, 20_000, 3000], "bob": [1, 100, 100, 0, 0], "": [1, 2000, 0, 0, 0]}
    snap = store.snapshot()
    assert "journal" not in snap and snap["combinations"] == doc["combinations"]


def test_last_updated_is_the_start_time_for_a_new_file(tmp_path: Path) -> None:
    before = time.time_ns()
    store_at(tmp_path / "u.json").open()
    doc = json.loads((tmp_path / "u.json").read_text())
    assert doc["combinations"] == [] and doc["costs"] == {"total_usd": 0, "by_user": {}}
    assert parse_time(doc["last_updated"]) >= before - 10**9  # type: ignore[operator]


def test_singbox_file_loads_round_trips_and_carries_on(tmp_path: Path, tz: Any) -> None:
    tz("CST-8")  # the zone the fixture's week keys were written in
    original = FIXTURE.read_text()
    assert render(load_totals(str(FIXTURE), log), Pricing()) == json.loads(original)
    path = tmp_path / "usages.json"
    shutil.copy(FIXTURE, path)
    store = store_at(path)
    store.open()
    assert path.read_text() == original  # nothing new: sing-box's file is left as it is
    store.record(rec("alice", "claude-sonnet-4-5-20250929", messages_count=2, input_tokens=100, output_tokens=100))
    store.close()
    doc = json.loads(path.read_text())
    before = json.loads(original)
    combo = doc["combinations"][0]
    assert combo["total"]["request_count"] == 5 and combo["by_user"]["alice"]["request_count"] == 4
    assert combo["total"]["messages_count"] == 49 and combo["total"]["input_tokens"] == 1800
    assert doc["combinations"][1:] == before["combinations"][1:]
    assert [c["model"] for c in doc["combinations"]] == [c["model"] for c in before["combinations"]]
    assert doc["costs"]["total_usd"] == 2.84  # bucket 0.1179 -> 0.12 and alice 0.1128 -> 0.11: unchanged
    assert doc["costs"]["by_user"] == {"alice": 2.05, "bob": 0.79}
    assert doc["last_updated"] > before["last_updated"]


# --- damaged files -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"", b"[]", b'{"combinations": "oops"}', b'{"combinations": [{"total": {"input_tokens": 1.5}}]}'],
)
def test_corrupt_file_is_kept_aside_never_overwritten(
    tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "u.json"
    first = store_at(path)
    first.record(rec("alice"))  # in the journal, not yet folded
    path.write_bytes(content)
    with caplog.at_level(logging.ERROR):
        store_at(path).open()
    aside = [p for p in tmp_path.iterdir() if ".corrupt-" in p.name]
    assert len(aside) == 1 and aside[0].read_bytes() == content
    assert "corrupt" in caplog.text and aside[0].name in caplog.text
    assert requests(path) == {"": 1, "alice": 1}


def test_corrupt_file_that_cannot_be_moved_stops_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "u.json"
    path.write_bytes(b"garbage")

    def refuse(src: str, dst: str) -> None:
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "rename", refuse)
    with pytest.raises(UsageFileError, match="corrupt"):
        store_at(path).open()
    assert path.read_bytes() == b"garbage"
    store = store_at(path)
    store.record(rec())
    assert not store.save()  # logged, and still not overwritten
    assert path.read_bytes() == b"garbage"


def test_cut_journal_line_is_skipped_and_later_lines_count(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "u.json"
    store = store_at(path)
    store.open()
    store.record(rec("alice"))
    with open(str(path) + ".journal", "ab") as journal:
        journal.write(b'\n{"t":1,"user":"mallory","model":"claude')  # a write cut short (disk full)
    store.record(rec("bob"))
    with caplog.at_level(logging.WARNING):
        store_at(path).open()
    assert "damaged" in caplog.text
    assert requests(path) == {"": 2, "alice": 1, "bob": 1}


def test_unwritable_journal_keeps_records_in_memory(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "u.json"
    store = store_at(path)
    store.open()
    journal = Path(str(path) + ".journal")
    journal.unlink()
    journal.mkdir()  # appending now fails
    with caplog.at_level(logging.ERROR):
        store.record(rec("alice"))
    assert "keeping the record in memory" in caplog.text
    journal.rmdir()
    assert store.snapshot()["combinations"][0]["total"]["request_count"] == 1
    assert store.save()
    store.record(rec("alice"))
    assert store.save()
    assert requests(path) == {"": 2, "alice": 2}


# --- gevent ------------------------------------------------------------------------------------


class CountingEvent(gevent.event.Event):
    """A store's stop event that counts the saver's waits: the saver waits once per period, and saves (when
    something changed) right after a wait ends, before the next one."""

    def __init__(self) -> None:
        super().__init__()
        self.waits = 0

    def wait(self, timeout: float | None = None) -> bool:
        self.waits += 1
        return bool(super().wait(timeout))


def saver_periods(event: CountingEvent, n: int) -> None:
    """Let the saver run `n` more periods (a bounded wait)."""
    target = event.waits + n
    for _ in range(5000):
        if event.waits >= target:
            return
        gevent.sleep(0.002)
    raise AssertionError(f"the saver ran {event.waits} periods, not {target}")


def test_saver_greenlet_saves_when_something_changed(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    store = store_at(path, interval=0.005)
    event = store._stop = CountingEvent()
    store.open()
    store.start()
    before = (path.stat().st_ino, path.stat().st_mtime_ns)
    saver_periods(event, 5)
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == before  # idle periods: no rewrites
    store.record(rec())
    saver_periods(event, 2)  # the period the record fell in ended with a save
    assert json.loads(path.read_text())["combinations"][0]["total"]["request_count"] == 1
    store.record(rec())
    store.close()
    assert json.loads(path.read_text())["combinations"][0]["total"]["request_count"] == 2
    assert store._saver is None


def test_waiting_for_the_lock_does_not_block_the_hub(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    store = store_at(path)
    store.open()
    holder = os.open(str(path) + ".lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # another process is folding
    ticks: list[None] = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.001)) for _ in range(10_000)])
    writer = gevent.spawn(store.record, rec())
    for _ in range(1000):  # bounded; a writer blocking the hub would stop the ticker (and this loop) altogether
        if len(ticks) > 5:
            break
        gevent.sleep(0.001)
    assert len(ticks) > 5 and not writer.dead  # other greenlets ran while the writer waited for the lock
    os.close(holder)
    writer.join(timeout=20)
    ticker.kill()
    assert writer.dead and requests(path)[""] == 1


def test_a_ledger_saved_before_counts_were_kept_still_loads() -> None:
    old = {"spend": {"alice": {"2026-11-02": 1.5, "2026-11-03": 0.25}}, "windows": {}}
    ledger = Ledger.from_json(old)
    since = ledger.since("alice", day_number("2026-11-03"))
    assert (since.requests, since.input, since.usd) == (0, 0, 0.25)  # spend only: those days have no counts
    ledger.add_all([(Record("alice", "claude-sonnet-4-5", 200_000, 0, 1, Tokens(10, 20, 30, 40), 0.5),
                     (day_number("2026-11-03") * 86400 + 60) * 10**9)], Pricing())
    since = ledger.since("alice", day_number("2026-11-03"))
    assert (since.requests, since.input, since.output, since.cache_read, since.cache_write) == (1, 10, 20, 30, 40)
    assert since.usd == 0.75
    again = Ledger.from_json(json.loads(json.dumps(ledger.to_json(day_number("2026-11-03") * 86400.0))))
    assert again.since("alice", 0) == ledger.since("alice", 0)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["alice", "bob"]), st.sampled_from(["check", "record", "record", "save"]),
                          st.floats(0.001, 5.0)), min_size=1, max_size=40))
# bob's store misses two journals, and again two after its fold (alice's last fold is her store's close): each
# loss is recovered at once (a recovery used to hold the next one back for RECOVER_RETRY seconds)
@example(steps=[("alice", "record", 1.0), ("alice", "save", 1.0), ("alice", "record", 1.0), ("alice", "save", 1.0),
                ("bob", "check", 1.0), ("alice", "record", 1.0), ("alice", "save", 1.0), ("alice", "record", 1.0)])
def test_stores_reading_their_ledger_between_records_count_each_record_once_in_journal_order(
        steps: list[tuple[str, str, float]]) -> None:
    """Two stores on one file (two workers): alice's requests go through one, bob's through the other. Each
    step is a limited request of one of them reading its store's ledger (its check), a response recorded, or
    a fold. Whatever the order, both ledgers and the file come out as every record added one by one in the
    order appended: also a store that was not reading while the other folded twice (one journal came and went
    unread), and a store that counts its own record at once or reads it back later."""
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "u.json"
        stores = {"alice": store_at(path), "bob": store_at(path)}
        for store in stores.values():
            store.open()
        expected = Ledger()
        recorded = {"": 0, "alice": 0, "bob": 0}
        for user, step, cost in steps:
            if step == "check":
                stores[user].current_ledger()
            elif step == "save":
                assert stores[user].save()
            else:
                record = rec(user)
                record.cost = cost
                stores[user].record(record)
                expected.add(record, time.time_ns(), Pricing())
                recorded[""] += 1
                recorded[user] += 1
        for store in stores.values():
            ledger = store.current_ledger()
            for user in stores:
                assert ledger.spent(user, [0]) == expected.spent(user, [0])
                assert ledger.since(user, 0) == expected.since(user, 0)
            store.close()
        assert requests(path) == {user: n for user, n in recorded.items() if n or not user}


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "b"]),
                          st.sampled_from(["check", "record", "record", "save", "restart"]), st.floats(0.001, 5.0)),
                min_size=1, max_size=40))
# a appends alone and takes its own lines; b joins and records; a's next check must read b's record
@example(steps=[("a", "record", 1.0), ("a", "check", 1.0), ("a", "record", 1.0), ("b", "record", 2.0),
                ("a", "check", 1.0)])
# b records and leaves (a restart) between two checks of a; a is alone at its next check and must still count it
@example(steps=[("a", "record", 1.0), ("a", "check", 1.0), ("b", "record", 2.0), ("b", "restart", 1.0),
                ("a", "check", 1.0)])
def test_a_store_that_appends_alone_counts_every_record_at_every_check(steps: list[tuple[str, str, float]]) -> None:
    """Two processes' stores on one file that come and go (a restart closes one and opens a new one, whose
    first record joins the journal's appenders), asking at every ledger read whether they append alone. At
    every check the ledger holds exactly every record appended so far, by either, in journal order: a store
    that appends alone takes its own lines as written and reads nothing, and must notice at once that the
    other joined, and count what the other appended before it left."""
    with tempfile.TemporaryDirectory() as directory, mock.patch.object(members, "ALONE_RECHECK", 0.0):
        path = Path(directory) / "u.json"
        stores = {"a": store_at(path), "b": store_at(path)}
        for store in stores.values():
            store.open()
        expected = Ledger()
        for who, step, cost in steps:
            if step == "check":
                ledger = stores[who].current_ledger()
                assert ledger.spent(who, [0]) == expected.spent(who, [0])
                assert ledger.spent("ab".replace(who, ""), [0]) == expected.spent("ab".replace(who, ""), [0])
            elif step == "save":
                assert stores[who].save()
            elif step == "restart":
                stores[who].close()
                stores[who] = store_at(path)
                stores[who].open()
            else:
                record = rec(who)
                record.cost = cost
                stores[who].record(record)
                expected.add(record, time.time_ns(), Pricing())
        for store in stores.values():
            ledger = store.current_ledger()
            assert [ledger.spent(user, [0]) for user in "ab"] == [expected.spent(user, [0]) for user in "ab"]
            store.close()


def test_a_store_found_alone_first_reads_what_a_process_that_left_had_appended(tmp_path: Path) -> None:
    """The other process appended, then closed its journal (and with it its place among the appenders), after
    this store's last read and before it asked whether it is alone: the answer is yes, and the other's record,
    which this store never read, is counted before its own lines are taken as written."""
    path = tmp_path / "u.json"
    mine, other = store_at(path), store_at(path)
    mine.open()
    other.open()
    mine.record(rec("a"))  # joins
    with mock.patch.object(members, "ALONE_RECHECK", 3600.0):
        assert mine.current_ledger().spent("a", [0]) == [rec("a").cost or Pricing().cost_of(rec("a"))]
    late = rec("b")
    late.cost = 2.5
    other.record(late)
    other._appender.close()  # the other process is gone (no fold: nothing moves the journal)
    mine._alone.after = 0.0
    mine._alone.ask(mine._appender, mine._follower)  # asked before it read the journal again
    mine.record(rec("a"))  # taken as written, after the other's line
    assert mine.current_ledger().spent("b", [0]) == [2.5]
    assert mine._alone.mark is not None  # and it does append alone now
    mine.close()
    other.close()
    assert requests(path) == {"": 3, "a": 2, "b": 1}
