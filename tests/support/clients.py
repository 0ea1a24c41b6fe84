"""How the suite talks to a running proxy (or the fake) as a client would: the anthropic SDK, or raw urllib3.

`client()` and `ask()` go through the SDK, as Claude Code does; `post_messages()` sends one raw
`POST /v1/messages` with `x-fake-*` knobs and returns the body as far as it came (a cut body is a
result here, not an exception). Everything goes through `procs.request`, so the tokens sent and the
error bodies received are remembered for the session's secret scan.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import anthropic
import urllib3

from tests.support.constants import ALICE, MODEL
from tests.support.procs import ERROR_BODIES, request


class Served(Protocol):
    """Anything with a base URL: a `procs.Proxy`, a `procs.Gunicorn`, a `FakeUpstream`."""

    @property
    def url(self) -> str: ...


def base_url(server: Served | str) -> str:
    return server if isinstance(server, str) else server.url


def client(server: Served | str, token: str = ALICE, api_key: bool = False, **kw: Any) -> anthropic.Anthropic:
    """The SDK pointed at `server`, no retries; `api_key=True` hands the token over as `api_key=` (which SDK 2.x
    sends as a Bearer token, like `auth_token=`: tests of the `x-api-key` header send it raw)."""
    kw.setdefault("max_retries", 0)
    kw.setdefault("timeout", 30)
    if api_key:
        return anthropic.Anthropic(base_url=base_url(server), api_key=token, **kw)
    return anthropic.Anthropic(base_url=base_url(server), auth_token=token, **kw)


def conversation(n: int = 1) -> list[dict[str, str]]:
    """`n` alternating user/assistant turns, the first from the user."""
    return [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(n)]


def ask(server: Served | str, token: str = ALICE, *, model: str = MODEL, stream: bool = False, n_messages: int = 1,
        headers: Mapping[str, str] | None = None, max_tokens: int = 16) -> Any:
    """One message through the SDK; a stream is read to its end. Returns the (final) message."""
    args: dict[str, Any] = {"model": model, "max_tokens": max_tokens, "messages": conversation(n_messages),
                            "extra_headers": dict(headers or {})}
    with client(server, token) as c:
        if stream:
            with c.messages.stream(**args) as s:
                return s.get_final_message()
        return c.messages.create(**args)


def knob_headers(**knobs: Any) -> dict[str, str]:
    """`x-fake-*` request headers for the fake upstream: `delay_ms=50` -> `x-fake-delay-ms: 50`."""
    return {"x-fake-" + k.replace("_", "-"): str(v) for k, v in knobs.items()}


def messages_body(stream: bool = False, model: str = MODEL, n_messages: int = 1, max_tokens: int = 16) -> bytes:
    return json.dumps({"model": model, "max_tokens": max_tokens, "stream": stream,
                       "messages": conversation(n_messages)}).encode()


@dataclass
class Reply:
    """What a raw request got: `status, headers, data = reply` unpacks it. `ended` is how the body ended: "" when
    read to its end, else the exception that ended it (a `ReadTimeoutError` means the client gave up waiting,
    anything else that the connection was cut)."""

    status: int
    headers: urllib3.HTTPHeaderDict
    data: bytes
    ended: BaseException | None = None

    def __iter__(self) -> Iterator[Any]:
        return iter((self.status, self.headers, self.data))

    def json(self) -> Any:
        return json.loads(self.data)

    @property
    def cut(self) -> bool:
        """The body ended because the connection was closed or reset (not complete, not our own timeout)."""
        return self.ended is not None and not isinstance(self.ended, urllib3.exceptions.ReadTimeoutError)


def post_messages(server: Served | str, token: str | None = ALICE, *, stream: bool = False, model: str = MODEL,
                  n_messages: int = 1, headers: Mapping[str, str] | None = None, body: bytes | None = None,
                  path: str = "/v1/messages", **knobs: Any) -> Reply:
    """One raw POST (Bearer `token`, none if None) with `x-fake-*` knobs; the body exactly as it came (still
    compressed) and as far as it came: a connection cut mid-body ends the data, it raises nothing."""
    sent = {"content-type": "application/json", **knob_headers(**knobs), **(headers or {})}
    if token is not None:
        sent.setdefault("Authorization", "Bearer " + token)
    payload = messages_body(stream, model, n_messages) if body is None else body
    r = request("POST", base_url(server) + path, body=payload, headers=sent, preload_content=False)
    data, ended = b"", None
    try:
        for chunk in r.stream(65536, decode_content=False):
            data += chunk
    except (urllib3.exceptions.HTTPError, OSError) as exc:
        ended = exc
    r.release_conn()
    if r.status >= 400:
        ERROR_BODIES.append((f"POST {base_url(server)}{path}", data))
    return Reply(r.status, r.headers, data, ended)


def stream_events(server: Served | str, key: str, headers: Mapping[str, str] | None = None, *,
                  on_first_delta: Callable[[], None], token: str = ALICE, events: int = 3) -> list[str]:
    """Stream a message through the SDK with the fake holding it after its first delta (`x-fake-wait-release:
    key`); `on_first_delta` runs when the client has that delta (and must release `key`). The event types."""
    seen: list[str] = []
    extra = {"x-fake-wait-release": key, "x-fake-events": str(events), **(headers or {})}
    with client(server, token) as c, c.messages.stream(model=MODEL, max_tokens=64, messages=conversation(1),
                                                      extra_headers=extra) as s:
        for event in s:
            seen.append(event.type)
            if event.type == "content_block_delta" and seen.count("content_block_delta") == 1:
                on_first_delta()
    return seen


def first_delta_only(fake: Any, key: str) -> None:
    """The client has the first delta: the fake must have sent exactly that one and be holding the rest (were
    the relay buffering, the client would have nothing yet). Then let the stream go on."""
    held = fake.sent_info(key)
    assert held["deltas"] == 1 and held["waiting"], held
    fake.release(key)
