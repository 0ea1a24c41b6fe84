"""`ccm-wsgi doctor` over real processes: a healthy setup (every line ok, exit 0) and one broken thing at a time
(the line about it fails, exit 1; the others stay as they were), against the fake upstream, real proxies and
real listeners. No test spends a refresh token: the fake counts refreshes, and the count stays 0.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.support import procs
from tests.support.constants import ACCESS, REFRESH, USERS
from tests.support.fake_upstream import FakeUpstream
from tests.support.procs import Proxy, service_config, write_credentials
from tests.support.proxies import free_port
from tests.support.system import read_only, unavailable

TIMEOUT = 60.0


class Report:
    """What one doctor run printed."""

    def __init__(self, status: int, text: str, tmp_path: Path):
        self.status = status
        self.lines = text.replace(str(tmp_path), "TMP").splitlines()  # the test's name is no finding

    def line(self, *words: str) -> str:
        """The one line that mentions every word."""
        found = [line for line in self.lines if all(word in line for word in words)]
        assert len(found) == 1, (words, self.lines)
        return found[0]

    def failing(self) -> list[str]:
        return [line for line in self.lines if not line.startswith("ok ")]


def doctor(tmp_path: Path, config: dict[str, Any], env: dict[str, str] | None = None) -> Report:
    path = tmp_path / "doctor-config.json"
    procs.remember_secrets(config)
    path.write_text(json.dumps(config, indent=2))
    output = tmp_path / "doctor.log"
    procs.LOG_FILES.add(output)
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    environment = {**os.environ, "HOME": str(home), "CLAUDE_CONFIG_DIR": str(home / ".claude"), "CCM_KEYCHAIN": "0",
                   **(env or {})}
    with open(output, "wb") as out:
        done = subprocess.run([sys.executable, "-m", "ccm_wsgi", "doctor", "-c", str(path)], stdout=out,
                              stderr=subprocess.STDOUT, env=environment, timeout=TIMEOUT)
    text = output.read_text()
    for line in text.splitlines():
        assert line.split(" ", 1)[0] in ("ok", "warn", "fail"), text
    return Report(done.returncode, text, tmp_path)


@pytest.fixture
def setup(tmp_path: Path, fake: FakeUpstream) -> dict[str, Any]:
    """A healthy config: a fresh login with a refresh token, a usage file, users, a free port on 127.0.0.1."""
    fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
    credential = write_credentials(tmp_path / "claude" / ".credentials.json", ACCESS, REFRESH)
    (tmp_path / "state").mkdir()
    service = service_config(fake.url, credential, users=USERS, listen_port=free_port(),
                             usages_path=str(tmp_path / "state" / "usages.json"))
    return {"log": {"level": "info"}, "services": [service]}


@pytest.fixture(autouse=True)
def no_refresh_spent(fake: FakeUpstream) -> Iterator[None]:
    yield
    if fake.proc is not None and fake.proc.poll() is None:
        assert fake.stats()["refreshes"] == 0


def service_of(config: dict[str, Any]) -> dict[str, Any]:
    return config["services"][0]  # type: ignore[no-any-return]


def credential_of(config: dict[str, Any]) -> Path:
    return Path(service_of(config)["credential_path"])


def test_a_healthy_setup_is_all_ok(tmp_path: Path, fake: FakeUpstream, setup: dict[str, Any]) -> None:
    report = doctor(tmp_path, setup)
    assert report.status == 0 and report.failing() == [], report.lines
    for words in (("config", "passes check"), ("login", "max", "valid for"), ("upstream", fake.url, "reachable"),
                  ("token endpoint", "reachable"), ("clock",), ("usage file", "writable", "MiB free"),
                  ("listener", "the port is free"), ("user(s)",), ("paid extra usage is off",)):
        report.line(*words)


# ------------------------------------------------------------------------------------------------ credentials


def test_a_missing_credential_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    credential_of(setup).unlink()
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("login", "no such file")
    assert line.startswith("fail") and "ccm-wsgi login -c" in line


def test_a_credential_others_can_read_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    os.chmod(credential_of(setup), 0o644)
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("mode 0644")
    assert line.startswith("fail") and "chmod 600 TMP/claude/.credentials.json" in line


def test_a_credential_owned_by_another_user_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    if os.geteuid() != 0:
        unavailable("changing a file's owner needs root")
    os.chown(credential_of(setup), 65534, 65534)
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("owned by")
    assert line.startswith("fail") and "this runs as root" in line


def test_an_expired_login_without_refresh_token_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    write_credentials(credential_of(setup), ACCESS, "", expires_in=-120, oauth={"refreshToken": None})
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("login", "expired")
    assert line.startswith("fail") and "no refresh token" in line and "ccm-wsgi login" in line


def test_an_expired_login_with_a_refresh_token_is_ok_and_not_refreshed(tmp_path: Path, fake: FakeUpstream,
                                                                       setup: dict[str, Any]) -> None:
    write_credentials(credential_of(setup), ACCESS, REFRESH, expires_in=-120)
    report = doctor(tmp_path, setup)
    line = report.line("login", "expired")
    assert line.startswith("ok") and "refreshed by the service" in line
    # extra usage cannot be asked with an expired token, and nothing is refreshed to ask it
    assert report.line("paid extra usage").startswith("warn") and "has expired" in report.line("paid extra usage")
    assert report.status == 0
    assert fake.stats()["token_requests"] == []


# ------------------------------------------------------------------------------------------------ the way out


def test_an_upstream_unreachable_through_the_detour_fails(tmp_path: Path, fake: FakeUpstream,
                                                          setup: dict[str, Any]) -> None:
    dead = free_port()  # nothing listens there
    setup["outbounds"] = [{"type": "http", "tag": "corp", "server": "127.0.0.1", "server_port": dead}]
    service_of(setup)["detour"] = "corp"
    report = doctor(tmp_path, setup)
    assert report.status == 1
    for what in ("upstream", "token endpoint"):
        line = report.line(what, "not reachable")
        assert line.startswith("fail") and f'outbound "corp" (http 127.0.0.1:{dead})' in line
    assert report.line("clock").startswith("warn")


def test_an_upstream_whose_certificate_is_not_trusted_fails(tmp_path: Path, fake: FakeUpstream,
                                                            setup: dict[str, Any]) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "upstream.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    tls_fake = FakeUpstream.start(tmp_path / "tls-fake", tls_cert=str(tmp_path / "upstream.pem"))
    try:
        tls_fake.add_account(access_token=ACCESS, refresh_token=REFRESH, expires_in=3600)
        service_of(setup).update(upstream_url=tls_fake.url, token_url=tls_fake.url + "/v1/oauth/token")
        report = doctor(tmp_path, setup)  # the system's roots do not know this CA
        assert report.status == 1
        line = report.line(f"upstream {tls_fake.url} ")
        assert line.startswith("fail") and "not trusted" in line
        report = doctor(tmp_path, setup, env={"CCM_CA_BUNDLE": str(tmp_path / "ca.pem")})
        assert report.status == 0, report.lines
        assert "TLS verified" in report.line(f"upstream {tls_fake.url} ")
    finally:
        tls_fake.stop()


def test_a_clock_off_by_minutes_fails(tmp_path: Path, fake: FakeUpstream, setup: dict[str, Any]) -> None:
    fake.configure(date_skew=600)
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("clock")
    assert line.startswith("fail") and "behind the upstream's" in line and "set-ntp" in line


# ------------------------------------------------------------------------------------------------------ files


def test_a_usage_directory_that_cannot_be_written_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    with read_only(tmp_path / "state"):
        report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("usage file")
    assert line.startswith("fail") and "Read-only file system" in line


def test_a_missing_usage_directory_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    service_of(setup)["usages_path"] = str(tmp_path / "nowhere" / "usages.json")
    report = doctor(tmp_path, setup)
    assert report.status == 1 and report.line("usage file", "does not exist").startswith("fail")


# ------------------------------------------------------------------------------------------------- listeners


def test_a_port_taken_by_another_program_fails(tmp_path: Path, fake: FakeUpstream, setup: dict[str, Any]) -> None:
    service_of(setup)["listen_port"] = fake.port  # the fake answers, but not as ccm-wsgi
    report = doctor(tmp_path, setup)
    assert report.status == 1
    assert report.line("listener", "taken by another program").startswith("fail")


def test_a_port_held_by_a_silent_listener_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(8)
        service_of(setup)["listen_port"] = holder.getsockname()[1]
        report = doctor(tmp_path, setup)
    assert report.status == 1
    assert report.line("listener", "taken by another program").startswith("fail")


def test_a_port_served_by_a_running_ccm_wsgi_is_ok(tmp_path: Path, setup: dict[str, Any],
                                                   start_proxy: Callable[..., Proxy]) -> None:
    running = start_proxy(setup)
    assert running.port == service_of(setup)["listen_port"]
    report = doctor(tmp_path, setup)
    assert report.status == 0, report.lines
    assert report.line("listener", "served by a running ccm-wsgi").startswith("ok")


def test_an_open_service_beyond_loopback_fails(tmp_path: Path, setup: dict[str, Any]) -> None:
    """The config alone says it: nothing is bound (port 0 is chosen at start)."""
    service_of(setup).update(listen="0.0.0.0", listen_port=0, users=[])
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("open (no users)")
    assert line.startswith("fail") and "0.0.0.0" in line
    assert report.line("listener", "chosen at start").startswith("ok")


# ------------------------------------------------------------------------------------------------------ overage


def test_overage_allowed_by_default_with_paid_extra_usage_fails(tmp_path: Path, fake: FakeUpstream,
                                                                setup: dict[str, Any]) -> None:
    fake.set_state(ACCESS, extra_usage={"is_enabled": True, "monthly_limit": 5000, "used_credits": 120.0,
                                        "utilization": 2.4})
    report = doctor(tmp_path, setup)
    assert report.status == 1
    line = report.line("paid extra usage is on")
    assert line.startswith("fail") and '"overage": "deny"' in line

    service_of(setup)["overage"] = "allow"  # said on purpose: a reminder only
    report = doctor(tmp_path, setup)
    assert report.status == 0 and report.line("paid extra usage is on").startswith("warn")

    service_of(setup)["overage"] = "deny"
    calls = fake.stats()["usage_api_calls"]
    report = doctor(tmp_path, setup)
    assert report.status == 0 and report.line('overage "deny"').startswith("ok")
    assert fake.stats()["usage_api_calls"] == calls  # nothing to ask then


def test_unknown_extra_usage_is_a_warning(tmp_path: Path, fake: FakeUpstream, setup: dict[str, Any]) -> None:
    fake.configure(usage_api={"status": 500})
    report = doctor(tmp_path, setup)
    assert report.status == 0
    assert report.line("cannot tell whether paid extra usage is on").startswith("warn")


# ---------------------------------------------------------------------------------------------------- inbound TLS


@pytest.mark.parametrize(("days", "level", "words"), [
    (365, "ok", "valid until"), (10, "warn", "expires in 10 days"), (5, "fail", "expires in"),
    (-1, "fail", "expired on"),
])
def test_inbound_certificates_near_their_end(tmp_path: Path, setup: dict[str, Any], days: int, level: str,
                                             words: str) -> None:
    now = dt.datetime.now(dt.timezone.utc)
    cert = trustme.CA().issue_cert("127.0.0.1", not_before=now - dt.timedelta(days=30),
                                   not_after=now + dt.timedelta(days=days, hours=1))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    service_of(setup)["tls"] = {"enabled": True, "certificate_path": str(tmp_path / "cert.pem"),
                                "key_path": str(tmp_path / "key.pem")}
    report = doctor(tmp_path, setup)
    line = report.line("TLS certificate")
    assert line.startswith(level) and words in line, line
    assert report.status == (1 if level == "fail" else 0)


def test_a_config_that_fails_check_fails_first(tmp_path: Path, setup: dict[str, Any]) -> None:
    service_of(setup)["listen_port"] = "eighty"
    report = doctor(tmp_path, setup)
    assert report.status == 1
    assert report.line("listen_port").startswith("fail") and report.line("does not pass check").startswith("fail")
