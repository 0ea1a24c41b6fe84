"""How to answer one /v1/messages request: the per-request knobs (`x-fake-NAME` headers or `fake_NAME` query
parameters) read into a `Plan`, and the SSE event sequence of a streamed answer."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from typing import Any

from .common import DEFAULT_MODEL, RELEASE_TIMEOUT, HttpError, anthropic_error, bounded, dumps
from .encoding import Encoder, accepts_encoding, make_encoder
from .wire import Request


def knob(req: Request, name: str) -> str | None:
    """Query parameter fake_NAME (underscores) wins over header x-fake-NAME."""
    value = req.query.get("fake_" + name.replace("-", "_"))
    if value is None:
        value = req.header("x-fake-" + name)
    return value


def int_knob(req: Request, name: str, default: int | None = None) -> int | None:
    value = knob(req, name)
    if value is None or value == "":
        return default
    try:
        return int(float(value))
    except ValueError:
        raise HttpError(400, f"x-fake-{name} must be a number, got {value!r}") from None


def bool_knob(req: Request, name: str) -> bool:
    value = knob(req, name)
    return value is not None and value.strip().lower() not in ("", "0", "false", "no", "off")


@dataclass
class Plan:
    """How to answer one /v1/messages request."""

    stream: bool
    model: str
    events: int = 5
    delay: float = 0.0
    delta_bytes: int = 0
    input_tokens: int = 10
    output_tokens: int = 5
    cache_read: int = 0
    cache_creation: int = 0
    cache_5m: int = 0
    cache_1h: int = 0
    drop_after: int | None = None
    stall_after: int | None = None
    error_after: int | None = None
    framing: str = ""
    encoding: Encoder | None = None
    size: int | None = None
    invalid_json: bool = False
    release_key: str | None = None
    release_timeout: float = RELEASE_TIMEOUT
    msg_id: str = field(default_factory=lambda: "msg_fake_" + secrets.token_hex(12))

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": self.cache_creation,
            "cache_read_input_tokens": self.cache_read,
            "cache_creation": {"ephemeral_5m_input_tokens": self.cache_5m,
                               "ephemeral_1h_input_tokens": self.cache_1h},
            "output_tokens": self.output_tokens,
            "service_tier": "standard",
        }


def plan_from_request(req: Request, body: dict[str, Any]) -> Plan:
    stream = bool(body.get("stream"))
    events = max(0, int_knob(req, "events", 5) or 0)
    plan = Plan(stream=stream, model=knob(req, "model") or str(body.get("model") or DEFAULT_MODEL), events=events)
    plan.delay = bounded((int_knob(req, "delay-ms", 0) or 0) / 1000)
    plan.delta_bytes = max(0, int_knob(req, "delta-bytes", 0) or 0)
    plan.input_tokens = int_knob(req, "input-tokens", 10) or 0
    plan.output_tokens = int_knob(req, "output-tokens", events if stream else 5) or 0
    plan.cache_read = int_knob(req, "cache-read-tokens", 0) or 0
    creation = int_knob(req, "cache-creation-tokens")
    c5, c1 = int_knob(req, "cache-5m-tokens"), int_knob(req, "cache-1h-tokens")
    if c5 is None and c1 is None:
        c5, c1 = creation or 0, 0
    plan.cache_5m, plan.cache_1h = c5 or 0, c1 or 0
    plan.cache_creation = creation if creation is not None else plan.cache_5m + plan.cache_1h
    plan.drop_after = int_knob(req, "drop-after")
    plan.stall_after = int_knob(req, "stall-after")
    plan.error_after = int_knob(req, "error-after")
    plan.framing = (knob(req, "framing") or ("chunked" if stream else "length")).lower()
    if plan.framing not in ("chunked", "close", "length"):
        raise HttpError(400, f"x-fake-framing must be chunked, close or length, got {plan.framing!r}")
    encoding = (knob(req, "encoding") or "").lower()
    if encoding and encoding != "identity" and accepts_encoding(req.header("accept-encoding"), encoding):
        plan.encoding = make_encoder(encoding)
    elif encoding and encoding != "identity":
        make_encoder(encoding)  # still validate the name
    plan.size = int_knob(req, "bytes")
    plan.invalid_json = bool_knob(req, "invalid-json")
    plan.release_key = knob(req, "wait-release") or None
    plan.release_timeout = bounded((int_knob(req, "release-timeout-ms") or RELEASE_TIMEOUT * 1000) / 1000)
    return plan


def ratelimit_override(req: Request) -> dict[str, str | None]:
    raw = knob(req, "ratelimit")
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        raise HttpError(400, "x-fake-ratelimit must be a JSON object") from None
    if not isinstance(value, dict):
        raise HttpError(400, "x-fake-ratelimit must be a JSON object")
    return {str(k): None if v is None else str(v) for k, v in value.items()}


def stream_piece(i: int, delta_bytes: int) -> str:
    text = "Hello" if i == 0 else f" {i}"
    return text.ljust(delta_bytes, ".") if delta_bytes else text


def sse(event_type: str, payload: dict[str, Any]) -> bytes:
    return b"event: " + event_type.encode() + b"\ndata: " + dumps(payload) + b"\n\n"


def sse_events(plan: Plan, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    """The event sequence of a streamed answer, cut short by an `error` event when error-after is set."""
    start = {"id": plan.msg_id, "type": "message", "role": "assistant", "model": plan.model, "content": [],
             "stop_reason": None, "stop_sequence": None, "usage": {**plan.usage(), "output_tokens": 1}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("message_start", {"type": "message_start", "message": start}),
        ("content_block_start", {"type": "content_block_start", "index": 0,
                                 "content_block": {"type": "text", "text": ""}}),
        ("ping", {"type": "ping"}),
    ]
    for i in range(plan.events):
        if plan.error_after == i:
            break
        delta = {"type": "text_delta", "text": stream_piece(i, plan.delta_bytes)}
        events.append(("content_block_delta", {"type": "content_block_delta", "index": 0, "delta": delta}))
    if plan.error_after is not None and plan.error_after <= plan.events:
        events.append(("error", anthropic_error(529, "Overloaded", "overloaded_error", request_id)))
        return events
    usage = {k: v for k, v in plan.usage().items() if k not in ("cache_creation", "service_tier")}
    events += [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("message_delta", {"type": "message_delta", "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                           "usage": usage}),
        ("message_stop", {"type": "message_stop"}),
    ]
    return events
