"""Sharing fairly: each user's limits through the official SDK against real `ccm-wsgi serve` processes.

Budgets, rate, concurrency, models, disabled and expired users, window shares, the overage guard and the
per-user rate-limit headers; a reload by SIGHUP while a stream runs. gunicorn's host-wide counts are in
tests/test_limits_gunicorn.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
import urllib3

from ccm_wsgi.accounting.members import ALONE_RECHECK
from tests.support.clients import ask, client, conversation, knob_headers, post_messages
from tests.support.constants import ACCESS, ALICE, BOB, MODEL
from tests.support.fake_upstream import FakeUpstream
from tests.support.limits import BIG, config, error_of, held_stream, messages_sent, refusal, status_of, user
from tests.support.pools import ADMIN, accounts, pool_service
from tests.support.procs import Proxy, wait_for

CAROL = "ak-ccm-carol-0123456789abcdef"
DAVE = "ak-ccm-dave-0123456789abcdef0"
OPUS = "claude-opus-4-6"
RL = "anthropic-ratelimit-unified-"
HOUR = 3600


def midnight_after(now: float) -> str:
    return time.strftime("%Y-%m-%d 00:00 UTC", time.gmtime((now // 86400 + 1) * 86400))


def raw_headers(proxy: Proxy, token: str, stream: bool = False, **knobs: Any) -> urllib3.HTTPHeaderDict:
    reply = post_messages(proxy, token, stream=stream, **knobs)
    assert reply.status == 200, reply.data
    return reply.headers


# ------------------------------------------------------------------------------------------ budget


@pytest.mark.parametrize("stream", [False, True])
def test_budget_refuses_until_the_period_ends_and_survives_a_restart(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy], stream: bool) -> None:
    cfg = config(fake, creds, tmp_path, [user("alice", ALICE, limits={"budget": [{"usd": 5, "per": "day"}]}),
                                         user("bob", BOB)])
    proxy = start_proxy(cfg)
    ask(proxy, ALICE, headers=BIG, stream=stream)  # $3 spent: under the budget
    ask(proxy, ALICE, headers=BIG, stream=stream)  # admitted at $3; it ends at $6 (one request in flight past it)
    before = time.time()
    err = refusal(lambda: ask(proxy, ALICE, headers=BIG, stream=stream))
    resets = {midnight_after(before), midnight_after(time.time())}
    status, kind, message = error_of(err)
    assert (status, kind) == (429, "billing_error")
    assert message in {f"daily budget of $5.00 reached; resets {r}" for r in resets}
    assert err.response.headers["x-should-retry"] == "false"
    assert messages_sent(fake) == 2  # nothing of the refused request went upstream
    ask(proxy, BOB, headers=BIG, stream=stream)  # bob has no budget
    assert any("alice" in line and "429" in line and "refused(budget_day)" in line for line in proxy.access_lines())

    own = status_of(proxy, ALICE)["limits"]
    assert own["budget"] == [{"per": "day", "usd": 5, "spent": pytest.approx(6.0, abs=0.01), "remaining": 0.0,
                              "resets": pytest.approx((before // 86400 + 1) * 86400, abs=86400)}]
    assert set(status_of(proxy, ADMIN)["users"]) == {"alice", "bob"}
    report = subprocess.run([sys.executable, "-m", "ccm_wsgi", "usage", "-c", str(proxy.config_path)],
                            capture_output=True, text=True, timeout=30, check=True).stdout
    alice_row = next(line for line in report.splitlines() if line.strip().startswith("alice ")
                     and " of " in line)
    assert "6.00 of 5.00 (120%)" in alice_row, report

    proxy.stop()  # what was spent this period is not forgotten
    again = start_proxy(cfg, name="again")
    assert error_of(refusal(lambda: ask(again, ALICE, headers=BIG, stream=stream)))[:2] == (429, "billing_error")
    assert messages_sent(fake) == 3


def test_a_budget_counts_at_once_what_another_process_on_the_usage_file_spent(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    """A `ccm-wsgi serve` that appends alone to its usage journal counts its own records as it writes them
    and does not read the journal back before a budget check. A second process on the same usage file (a
    second serve, a worker) is counted in the first one's next check all the same, and what it recorded before
    it stopped is still counted once the first appends alone again."""
    cfg = config(fake, creds, tmp_path, [user("alice", ALICE, limits={"budget": [{"usd": 10, "per": "day"}]})])
    first = start_proxy(cfg)

    def spent() -> float:
        budget: float = status_of(first, ALICE)["limits"]["budget"][0]["spent"]
        return budget

    ask(first, ALICE, headers=BIG)  # $3 (the first record: this process joins the journal's appenders)
    time.sleep(ALONE_RECHECK + 0.2)
    assert spent() == pytest.approx(3.0, abs=0.01)  # this read finds the process alone
    ask(first, ALICE, headers=BIG)  # $6, taken as written
    assert spent() == pytest.approx(6.0, abs=0.01)

    second = start_proxy(cfg, name="second")
    ask(second, ALICE, headers=BIG)  # admitted at $6; $9
    assert spent() == pytest.approx(9.0, abs=0.01)  # at once, in the first process
    ask(second, ALICE, headers=knob_headers(input_tokens=100_000))  # $9.30 (no fold in between)
    assert spent() == pytest.approx(9.3, abs=0.01)
    ask(second, ALICE, headers=knob_headers(input_tokens=100_000))  # $9.60, and the second process stops
    second.stop()

    time.sleep(ALONE_RECHECK + 0.2)
    assert spent() == pytest.approx(9.6, abs=0.01)  # alone again: what the second recorded before it left is counted
    ask(first, ALICE, headers=BIG)  # admitted at $9.60; $12.60
    assert spent() == pytest.approx(12.6, abs=0.01)
    assert error_of(refusal(lambda: ask(first, ALICE)))[:2] == (429, "billing_error")
    assert messages_sent(fake) == 6


# ------------------------------------------------------------------- rate, models, disabled, expired


def test_rate_models_disabled_and_expired_are_refused_before_anything_is_sent(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    users = [user("alice", ALICE, limits={"models": ["claude-sonnet-*", "claude-haiku-*"]}),
             user("bob", BOB, limits={"requests_per_minute": 2}),
             user("carol", CAROL, disabled=True),
             user("dave", DAVE, expires="2020-01-02T03:04:05Z")]
    proxy = start_proxy(config(fake, creds, tmp_path, users))

    ask(proxy, ALICE)
    for stream in (False, True):
        err = refusal(lambda stream=stream: ask(proxy, ALICE, model=OPUS, stream=stream))
        assert error_of(err) == (400, "invalid_request_error", "model claude-opus-4-6 is not allowed for you here "
                                                               "(allowed: claude-sonnet-*, claude-haiku-*)")
        assert err.response.headers["x-should-retry"] == "false"

    ask(proxy, BOB)
    ask(proxy, BOB, stream=True)
    err = refusal(lambda: ask(proxy, BOB))
    status, kind, message = error_of(err)
    assert (status, kind) == (429, "rate_limit_error") and message.startswith("more than 2 requests in a minute")
    assert 1 <= int(err.response.headers["retry-after"]) <= 61  # the minute, counted in tenths (up to 60.1 s)
    assert "x-should-retry" not in err.response.headers  # the CLI's own retry will get through

    err = refusal(lambda: ask(proxy, CAROL))
    assert error_of(err) == (429, "permission_error", "carol's access to this ccm-wsgi is disabled; ask its operator")
    err = refusal(lambda: ask(proxy, DAVE, stream=True))
    assert error_of(err) == (429, "permission_error",
                             "dave's access to this ccm-wsgi expired on 2020-01-02 03:04 UTC; ask its operator")
    assert err.response.headers["x-should-retry"] == "false"

    assert messages_sent(fake) == 3  # alice's one, bob's two
    refused = [line.split("refused(")[1].rstrip(")") for line in proxy.access_lines() if "refused(" in line]
    assert refused == ["model", "model", "requests_per_minute", "disabled", "expired"]


# ------------------------------------------------------------------------------------- concurrency


def test_concurrency_waits_for_a_slot_refuses_with_retry_after_and_frees_slots_whatever_the_end(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    users = [user("alice", ALICE, limits={"max_concurrent": 1}), user("bob", BOB)]
    proxy = start_proxy(config(fake, creds, tmp_path, users), env={"CCM_QUEUE_WAIT": "3"})

    # one stream holds alice's slot: another request of hers waits, and is refused when none frees
    first = held_stream(proxy, ALICE, "one")
    wait_for(lambda: fake.sent("one") == 1, what="first delta sent")
    err = refusal(lambda: ask(proxy, ALICE))
    status, kind, message = error_of(err)
    assert (status, kind, message) == (429, "rate_limit_error", "1 of your requests are already running; "
                                                                "retry in a moment")
    assert err.response.headers["retry-after"] == "2" and "x-should-retry" not in err.response.headers
    ask(proxy, BOB)  # bob has no limit
    assert status_of(proxy, ALICE)["limits"]["in_flight"] == 1

    # a request that waits gets the slot when the stream ends
    done: list[Any] = []
    waiting = threading.Thread(target=lambda: done.append(ask(proxy, ALICE)))
    waiting.start()
    assert messages_sent(fake) == 2  # the held stream and bob's: the waiting request is not sent yet
    fake.release("one")
    assert b"message_stop" in first.read()
    waiting.join(30)
    assert done and done[0].content, "the waiting request was served once the slot freed"

    # a client that goes away mid-stream (Claude Code's Esc) gives its slot back
    with client(proxy, ALICE) as c, c.messages.stream(model=MODEL, max_tokens=16, messages=conversation(1),
                                                      extra_headers=knob_headers(wait_release="esc")) as s:
        next(iter(s))
    fake.release("esc")  # the upstream goes on; the relay finds the client gone
    ask(proxy, ALICE)

    # an upstream error gives it back too
    with pytest.raises(anthropic.InternalServerError):
        ask(proxy, ALICE, headers=knob_headers(status=500))
    ask(proxy, ALICE, stream=True)
    wait_for(lambda: status_of(proxy, ALICE)["limits"]["in_flight"] == 0, what="no slot held")


# ------------------------------------------------------------------------------------ window share


def test_window_share_refuses_the_user_past_it_while_others_go_on(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    reset = int(time.time()) + HOUR  # 80 % of the 5-hour window gone: Claude Code warns from 90 % used
    fake.set_state(ACCESS, five_hour_utilization=0.10, five_hour_reset=reset)
    users = [user("alice", ALICE, limits={"window_share": {"five_hour": 30}}),
             user("bob", BOB, limits={"window_share": {"five_hour": 100}})]
    proxy = start_proxy(config(fake, creds, tmp_path, users))

    headers = raw_headers(proxy, ALICE)  # the window stood at 10 before anyone here used it: nobody's
    assert (headers[RL + "5h-utilization"], headers[RL + "5h-status"]) == ("0.10", "allowed")
    fake.set_state(ACCESS, five_hour_utilization=0.37)
    raw_headers(proxy, ALICE, stream=True)  # alice: 27 points, 90 % of her share, counted when it ends
    headers = raw_headers(proxy, ALICE)  # her next answers say so
    assert (headers[RL + "5h-utilization"], headers[RL + "5h-status"]) == ("0.90", "allowed_warning")
    assert headers[RL + "status"] == "allowed_warning" and headers[RL + "representative-claim"] == "five_hour"
    headers = raw_headers(proxy, BOB)  # bob sees the subscription, not alice's standing
    assert (headers[RL + "5h-utilization"], headers[RL + "5h-status"]) == ("0.37", "allowed")
    assert headers[RL + "status"] == "allowed"

    fake.set_state(ACCESS, five_hour_utilization=0.45)
    raw_headers(proxy, BOB)  # 8 points, shared by cost among the requests since the last rise (alice's too)
    fake.set_state(ACCESS, five_hour_utilization=0.50)
    ask(proxy, ALICE)  # admitted under 30; 5 more points for her
    err = refusal(lambda: ask(proxy, ALICE, stream=True))
    status, kind, message = error_of(err)
    assert (status, kind) == (429, "rate_limit_error") and err.response.headers["x-should-retry"] == "false"
    until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reset))
    assert message == f"your share (30%) of the subscription's 5-hour window is used up; resets {until}"
    ask(proxy, BOB)

    share = status_of(proxy, ALICE)["limits"]["window_share"]["default"]["five_hour"]
    assert share["share"] == 30 and share["used"] >= 30 and share["resets"] == reset
    points = {name: view["window_share"]["default"]["five_hour"]["used"]
              for name, view in status_of(proxy, ADMIN)["users"].items()}
    assert sum(points.values()) == pytest.approx(50 - 10, abs=0.01)  # every point since the first request
    assert any("refused(share_five_hour)" in line for line in proxy.access_lines())


def test_in_a_pool_a_share_is_per_credential_window(tmp_path: Path, fake: FakeUpstream,
                                                    start_proxy: Callable[..., Proxy]) -> None:
    reset = int(time.time()) + HOUR
    paths = accounts(fake, tmp_path, "a", "b", five_hour_utilization=0.10, five_hour_reset=reset)
    cfg = pool_service(fake, paths, strategy="fallback", users=[
        user("alice", ALICE, credential="pool", limits={"window_share": {"five_hour": 30}})])
    for credential in cfg["services"][0]["credentials"][:2]:
        credential["usages_path"] = str(tmp_path / f"usage-{credential['tag']}.json")
    proxy = start_proxy(cfg)

    def served_by() -> str:
        reply = post_messages(proxy, ALICE)
        assert reply.status == 200, reply.data
        return str(reply.headers["x-fake-account"])

    assert served_by() == "a"
    fake.set_state("a", five_hour_utilization=0.45)
    assert served_by() == "a"  # 35 points of a's window: her share of a is used up
    assert served_by() == "b"  # b's window is another one
    fake.set_state("b", five_hour_utilization=0.45)
    assert served_by() == "b"
    err = refusal(lambda: ask(proxy, ALICE))
    assert error_of(err)[:2] == (429, "rate_limit_error") and "5-hour window is used up" in error_of(err)[2]
    assert [r["account"] for r in fake.requests("/v1/messages")] == ["a", "a", "b", "b"]


# ------------------------------------------------------------------------------------ overage guard


def test_overage_deny_stops_a_credential_once_paid_extra_usage_is_in_use(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    reset = int(time.time()) + 2 * HOUR
    proxy = start_proxy(config(fake, creds, tmp_path, [user("alice", ALICE)], overage="deny"))
    ask(proxy, ALICE)
    fake.set_state(ACCESS, status="rejected", five_hour_utilization=1.0, five_hour_reset=reset,
                   headers={RL + "overage-status": "allowed", RL + "overage-in-use": "true"})
    headers = raw_headers(proxy, ALICE)  # this answer says extra usage paid for it
    assert not any(name.lower().startswith(RL + "overage") for name in headers)  # never shown to users
    for stream in (False, True):
        err = refusal(lambda stream=stream: ask(proxy, ALICE, stream=stream))
        status, kind, message = error_of(err)
        assert (status, kind) == (429, "rate_limit_error") and err.response.headers["x-should-retry"] == "false"
        until = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(reset))
        assert "paid extra usage is not allowed here" in message and until in message
    assert messages_sent(fake) == 2


def test_overage_deny_in_a_pool_moves_on(tmp_path: Path, fake: FakeUpstream,
                                         start_proxy: Callable[..., Proxy]) -> None:
    paths = accounts(fake, tmp_path, "a", "b")
    fake.set_state("a", status="rejected", five_hour_utilization=1.0,
                   headers={RL + "overage-status": "allowed_warning", RL + "overage-in-use": "true"})
    proxy = start_proxy(pool_service(fake, paths, strategy="fallback", overage="deny"))
    served = [post_messages(proxy, ALICE).headers["x-fake-account"] for _ in range(3)]
    assert served == ["a", "b", "b"]


# ------------------------------------------------------------------------------------------ reload


def test_sighup_adds_a_user_and_changes_a_limit_while_a_stream_goes_on(
        tmp_path: Path, fake: FakeUpstream, creds: Path, start_proxy: Callable[..., Proxy]) -> None:
    cfg = config(fake, creds, tmp_path, [user("alice", ALICE)])
    proxy = start_proxy(cfg)
    assert refusal(lambda: ask(proxy, BOB)).status_code == 401
    stream = held_stream(proxy, ALICE, "reload")

    cfg["services"][0]["users"] = [user("alice", ALICE, limits={"models": ["claude-haiku-*"]}), user("bob", BOB)]
    proxy.config_path.write_text(json.dumps(cfg))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in proxy.log(), what="reload logged")
    ask(proxy, BOB)
    assert error_of(refusal(lambda: ask(proxy, ALICE)))[:2] == (400, "invalid_request_error")
    fake.release("reload")
    body = stream.read()  # the stream started before the reload ends whole
    assert body.count(b"event: content_block_delta") == 4 and b"event: message_stop" in body

    cfg["services"][0]["users"][1]["token"] = "short"  # fails check
    proxy.config_path.write_text(json.dumps(cfg))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reload refused" in proxy.log(), what="refusal logged")
    assert "services[0].users[1].token:" in proxy.log()
    ask(proxy, BOB)  # the running config stays
    assert proxy.proc is not None and proxy.proc.poll() is None
