"""The typed config model: the new keys, the helpers the runtime asks, objects built in Python, token rules."""

from __future__ import annotations

import datetime
import hashlib
from typing import Any

import pytest

from ccm_wsgi.config import (
    BalancerCredential,
    ConfigError,
    DefaultCredential,
    ExternalCredential,
    Limits,
    RedisState,
    SocksOutbound,
    User,
    parse,
)
from ccm_wsgi.config.credentials import POLL_INTERVAL
from ccm_wsgi.config.service import DEFAULT_AUTHORIZE_URL, SINGLE_POLL_INTERVAL

ALICE = {"name": "alice", "token": "ak-ccm-secret-alice"}
BOB = {"name": "bob", "token": "ak-ccm-secret-bob-0"}
BUDGET = {"budget": [{"usd": 5, "per": "day"}, {"usd": 20.5, "per": "month"}]}


def service(**fields: Any) -> dict[str, Any]:
    return {"services": [{"type": "ccm", **fields}]}


def problems(data: Any) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(data)
    return info.value.problems


def one(data: Any) -> Any:
    (svc,) = parse(data).services
    return svc


# -------------------------------------------------------------------------------------------- new keys


def test_limits_state_and_user_controls() -> None:
    svc = one(service(
        usages_path="/var/lib/ccm/usage.json", overage="deny", authorize_url="https://login.example.com/authorize",
        limits={**BUDGET, "requests_per_minute": 60, "max_concurrent": 4, "models": "claude-sonnet-*",
                "window_share": {"five_hour": 25}},
        users=[{**ALICE, "disabled": True, "expires": "2026-12-31T23:59:59Z"},
               {**BOB, "limits": {"models": ["claude-haiku-*", "claude-sonnet-4-5"]},
                "expires": "2026-06-30T12:00:00.5+02:00"}],
        state={"type": "redis", "url": "rediss://:secret@redis.internal:6380/2"},
    ))
    assert (svc.overage, svc.authorize_url) == ("deny", "https://login.example.com/authorize")
    limits = svc.limits
    assert limits is not None and limits.window_share is not None
    assert [(b.usd, b.per) for b in limits.budget] == [(5.0, "day"), (20.5, "month")]
    assert (limits.requests_per_minute, limits.max_concurrent, limits.models) == (60, 4, ("claude-sonnet-*",))
    assert (limits.window_share.five_hour, limits.window_share.weekly) == (25.0, None)
    alice, bob = svc.users
    assert alice.disabled and not bob.disabled
    assert alice.expires == datetime.datetime(2026, 12, 31, 23, 59, 59, tzinfo=datetime.timezone.utc)
    assert bob.expires is not None and bob.expires.utcoffset() == datetime.timedelta(hours=2)
    assert svc.state == RedisState(type="redis", url="rediss://:secret@redis.internal:6380/2")
    assert svc.state.key_prefix == "ccm:"


def test_defaults_of_the_new_keys() -> None:
    svc = one(service())
    assert (svc.limits, svc.overage, svc.state, svc.authorize_url) == (None, "allow", None, DEFAULT_AUTHORIZE_URL)
    assert (svc.reuse_addr, svc.tcp_keep_alive, svc.tcp_keep_alive_interval, svc.disable_tcp_keep_alive) == (
        False, 300.0, 75.0, False)


def test_listen_socket_fields_are_typed() -> None:
    svc = one(service(reuse_addr=True, tcp_keep_alive="1m", tcp_keep_alive_interval="15s",
                      disable_tcp_keep_alive=True))
    assert (svc.reuse_addr, svc.tcp_keep_alive, svc.tcp_keep_alive_interval, svc.disable_tcp_keep_alive) == (
        True, 60.0, 15.0, True)
    zero = one(service(tcp_keep_alive="0s", tcp_keep_alive_interval="0"))  # sing-box: 0 means the default
    assert (zero.tcp_keep_alive, zero.tcp_keep_alive_interval) == (300.0, 75.0)


NEW_INVALID: list[tuple[str, Any, str]] = [
    ("overage", service(overage="maybe"), 'services[0].overage: must be "allow" or "deny"'),
    ("authorize_url", service(authorize_url="claude.com/authorize"),
     "services[0].authorize_url: must be an http:// or https:// URL with a host"),
    ("limits type", service(limits=[]), "services[0].limits: must be an object"),
    ("limits key", service(limits={"rpm": 5}), "services[0].limits.rpm: unknown key"),
    ("budget type", service(limits={"budget": {"usd": 1, "per": "day"}}), "services[0].limits.budget: must be a list"),
    ("budget usd zero", service(usages_path="/u", limits={"budget": [{"usd": 0, "per": "day"}]}),
     "services[0].limits.budget[0].usd: must be a number > 0"),
    ("budget usd string", service(usages_path="/u", limits={"budget": [{"usd": "5", "per": "day"}]}),
     "services[0].limits.budget[0].usd: must be a number > 0"),
    ("budget per", service(usages_path="/u", limits={"budget": [{"usd": 1, "per": "year"}]}),
     'services[0].limits.budget[0].per: must be "day", "week" or "month"'),
    ("budget per missing", service(usages_path="/u", limits={"budget": [{"usd": 1}]}),
     "services[0].limits.budget[0].per: required"),
    ("budget usd missing", service(usages_path="/u", limits={"budget": [{"per": "week"}]}),
     "services[0].limits.budget[0].usd: required"),
    ("budget per twice", service(usages_path="/u", limits={"budget": [{"usd": 1, "per": "day"},
                                                                      {"usd": 2, "per": "week"},
                                                                      {"usd": 3, "per": "day"}]}),
     'services[0].limits.budget[2].per: duplicate period "day" (same as services[0].limits.budget[0])'),
    ("rpm zero", service(limits={"requests_per_minute": 0}),
     "services[0].limits.requests_per_minute: must be an integer >= 1"),
    ("rpm float", service(limits={"requests_per_minute": 1.5}),
     "services[0].limits.requests_per_minute: must be an integer >= 1"),
    ("concurrency bool", service(limits={"max_concurrent": True}),
     "services[0].limits.max_concurrent: must be an integer >= 1"),
    ("models empty list", service(limits={"models": []}), "services[0].limits.models: must name at least one model"),
    ("models empty pattern", service(limits={"models": ["claude-*", " "]}),
     "services[0].limits.models: must not contain an empty pattern"),
    ("models type", service(limits={"models": 5}), "services[0].limits.models: must be a string or a list"),
    ("window share above 100", service(usages_path="/u", limits={"window_share": {"weekly": 101}}),
     "services[0].limits.window_share.weekly: must be a number > 0 and at most 100"),
    ("window share zero", service(usages_path="/u", limits={"window_share": {"five_hour": 0}}),
     "services[0].limits.window_share.five_hour: must be a number > 0 and at most 100"),
    ("window share empty", service(usages_path="/u", limits={"window_share": {}}),
     "services[0].limits.window_share: needs five_hour, weekly or both"),
    ("window share key", service(usages_path="/u", limits={"window_share": {"daily": 5}}),
     "services[0].limits.window_share.daily: unknown key"),
    ("user limits", service(users=[{**ALICE, "limits": {"max_concurrent": 0}}]),
     "services[0].users[0].limits.max_concurrent: must be an integer >= 1"),
    ("user disabled", service(users=[{**ALICE, "disabled": "yes"}]),
     "services[0].users[0].disabled: must be true or false"),
    ("user expires without zone", service(users=[{**ALICE, "expires": "2026-12-31T23:59:59"}]),
     "services[0].users[0].expires: must be an RFC 3339 time with a zone"),
    ("user expires date", service(users=[{**ALICE, "expires": "2026-12-31"}]),
     "services[0].users[0].expires: must be an RFC 3339 time with a zone"),
    ("user expires impossible", service(users=[{**ALICE, "expires": "2026-02-30T00:00:00Z"}]),
     "services[0].users[0].expires: must be an RFC 3339 time with a zone"),
    ("user expires number", service(users=[{**ALICE, "expires": 1798761599}]),
     "services[0].users[0].expires: must be a string"),
    ("state type", service(state={"type": "memcached", "url": "redis://x"}),
     'services[0].state.type: unknown state type "memcached" (must be "redis")'),
    ("state type missing", service(state={"url": "redis://x"}), "services[0].state.type: required"),
    ("state url missing", service(state={"type": "redis"}), "services[0].state.url: required"),
    ("state url scheme", service(state={"type": "redis", "url": "http://x:6379"}),
     "services[0].state.url: must be a redis://, rediss:// or unix:// URL"),
    ("state url host", service(state={"type": "redis", "url": "redis://"}),
     "services[0].state.url: must be a redis://, rediss:// or unix:// URL"),
    ("state unix path", service(state={"type": "redis", "url": "unix://"}),
     "services[0].state.url: a unix:// URL needs the socket's path"),
    ("state key prefix", service(state={"type": "redis", "url": "redis://x", "key_prefix": 1}),
     "services[0].state.key_prefix: must be a string"),
    # admin tokens follow the user-token rules; placeholders are refused
    ("admin token short", service(admin_tokens=["admin"]),
     "services[0].admin_tokens[0]: must be at least 8 characters long"),
    ("admin token placeholder", service(admin_tokens=["ak-ccm-change-me-admin"]),
     "services[0].admin_tokens[0]: is the example's placeholder, not a secret: generate a token with `ccm-wsgi token`"),
    ("user token placeholder", service(users=[{"name": "a", "token": "ak-ccm-CHANGEME-a"}]),
     "services[0].users[0].token: is the example's placeholder"),
    # budgets and window shares need the usage records
    ("ledger single", service(limits=BUDGET),
     "services[0].limits: budget is counted from the usage records: set the service's usages_path (or use shared "
     'state: "state": {"type": "redis", "url": ...})'),
    ("ledger user", service(users=[ALICE, {**BOB, "limits": {"window_share": {"weekly": 10}}}]),
     "services[0].users[1].limits: window_share is counted from the usage records: set the service's usages_path"),
    ("ledger pool", service(
        credentials=[{"tag": "a", "usages_path": "/u/a.json"}, {"tag": "b"},
                     {"tag": "e", "type": "external", "url": "https://peer", "token": "external-token-1"},
                     {"tag": "p", "type": "balancer", "credentials": ["a", "b", "e"]}],
        users=[{**ALICE, "credential": "p", "allow_external_usage": True, "limits": BUDGET},
               {**BOB, "credential": "a", "limits": BUDGET}]),
     'services[0].users[0].limits: budget is counted from the usage records, which credentials "b", "e" do not keep: '
     "set usages_path there (or use shared state"),
    ("ledger pool inherited", service(
        limits={"window_share": {"five_hour": 50}, **BUDGET},
        credentials=[{"tag": "a", "usages_path": "/u/a.json"}, {"tag": "b"}],
        users=[{**ALICE, "credential": "a"}, {**BOB, "credential": "b"}]),
     'services[0].limits: budget and window_share are counted from the usage records, which credential "b" does not '
     "keep: set usages_path there"),
    ("ledger open pool", service(limits=BUDGET, credentials=[{"tag": "a"}, {"tag": "b", "usages_path": "/u"}]),
     'services[0].limits: budget is counted from the usage records, which credential "a" does not keep'),
]


@pytest.mark.parametrize(("data", "expected"), [c[1:] for c in NEW_INVALID], ids=[c[0] for c in NEW_INVALID])
def test_new_keys_are_checked(data: Any, expected: str) -> None:
    found = problems(data)
    assert any(line.startswith(expected) for line in found), found


def test_ledger_is_not_needed_with_redis_state_or_records_or_other_limits() -> None:
    redis = {"type": "redis", "url": "redis://127.0.0.1:6379/0"}
    assert one(service(limits=BUDGET, state=redis)).limits is not None
    assert one(service(limits=BUDGET, usages_path="/u.json")).limits is not None
    assert one(service(limits={"requests_per_minute": 5, "max_concurrent": 1, "models": "*"})).limits is not None
    # a user with its own limits does not inherit the service's budget, so only the service's ledger matters
    pool = one(service(limits=BUDGET, credentials=[{"tag": "a", "usages_path": "/u/a.json"}, {"tag": "b"}],
                       users=[{**ALICE, "credential": "a"}, {**BOB, "credential": "b", "limits": {}}]))
    assert pool.limits_for(pool.users[1]) == Limits()


def test_placeholder_messages_never_quote_the_token() -> None:
    found = "\n".join(problems(service(users=[{"name": "a", "token": "ak-ccm-change-me-alice"}],
                                       admin_tokens=["Change-Me-admin-1"])))
    assert found.count("ccm-wsgi token") == 2
    assert "alice" not in found and "admin-1" not in found


# -------------------------------------------------------------------------------------------- helpers


def test_single_credential_is_one_default_credential() -> None:
    svc = one(service(credential_path="/c.json", usages_path="/u.json", detour="proxy-a",
                      users=[ALICE], limits={"max_concurrent": 2}) | {"outbounds": [
        {"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1080}]})
    assert not svc.pooled
    assert svc.effective_credentials == (DefaultCredential(
        tag="default", credential_path="/c.json", usages_path="/u.json", detour="proxy-a", limit_5h=100,
        limit_weekly=100),)
    assert svc.default_poll_interval == SINGLE_POLL_INTERVAL
    assert svc.limits_for(svc.users[0]) == svc.limits_for(None) == Limits(max_concurrent=2)
    assert [c.tag for c in svc.reachable("default")] == ["default"]


def test_pool_helpers() -> None:
    svc = one(service(
        credentials=[{"tag": "a"},
                     {"tag": "e", "type": "external", "url": "https://peer/", "token": "external-token-1"},
                     {"tag": "p", "type": "fallback", "credentials": ["e", "a"]}],
        users=[{**ALICE, "credential": "p", "allow_external_usage": True, "limits": {"max_concurrent": 1}},
               {**BOB, "credential": "a"}]))
    assert svc.pooled and svc.default_poll_interval == POLL_INTERVAL
    a, e, p = svc.effective_credentials
    match p:
        case BalancerCredential(strategy=strategy, credentials=members):
            assert (strategy, members) == ("fallback", ("e", "a"))
        case _:
            pytest.fail("not a balancer")
    assert isinstance(a, DefaultCredential) and isinstance(e, ExternalCredential) and e.url == "https://peer"
    assert [c.tag for c in svc.reachable("p")] == ["e", "a"]
    assert [c.tag for c in svc.reachable("a")] == ["a"]
    assert svc.reachable("nope") == ()
    alice, bob = svc.users
    assert svc.limits_for(alice) == Limits(max_concurrent=1)
    assert svc.limits_for(bob) is None


# -------------------------------------------------------------------------------------------- in Python


def test_objects_built_in_python_are_checked_like_the_file() -> None:
    hashed = hashlib.sha256(b"ak-ccm-secret-alice").hexdigest().upper()
    assert User(name="alice", token="ak-ccm-secret-alice").digest == User(name="alice", token_sha256=hashed).digest
    with pytest.raises(ValueError, match="needs exactly one of token or token_sha256"):
        User(name="alice")
    with pytest.raises(ValueError, match="must be at least 8 characters long"):
        User(name="alice", token="short")
    with pytest.raises(ValueError, match="must be a duration"):
        SocksOutbound(tag="s", server="127.0.0.1", server_port=1080, connect_timeout=3.0)  # durations are "3s"
    socks = SocksOutbound(tag="s", server="127.0.0.1", server_port=1080, connect_timeout="3s")
    assert (socks.type, socks.version, socks.connect_timeout) == ("socks", "5", 3.0)
    with pytest.raises(ValueError, match="only valid with socks version 5"):
        SocksOutbound(tag="s", server="127.0.0.1", server_port=1080, version="4", password="x")


def test_models_are_frozen() -> None:
    svc = one(service())
    with pytest.raises(ValueError):
        svc.listen_port = 1  # type: ignore[misc]
