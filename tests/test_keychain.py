"""The macOS keychain path (Claude Code's own keychain entry) through `keyring`, with an in-memory backend
(tests/support/memkeyring.py) in the `ccm-wsgi serve` child. `CCM_KEYCHAIN=1` turns the keychain on where it is
not macOS."""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest

from ccm_wsgi.credentials import keychain
from tests.support.constants import MODEL
from tests.support.procs import Proxy, service_config, wait_for, write_credentials

ROOT = Path(__file__).resolve().parent.parent
ACCOUNT = "ccm-keychain-tester"
FILE_ACCESS, FILE_REFRESH = "sk-ant-oat01-from-the-file", "sk-ant-ort01-from-the-file"
CHAIN_ACCESS, CHAIN_REFRESH = "sk-ant-oat01-from-the-keychain", "sk-ant-ort01-from-the-keychain"








def oauth_json(access: str, refresh: str, expires_in: float) -> str:
    """The keychain item's data: the same JSON as the file."""
    return json.dumps({"claudeAiOauth": {
        "accessToken": access, "refreshToken": refresh, "expiresAt": int((time.time() + expires_in) * 1000),
        "scopes": ["user:inference", "user:profile"], "subscriptionType": "max"}})


@pytest.fixture
def setup(tmp_path: Path, fake, start_proxy) -> Callable[..., tuple[Proxy, Path, Path]]:
    """A service with no credential_path, CLAUDE_CONFIG_DIR set (so the suffixed item name), the file
    there holding FILE_ACCESS, and the keyring seeded with `item` (JSON text) unless None."""
    config_dir = tmp_path / "claude-work"
    service = keychain.service_name(str(config_dir), os.path.expanduser("~"))
    fake.add_account(access_token=FILE_ACCESS, refresh_token=FILE_REFRESH, expires_in=3600)

    def start(item: str | None, keychain_on: str | None = "1", **env: str) -> tuple[Proxy, Path, Path]:
        creds = write_credentials(config_dir / ".credentials.json", FILE_ACCESS, FILE_REFRESH)
        dump = tmp_path / "keyring-dump.json"
        child_env = {
            "CLAUDE_CONFIG_DIR": str(config_dir), "USER": ACCOUNT, "LOGNAME": ACCOUNT,
            "PYTHON_KEYRING_BACKEND": "tests.support.memkeyring.MemoryKeyring", "MEMKEYRING_DUMP": str(dump),
            "MEMKEYRING_SEED": json.dumps({service: {ACCOUNT: item}} if item is not None else {}),
            "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env,
        }
        if keychain_on is not None:
            child_env["CCM_KEYCHAIN"] = keychain_on
        saved = {k: os.environ.pop(k) for k in ("SUDO_USER", "CCM_KEYCHAIN") if k in os.environ}
        try:
            proxy = start_proxy({"services": [service_config(fake.url, "")]}, env=child_env)
        finally:
            os.environ.update(saved)
        return proxy, creds, dump

    start.service = service  # type: ignore[attr-defined]
    return start


def bearer_seen(fake) -> str:
    sent = [r for r in fake.requests() if r["path"] == "/v1/messages"][-1]
    return next(v for k, v in sent["headers"] if k.lower() == "authorization")


def hello(proxy: Proxy) -> Any:
    c = anthropic.Anthropic(base_url=proxy.url, auth_token="unused", max_retries=0)
    return c.messages.create(model=MODEL, max_tokens=8, messages=[{"role": "user", "content": "hi"}])


def test_keychain_is_read_first(fake, setup):
    fake.add_account(access_token=CHAIN_ACCESS, refresh_token=CHAIN_REFRESH, expires_in=3600)
    proxy, creds, dump = setup(oauth_json(CHAIN_ACCESS, CHAIN_REFRESH, 3600))
    before = creds.read_bytes()
    hello(proxy)
    assert bearer_seen(fake) == "Bearer " + CHAIN_ACCESS
    assert creds.read_bytes() == before
    assert "keychain " + setup.service in proxy.log()
    assert not dump.exists()  # nothing written back: the token was fresh


@pytest.mark.parametrize("item", [None, "not json", json.dumps({"other": 1})])
def test_file_when_the_item_is_missing_or_unusable(fake, setup, item):
    proxy, _creds, dump = setup(item)
    hello(proxy)
    assert bearer_seen(fake) == "Bearer " + FILE_ACCESS
    assert not dump.exists()


def test_refresh_is_written_back_to_the_keychain(fake, setup):
    fake.add_account(access_token=CHAIN_ACCESS, refresh_token=CHAIN_REFRESH, expires_in=30)
    proxy, creds, dump = setup(oauth_json(CHAIN_ACCESS, CHAIN_REFRESH, 30))
    before = creds.read_bytes()
    hello(proxy)
    hello(proxy)
    assert fake.stats()["refreshes"] == 1
    stored = json.loads(dump.read_text())[setup.service][ACCOUNT]
    assert ": " not in stored and ", " not in stored  # compact JSON, as Claude Code stores it
    oauth = json.loads(stored)["claudeAiOauth"]
    assert oauth["accessToken"] not in (CHAIN_ACCESS, FILE_ACCESS) and oauth["refreshToken"] != CHAIN_REFRESH
    assert oauth["scopes"] == ["user:inference", "user:profile"] and oauth["subscriptionType"] == "max"
    assert bearer_seen(fake) == "Bearer " + oauth["accessToken"]
    assert creds.read_bytes() == before  # the file is not the store here
    for secret in (CHAIN_ACCESS, CHAIN_REFRESH, oauth["accessToken"], oauth["refreshToken"]):
        assert secret not in proxy.log()


def test_failed_keychain_write_falls_back_to_the_file(fake, setup):
    fake.add_account(access_token=CHAIN_ACCESS, refresh_token=CHAIN_REFRESH, expires_in=30)
    proxy, creds, dump = setup(oauth_json(CHAIN_ACCESS, CHAIN_REFRESH, 30), MEMKEYRING_FAIL_WRITES="1")
    hello(proxy)
    assert not dump.exists()
    oauth = json.loads(creds.read_text())["claudeAiOauth"]
    assert oauth["accessToken"] != FILE_ACCESS
    assert "could not be written" in proxy.log()


@pytest.mark.skipif(sys.platform == "darwin", reason="the keychain is the default on macOS")
@pytest.mark.parametrize("keychain_on", [None, "0"])
def test_other_systems_use_the_file_only(fake, setup, keychain_on):
    fake.add_account(access_token=CHAIN_ACCESS, refresh_token=CHAIN_REFRESH, expires_in=3600)
    proxy, creds, dump = setup(oauth_json(CHAIN_ACCESS, CHAIN_REFRESH, 3600), keychain_on=keychain_on)
    hello(proxy)
    assert bearer_seen(fake) == "Bearer " + FILE_ACCESS
    assert not dump.exists()
    wait_for(lambda: "loaded from " + str(creds) in proxy.log(), 5, what="the file named in the log")
