"""The status page `/ccm/` in a real browser: Debian's headless Chromium, driven through Debian's chromedriver by
selenium, signs in through the form as a user and as an admin over TLS, reads what the page shows (the same figures
as `ccm-wsgi usage` and `/metrics`), watches it refresh itself, and signs out. Screenshots stay in the test's
temporary directory. The headers, the cookie and the form rules are also checked byte for byte, and gunicorn's
workers are shown to share one session key and one list of refusals."""

from __future__ import annotations

import contextlib
import http.cookies
import json
import re
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme
import urllib3
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as DriverService
from selenium.webdriver.common.by import By
from selenium.webdriver.remote.webdriver import WebDriver

from tests.support.clients import ask
from tests.support.constants import ACCESS, ALICE, BOB, MODEL, REFRESH
from tests.support.fake_upstream import FakeUpstream
from tests.support.observe import ADMIN, HAIKU, knobs, scrape, tls_pool, tls_sdk, two_users, usage_by_user, value
from tests.support.procs import (
    Gunicorn,
    Proxy,
    only,
    request,
    service_config,
    wait_for,
    write_credentials,
    write_pair,
)

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
TOKENS = (ALICE, BOB, ADMIN, ACCESS, REFRESH)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory, module_fake: FakeUpstream,
         module_ca: trustme.CA) -> Iterator[dict[str, Any]]:
    """A TLS service with two users, an admin and some traffic (a refusal included)."""
    tmp, fake, ca = tmp_path_factory.mktemp("page"), module_fake, module_ca
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    creds = write_credentials(tmp / "claude" / ".credentials.json", ACCESS, REFRESH)
    cert = ca.issue_cert("127.0.0.1")
    cert_path, key_path = write_pair(cert, tmp, "server")
    users = [{"name": "alice", "token": ALICE, "limits": {"budget": [{"usd": 5, "per": "day"}],
                                                         "requests_per_minute": 60}},
             {"name": "bob", "token": BOB, "limits": {"models": ["claude-haiku-*"]}}]
    usages = tmp / "usage" / "usages.json"
    config = {"log": {"level": "info"}, "services": [service_config(
        fake.url, creds, users=users, admin_tokens=[ADMIN], usages_path=str(usages),
        tls={"enabled": True, "certificate_path": str(cert_path), "key_path": str(key_path)})]}
    proxy = Proxy(tmp, config, name="page").start()
    message = {"model": MODEL, "max_tokens": 16, "messages": [{"role": "user", "content": "hi"}]}
    try:
        with tls_sdk(proxy.url, ALICE, ca) as alice, tls_sdk(proxy.url, BOB, ca) as bob:
            alice.messages.create(**message, extra_headers=knobs(100_000, 20_000, 50_000, 10_000))
            with alice.messages.stream(**message, extra_headers=knobs(1234, 567)) as s:
                s.get_final_message()
            bob.messages.create(**{**message, "model": HAIKU}, extra_headers=knobs(4000, 300))
            with contextlib.suppress(Exception):
                bob.messages.create(**message)  # refused: bob may only use haiku
        yield {"url": proxy.url, "pool": tls_pool(ca), "usages": str(usages), "proxy": proxy, "ca": ca,
               "message": message, "shots": tmp}
    finally:
        proxy.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[WebDriver]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=412,915", "--ignore-certificate-errors", "--hide-scrollbars"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=DriverService(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


def sign_in(driver: WebDriver, url: str, token: str) -> None:
    driver.delete_all_cookies()
    driver.get(url + "/ccm/")
    field = driver.find_element(By.ID, "token")
    field.send_keys(token)
    field.submit()
    wait_for(lambda: "/ccm/" in driver.current_url and not driver.find_elements(By.ID, "token"), 10,
             what="the page after signing in")


def no_token_shown(driver: WebDriver) -> None:
    for token in TOKENS:
        assert token not in driver.current_url and token not in driver.page_source


PERIODS = """
const card = [...document.querySelectorAll("article.person")].find(
    c => c.querySelector("h3").textContent === arguments[0]);
return [...card.querySelectorAll("tbody tr")].map(
    row => [row.querySelector("th").textContent, [...row.querySelectorAll("td")].map(td => td.textContent)]);
"""


def periods(driver: WebDriver, person: str) -> dict[str, list[str]]:
    """The usage table of one person's card: {period: [requests, USD, input, output, cache read, cache write]}, read
    in one go (the page may swap its live part in between two reads)."""
    return {period: cells for period, cells in driver.execute_script(PERIODS, person)}


def expected(totals: dict[str, float]) -> list[str]:
    """A `ccm-wsgi usage --json` user's totals as the page writes them."""
    numbers = [f"{int(totals[k]):,}" for k in ("request_count", "input_tokens", "output_tokens",
                                               "cache_read_input_tokens", "cache_creation_input_tokens")]
    return [numbers[0], f"${totals['cost_usd']:,.2f}", *numbers[1:]]


def csp_violations(driver: WebDriver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if "Content Security Policy" in e["message"]]


def test_a_user_signs_in_sees_their_own_usage_refreshing_and_signs_out(site: dict[str, Any],
                                                                        browser: WebDriver) -> None:
    url = site["url"]
    sign_in(browser, url, ALICE)
    assert browser.current_url == url + "/ccm/"
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Signed in as alice" in text and "bob" not in text
    report = usage_by_user(site["usages"])
    shown = periods(browser, "alice")
    assert list(shown) == ["Today", "This week", "This month"]
    assert shown["Today"] == shown["This week"] == shown["This month"] == expected(report["alice"])
    credential = browser.find_element(By.CSS_SELECTOR, "article.credential").text
    assert "5-hour" in credential and "10 %" in credential and "Weekly" in credential and "20 %" in credential
    assert "resets in " in credential
    metrics = scrape(url, pool=site["pool"])
    left = value(metrics, "ccm_user_budget_remaining_usd", user="alice", per="day")
    assert left is not None and f"${5 - left:,.2f} spent, ${left:,.2f} left" in text
    assert "At most 60 requests a minute." in text

    cookie = browser.get_cookie("ccm_session")
    assert cookie is not None
    assert (cookie["httpOnly"], cookie["secure"], cookie["sameSite"], cookie["path"]) == (True, True, "Strict", "/ccm/")
    assert 11 * 3600 < cookie["expiry"] - time.time() <= 12 * 3600
    no_token_shown(browser)

    browser.get(url + "/ccm/?refresh=2")  # the live part every 2 s
    browser.execute_script("window.stayed = true")
    with tls_sdk(url, ALICE, site["ca"]) as alice:
        alice.messages.create(**site["message"])
    wait_for(lambda: periods(browser, "alice")["Today"][0] == str(int(report["alice"]["request_count"]) + 1), 20,
             interval=0.2, what="the page to show the new request")
    assert browser.execute_script("return window.stayed") is True  # swapped in place, never reloaded
    assert csp_violations(browser) == []
    browser.save_screenshot(str(site["shots"] / "user.png"))

    browser.find_element(By.CSS_SELECTOR, ".who button").click()
    wait_for(lambda: browser.find_elements(By.ID, "token"), 10, what="the sign-in form after signing out")
    browser.get(url + "/ccm/")
    assert browser.find_elements(By.ID, "token") and "alice" not in browser.find_element(By.TAG_NAME, "body").text
    no_token_shown(browser)


def test_an_admin_sees_every_user_credential_and_refusal(site: dict[str, Any], browser: WebDriver) -> None:
    sign_in(browser, site["url"], ADMIN)
    text = browser.find_element(By.TAG_NAME, "body").text
    assert "Signed in as admin" in text
    report = usage_by_user(site["usages"])
    for person in ("alice", "bob"):
        assert periods(browser, person)["Today"] == expected(report[person])
    assert "default max" in browser.find_element(By.CSS_SELECTOR, "article.credential h3").text
    refusals = browser.find_element(By.CSS_SELECTOR, "table.refusals tbody").text
    assert re.search(r"UTC bob model 400", refusals), refusals
    assert "Models: claude-haiku-*." in text
    assert csp_violations(browser) == []
    no_token_shown(browser)
    height = browser.execute_script("return document.documentElement.scrollHeight")
    browser.set_window_size(412, min(int(height) + 120, 4000))  # the whole page, as on a phone
    browser.save_screenshot(str(site["shots"] / "admin.png"))
    browser.set_window_size(412, 915)


def test_a_wrong_token_is_refused_and_never_shown(site: dict[str, Any], browser: WebDriver) -> None:
    browser.delete_all_cookies()
    browser.get(site["url"] + "/ccm/")
    field = browser.find_element(By.ID, "token")
    wrong = "ak-ccm-not-a-user-0123456789"
    field.send_keys(wrong)
    field.submit()
    wait_for(lambda: browser.find_elements(By.CSS_SELECTOR, ".message"), 10, what="the refusal message")
    assert "not the token of a user or admin" in browser.find_element(By.CSS_SELECTOR, ".message").text
    assert browser.find_element(By.ID, "token").get_attribute("value") == ""
    assert wrong not in browser.page_source and wrong not in browser.current_url
    assert wrong not in site["proxy"].log()


# --- the same rules, byte for byte ---------------------------------------------------------------------------


def form_of(html: bytes) -> str:
    found = re.search(rb'name="form" value="([^"]+)"', html)
    assert found, html
    return found.group(1).decode()


def cookie_of(r: urllib3.BaseHTTPResponse) -> tuple[str, http.cookies.Morsel[str]]:
    jar: http.cookies.SimpleCookie = http.cookies.SimpleCookie()
    jar.load(r.headers["set-cookie"])
    morsel = jar["ccm_session"]
    return f"ccm_session={morsel.value}", morsel


def post_sign_in(url: str, pool: urllib3.PoolManager, token: str, cookie: str, form: str,
                 **headers: str) -> urllib3.BaseHTTPResponse:
    return request("POST", url + "/ccm/", pool=pool, redirect=False, encode_multipart=False,
                   fields={"form": form, "token": token}, headers={"Cookie": cookie, **headers})


def test_headers_cookie_and_forms(site: dict[str, Any]) -> None:
    url, pool = site["url"], site["pool"]
    r = request("GET", url + "/ccm/", pool=pool)
    assert r.status == 200 and r.headers["content-type"] == "text/html; charset=utf-8"
    assert r.headers["content-security-policy"] == CSP
    assert (r.headers["x-content-type-options"], r.headers["cache-control"]) == ("nosniff", "no-store")
    cookie, _ = cookie_of(r)
    form = form_of(r.data)
    assert request("GET", url + "/ccm/live", pool=pool, headers={"Cookie": cookie}).status == 401
    assert post_sign_in(url, pool, ADMIN, cookie, "forged").status == 403  # not the session's form token
    assert post_sign_in(url, pool, ADMIN, "", form).status == 403  # no session: another site's page
    assert post_sign_in(url, pool, ADMIN, cookie, form, **{"Sec-Fetch-Site": "cross-site"}).status == 403
    signed = post_sign_in(url, pool, ADMIN, cookie, form)
    assert (signed.status, signed.headers["location"]) == (303, "/ccm/")
    assert ADMIN not in signed.headers["set-cookie"] and ADMIN.encode() not in signed.data
    session, morsel = cookie_of(signed)
    assert (morsel["httponly"], morsel["samesite"], morsel["secure"], morsel["path"]) == (True, "Strict", True, "/ccm/")
    live = request("GET", url + "/ccm/live", pool=pool, headers={"Cookie": session})
    assert live.status == 200 and b"Last refusals" in live.data and live.headers["content-security-policy"] == CSP
    script = request("GET", url + "/ccm/static/page.js", pool=pool)
    assert script.status == 200 and script.headers["content-type"].startswith("text/javascript")


def new_connection() -> urllib3.PoolManager:
    """A pool of its own: the request goes to whichever worker accepts a new connection now."""
    return urllib3.PoolManager(retries=False, timeout=urllib3.Timeout(connect=5, read=30))


def signed_in(url: str, token: str, pool: urllib3.PoolManager | None = None) -> str:
    """The session cookie of `token`, signed in through the form."""
    pool = pool or new_connection()
    r = request("GET", url + "/ccm/", pool=pool)
    cookie, _ = cookie_of(r)
    session, _ = cookie_of(post_sign_in(url, pool, token, cookie, form_of(r.data)))
    return session


def sees_the_page(url: str, session: str) -> bool:
    r = request("GET", url + "/ccm/", pool=new_connection(), headers={"Cookie": session})
    assert r.status == 200
    return b"Signed in as" in r.data and b'id="token"' not in r.data


def test_a_reload_ends_the_sessions_it_no_longer_lets_in(tmp_path: Path, module_fake: FakeUpstream,
                                                         start_proxy: Callable[..., Proxy]) -> None:
    creds = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)
    carol = "ak-ccm-carol-page-0123456789"
    users = [{"name": "alice", "token": ALICE}, {"name": "bob", "token": BOB}, {"name": "carol", "token": carol}]
    config = {"log": {"level": "info"}, "services": [service_config(module_fake.url, creds, users=users,
                                                                    admin_tokens=[ADMIN])]}
    proxy = start_proxy(config)
    sessions = {who: signed_in(proxy.url, token) for who, token in
                [("alice", ALICE), ("bob", BOB), ("carol", carol), ("admin", ADMIN)]}
    assert all(sees_the_page(proxy.url, session) for session in sessions.values())
    service = config["services"][0]
    service["users"] = [{"name": "bob", "token": BOB, "disabled": True}, {"name": "carol", "token": carol}]
    service["admin_tokens"] = ["ak-ccm-admin-observe-other-0123"]
    proxy.config_path.write_text(json.dumps(config))
    proxy.signal(signal.SIGHUP)
    wait_for(lambda: "reloaded" in proxy.log(), what="the reload")
    assert {who: sees_the_page(proxy.url, session) for who, session in sessions.items()} == {
        "alice": False, "bob": False, "carol": True, "admin": False}  # removed, disabled, kept, token changed
    live = request("GET", proxy.url + "/ccm/live", pool=new_connection(), headers={"Cookie": sessions["bob"]})
    assert live.status == 401


# --- gunicorn: a cookie one worker made is good on the other, which lists the first one's refusals ---------------


@pytest.fixture
def gunicorn(tmp_path: Path, module_fake: FakeUpstream, start_gunicorn: Callable[..., Gunicorn]) -> Gunicorn:
    return start_gunicorn(two_users(module_fake.url, tmp_path))


def test_gunicorn_workers_share_sessions_and_refusals(gunicorn: Gunicorn) -> None:
    first, second = sorted(gunicorn.worker_pids())
    url = gunicorn.url
    with only(gunicorn, first):
        with contextlib.suppress(Exception):
            ask(gunicorn, BOB)  # refused here: bob may only use haiku
        session = signed_in(url, ADMIN)
    with only(gunicorn, second):
        page = request("GET", url + "/ccm/", pool=new_connection(), headers={"Cookie": session})
    assert page.status == 200 and b"Signed in as <strong>admin</strong>" in page.data
    assert re.search(rb"<td>bob</td><td><code>model</code></td><td>400</td>", page.data), page.data
    # gunicorn logs a request once it has answered it: wait for the line
    wait_for(lambda: second in gunicorn.request_pids(), 10, what="the second worker's access line")
    assert first in gunicorn.request_pids()
