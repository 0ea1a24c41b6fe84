"""The Flask application of one ccm service.

Flask serves the small endpoints (`/healthz`, `/ccm/v1/status`, `/metrics`, the status page under `/ccm/`,
the JSON 404s); `/v1/*` is sent straight to the proxy's WSGI callable before Flask builds a request object,
because that path is hot and gains nothing from Werkzeug.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from flask import Flask, Response, request

from ..errors import JSON_HEADERS, ProxyError, error_body
from ..observe import page, session
from ..patches import abandon
from .auth import presented_token
from .guard import OpenGuard
from .proxy import has_body, status_line

if TYPE_CHECKING:
    from ..service import Service

METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
FORM_LIMIT = 16 * 1024  # the status page's forms are a token and a form token


def json_response(body: bytes, status: int = 200) -> Response:
    return Response(body, status=status, content_type="application/json")


def refuse(err: ProxyError, environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = err.body()
    headers = [*JSON_HEADERS, ("Content-Length", str(len(body))), *err.headers]
    if has_body(environ):
        abandon(environ["wsgi.input"])
        headers.append(("Connection", "close"))
    start_response(status_line(err.status), headers)
    return [body]


def closing_unread(environ: dict[str, Any], start_response: Any) -> Any:
    """A request body the route did not read is not waited for: the connection ends with the answer."""

    def start(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        stream = environ["wsgi.input"]
        length = getattr(stream, "content_length", None)
        if length is None or getattr(stream, "position", 0) < length:
            abandon(stream)
            headers = [*headers, ("Connection", "close")]
        return start_response(status, headers, exc_info)

    return start


def create_app(service: Service) -> Flask:
    app = Flask("ccm_wsgi")
    app.config["SERVICE"] = service
    app.config["MAX_CONTENT_LENGTH"] = FORM_LIMIT
    secret = session.key(service.shared)
    session.configure(app, secret, tls=service.cfg.tls is not None)
    app.register_blueprint(page.blueprint(service, secret))

    @app.get("/healthz")
    def healthz() -> Response:
        return json_response(b'{"status":"ok"}')

    @app.route("/ccm/v1/status", methods=METHODS)
    def status() -> Response:
        if request.method != "GET":
            return json_response(error_body("invalid_request_error", "method not allowed"), 405)
        auth = service.auth
        if auth.is_admin(request.environ):
            return json_response(json.dumps(service.admin_status(), sort_keys=True).encode())
        if auth.open:
            message = "status endpoint requires user authentication"
            return json_response(error_body("authentication_error", message), 403)
        try:
            user = auth.authenticate(request.environ)
        except ProxyError as err:
            return json_response(err.body(), err.status)
        view: dict[str, Any] = {**service.status(user)}
        if user is not None and (user.disabled or user.expires or service.cfg.limits_for(user) is not None):
            view["limits"] = service.limits.view(user)  # beside the pool's view, which stays as sing-box's
        return json_response(json.dumps(view, sort_keys=True).encode())

    @app.get("/metrics")
    def metrics() -> Response:
        """Prometheus text format, for an admin token, or anyone on an open service."""
        if service.metrics is None:  # CCM_METRICS=off
            return json_response(error_body("not_found_error", "Not found"), 404)
        auth = service.auth
        if not auth.open and not auth.is_admin(request.environ):
            if auth.user_with(presented_token(request.environ) or "") is None:  # no token, or not one of ours
                return json_response(error_body("authentication_error", "metrics need an admin token"), 401)
            return json_response(error_body("permission_error", "metrics need an admin token, not a user's"), 403)
        body, content_type = service.metrics.scrape(request.headers.get("Accept", ""))
        return Response(body, content_type=content_type)

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def not_found(path: str) -> Response:
        return json_response(error_body("not_found_error", "Not found"), 404)

    @app.errorhandler(404)
    @app.errorhandler(405)
    def no_route(_: Exception) -> Response:
        return json_response(error_body("not_found_error", "Not found"), 404)

    flask_wsgi = app.wsgi_app
    proxy = service.proxy
    guard = OpenGuard([service.cfg.tls.server_name if service.cfg.tls else ""])

    def dispatch(environ: dict[str, Any], start_response: Any) -> Any:
        path = environ.get("PATH_INFO", "")
        if service.auth.open and path != "/healthz":  # users may come and go with a reload
            try:
                guard.check(environ)
            except ProxyError as err:
                return refuse(err, environ, start_response)
        if path[:4] == "/v1/":
            return proxy(environ, start_response)
        if has_body(environ):
            return flask_wsgi(environ, closing_unread(environ, start_response))
        return flask_wsgi(environ, start_response)

    app.wsgi_app = dispatch  # type: ignore[method-assign]
    return app
