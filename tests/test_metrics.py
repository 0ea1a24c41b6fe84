"""`/metrics` end to end: a known set of requests through `ccm-wsgi serve` (over TLS) and gunicorn with two workers,
then what Prometheus would read, parsed by prometheus_client's own parser: exact counts, tokens and dollars, the
same figures `ccm-wsgi usage` reports, the access rules, and the Grafana dashboard's queries."""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import pytest
import trustme
from cryptography import x509

from tests.support.clients import ask
from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.observe import (
    ADMIN,
    HAIKU,
    Samples,
    knobs,
    scrape,
    tls_pool,
    tls_sdk,
    total,
    two_users,
    usage_by_user,
    value,
)
from tests.support.procs import (
    HTTP,
    Gunicorn,
    Proxy,
    only,
    request,
    service_config,
    wait_for,
    write_credentials,
    write_pair,
)

CAROL = "ak-ccm-carol-0123456789abcdef"
DASHBOARD = Path(__file__).resolve().parents[1] / "conf" / "grafana-dashboard.json"
# alice's two answers: 100k input ($0.30), 20k output ($0.30), 50k cache read ($0.015), 10k cache write ($0.0375)
ALICE_EACH = knobs(100_000, 20_000, 50_000, 10_000)
ALICE_COST = 2 * 0.6525  # over her $1 daily budget: her next request is refused
BOB_HAIKU = knobs(200_000, 40_000)  # Haiku 4.5: $0.20 + $0.20
BOB_COST = 0.4


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, module_fake: FakeUpstream,
           module_ca: trustme.CA) -> Iterator[dict[str, Any]]:
    """One TLS service after a known set of requests: its URL, usage file, certificate and what each client got."""
    tmp, fake, ca = tmp_path_factory.mktemp("metrics"), module_fake, module_ca
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    # a minute left: the first request refreshes it
    creds = write_credentials(tmp / "claude" / ".credentials.json", ACCESS, REFRESH, expires_in=60)
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(cert, tmp, "server")
    users = [{"name": "alice", "token": ALICE, "limits": {"budget": [{"usd": 1, "per": "day"}]}},
             {"name": "bob", "token": BOB, "limits": {"models": ["claude-haiku-*"]}},
             {"name": "carol", "token": CAROL}]
    usages = tmp / "usage" / "usages.json"
    config = {"log": {"level": "info"}, "services": [service_config(
        fake.url, creds, users=users, admin_tokens=[ADMIN], usages_path=str(usages),
        tls={"enabled": True, "certificate_path": str(cert_path), "key_path": str(key_path)})]}
    proxy = Proxy(tmp, config, name="metrics").start()
    try:
        url, pool = proxy.url, tls_pool(ca)
        got: dict[str, Any] = {}
        with tls_sdk(url, ALICE, ca) as alice, tls_sdk(url, BOB, ca) as bob, tls_sdk(url, CAROL, ca) as carol:
            message = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
            alice.messages.create(**message, extra_headers=ALICE_EACH)
            with pytest.raises(anthropic.APIStatusError) as overloaded:
                alice.messages.create(**message, extra_headers={"x-fake-status": "529"})
            got["overloaded"] = overloaded.value.status_code
            with alice.messages.stream(**message, extra_headers=ALICE_EACH) as s:
                s.get_final_message()
            with pytest.raises(anthropic.RateLimitError):  # the daily budget is spent
                alice.messages.create(**message)
            with pytest.raises(anthropic.BadRequestError):  # bob may not use sonnet
                bob.messages.create(**message)
            bob.messages.create(**{**message, "model": HAIKU}, extra_headers=BOB_HAIKU)
            with pytest.raises(anthropic.APIError), carol.messages.stream(  # the upstream drops it
                    **message, extra_headers={**knobs(1000, 3), "x-fake-drop-after": "1"}) as s:
                s.get_final_message()
        got["no token"] = request("POST", url + "/v1/messages", pool=pool, body=b"{}").status
        yield {"url": url, "pool": pool, "usages": str(usages), "cert": cert, "proxy": proxy, "got": got}
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def samples(served: dict[str, Any]) -> Samples:
    return scrape(served["url"], pool=served["pool"])


def test_known_requests_give_exact_counts_tokens_and_costs(served: dict[str, Any], samples: Samples) -> None:
    assert served["got"] == {"overloaded": 529, "no token": 401}
    requests = {labels: n for (name, labels), n in samples.items() if name == "ccm_requests_total"}
    assert requests == {
        (("model", "Sonnet 4.6"), ("status", "200"), ("user", "alice")): 2,
        (("model", "Sonnet 4.6"), ("status", "529"), ("user", "alice")): 1,
        (("model", "Sonnet 4.6"), ("status", "429"), ("user", "alice")): 1,
        (("model", "Sonnet 4.6"), ("status", "400"), ("user", "bob")): 1,
        (("model", "Haiku 4.5"), ("status", "200"), ("user", "bob")): 1,
        (("model", "Sonnet 4.6"), ("status", "200"), ("user", "carol")): 1,  # cut short, still an answer
        (("model", "other"), ("status", "401"), ("user", "-")): 1,  # no user, and no model read
    }
    for kind, n in {"input": 200_000, "output": 40_000, "cache_read": 100_000, "cache_write": 20_000}.items():
        assert value(samples, "ccm_tokens_total", user="alice", model="Sonnet 4.6", kind=kind) == n
    assert value(samples, "ccm_tokens_total", user="bob", model="Haiku 4.5", kind="input") == 200_000
    assert value(samples, "ccm_tokens_total", user="bob", model="Haiku 4.5", kind="output") == 40_000
    assert value(samples, "ccm_cost_usd_total", user="alice", model="Sonnet 4.6") == pytest.approx(ALICE_COST)
    assert value(samples, "ccm_cost_usd_total", user="bob", model="Haiku 4.5") == pytest.approx(BOB_COST)
    assert value(samples, "ccm_refusals_total", user="alice", limit="budget_day") == 1
    assert value(samples, "ccm_refusals_total", user="bob", limit="model") == 1
    assert value(samples, "ccm_upstream_errors_total", status="529") == 1
    assert value(samples, "ccm_stream_cuts_total", cause="upstream_dropped") == 1
    assert value(samples, "ccm_token_refresh_total", credential="default", result="success") == 1
    assert value(samples, "ccm_token_refresh_total", credential="default", result="failure") == 0
    assert value(samples, "ccm_upstream_first_byte_seconds_count") == 5  # every answer the upstream began
    assert value(samples, "ccm_active_requests") == 0
    assert value(samples, "ccm_usage_save_failures_total") == 0
    assert value(samples, "ccm_user_budget_remaining_usd", user="alice", per="day") == 0


def test_metrics_agree_with_ccm_wsgi_usage(served: dict[str, Any], samples: Samples) -> None:
    report = usage_by_user(served["usages"])
    assert set(report) == {"alice", "bob", "carol"}
    for user, totals in report.items():
        assert totals["request_count"] == total(samples, "ccm_requests_total", user=user, status="200")
        for key, kind in [("input_tokens", "input"), ("output_tokens", "output"),
                          ("cache_read_input_tokens", "cache_read"), ("cache_creation_input_tokens", "cache_write")]:
            assert totals[key] == total(samples, "ccm_tokens_total", user=user, kind=kind), (user, kind)
        cost = total(samples, "ccm_cost_usd_total", user=user)
        assert totals["cost_usd"] == pytest.approx(round(cost, 2), abs=0.011)  # the file rounds each bucket


def test_credential_windows_and_certificate(served: dict[str, Any], samples: Samples) -> None:
    now = time.time()
    assert value(samples, "ccm_credential_utilization_ratio", credential="default", window="five_hour") == 0.1
    assert value(samples, "ccm_credential_utilization_ratio", credential="default", window="weekly") == 0.2
    for window in ("five_hour", "weekly"):
        reset = value(samples, "ccm_credential_window_reset_timestamp_seconds", credential="default", window=window)
        assert reset is not None and now < reset < now + 8 * 86400
    assert value(samples, "ccm_credential_available", credential="default") == 1
    leaf = x509.load_pem_x509_certificate(served["cert"].cert_chain_pems[0].bytes())
    expiry = value(samples, "ccm_tls_certificate_expiry_timestamp_seconds")
    assert expiry == leaf.not_valid_after_utc.timestamp()


def test_only_admins_read_metrics(served: dict[str, Any]) -> None:
    url, pool = served["url"], served["pool"]
    for token, status, kind in [(None, 401, "authentication_error"), ("not-a-token-of-ours", 401,
                                "authentication_error"), (ALICE, 403, "permission_error")]:
        headers = {"Authorization": "Bearer " + token} if token else {}
        r = request("GET", url + "/metrics", pool=pool, headers=headers)
        assert (r.status, json.loads(r.data)["error"]["type"]) == (status, kind)
        assert b"ccm_" not in r.data
    assert scrape(url, ADMIN, pool)  # and x-api-key works as well as a Bearer token
    assert request("GET", url + "/metrics", pool=pool, headers={"x-api-key": ADMIN}).status == 200


def test_an_open_service_shows_metrics_and_its_page_to_anyone_and_metrics_can_be_turned_off(
        tmp_path: Path, module_fake: FakeUpstream) -> None:
    creds = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)
    config = {"services": [service_config(module_fake.url, creds, usages_path=str(tmp_path / "usages.json"))]}
    proxy = Proxy(tmp_path, config, name="open").start()
    try:
        ask(proxy)
        found = scrape(proxy.url, token=None)
        assert value(found, "ccm_requests_total", user="-", model="Sonnet 4.6", status="200") == 1
        page = request("GET", proxy.url + "/ccm/")
        assert page.status == 200 and b"Open service: everyone sees everything" in page.data
        assert re.search(rb"<h3>\(no user\)</h3>.*?<th scope=\"row\">Today</th><td>1</td>", page.data, re.S)
    finally:
        proxy.stop()
    proxy = Proxy(tmp_path, config, name="off", env={"CCM_METRICS": "off"}).start()
    try:
        ask(proxy)  # the proxy works as ever, without metrics
        r = request("GET", proxy.url + "/metrics")
        assert r.status == 404 and b"ccm_" not in r.data
    finally:
        proxy.stop()


def test_the_dashboard_queries_only_metrics_a_scrape_has(samples: Samples) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert [i["name"] for i in dashboard["__inputs"]] == ["DS_PROMETHEUS"]
    assert dashboard["__inputs"][0]["pluginId"] == "prometheus"
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    titles = " ".join(p["title"].lower() for p in panels)
    for subject in ("requests", "tokens", "cost", "utilisation", "reset", "budget", "error"):
        assert subject in titles
    names = {name for name, _ in samples}
    used: set[str] = set()
    for panel in panels:
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"
            used |= set(re.findall(r"\bccm_[a-z_]+", target["expr"]))
    assert used and used <= names, used - names
    families = {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in names if name.startswith("ccm_")}
    assert families <= {re.sub(r"_(total|bucket|count|sum)$", "", name) for name in used}  # every metric shown


# --- gunicorn: one scrape of any worker shows every worker's counts, a replaced worker's included -------------


@pytest.fixture
def gunicorn(tmp_path: Path, module_fake: FakeUpstream, start_gunicorn: Callable[..., Gunicorn]) -> Gunicorn:
    return start_gunicorn(two_users(module_fake.url, tmp_path))


def counts(server: Gunicorn) -> dict[str, float]:
    found = scrape(server.url)
    return {user: value(found, "ccm_requests_total", user=user, model="Sonnet 4.6", status="200") or 0
            for user in ("alice", "bob")}


def test_gunicorn_workers_are_summed_and_a_replaced_worker_keeps_its_counts(gunicorn: Gunicorn) -> None:
    first, second = sorted(gunicorn.worker_pids())
    with only(gunicorn, first):
        ask(gunicorn, ALICE)
        ask(gunicorn, ALICE)
        assert counts(gunicorn) == {"alice": 2, "bob": 0}
    with only(gunicorn, second):
        ask(gunicorn, ALICE)
        assert counts(gunicorn) == {"alice": 3, "bob": 0}  # the other worker's two, and this one
    wait_for(lambda: set(gunicorn.request_pids()) == {first, second}, 10, what="both workers' access lines")
    os.kill(first, signal.SIGKILL)
    wait_for(lambda: len(gunicorn.worker_pids()) == 3, 20, what="a worker replacing the killed one")
    replacement = (gunicorn.worker_pids() - {first, second}).pop()
    with only(gunicorn, replacement):  # pauses the survivor; the killed worker is gone already
        ask(gunicorn, BOB, model=HAIKU)
        found = scrape(gunicorn.url)
    assert value(found, "ccm_requests_total", user="alice", model="Sonnet 4.6", status="200") == 3
    assert value(found, "ccm_requests_total", user="bob", model="Haiku 4.5", status="200") == 1
    assert value(found, "ccm_active_requests") == 0
    wait_for(lambda: replacement in gunicorn.request_pids(), 10, what="the replacement's access line")
    HTTP.clear()  # no idle kept-alive connection holds up gunicorn's stop
