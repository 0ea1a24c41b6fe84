"""The control API under /_fake/: what tests use to script the fake and read what it saw (never recorded or
counted as upstream traffic)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

from . import authorize
from .common import HttpError
from .state import Account
from .wire import Exchange

if TYPE_CHECKING:
    from .server import FakeServer

class Control:
    def __init__(self, server: FakeServer, ex: Exchange) -> None:
        self.server = server
        self.state = server.state
        self.ex = ex

    def body(self) -> dict[str, Any]:
        try:
            data = self.ex.req.json()
        except ValueError:
            raise HttpError(400, "control body is not JSON", body={"error": "control body is not JSON"}) from None
        if not isinstance(data, dict):
            raise HttpError(400, "control body must be an object", body={"error": "control body must be an object"})
        return data

    def dispatch(self) -> None:
        method = self.ex.req.method
        parts = [unquote(p) for p in self.ex.req.path.split("/")[2:]] or [""]
        route = (method, parts[0])
        try:
            self.route(route, parts)
        except HttpError as exc:
            if exc.body is None:
                exc.body = {"error": exc.message}
            raise

    def route(self, route: tuple[str, str], parts: list[str]) -> None:
        simple: dict[tuple[str, str], Callable[[], Any]] = {
            ("GET", "health"): lambda: "ok",
            ("GET", "stats"): self.stats,
            ("GET", "requests"): self.requests,
            ("POST", "reset"): self.reset,
            ("GET", "config"): lambda: asdict(self.state.config),
            ("POST", "config"): self.config,
            ("POST", "revoke"): self.revoke,
        }
        if len(parts) == 1 and route in simple:
            self.ex.send_json(200, simple[route]())
        elif parts[0] == "accounts":
            self.accounts(parts[1:])
        elif parts[0] == "authorizations":
            authorize.control(self.state, self.ex, parts[1:])
        elif parts[0] == "release" and len(parts) == 2 and route[0] == "POST":
            rel = self.state.release(parts[1])
            rel.event.set()
            self.ex.send_json(200, rel.to_json(parts[1]))
        elif parts[0] == "sent" and len(parts) == 2 and route[0] == "GET":
            self.ex.send_json(200, self.state.release(parts[1]).to_json(parts[1]))
        else:
            raise HttpError(404, f"no control endpoint {route[0]} {self.ex.req.path}")

    def stats(self) -> dict[str, Any]:
        conns = self.server.connections
        return self.state.stats_json(sum(1 for c in conns if not c.is_control), len(conns))

    def requests(self) -> list[dict[str, Any]]:
        query = self.ex.req.query
        since = int(query.get("since") or 0)
        path = query.get("path")
        return [r for r in self.state.records if r["seq"] > since and (path is None or r["route"] == path)]

    def reset(self) -> dict[str, Any]:
        data = self.body()
        self.state.reset(accounts=bool(data.get("accounts")), config=bool(data.get("config")))
        return {"ok": True}

    def config(self) -> dict[str, Any]:
        self.state.config.update(self.body())
        return asdict(self.state.config)

    def revoke(self) -> dict[str, Any]:
        data = self.body()
        result: dict[str, Any] = {}
        if data.get("access_token"):
            entry = self.state.access.get(data["access_token"])
            if entry is None:
                raise HttpError(404, "unknown access_token")
            entry.revoked = True
            result["access_token"] = "revoked"
        if data.get("refresh_token"):
            rentry = self.state.refresh.get(data["refresh_token"])
            if rentry is None:
                raise HttpError(404, "unknown refresh_token")
            rentry.spent = True
            result["refresh_token"] = "spent"
        if not result:
            raise HttpError(400, "give access_token and/or refresh_token")
        return result

    def account_json(self, account: Account) -> dict[str, Any]:
        return {**asdict(account), **self.state.tokens_of(account.id)}

    def accounts(self, rest: list[str]) -> None:
        method = self.ex.req.method
        if not rest and method == "GET":
            self.ex.send_json(200, [self.account_json(a) for a in self.state.accounts.values()])
        elif not rest and method == "POST":
            self.ex.send_json(200, self.state.add_account(self.body()))
        elif len(rest) == 2 and rest[1] == "state" and method in ("GET", "POST"):
            account = self.state.find_account(rest[0], create=method == "POST")
            if account is None:
                raise HttpError(404, f"unknown account {rest[0]!r}")
            if method == "POST":
                self.state.apply_state(account, self.body())
            self.ex.send_json(200, self.account_json(account))
        else:
            raise HttpError(404, f"no control endpoint {method} {self.ex.req.path}")
