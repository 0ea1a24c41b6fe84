"""What is on disk, and when, seen from the system calls of a real `ccm-wsgi serve` under strace (Debian
package strace, installed by tests/install-system-deps.sh; strace -y names each descriptor's file or socket).

* A file ccm-wsgi replaces (a refreshed credential, the usage file and its journal) survives a power loss: the
  new content is written to a temp file that is fsynced before it is renamed over the target. Otherwise a
  crash right after the rename can leave the target empty or half-written, and a refreshed login is lost.
* A response's usage record is in the journal before the response's last byte is sent: a client that has the
  whole answer never outlives its record, even if the process is killed right then.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
from pathlib import Path

from tests.support.clients import ask, post_messages
from tests.support.constants import ACCESS, ALICE, REFRESH, USERS
from tests.support.procs import HTTP, service_config, write_credentials
from tests.support.system import require, unavailable

SYSCALLS = "fsync,fdatasync,rename,renameat,renameat2"
SYNCED = re.compile(r'^(?:fsync|fdatasync)\(\d+<(?P<path>[^>]*)>\)\s+= 0')
RENAMED = re.compile(r'^(?P<call>rename|renameat2?)\((?:[^,]+, )?"(?P<src>[^"]*)", (?:[^,]+, )?"(?P<dst>[^"]*)"'
                     r'(?:, [^)]*)?\)\s+= 0')


def strace_prefix(tmp_path: Path, syscalls: str = SYSCALLS, *options: str) -> tuple[tuple[str, ...], Path]:
    """The strace command line to run a process under (one trace file per thread), and the traces' prefix."""
    strace = require("strace", "strace")
    probe = subprocess.run([strace, "-o", "/dev/null", "true"], capture_output=True, text=True)
    if probe.returncode:
        unavailable(f"strace cannot trace here (ptrace not permitted?): {probe.stderr.strip()}")
    prefix = tmp_path / "trace"
    return (strace, "-ff", "-qq", "-y", *options, "-e", f"trace={syscalls}", "-e", "signal=none", "-o",
            str(prefix)), prefix


def renames_and_syncs(prefix: Path) -> list[tuple[str, str, bool]]:
    """(temp file, target, fsynced before the rename) for each rename of a `.tmp-` file, from every thread."""
    found = []
    for trace in sorted(prefix.parent.glob(prefix.name + ".*")):
        synced: set[str] = set()
        for line in trace.read_text(errors="replace").splitlines():
            if m := SYNCED.match(line):
                synced.add(m.group("path"))
            elif (m := RENAMED.match(line)) and ".tmp-" in m.group("src"):
                found.append((m.group("src"), m.group("dst"), m.group("src") in synced))
    return found


def serve_pid(tracer_pid: int) -> int:
    """The traced `ccm-wsgi serve` (strace's only child)."""
    children = Path(f"/proc/{tracer_pid}/task/{tracer_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def test_replaced_files_are_fsynced_before_the_rename(tmp_path, fake, start_proxy):
    wrapper, prefix = strace_prefix(tmp_path)
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=30)
    creds = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=30)
    usages = tmp_path / "usage" / "usages.json"
    cfg = service_config(fake.url, creds, users=USERS, usages_path=str(usages))
    proxy = start_proxy({"services": [cfg]}, wrapper=wrapper)
    assert ask(proxy, ALICE).content  # refreshes the credential (30 s from expiry), journals a usage record
    assert fake.stats()["refreshes"] == 1
    assert proxy.proc is not None
    os.kill(serve_pid(proxy.proc.pid), signal.SIGTERM)  # the final save folds the journal into the usage file
    assert proxy.wait(30) == 0, proxy.log()
    found = renames_and_syncs(prefix)
    targets = {dst for _, dst, _ in found}
    assert {str(creds), str(usages)} <= targets, found
    unsynced = [(src, dst) for src, dst, synced in found if not synced]
    assert not unsynced, f"renamed over its target without an fsync first: {unsynced}"


SENT = re.compile(r'^(?:write|writev|sendto|sendmsg)\((?P<fd>\d+)<(?P<what>.*?)>, ')


def test_usage_is_journaled_before_the_last_byte_of_the_response(tmp_path, fake, creds, start_proxy):
    wrapper, prefix = strace_prefix(tmp_path, "write,writev,sendto,sendmsg", "-yy")
    usages = tmp_path / "usage" / "usages.json"
    cfg = service_config(fake.url, creds, users=USERS, usages_path=str(usages))
    proxy = start_proxy({"services": [cfg]}, wrapper=wrapper)
    # one request per connection, one after the other: a stream (chunked) and a relayed 2 MB JSON answer
    for knobs in ({"stream": True}, {"bytes": 2_000_000}):
        HTTP.clear()  # a new connection each time
        reply = post_messages(proxy, headers={"Connection": "close"}, **knobs)
        assert reply.status == 200 and reply.ended is None
    assert proxy.proc is not None
    serve = serve_pid(proxy.proc.pid)
    os.kill(serve, signal.SIGTERM)
    assert proxy.wait(30) == 0, proxy.log()
    events = []  # ("record", "") or ("send", client connection) in the order of the serving thread
    for line in (prefix.parent / f"{prefix.name}.{serve}").read_text(errors="replace").splitlines():
        if (m := SENT.match(line)) is None:
            continue
        if m.group("what").endswith("usages.json.journal") and '\\"user\\"' in line:
            events.append(("record", ""))
        elif f"127.0.0.1:{proxy.port}->" in m.group("what"):
            events.append(("send", m.group("what")))
    connections = list(dict.fromkeys(what for kind, what in events if kind == "send"))
    assert len(connections) == 2 and [k for k, _ in events].count("record") == 2, events
    for connection in connections:
        sends = [i for i, (kind, what) in enumerate(events) if what == connection]
        records = [i for i, (kind, _) in enumerate(events) if kind == "record" and sends[0] < i < sends[-1]]
        assert len(records) == 1, f"the record of the response on {connection} was not journaled before its end"
