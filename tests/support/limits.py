"""Helpers for the limits tests: configs with limited users, refusals as the SDK sees them, held streams."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anthropic
import pytest
import urllib3

from tests.support.clients import conversation, knob_headers
from tests.support.constants import MODEL
from tests.support.fake_upstream import FakeUpstream
from tests.support.pools import ADMIN
from tests.support.procs import Proxy, request, service_config

BIG = knob_headers(input_tokens=1_000_000)  # $3.00 a request on Sonnet 4.6


def user(name: str, token: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "token": token, **fields}


def config(fake: FakeUpstream, creds: Path, tmp_path: Path, users: list[dict[str, Any]],
           **fields: Any) -> dict[str, Any]:
    service = service_config(fake.url, creds, users=users, usages_path=str(tmp_path / "usage.json"),
                             admin_tokens=[ADMIN], **fields)
    return {"log": {"level": "info"}, "services": [service]}


def refusal(call: Callable[[], Any]) -> anthropic.APIStatusError:
    with pytest.raises(anthropic.APIStatusError) as caught:
        call()
    return caught.value


def error_of(err: anthropic.APIStatusError) -> tuple[int, str, str]:
    body: Any = err.body
    return err.status_code, body["error"]["type"], body["error"]["message"]


def status_of(proxy: Proxy, token: str) -> dict[str, Any]:
    r = request("GET", proxy.url + "/ccm/v1/status", headers={"Authorization": "Bearer " + token})
    assert r.status == 200, r.data
    return json.loads(r.data)


def messages_sent(fake: FakeUpstream) -> int:
    return len(fake.requests("/v1/messages"))


def held_stream(proxy: Proxy, token: str, key: str) -> urllib3.BaseHTTPResponse:
    """A stream the fake holds after its first delta (until `key` is released); its head has arrived. It has
    a connection of its own (a new one, never reused: gunicorn tests pause workers)."""
    r = urllib3.PoolManager(retries=False).request(
        "POST", proxy.url + "/v1/messages", preload_content=False,
        body=json.dumps({"model": MODEL, "max_tokens": 16, "stream": True, "messages": conversation(1)}).encode(),
        headers={"Authorization": "Bearer " + token, "content-type": "application/json",
                 **knob_headers(wait_release=key, events=4)})
    assert r.status == 200
    return r
