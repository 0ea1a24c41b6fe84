"""Limits under gunicorn: two workers count one host's requests in flight and one budget, a killed worker's
slots come back, and gunicorn's own HUP reloads the config (a bad one is refused, the running one stays)."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.clients import ask
from tests.support.constants import ALICE, BOB
from tests.support.fake_upstream import FakeUpstream
from tests.support.limits import BIG, config, error_of, held_stream, messages_sent, refusal, user
from tests.support.procs import Gunicorn, only, wait_for

LIMITS = {"max_concurrent": 1, "budget": [{"usd": 5, "per": "day"}]}


def test_two_workers_hold_one_host_wide_concurrency_and_budget(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_gunicorn: Callable[..., Gunicorn]) -> None:
    server = start_gunicorn(config(fake, creds, tmp_path, [user("alice", ALICE, limits=LIMITS)]),
                            env={"CCM_QUEUE_WAIT": "1"})
    first, second = sorted(server.worker_pids())

    with only(server, first):
        stream = held_stream(server, ALICE, "held")
    with only(server, second):  # the other worker knows the slot is taken
        assert error_of(refusal(lambda: ask(server, ALICE)))[:2] == (429, "rate_limit_error")
    fake.release("held")
    assert b"message_stop" in stream.read()

    with only(server, first):  # a worker killed mid-stream: the master gives its slot back
        held_stream(server, ALICE, "killed")
        os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(server.worker_pids()) == 3, what="a new worker")
    ask(server, ALICE)

    with only(server, second):
        ask(server, ALICE, headers=BIG)  # $3
    third = max(server.worker_pids())
    with only(server, third):
        ask(server, ALICE, headers=BIG)  # $6: admitted at $3
    for pid in (second, third):  # each worker sees the spend of the other
        with only(server, pid):
            assert error_of(refusal(lambda: ask(server, ALICE, headers=BIG)))[:2] == (429, "billing_error")
    assert messages_sent(fake) == 5


def test_gunicorn_hup_reloads_and_refuses_a_bad_config(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_gunicorn: Callable[..., Gunicorn]) -> None:
    cfg = config(fake, creds, tmp_path, [user("alice", ALICE)])
    server = start_gunicorn(cfg)
    assert refusal(lambda: ask(server, BOB)).status_code == 401

    cfg["services"][0]["users"].append(user("bob", BOB))
    hup(server, cfg)
    ask(server, BOB)

    cfg["services"][0]["users"][1]["token"] = "short"
    hup(server, cfg)
    assert "reload refused, the running config stays: services[0].users[1].token:" in server.log()
    ask(server, BOB)
    assert server.proc is not None and server.proc.poll() is None


def hup(server: Gunicorn, cfg: dict[str, Any]) -> None:
    """Write `cfg` and send gunicorn's HUP; return once new workers serve and the old ones have gone (until
    then, a request may still reach an old worker, with the old config)."""
    old = server.worker_pids()
    server.config_path.write_text(json.dumps(cfg))
    assert server.proc is not None
    server.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: len(server.worker_pids() - old) >= server.workers, what="new workers")
    wait_for(lambda: not any(alive(pid) for pid in old), what="old workers gone")


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True
