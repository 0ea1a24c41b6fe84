"""The usage store: sing-box's file format, exact totals, and no lost or doubled record whatever happens."""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gevent
import pytest

from ccm_wsgi.accounting.pricing import Pricing
from ccm_wsgi.accounting.sse import Usage
from ccm_wsgi.accounting.usage import (
    Record,
    UsageFileError,
    UsageStore,
    format_time,
    load_totals,
    make_record,
    parse_time,
    render,
    week_key,
)

FIXTURE = Path(__file__).parent / "fixtures" / "singbox-usages.json"
W1 = 1766620800  # 2025-12-25 00:00:00 UTC
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


def rec(user: str = "alice", model: str = "claude-sonnet-4-5", **fields: int) -> Record:
    values = {"context_window": 200_000, "week_start_unix": W1, "messages_count": 1, "input_tokens": 10}
    values |= dict.fromkeys(
        (
            "output_tokens",
            "cache_read_input_tokens",
            "cache_creation_input_tokens",
            "cache_creation_5m_input_tokens",
            "cache_creation_1h_input_tokens",
        ),
        0,
    )
    return Record(user, model, **(values | fields))


def store_at(path: Path, **kwargs: Any) -> UsageStore:
    return UsageStore(str(path), Pricing(), log, **kwargs)


def requests(path: Path) -> dict[str, int]:
    """Request count per user and in total, from a fresh read-only load of file + journal."""
    doc = render(load_totals(str(path), log), Pricing())
    counts: dict[str, int] = {"": 0}
    for combo in doc["combinations"]:
        counts[""] += combo["total"]["request_count"]
        for user, stats in combo["by_user"].items():
            counts[user] = counts.get(user, 0) + stats["request_count"]
    return counts


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp-" in p.name or ".corrupt-" in p.name)


# --- make_record ---------------------------------------------------------------------------------


def test_make_record_rules() -> None:
    u = Usage("claude-opus-4-6", 150_000, 10, 40_000, 0, 6_000, 5_000)
    r = make_record("alice", u, "ignored", 4, "context-1m-2025-08-07", " 1767225600 ")
    assert r == Record("alice", "claude-opus-4-6", 1_000_000, W1, 4, 150_000, 10, 40_000, 11_000, 6_000, 5_000)
    assert make_record("", Usage(input_tokens=1), "req-model", 0, "", None).model == "req-model"  # type: ignore[union-attr]
    assert make_record("a", Usage(input_tokens=1), "", 0, "", None) is None  # no model at all
    assert make_record("a", Usage("m", cache_read_input_tokens=5), "", 0, "", None) is None  # no input/output


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
    r = make_record("a", Usage("m", input_tokens=tokens - 1, cache_read_input_tokens=1), "", 1, beta, None)
    assert r is not None and r.context_window == window


@pytest.mark.parametrize(
    ("header", "week"),
    [("1767225600", W1), (" 1767225600\t", W1), ("+1767225600", W1), (None, 0), ("", 0), ("abc", 0), ("0", 0)],
)
def test_week_hint(header: str | None, week: int) -> None:
    assert make_record("a", Usage("m", 1), "", 1, "", header).week_start_unix == week  # type: ignore[union-attr]


@pytest.mark.parametrize("header", ["-5", "1.5e9", "1_767_225_600", "9" * 30, "100", "١٢٣"])
def test_week_hint_never_raises(header: str) -> None:
    assert make_record("a", Usage("m", 1), "", 1, "", header).week_start_unix == 0  # type: ignore[union-attr]


def test_cache_creation_falls_back_to_the_split() -> None:
    u = Usage("m", 1, 0, 0, 0, 30, 12)
    assert make_record("a", u, "", 1, "", None).cache_creation_input_tokens == 42  # type: ignore[union-attr]


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
    }
    assert list(doc) == ["last_updated", "costs", "combinations", "journal"]
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


# --- durability --------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import logging, os, signal, sys
    from ccm_wsgi.accounting.pricing import Pricing
    from ccm_wsgi.accounting.usage import Record, UsageStore

    path = sys.argv[1]
    store = UsageStore(path, Pricing(), logging.getLogger("child"))

    def rec(user, i):
        return Record(user, "claude-sonnet-4-5", 200000, 1766620800, 1, 10 + i % 7, 1, 0, 0, 0, 0)

    def die():
        os.kill(os.getpid(), signal.SIGKILL)
    """
)


def child(path: Path, body: str, *args: str) -> subprocess.CompletedProcess[str]:
    script = CHILD + textwrap.dedent(body)
    return subprocess.run(
        [sys.executable, "-c", script, str(path), *args], capture_output=True, text=True, timeout=60, check=False
    )


def input_tokens(n: int, start: int = 0) -> int:
    return sum(10 + i % 7 for i in range(start, start + n))


@pytest.mark.parametrize("opened", [True, False])
def test_sigkill_right_after_recording_loses_nothing(tmp_path: Path, opened: bool) -> None:
    path = tmp_path / "u.json"
    done = child(path, f"{'store.open()' if opened else ''}\nfor i in range(37): store.record(rec('alice', i))\ndie()")
    assert done.returncode == -signal.SIGKILL, done.stderr
    store = store_at(path)
    store.open()
    doc = json.loads(path.read_text())
    assert doc["combinations"][0]["total"]["request_count"] == 37
    assert doc["combinations"][0]["total"]["input_tokens"] == input_tokens(37)
    store.open()  # folding twice changes nothing
    assert requests(path) == {"": 37, "alice": 37}


@pytest.mark.parametrize(
    ("target", "when"),
    [("file", "before"), ("file", "after"), ("journal", "before"), ("journal", "after")],
)
def test_sigkill_inside_save_never_loses_or_doubles(tmp_path: Path, target: str, when: str) -> None:
    path = tmp_path / "u.json"
    body = """
        store.open()
        for i in range(5): store.record(rec("alice", i))
        store.save()  # the file now has a journal marker
        for i in range(5, 12): store.record(rec("bob", i))
        target = {"file": path, "journal": path + ".journal"}[sys.argv[2]]
        real = os.replace
        def replace(src, dst):
            if dst == target and sys.argv[3] == "before": die()
            real(src, dst)
            if dst == target and sys.argv[3] == "after": die()
        os.replace = replace
        store.save()
    """
    done = child(path, body, target, when)
    assert done.returncode == -signal.SIGKILL, done.stderr
    json.loads(path.read_text())  # always a whole file
    assert requests(path) == {"": 12, "alice": 5, "bob": 7}
    store = store_at(path)
    store.open()
    assert leftovers(tmp_path) == []  # killed saves' temp files are cleaned up
    store.record(rec("carol"))
    store.save()
    store.save()
    assert requests(path) == {"": 13, "alice": 5, "bob": 7, "carol": 1}
    assert json.loads(path.read_text())["combinations"][0]["total"]["request_count"] == 13


def test_random_sigkill_during_record_and_save_loop(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    script = CHILD + textwrap.dedent(
        """
        store.open()
        i = int(sys.argv[2])
        while True:
            store.record(rec("alice", i))
            i += 1
            sys.stdout.write(f"{i}\\n")
            sys.stdout.flush()
            store.save()
        """
    )
    rng = random.Random(7)
    counted = 0
    for _ in range(6):
        proc = subprocess.Popen(
            [sys.executable, "-c", script, str(path), str(counted)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        target = rng.randint(3, 30)
        acked = counted
        while acked < counted + target:
            acked = int(proc.stdout.readline())
        time.sleep(rng.random() * 0.004)
        proc.send_signal(signal.SIGKILL)
        for line in proc.stdout:
            acked = int(line)
        proc.wait()
        json.loads(path.read_text())  # never a partial file
        total = requests(path)[""]
        assert acked <= total <= acked + 1  # acknowledged records are never lost; one may be in flight
        counted = total
        assert not [n for n in os.listdir(tmp_path) if ".corrupt-" in n]
    store = store_at(path)
    store.open()
    doc = json.loads(path.read_text())
    assert doc["combinations"][0]["total"]["input_tokens"] == input_tokens(counted)


def test_two_processes_sharing_one_file_are_exact(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    script = CHILD + textwrap.dedent(
        """
        store.open()
        for i in range(500):
            store.record(rec(sys.argv[2], i))
            if i % 25 == 0:
                store.save()
        store.close()
        """
    )
    procs = [subprocess.Popen([sys.executable, "-c", script, str(path), user]) for user in ("a", "b")]
    assert [p.wait(timeout=60) for p in procs] == [0, 0]
    assert requests(path) == {"": 1000, "a": 500, "b": 500}
    doc = json.loads(path.read_text())  # both closed with a final save: all folded into the file
    assert doc["combinations"][0]["total"]["request_count"] == 1000
    assert doc["combinations"][0]["total"]["input_tokens"] == 2 * input_tokens(500)


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


def test_saver_greenlet_saves_when_something_changed(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    store = store_at(path, interval=0.05)
    store.open()
    store.start()
    mtime = path.stat().st_mtime_ns
    gevent.sleep(0.15)
    assert path.stat().st_mtime_ns == mtime  # idle: no rewrites
    store.record(rec())
    gevent.sleep(0.3)
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
    ticks = []
    ticker = gevent.spawn(lambda: [ticks.append(gevent.sleep(0.005)) for _ in range(1000)])
    writer = gevent.spawn(store.record, rec())
    gevent.sleep(0.1)
    assert not writer.dead and len(ticks) > 5
    os.close(holder)
    writer.join(timeout=2)
    ticker.kill()
    assert writer.dead and requests(path)[""] == 1


# --- the report ----------------------------------------------------------------------------------


def usage_cli(*args: str, zone: str = "CST-8") -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TZ": zone}
    cmd = [sys.executable, "-m", "ccm_wsgi", "usage", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=60, check=False)


def test_report_table(tmp_path: Path) -> None:
    done = usage_cli("-f", str(FIXTURE))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    newest, older, none = (
        out.index("Week from 2026-01-01 08:00:00 UTC+8"),
        out.index("Week from 2025-12-25 08:00:00 UTC+8"),
        out.index("No week"),
    )
    assert newest < older < none
    assert "claude-sonnet-4-5-20250929 (1M)" in out and "250,000" in out and "400,000" in out
    week1 = out[older:none]
    assert re.search(r"alice\s+total\s+5\s+102\s+251,500\s+6,400\s+300,000\s+28,000\s+1\.96", week1)
    assert re.search(r"^\s+total\s+6\s+107\s+251,700\s+6,700\s+300,000\s+28,000\s+1\.97$", week1, re.M)
    assert re.search(r"All weeks: 22 requests, .*USD 2\.84", out)


def test_report_json_is_the_usage_file_schema() -> None:
    done = usage_cli("-f", str(FIXTURE), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(FIXTURE.read_text())


def test_report_reads_the_journal_and_changes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    store = store_at(path)
    store.open()
    store.record(rec("alice", input_tokens=1234))
    os.unlink(str(path) + ".lock")
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    done = usage_cli("-f", str(path), "--json", zone="UTC")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["combinations"][0]["total"]["input_tokens"] == 1234
    assert "journal" not in json.loads(done.stdout)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_report_missing_file(tmp_path: Path) -> None:
    done = usage_cli("-f", str(tmp_path / "none.json"))
    assert done.returncode == 1
    assert "none.json" in done.stderr and not done.stdout


def test_report_with_config(tmp_path: Path) -> None:
    pytest.importorskip("ccm_wsgi.config")
    shutil.copy(FIXTURE, tmp_path / "usages.json")
    config = {
        "services": [
            {
                "type": "ccm",
                "tag": "team",
                "listen": "127.0.0.1",
                "listen_port": 18080,
                "usages_path": str(tmp_path / "usages.json"),
                "users": [{"name": "alice", "token": "ak-ccm-" + "a" * 40}],
            }
        ]
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    done = usage_cli("-c", str(tmp_path / "config.json"))
    assert done.returncode == 0, done.stderr
    assert "team" in done.stdout and "USD 2.84" in done.stdout
    done = usage_cli("-c", str(tmp_path / "config.json"), "--json")
    assert json.loads(done.stdout) == json.loads(FIXTURE.read_text())
