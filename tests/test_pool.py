"""Several subscriptions in one pool: selection, stickiness, quota failover, status, chaining."""

from __future__ import annotations

import json
import time

import anthropic
import pytest

from tests.support.clients import post_messages
from tests.support.constants import ALICE, BOB, MODEL
from tests.support.pools import ADMIN, accounts, pool_service
from tests.support.procs import request, wait_for, write_credentials


def admin_status(proxy) -> dict:
    r = request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + ADMIN})
    assert r.status == 200, r.data
    return json.loads(r.data)


def polled(proxy, n: int):
    """Wait until the background poller has seen every credential once."""
    return wait_for(lambda: all(c["updated"] for c in admin_status(proxy)["credentials"][:n]), 15,
                    what="first quota poll")


def ask(proxy, token=ALICE, session: str | None = None, extra: dict | None = None):
    """One raw message, in Claude Code's session `session` (header x-claude-code-session-id)."""
    headers = {"x-claude-code-session-id": session} if session else {}
    return post_messages(proxy, token, headers={**headers, **(extra or {})})


def account_of(r) -> str:
    """The pooled account (the fake's account id) that served a 200."""
    assert r.status == 200, (r.status, r.data)
    return r.headers["x-fake-account"]


def test_least_used_prefers_headroom(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    fake.set_state("a", seven_day_utilization=0.8)
    fake.set_state("b", seven_day_utilization=0.1)
    proxy = start_proxy(pool_service(fake, paths))
    polled(proxy, 2)
    assert {account_of(ask(proxy)) for _ in range(4)} == {"b"}


def test_round_robin_alternates_and_fallback_sticks_to_first(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    rr = start_proxy(pool_service(fake, paths, "round-robin"), name="rr")
    polled(rr, 2)
    order = [account_of(ask(rr)) for _ in range(4)]
    assert order in (["a", "b", "a", "b"], ["b", "a", "b", "a"])
    fb = start_proxy(pool_service(fake, paths, "fallback"), name="fb")
    polled(fb, 2)
    assert [account_of(ask(fb)) for _ in range(3)] == ["a", "a", "a"]


def test_quota_poll_is_an_oauth_request(tmp_path, fake, start_proxy):
    """The background poll of Anthropic's usage API sends the account's OAuth token and the oauth beta flag
    (without it, Anthropic refuses the token: the fake does too)."""
    paths = accounts(fake, tmp_path, "a")
    proxy = start_proxy(pool_service(fake, paths))
    polled(proxy, 1)
    poll = fake.requests(path="/api/oauth/usage")[0]
    headers = {k.lower(): v for k, v in poll["headers"]}
    assert headers["authorization"] == "Bearer sk-ant-oat01-a-access-xxxxxxxx"
    assert "oauth-2025-04-20" in [b.strip() for b in headers["anthropic-beta"].split(",")]
    assert fake.stats()["oauth_beta_missing"] == 0 and fake.stats()["usage_api_calls"]["a"] >= 1


def test_random_uses_both(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    proxy = start_proxy(pool_service(fake, paths, "random"))
    polled(proxy, 2)
    assert {account_of(ask(proxy)) for _ in range(30)} == {"a", "b"}


def test_session_sticks_and_transient_error_does_not_move_it(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    proxy = start_proxy(pool_service(fake, paths, "round_robin"))
    polled(proxy, 2)
    first = account_of(ask(proxy, session="s-1"))
    assert all(account_of(ask(proxy, session="s-1")) == first for _ in range(4))
    # a 500 (not a quota 429) passes through unchanged and does not move the session
    r = ask(proxy, session="s-1", extra={"x-fake-status": "500"})
    assert r.status == 500 and json.loads(r.data)["error"]["type"] == "api_error"
    assert account_of(ask(proxy, session="s-1")) == first
    # the session in metadata.user_id (JSON-string form of current Claude Code) sticks too
    body = {"model": MODEL, "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}],
            "metadata": {"user_id": json.dumps({"device_id": "d", "session_id": "s-2"})}}
    seen = set()
    for _ in range(4):
        r = request("POST", proxy.url + "/v1/messages", body=json.dumps(body).encode(),
                    headers={"Authorization": "Bearer " + ALICE, "content-type": "application/json"})
        seen.add(account_of(r))
    assert len(seen) == 1


def test_quota_429_is_invisible_and_moves_the_session(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    proxy = start_proxy(pool_service(fake, paths, "fallback"))
    polled(proxy, 2)
    assert account_of(ask(proxy, session="conv")) == "a"
    fake.set_state("a", quota_429=True, status="rejected")
    c = anthropic.Anthropic(base_url=proxy.url, auth_token=ALICE, max_retries=0,
                            default_headers={"x-claude-code-session-id": "conv"})
    message = c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}])
    assert message.content[0].text
    with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "hi"}]) as s:
        assert "".join(s.text_stream)
    assert account_of(ask(proxy, session="conv")) == "b"
    assert "after a quota 429 from a" in proxy.log()


def test_all_exhausted_gives_429_with_earliest_reset(tmp_path, fake, start_proxy):
    now = int(time.time())
    paths = accounts(fake, tmp_path, "a", "b")
    fake.set_state("a", quota_429=True, status="rejected", claim="five_hour", five_hour_reset=now + 3600)
    fake.set_state("b", quota_429=True, status="rejected", claim="five_hour", five_hour_reset=now + 1800)
    proxy = start_proxy(pool_service(fake, paths))
    r = ask(proxy)
    assert r.status == 429
    assert json.loads(r.data)["error"]["type"] == "rate_limit_error"
    assert 1700 <= int(r.headers["retry-after"]) <= 1801


def test_limit_and_reserve_caps(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    fake.set_state("a", seven_day_utilization=0.55, five_hour_utilization=0.1)
    fake.set_state("b", seven_day_utilization=0.6, five_hour_utilization=0.95)
    cfg = pool_service(fake, paths, "fallback")
    creds = cfg["services"][0]["credentials"]
    creds[0]["limit_weekly"] = 50  # a: 55 % >= 50 % cap -> skipped
    creds[1]["reserve_5h"] = 10  # b: 95 % >= 90 % cap -> skipped
    proxy = start_proxy(cfg)
    polled(proxy, 2)
    r = ask(proxy)
    assert r.status == 429 and "rate-limited" in json.loads(r.data)["error"]["message"]
    creds[1]["reserve_5h"] = 1  # same quota, cap 99 %: now b serves
    proxy2 = start_proxy(cfg, name="p2")
    polled(proxy2, 2)
    assert account_of(ask(proxy2)) == "b"


def test_poll_failures_within_grace_keep_the_credential(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a")
    fake.set_state("a", usage_api={"status": 500})
    proxy = start_proxy(pool_service(fake, paths))
    wait_for(lambda: admin_status(proxy)["credentials"][0]["poll_failures"] >= 1, 15, what="a failed poll")
    assert account_of(ask(proxy)) == "a"
    fake.set_state("a", usage_api={"status": 429, "retry_after": 60})
    assert account_of(ask(proxy)) == "a"


def test_malformed_ratelimit_headers_never_break_a_request(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    proxy = start_proxy(pool_service(fake, paths))
    garbage = json.dumps({"anthropic-ratelimit-unified-5h-utilization": "lots",
                          "anthropic-ratelimit-unified-7d-reset": "soon",
                          "anthropic-ratelimit-unified-representative-claim": "weird"})
    for _ in range(3):
        assert ask(proxy, extra={"x-fake-ratelimit": garbage}).status == 200
    # a 429 whose unified status says "allowed" is a throttle, not the quota: it passes through as it came,
    # whatever the garbage beside it, and the account keeps serving
    r = ask(proxy, extra={"x-fake-status": "429", "x-fake-ratelimit": garbage})
    assert r.status == 429 and r.headers["anthropic-ratelimit-unified-status"] == "allowed"
    assert r.json() == {"type": "error", "request_id": r.headers["request-id"],
                        "error": {"type": "rate_limit_error", "message": "fake error 429 (x-fake-status)"}}
    assert r.headers["retry-after"] == "30"
    assert ask(proxy).status == 200


def test_status_endpoint_numbers(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a", "b")
    fake.set_state("a", five_hour_utilization=0.30, seven_day_utilization=0.40,
                   organization_type="claude_max", rate_limit_tier="default_claude_max_5x")
    fake.set_state("b", five_hour_utilization=0.0, seven_day_utilization=0.10)
    users = [{"name": "alice", "token": ALICE, "credential": "pool"}, {"name": "bob", "token": BOB, "credential": "b"}]
    cfg = pool_service(fake, paths, users=users)
    # plan weights: a is max 5x (weight 5), b is pro (weight 1)
    write_credentials(paths["a"], "sk-ant-oat01-a-access-xxxxxxxx", "sk-ant-ort01-a-refresh-xxxxxxx",
                      oauth={"subscriptionType": "max", "rateLimitTier": "default_claude_max_5x"})
    write_credentials(paths["b"], "sk-ant-oat01-b-access-xxxxxxxx", "sk-ant-ort01-b-refresh-xxxxxxx",
                      oauth={"subscriptionType": "pro"})
    proxy = start_proxy(cfg)
    polled(proxy, 2)
    r = request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + ALICE})
    assert r.status == 200
    # sing-box's worked example: 5h 100-(69*5+99)/6 = 26, weekly 100-(59*5+89)/6 = 36, weight 6
    assert json.loads(r.data) == {"five_hour_utilization": 26.0, "plan_weight": 6.0, "weekly_utilization": 36.0}
    r = request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + BOB})
    assert json.loads(r.data) == {"five_hour_utilization": 1.0, "plan_weight": 1.0, "weekly_utilization": 11.0}
    full = admin_status(proxy)
    by_tag = {c["tag"]: c for c in full["credentials"]}
    assert by_tag["a"]["weekly_utilization"] == 40 and by_tag["b"]["five_hour_utilization"] == 0
    assert full["pools"]["pool"]["members"] == ["a", "b"]
    assert request("GET", proxy.url + "/ccm/v1/status").status == 401
    assert request("POST", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + ALICE}).status == 405


def test_credential_file_created_after_start(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "a")
    late = tmp_path / "late" / ".credentials.json"
    cfg = pool_service(fake, {**paths, "late": late}, "fallback")
    cfg["services"][0]["credentials"][0]["limit_weekly"] = 10  # a is over its cap: only "late" could serve
    proxy = start_proxy(cfg)
    polled(proxy, 1)
    r = ask(proxy)
    assert r.status == 429
    fake.add_account(access_token="sk-ant-oat01-late-access-xxxx", refresh_token="sk-ant-ort01-late-rrrr",
                     account="late", expires_in=3600)
    write_credentials(late, "sk-ant-oat01-late-access-xxxx", "sk-ant-ort01-late-rrrr")
    assert account_of(ask(proxy)) == "late"
    late.write_text("{broken")
    assert ask(proxy).status == 429


def test_chaining_through_a_second_instance(tmp_path, fake, start_proxy):
    paths = accounts(fake, tmp_path, "b")
    peer_token = "ak-ccm-peer-0123456789abcdef"
    peer = start_proxy({"services": [{
        "type": "ccm", "listen": "127.0.0.1", "listen_port": 0, "upstream_url": fake.url,
        "token_url": fake.url + "/v1/oauth/token", "credential_path": str(paths["b"]),
        "users": [{"name": "instance-a", "token": peer_token}],
    }]}, name="peer")
    front = {"services": [{
        "type": "ccm", "listen": "127.0.0.1", "listen_port": 0, "upstream_url": fake.url,
        "credentials": [{"tag": "remote", "type": "external", "url": peer.url, "token": peer_token}],
        "users": [{"name": "alice", "token": ALICE, "credential": "remote", "allow_external_usage": True}],
    }]}
    proxy = start_proxy(front, name="front")
    c = anthropic.Anthropic(base_url=proxy.url, auth_token=ALICE, max_retries=0)
    assert c.messages.create(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]).content
    with c.messages.stream(model=MODEL, max_tokens=5, messages=[{"role": "user", "content": "x"}]) as s:
        assert "".join(s.text_stream)
    assert " instance-a POST /v1/messages 200 " in peer.log()
    assert fake.requests()[-1]["account"] == "b"


@pytest.mark.parametrize("status", [400, 401, 404, 413, 529])
def test_other_statuses_pass_through_in_a_pool(tmp_path, fake, start_proxy, status):
    paths = accounts(fake, tmp_path, "a")
    proxy = start_proxy(pool_service(fake, paths))
    r = ask(proxy, extra={"x-fake-status": str(status)})
    assert r.status == status
    # the upstream's own body, byte for byte (its request id included)
    kinds = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 529: "overloaded_error"}
    error = {"type": kinds[status], "message": f"fake error {status} (x-fake-status)"}
    expected = {"type": "error", "error": error, "request_id": r.headers["request-id"]}
    assert r.data == json.dumps(expected, separators=(",", ":")).encode()
    assert r.headers.get("retry-after") == ("30" if status == 529 else None)
    # a 401 makes the proxy renew the token once (the retry gets the same 401, which passes through)
    assert fake.stats()["refreshes"] == (1 if status == 401 else 0)
    assert len(fake.requests(path="/v1/messages")) == (2 if status == 401 else 1)
