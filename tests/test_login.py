"""`ccm-wsgi login` end to end: a real login process, the fake upstream's authorize page and token endpoint (which
check the PKCE verifier against the challenge, the state, the redirect URI and the client id), and the test as
the person in front of the browser.

Paste mode and callback mode, `--import`, every error a person can act on (each exits 1 with a message that says
what to do and leaves the target as it was), Ctrl-C at two points, the file's mode and foreign keys, a pool
credential reached through its detour, and a running `ccm-wsgi serve` using the new login without a restart.
"""

from __future__ import annotations

import base64
import getpass
import hashlib
import json
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ccm_wsgi.anthropic import CLIENT_ID, LOGIN_SCOPES, REDIRECT_URI, TOKEN_USER_AGENT
from tests.support.clients import ask
from tests.support.constants import ACCESS, ALICE, REFRESH, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.login import Browser, LoginRun, leftovers, login_service, query, shown_code, write_config
from tests.support.procs import ROOT, request, wait_for, write_credentials
from tests.support.proxies import start_socks5
from tests.support.system import read_only

AUTHORIZE_PARAMS = ["code", "client_id", "response_type", "redirect_uri", "scope", "code_challenge",
                    "code_challenge_method", "state"]


@pytest.fixture
def browser() -> Browser:
    return Browser()


@pytest.fixture
def target(tmp_path: Path) -> Path:
    """A credential file that already holds another program's keys, readable by others (as a careless copy is)."""
    path = tmp_path / "claude" / ".credentials.json"
    path.parent.mkdir()
    path.write_text(json.dumps({"mcpOAuth": {"server": {"clientId": "kept"}}, "otherKey": [1, 2]}))
    os.chmod(path, 0o644)
    return path


@pytest.fixture
def config(tmp_path: Path, fake: FakeUpstream, target: Path) -> Path:
    return write_config(tmp_path, [login_service(fake, target)])


def start(tmp_path: Path, config: Path, *args: str) -> LoginRun:
    return LoginRun(tmp_path, "-c", str(config), *args)


def authorize_prefix(fake: FakeUpstream) -> str:
    return fake.url + "/cai/oauth/authorize?"


def s256(verifier: str) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest()).rstrip(b"=").decode()


def oauth_of(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())["claudeAiOauth"]  # type: ignore[no-any-return]


def assert_untouched(path: Path, before: bytes) -> None:
    assert path.read_bytes() == before
    assert leftovers(path.parent) == []


# ------------------------------------------------------------------------------------------------ paste mode


def test_paste_login_writes_claude_codes_format_and_the_fake_accepts_the_tokens(
        tmp_path: Path, fake: FakeUpstream, config: Path, target: Path, browser: Browser) -> None:
    run = start(tmp_path, config)
    url = run.url(authorize_prefix(fake))
    params = [pair.split("=", 1)[0] for pair in url.split("?", 1)[1].split("&")]
    assert params == AUTHORIZE_PARAMS  # Claude Code's order
    sent = query(url)
    assert (sent["code"], sent["client_id"], sent["response_type"], sent["redirect_uri"], sent["scope"],
            sent["code_challenge_method"]) == ("true", CLIENT_ID, "code", REDIRECT_URI, " ".join(LOGIN_SCOPES), "S256")
    assert len(sent["code_challenge"]) == 43 and len(sent["state"]) == 43

    assert run.run(shown_code(browser.authorize(url))) == 0, run.stderr()

    # the fake checked verifier, state, redirect URI and client id; here is what it was sent
    [exchange] = [json.loads(r["body"]) for r in fake.requests(path="/v1/oauth/token")]
    assert list(exchange) == ["grant_type", "code", "state", "code_verifier", "redirect_uri", "client_id"]
    assert exchange["grant_type"] == "authorization_code" and exchange["redirect_uri"] == REDIRECT_URI
    assert s256(exchange["code_verifier"]) == sent["code_challenge"] and exchange["state"] == sent["state"]
    [token_request] = fake.requests(path="/v1/oauth/token")
    assert ["User-Agent", TOKEN_USER_AGENT] in token_request["headers"]
    assert fake.stats()["logins"] == 1

    document = json.loads(target.read_text())
    assert document["mcpOAuth"] == {"server": {"clientId": "kept"}} and document["otherKey"] == [1, 2]
    oauth = document["claudeAiOauth"]
    assert set(oauth) == {"accessToken", "refreshToken", "expiresAt", "scopes", "subscriptionType", "rateLimitTier"}
    assert (oauth["scopes"], oauth["subscriptionType"], oauth["rateLimitTier"]) == (
        list(LOGIN_SCOPES), "max", "default_claude_max_20x")
    assert fake.state(oauth["accessToken"])["id"] == fake.state(oauth["refreshToken"])["id"]
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert leftovers(target.parent) == [] and not Path(str(target.parent) + ".lock").exists()
    assert "Logged in" in run.stdout() and "Claude Max" in run.stdout()
    fake.configure(strict=True)  # the fake only accepts tokens it issued: the login's work
    assert request("GET", fake.url + "/api/oauth/profile",
                   headers={"Authorization": "Bearer " + oauth["accessToken"]}).status == 200


@pytest.mark.parametrize("form", ["callback address", "bare code"])
def test_the_callback_address_or_a_bare_code_can_be_pasted(
        tmp_path: Path, fake: FakeUpstream, config: Path, target: Path, browser: Browser, form: str) -> None:
    run = start(tmp_path, config)
    location = browser.authorize(run.url(authorize_prefix(fake)))
    pasted = location if form == "callback address" else query(location)["code"]
    assert run.run(pasted) == 0, run.stderr()
    assert fake.stats()["logins"] == 1 and oauth_of(target)["subscriptionType"] == "max"


def test_a_garbled_paste_is_asked_again(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                        browser: Browser) -> None:
    run = start(tmp_path, config)
    location = browser.authorize(run.url(authorize_prefix(fake)))
    run.paste("not a code at all")
    wait_for(lambda: "Paste it again" in run.stderr(), what="the prompt to paste again")
    assert run.run(shown_code(location)) == 0 and fake.stats()["logins"] == 1


def test_the_subscription_type_is_optional(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                           browser: Browser) -> None:
    fake.add_account(account="no-profile", profile={"error": "nothing here"})
    fake.configure(authorize={"account": "no-profile"})
    run = start(tmp_path, config)
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0
    oauth = oauth_of(target)
    assert oauth["subscriptionType"] is None and oauth["accessToken"]
    assert "subscription type could not be read" in run.stderr() and "subscription type unknown" in run.stdout()


# --------------------------------------------------------------------------------------------- callback mode


def test_callback_login_through_the_loopback_listener(tmp_path: Path, fake: FakeUpstream, config: Path,
                                                       target: Path, browser: Browser) -> None:
    run = start(tmp_path, config, "--callback-port", "0")
    url = run.url(authorize_prefix(fake))
    redirect = query(url)["redirect_uri"]
    assert redirect.startswith("http://localhost:") and redirect.endswith("/callback")
    port = int(redirect.split(":")[2].split("/")[0])
    assert f"ssh -L {port}:127.0.0.1:{port} " in run.stdout() and "@198.51.100.9" in run.stdout()

    location = browser.authorize(url)
    assert location.startswith(redirect + "?")
    landed = browser.land(location)
    assert landed.status == 200 and b"Go back to the terminal" in landed.data
    assert run.wait() == 0, run.stderr()
    [exchange] = [json.loads(r["body"]) for r in fake.requests(path="/v1/oauth/token")]
    assert exchange["redirect_uri"] == redirect  # the code is bound to the redirect URI that produced it
    assert oauth_of(target)["subscriptionType"] == "max"


def test_callback_mode_also_takes_the_pasted_address(tmp_path: Path, fake: FakeUpstream, config: Path,
                                                     target: Path, browser: Browser) -> None:
    """No tunnel: the page does not load, and the person pastes the address the browser shows."""
    run = start(tmp_path, config, "--callback-port", "0")
    location = browser.authorize(run.url(authorize_prefix(fake)))
    assert run.run(location) == 0, run.stderr()
    assert fake.stats()["logins"] == 1


def test_a_declined_authorization_says_so(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                          browser: Browser) -> None:
    fake.configure(authorize={"error": "access_denied"})
    before = target.read_bytes()
    run = start(tmp_path, config, "--callback-port", "0")
    browser.land(browser.authorize(run.url(authorize_prefix(fake))))
    assert run.wait() == 1
    assert "refused (access_denied)" in run.stderr()
    assert_untouched(target, before)


# ------------------------------------------------------------------------------------------------------ import


@pytest.mark.parametrize("source", ["file", "stdin"])
def test_import_installs_a_login_made_elsewhere(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                                source: str) -> None:
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH)
    made = write_credentials(tmp_path / "laptop" / ".credentials.json", ACCESS, REFRESH,
                             mcpOAuth={"laptop-only": True})
    if source == "file":
        run = start(tmp_path, config, "--import", str(made))
        status = run.wait()
    else:
        run = start(tmp_path, config, "--import", "-")
        status = run.run(made.read_text())
    assert status == 0, run.stderr()
    document = json.loads(target.read_text())
    assert document["claudeAiOauth"] == json.loads(made.read_text())["claudeAiOauth"]
    assert document["mcpOAuth"] == {"server": {"clientId": "kept"}}  # the target's keys, not the laptop's
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert "owns the login's refresh chain" in run.stderr()


@pytest.mark.parametrize(("content", "message"), [
    ("{not json", "invalid JSON"),
    ('{"somethingElse": {}}', "no claudeAiOauth object"),
    (json.dumps({"claudeAiOauth": {"accessToken": "sk-ant-oat01-import-expired-000", "expiresAt": 1000}}),
     "expired and has no refresh token"),
])
def test_import_refuses_what_is_not_a_usable_login(tmp_path: Path, config: Path, target: Path, content: str,
                                                   message: str) -> None:
    before = target.read_bytes()
    run = start(tmp_path, config, "--import", "-")
    assert run.run(content) == 1
    assert message in run.stderr()
    assert_untouched(target, before)


# ------------------------------------------------------------------------------------------------------ errors


def test_a_wrong_code_is_refused(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                 browser: Browser) -> None:
    before = target.read_bytes()
    run = start(tmp_path, config)
    location = browser.authorize(run.url(authorize_prefix(fake)))
    assert run.run("wrongcode0123456789#" + query(location)["state"]) == 1
    assert "refused the code (invalid_grant)" in run.stderr() and "Run ccm-wsgi login again" in run.stderr()
    assert fake.stats()["invalid_grant"] == 1
    assert_untouched(target, before)


def test_an_expired_code_is_refused(tmp_path: Path, fake: FakeUpstream, config: Path, target: Path,
                                    browser: Browser) -> None:
    before = target.read_bytes()
    run = start(tmp_path, config)
    location = browser.authorize(run.url(authorize_prefix(fake)))
    fake.expire_code(query(location)["state"])
    assert run.run(shown_code(location)) == 1
    assert "invalid_grant" in run.stderr() and "expired" in run.stderr()
    assert fake.stats()["logins"] == 0
    assert_untouched(target, before)


def test_a_state_mismatch_is_refused_before_the_code_is_sent(tmp_path: Path, fake: FakeUpstream, config: Path,
                                                             target: Path, browser: Browser) -> None:
    before = target.read_bytes()
    run = start(tmp_path, config)
    location = browser.authorize(run.url(authorize_prefix(fake)))
    assert run.run(query(location)["code"] + "#AnotherAttemptsState0123456789") == 1
    assert "state mismatch" in run.stderr()
    assert fake.requests(path="/v1/oauth/token") == []
    assert_untouched(target, before)


@pytest.mark.parametrize(("fault", "shown"), [
    ({"status": 403, "body": {"error": "invalid_client", "error_description": "SECRET-DETAIL-not-for-you"}},
     "HTTP 403 invalid_client"),
    ({"status": 500, "body": "<html>SECRET-DETAIL-not-for-you</html>"}, "HTTP 500"),
])
def test_a_token_endpoint_refusal_shows_its_status_and_error_code_only(
        tmp_path: Path, fake: FakeUpstream, config: Path, target: Path, browser: Browser, fault: dict[str, Any],
        shown: str) -> None:
    before = target.read_bytes()
    fake.configure(token_endpoint=fault)
    run = start(tmp_path, config)
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 1
    assert f"refused the login ({shown})" in run.stderr()
    assert "SECRET-DETAIL" not in run.stderr() + run.stdout()
    assert_untouched(target, before)


@pytest.fixture
def unwritable(tmp_path: Path) -> Iterator[Path]:
    """A directory nobody can write into, root included (a read-only mount)."""
    directory = tmp_path / "ro"
    directory.mkdir()
    (directory / ".credentials.json").write_text(json.dumps({"otherKey": 1}))
    with read_only(directory):
        yield directory / ".credentials.json"


def test_an_unwritable_target_is_refused_before_the_login_starts(tmp_path: Path, fake: FakeUpstream,
                                                                 unwritable: Path) -> None:
    before = unwritable.read_bytes()
    run = LoginRun(tmp_path, "-c", str(write_config(tmp_path, [login_service(fake, unwritable)])))
    assert run.wait() == 1
    assert "cannot write the login into" in run.stderr() and "Read-only file system" in run.stderr()
    assert fake.url not in run.stdout() and fake.authorizations() == []  # the person was asked for nothing
    assert unwritable.read_bytes() == before


def test_ctrl_c_while_waiting_for_the_code_leaves_everything(tmp_path: Path, fake: FakeUpstream, config: Path,
                                                              target: Path, browser: Browser) -> None:
    before = target.read_bytes()
    run = start(tmp_path, config)
    browser.authorize(run.url(authorize_prefix(fake)))
    run.interrupt()
    assert run.wait() == 130
    assert "interrupted: nothing was written" in run.stderr()
    assert fake.requests(path="/v1/oauth/token") == []
    assert_untouched(target, before)


def test_ctrl_c_during_the_exchange_leaves_everything(tmp_path: Path, fake: FakeUpstream, config: Path,
                                                      target: Path, browser: Browser) -> None:
    """The space for the new file is reserved by then: the interrupted login must give it back."""
    before = target.read_bytes()
    fake.configure(token_endpoint={"hold": "exchange"})
    run = start(tmp_path, config)
    run.paste(shown_code(browser.authorize(run.url(authorize_prefix(fake)))))
    wait_for(lambda: fake.sent_info("exchange")["waiting"], what="the exchange to reach the token endpoint")
    assert leftovers(target.parent)  # the reservation is there while the exchange runs
    run.interrupt()
    assert run.wait() == 130
    fake.release("exchange")
    assert_untouched(target, before)


# ------------------------------------------------------------------------------------ where it goes, and after


def test_a_pool_credential_is_logged_in_through_its_detour(tmp_path: Path, fake: FakeUpstream,
                                                           browser: Browser) -> None:
    socks = start_socks5(tmp_path / "socks")
    try:
        other, pooled = tmp_path / "a" / ".credentials.json", tmp_path / "b" / ".credentials.json"
        service = login_service(fake, "")
        del service["credential_path"]
        service["credentials"] = [{"tag": "a", "credential_path": str(other)},
                                  {"tag": "b", "credential_path": str(pooled), "detour": "via-socks"}]
        service["users"] = [{**USERS[0], "credential": "a"}]
        outbounds = [{"type": "socks", "tag": "via-socks", "server": "127.0.0.1", "server_port": socks.port}]
        config = write_config(tmp_path, [service], outbounds=outbounds)
        before = socks.connections()
        run = LoginRun(tmp_path, "-c", str(config), "--credential", "b")
        assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0, run.stderr()
        assert oauth_of(pooled)["subscriptionType"] == "max" and not other.exists()
        assert socks.wait_connections(before + 1) > before  # the exchange and the profile went through it
        assert f"127.0.0.1:{fake.port}" in socks.destinations()
    finally:
        socks.stop()


def test_several_credentials_need_a_tag(tmp_path: Path, fake: FakeUpstream) -> None:
    service = login_service(fake, "")
    del service["credential_path"]
    service["credentials"] = [{"tag": "a", "credential_path": str(tmp_path / "a.json")},
                              {"tag": "b", "credential_path": str(tmp_path / "b.json")}]
    service["users"] = [{**USERS[0], "credential": "a"}]
    config = write_config(tmp_path, [service])
    run = LoginRun(tmp_path, "-c", str(config))
    assert run.wait() == 1 and "--credential TAG" in run.stderr() and "(a, b)" in run.stderr()
    run = LoginRun(tmp_path, "-c", str(config), "--credential", "c")
    assert run.wait() == 1 and 'no credential "c"' in run.stderr()


def test_credential_path_and_the_default_location(tmp_path: Path, fake: FakeUpstream, browser: Browser) -> None:
    chosen = tmp_path / "chosen" / "login.json"
    config = write_config(tmp_path, [login_service(fake, "")])
    run = LoginRun(tmp_path, "-c", str(config), "--credential-path", str(chosen))
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0, run.stderr()
    assert oauth_of(chosen)["accessToken"] and stat.S_IMODE(chosen.parent.stat().st_mode) == 0o700
    run = LoginRun(tmp_path, "-c", str(config))  # no credential_path: Claude Code's own location
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0, run.stderr()
    assert oauth_of(tmp_path / "home" / ".claude" / ".credentials.json")["accessToken"]


def test_a_running_proxy_uses_the_new_login_on_its_next_request(tmp_path: Path, fake: FakeUpstream,
                                                                start_proxy: Any, browser: Browser) -> None:
    credential = tmp_path / "service" / ".credentials.json"
    fake.configure(strict=True)
    service = login_service(fake, credential, users=USERS)
    proxy = start_proxy({"log": {"level": "info"}, "services": [service]})
    with pytest.raises(Exception, match="503"):
        ask(proxy, ALICE)  # no login yet
    run = LoginRun(tmp_path, "-c", str(write_config(tmp_path, [service])))
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0, run.stderr()
    assert ask(proxy, ALICE).content[0].text  # no restart
    [message] = fake.requests(path="/v1/messages")
    sent = {name.lower(): value for name, value in message["headers"]}
    assert sent["authorization"] == "Bearer " + oauth_of(credential)["accessToken"]


def test_the_default_location_on_macos_is_the_keychain_item(tmp_path: Path, fake: FakeUpstream,
                                                            browser: Browser) -> None:
    """Claude Code's own login lives in the keychain there: the login replaces its claudeAiOauth, keeps the rest."""
    dump = tmp_path / "keychain.json"
    seed = {"Claude Code-credentials": {getpass.getuser(): json.dumps({"mcpOAuth": {"kept": True}})}}
    env = {"CCM_KEYCHAIN": "1", "PYTHON_KEYRING_BACKEND": "tests.support.memkeyring.MemoryKeyring",
           "MEMKEYRING_SEED": json.dumps(seed), "MEMKEYRING_DUMP": str(dump),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "SUDO_USER": ""}  # the item of the user running the test
    run = LoginRun(tmp_path, "-c", str(write_config(tmp_path, [login_service(fake, "")])), env=env)
    assert run.run(shown_code(browser.authorize(run.url(authorize_prefix(fake))))) == 0, run.stderr()
    item = json.loads(json.loads(dump.read_text())["Claude Code-credentials"][getpass.getuser()])
    assert item["mcpOAuth"] == {"kept": True} and item["claudeAiOauth"]["subscriptionType"] == "max"
    assert not (tmp_path / "home" / ".claude" / ".credentials.json").exists()
