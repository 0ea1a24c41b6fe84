"""The usage store across processes: SIGKILL at any moment loses or doubles nothing, two processes share one
file exactly, and `ccm-wsgi usage` reports a file (and its journal) without changing it."""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.support.usage_store import FIXTURE, leftovers, rec, requests, store_at

# --- durability --------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import logging, os, signal, sys
    from ccm_wsgi.accounting.pricing import Pricing
    from ccm_wsgi.accounting.records import Record
    from ccm_wsgi.accounting.store import UsageStore
    from ccm_wsgi.accounting.tokens import Tokens

    path = sys.argv[1]
    store = UsageStore(path, Pricing(), logging.getLogger("child"))

    def rec(user, i):
        return Record(user, "claude-sonnet-4-5", 200000, 1766620800, 1, Tokens(10 + i % 7, 1))

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
    [(step, when) for step in ("file", "seal", "unlink") for when in ("before", "after")],
)
def test_sigkill_inside_save_never_loses_or_doubles(tmp_path: Path, target: str, when: str) -> None:
    path = tmp_path / "u.json"
    body = """
        store.open()
        for i in range(5): store.record(rec("alice", i))
        store.save()  # the file now has a journal marker
        for i in range(5, 12): store.record(rec("bob", i))
        # the three steps of a fold: the journal is sealed (renamed), the file replaced, the sealed journal removed
        step, when = sys.argv[2], sys.argv[3]
        def crashing(real, hit):
            def call(*args):
                if hit(*args) and when == "before": die()
                real(*args)
                if hit(*args) and when == "after": die()
            return call
        os.rename = crashing(os.rename, lambda src, dst: step == "seal" and src == path + ".journal")
        os.replace = crashing(os.replace, lambda src, dst: step == "file" and dst == path)
        os.unlink = crashing(os.unlink, lambda name: step == "unlink" and name.startswith(path + ".journal."))
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


def test_a_fold_from_the_live_state_writes_what_a_fold_from_the_journal_writes(tmp_path: Path) -> None:
    """A store that holds every record since its last fold writes the file from memory; the file must be the
    one a fresh store folding the same file and journal writes, byte for byte (totals, ledger with spend,
    counts and window shares, marker), also after another process has folded in between, records it could
    not journal included."""
    path = tmp_path / "live" / "u.json"
    body = """
        import shutil
        from ccm_wsgi.accounting.store import UsageStore
        store.open()
        def mixed(i):
            r = Record(("alice", "bob", "carol")[i % 3], ("claude-sonnet-4-5", "claude-opus-4-1")[i % 2], 200000,
                       1766620800 + 604800 * (i % 2), 1 + i % 4, Tokens(10 + i, 3 + i % 5, i % 7, i % 3))
            r.cost = 0.001 * (1 + i % 9)
            r.readings = (1.0 * i, 1766700000.0, 1.0 * i - 1, 0.5 * i, 1767000000.0, 0.5 * i - 0.5)
            return r
        for i in range(40): store.record(mixed(i))
        store.save()
        other = UsageStore(path, Pricing(), logging.getLogger("other"))  # another process's fold, of records
        for i in range(40, 45): other.record(mixed(i))                       # journaled and of records it
        def full(line): raise OSError(28, "No space left on device")          # kept in memory, which only
        other._appender.append = full                                        # the file will hold
        for i in range(45, 50): other.record(mixed(i))
        other.save()
        for i in range(50, 90): store.record(mixed(i))
        store.save()  # after the other fold: from the journal
        for i in range(90, 130): store.record(mixed(i))
        shutil.copytree(os.path.dirname(path), sys.argv[2])  # file + journal, before the fold below
        store.save()  # from the live state again
    """
    copy = tmp_path / "copy"
    path.parent.mkdir()
    done = child(path, body, str(copy))
    assert done.returncode == 0, done.stderr
    fresh = store_at(copy / "u.json")
    fresh.open()  # folds the copied journal into the copied file
    live, folded = json.loads(path.read_text()), json.loads((copy / "u.json").read_text())
    assert live["combinations"][0]["total"]["request_count"] + live["combinations"][1]["total"]["request_count"] == 130
    assert live["ledger"]["windows"]["five_hour"]["points"]
    assert path.read_bytes() == (copy / "u.json").read_bytes(), (live, folded)


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


def test_a_fold_gets_in_while_a_gevent_process_appends_without_pause(tmp_path: Path) -> None:
    """Under gevent an appender keeps the shared lock until its event loop's next turn. A process whose turn
    does not end (records appended one after another, nothing waited for) still lets a fold in: the fold says
    that it waits, and the appender then gives the lock back after each record. Nothing is lost meanwhile."""
    path = tmp_path / "u.json"
    stop = tmp_path / "stop"
    busy = subprocess.Popen([sys.executable, "-c", "from gevent import monkey; monkey.patch_all()\n" + CHILD +
                             textwrap.dedent("""
        store.open()
        n = 0
        for _ in range(10_000_000):  # one turn of the event loop: nothing here waits
            store.record(rec("alice", n))
            n += 1
            if n == 1:
                print("appending", flush=True)
            if os.path.exists(sys.argv[2]):
                break
        print(n, flush=True)
    """), str(path), str(stop)], stdout=subprocess.PIPE, text=True)
    assert busy.stdout is not None
    try:
        assert busy.stdout.readline().strip() == "appending"
        folder = store_at(path)
        assert folder.save(), "the fold timed out waiting for the appending process"
        assert busy.poll() is None  # it was still appending throughout
        stop.touch()
        appended = int(busy.stdout.readline())
        assert busy.wait(30) == 0
    finally:
        busy.kill()
        busy.wait()
    assert folder.save()
    assert requests(path)["alice"] == appended
    assert Path(str(path) + ".lock").read_bytes()[8] == 0  # nobody waits for the lock any more


def test_a_slow_fold_in_one_process_never_holds_up_another_s_records(tmp_path: Path) -> None:
    """A worker whose fold is slow (a slow disk) must not stall the responses of the others: they append to
    the journal while it folds, and their records are durable at once."""
    path = tmp_path / "u.json"
    slow = subprocess.Popen([sys.executable, "-c", CHILD + textwrap.dedent("""
        store.open()
        for i in range(3): store.record(rec("alice", i))
        from ccm_wsgi import files
        real = files.replace_atomically
        def slowly(*args):
            print("folding", flush=True)
            sys.stdin.readline()  # until the test has appended meanwhile
            real(*args)
        files.replace_atomically = slowly
        store.save()
        print("done", flush=True)
    """), str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert slow.stdout is not None and slow.stdin is not None
    try:
        assert slow.stdout.readline().strip() == "folding"
        other = store_at(path)
        other.record(rec("bob"))  # another worker records while the fold is under way
        assert b'"user":"bob"' in Path(str(path) + ".journal").read_bytes(), "the record waited for the fold"
        slow.stdin.write("\n")
        slow.stdin.flush()
        assert slow.stdout.readline().strip() == "done"
    finally:
        slow.kill()
        slow.wait()
    assert requests(path)["bob"] == 1 and requests(path)["alice"] == 3
