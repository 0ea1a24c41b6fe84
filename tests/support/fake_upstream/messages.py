"""The /v1 endpoints: Messages (JSON or SSE, with the faults of its plan), count_tokens and models, after the
shared steps (stall, time to first byte, authentication, status knob, quota 429) and rate-limit headers."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from .common import (
    DEFAULT_TEXT,
    JSON_PIECE,
    MAX_STALL,
    MODELS,
    OAUTH_BETA_MISSING,
    RETRY_AFTER_STATUSES,
    RL,
    ClientGone,
    DropConnection,
    HttpError,
    dumps,
    has_oauth_beta,
    log,
)
from .plan import Plan, bool_knob, int_knob, knob, plan_from_request, ratelimit_override, sse, sse_events
from .state import Account, Release
from .wire import BodyWriter, Exchange

if TYPE_CHECKING:
    from .server import FakeServer

class V1:
    """Messages, count_tokens, models; the shared knobs (stall, ttfb, auth, status) run first."""

    def __init__(self, server: FakeServer, ex: Exchange) -> None:
        self.server = server
        self.state = server.state
        self.ex = ex
        self.req = ex.req
        self.conn = ex.conn
        self.account: Account | None = None

    def handle(self) -> None:
        if bool_knob(self.req, "stall-before-headers"):
            self.stall_before_headers()
            return
        ttfb = int_knob(self.req, "ttfb-ms", 0) or 0
        if ttfb > 0 and self.conn.wait_peer_close(ttfb / 1000):
            self.state.stats.closed_early += 1
            raise DropConnection()
        self.authenticate()
        path, method = self.req.path, self.req.method
        if path == "/v1/messages":
            self.require(method, "POST")
            self.messages()
        elif path == "/v1/messages/count_tokens":
            self.require(method, "POST")
            self.apply_status_knob()
            self.ex.send_json(200, {"input_tokens": max(1, len(self.req.body) // 4)}, self.rl_headers())
        elif path == "/v1/models":
            self.require(method, "GET")
            self.apply_status_knob()
            self.ex.send_json(200, self.models_body(), self.rl_headers())
        else:
            self.ex.send_error(404, f"Not found: {method} {path}", headers=self.rl_headers())

    def require(self, method: str, expected: str) -> None:
        if method != expected:
            raise HttpError(405, f"Method {method} not allowed", headers=[("allow", expected)])

    def stall_before_headers(self) -> None:
        if self.conn.wait_peer_close(MAX_STALL):
            self.state.stats.closed_early += 1
        self.conn.close()
        raise DropConnection()

    # ----- auth and rate-limit headers
    def authenticate(self) -> None:
        auth = self.req.header("authorization") or ""
        bearer = auth[:7].lower() == "bearer "
        token = auth[7:].strip() if bearer else (self.req.header("x-api-key") or "")
        entry = self.state.access.get(token) if token else None
        problem = None
        if bearer and token and not has_oauth_beta(self.req.header("anthropic-beta")):
            self.state.stats.oauth_beta_missing += 1  # as Anthropic does, whatever the token
            problem = OAUTH_BETA_MISSING
        elif entry is not None and entry.revoked:
            problem = "OAuth token has been revoked. Please obtain a new token."
        elif self.state.config.strict and (entry is None or entry.auto):
            problem = "invalid x-api-key"
        elif self.state.config.strict and entry is not None and entry.expired():
            problem = "OAuth token has expired. Please obtain a new token or refresh your existing token."
        if problem:
            self.state.stats.unauthorized += 1
            raise HttpError(401, problem)
        if entry is None and token:
            entry = self.state.auto_register(token)
        if entry is not None:
            self.account = self.state.accounts[entry.account]
        if self.account is not None and self.ex.record is not None:
            self.ex.record["account"] = self.account.id

    def rl_headers(self, rejected: bool = False) -> list[tuple[str, str]]:
        acct = self.account or Account(id="")
        status = "rejected" if rejected else acct.status
        claim_is_7d = acct.claim in ("seven_day", "7d")
        headers = {
            RL + "status": status,
            RL + "5h-status": "rejected" if status == "rejected" and not claim_is_7d else "allowed",
            RL + "5h-utilization": str(acct.five_hour_utilization),
            RL + "5h-reset": str(acct.five_hour_reset),
            RL + "7d-status": "rejected" if status == "rejected" and claim_is_7d else "allowed",
            RL + "7d-utilization": str(acct.seven_day_utilization),
            RL + "7d-reset": str(acct.seven_day_reset),
            RL + "representative-claim": acct.claim,
            RL + "reset": str(acct.seven_day_reset if claim_is_7d else acct.five_hour_reset),
        }
        if acct.id:
            headers["x-fake-account"] = acct.id
        headers.update(acct.headers)
        headers.update(ratelimit_override(self.req))
        return [(k, v) for k, v in headers.items() if v is not None]

    def retry_after(self, default: int = 30) -> list[tuple[str, str]]:
        return [("retry-after", knob(self.req, "retry-after") or str(default))]

    def apply_status_knob(self) -> None:
        status = int_knob(self.req, "status")
        if status is None or status == 200:
            return
        headers = self.rl_headers()
        if status in RETRY_AFTER_STATUSES:
            headers += self.retry_after()
        raise HttpError(status, f"fake error {status} (x-fake-status)", headers=headers)

    def apply_quota(self) -> None:
        acct = self.account
        if acct is None or not acct.quota_429:
            return
        reset = acct.seven_day_reset if acct.claim in ("seven_day", "7d") else acct.five_hour_reset
        try:
            wait = max(1, int(float(reset) - time.time()))
        except ValueError:
            wait = 30
        raise HttpError(429, "This request would exceed your account's rate limit. Please try again later.",
                        headers=self.rl_headers(rejected=True) + self.retry_after(wait))

    @staticmethod
    def models_body() -> dict[str, Any]:
        data = [{"type": "model", "id": mid, "display_name": name, "created_at": "2025-08-05T00:00:00Z"}
                for mid, name in MODELS]
        return {"data": data, "has_more": False, "first_id": data[0]["id"], "last_id": data[-1]["id"]}

    # ----- messages
    def messages(self) -> None:
        try:
            body = self.req.json()
        except ValueError:
            raise HttpError(400, "messages: request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise HttpError(400, "messages: request body must be a JSON object")
        plan = plan_from_request(self.req, body)
        self.apply_quota()
        self.apply_status_knob()
        if self.account is not None:
            self.state.stats.messages_by_account[self.account.id] += 1
        headers = self.rl_headers()
        if plan.stream and not plan.invalid_json:
            self.stream(plan, headers)
        else:
            self.json_response(plan, headers)

    def message_body(self, plan: Plan) -> bytes:
        if plan.invalid_json:
            return b'{"id":"msg_broken","type":"message","content":[{"type":"text","text":"Hel'
        message = {
            "id": plan.msg_id, "type": "message", "role": "assistant", "model": plan.model,
            "content": [{"type": "text", "text": DEFAULT_TEXT}],
            "stop_reason": "end_turn", "stop_sequence": None, "usage": plan.usage(),
        }
        body = dumps(message)
        if plan.size and plan.size > len(body):
            message["content"][0]["text"] = DEFAULT_TEXT + " " + "x" * (plan.size - len(body) - 1)
            body = dumps(message)
        return body

    def json_response(self, plan: Plan, headers: list[tuple[str, str]]) -> None:
        body = self.message_body(plan)
        if plan.encoding is not None:
            body = plan.encoding.feed(body) + plan.encoding.finish()
            headers = [*headers, ("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        headers = [("content-type", "application/json"), *headers]
        if plan.drop_after == 0:
            self.drop()
        chunked = plan.framing == "chunked"
        self.ex.send_head(200, headers, length=len(body) if plan.framing == "length" else None, chunked=chunked)
        writer = BodyWriter(self.conn, chunked, None)
        rel = self.state.release(plan.release_key) if plan.release_key else None
        try:
            if plan.drop_after is not None or plan.stall_after is not None:
                writer.write(body[: len(body) // 2])
                if plan.drop_after is not None:
                    self.drop()
                self.stall()
            for start in range(0, len(body), JSON_PIECE):
                piece = body[start: start + JSON_PIECE]
                writer.write(piece)
                if rel is not None:
                    rel.events += 1
                    rel.bytes += len(piece)
                    if start == 0 and len(body) > JSON_PIECE:
                        self.wait_release(rel, plan.release_timeout)
            writer.finish()
        except ClientGone:
            self.state.stats.closed_early += 1
            raise
        finally:
            if rel is not None:
                rel.done = True
                rel.waiting = False
        if plan.framing == "close":
            self.conn.close()

    def drop(self) -> None:
        self.state.stats.dropped += 1
        self.conn.reset()
        raise DropConnection()

    def stall(self) -> None:
        if self.conn.wait_peer_close(MAX_STALL):
            self.state.stats.closed_early += 1
        self.conn.close()
        raise DropConnection()

    def stream(self, plan: Plan, headers: list[tuple[str, str]]) -> None:
        events = sse_events(plan, self.ex.request_id)
        headers = [("content-type", "text/event-stream; charset=utf-8"), ("cache-control", "no-cache"), *headers]
        if plan.framing == "length":
            self.stream_with_length(plan, events, headers)
            return
        if plan.encoding is not None:
            headers += [("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        chunked = plan.framing == "chunked"
        self.ex.send_head(200, headers, chunked=chunked)
        writer = BodyWriter(self.conn, chunked, plan.encoding)
        rel = self.state.release(plan.release_key) if plan.release_key else None
        self.state.stats.streams_total += 1
        self.state.active_streams += 1
        try:
            self.send_events(plan, events, writer, rel)
            writer.finish()
            self.state.stats.streams_completed += 1
        except ClientGone:
            self.state.stats.closed_early += 1
            raise
        finally:
            self.state.active_streams -= 1
            if rel is not None:
                rel.done = True
                rel.waiting = False
        if not chunked:
            self.conn.close()

    def send_events(self, plan: Plan, events: list[tuple[str, dict[str, Any]]], writer: BodyWriter,
                    rel: Release | None) -> None:
        """Write the events one by one; faults, delays and the release hook act between them."""
        deltas = 0
        for name, payload in events:
            if name in ("content_block_delta", "content_block_stop"):
                self.interrupt(plan, deltas)
            if name == "content_block_delta" and plan.delay and self.conn.wait_peer_close(plan.delay):
                raise ClientGone("peer closed while the stream was sleeping")
            event = sse(name, payload)
            writer.write(event)
            deltas += name == "content_block_delta"
            if rel is not None:
                rel.events += 1
                rel.deltas = deltas
                rel.bytes += len(event)
                if (name == "content_block_delta" and deltas == 1) or (name == "ping" and plan.events == 0):
                    self.wait_release(rel, plan.release_timeout)

    def interrupt(self, plan: Plan, sent_deltas: int) -> None:
        """drop-after / stall-after once `sent_deltas` deltas are out."""
        if plan.drop_after == sent_deltas:
            self.drop()
        if plan.stall_after == sent_deltas:
            self.stall()

    def wait_release(self, rel: Release, timeout: float) -> None:
        """Block until POST /_fake/release/KEY. Nobody releasing it in time fails the answer (a reset): a test that
        waits for the client to see what was sent so far must never pass by the fake giving up and going on."""
        rel.waiting = True
        released = rel.event.wait(timeout)
        rel.waiting = False
        if not released:
            rel.timed_out = True
            log(f"wait-release: nobody released the answer within {timeout:g}s; resetting it")
            self.drop()

    def stream_with_length(self, plan: Plan, events: list[tuple[str, dict[str, Any]]],
                           headers: list[tuple[str, str]]) -> None:
        """framing=length on a stream: the whole SSE body at once with a Content-Length (no faults, no delays)."""
        body = b"".join(sse(name, payload) for name, payload in events)
        if plan.encoding is not None:
            body = plan.encoding.feed(body) + plan.encoding.finish()
            headers = [*headers, ("content-encoding", plan.encoding.name), ("vary", "accept-encoding")]
        self.ex.send_head(200, headers, length=len(body))
        self.conn.send(body)
