"""`GET /ccm/`: the status page, server-rendered HTML for people, and its sign-in.

* Signed out, `/ccm/` is a form that takes a user or admin token (POSTed, never in a URL; the answer never
  repeats it) and opens a session (`session.py`); `/ccm/sign-out` ends it. On an open service (no users)
  everyone sees everything, as with `/metrics`.
* Signed in, the page (`view.py`) is plain HTML that reads well on a phone; a small same-origin script
  fetches its live part (`/ccm/live`) every `refresh` seconds (30 by default, `?refresh=N` to change) and
  swaps it in, so the page stays current without reloading. Without the script it is still the whole page.
* Every answer carries a strict Content-Security-Policy (scripts, styles and fetches from this origin
  only, no inline code, no framing, forms posting only here) and is not cached.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from flask import Blueprint, Response, redirect, render_template, request, session, url_for

from . import view
from .session import form_ok, form_token, sign_in, viewer

if TYPE_CHECKING:
    from ..service import Service
    from .session import Viewer

log = logging.getLogger("ccm_wsgi.observe")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff", "Referrer-Policy": "no-referrer",
           "X-Frame-Options": "DENY", "Cross-Origin-Opener-Policy": "same-origin"}
REFRESH, REFRESH_MIN, REFRESH_MAX = 30, 2, 3600


def blueprint(service: Service, secret: bytes) -> Blueprint:
    pages = Blueprint("ccm_page", __name__, url_prefix="/ccm", static_folder="static",
                      template_folder="templates")

    def current() -> Viewer | None:
        return viewer(service.auth, secret, session, time.time())

    def signed_out(message: str = "", status: int = 200) -> Response:
        html = render_template("ccm/sign_in.html", tag=service.tag, form=form_token(session), message=message)
        return Response(html, status)

    @pages.after_request
    def protect(response: Response) -> Response:
        response.headers.update(HEADERS)
        if request.endpoint != "ccm_page.static":
            response.headers["Cache-Control"] = "no-store"
        return response

    @pages.get("/")
    def page() -> Response:
        who = current()
        if who is None:
            return signed_out()
        refresh = min(max(request.args.get("refresh", REFRESH, type=int), REFRESH_MIN), REFRESH_MAX)
        return Response(render_template("ccm/page.html", page=view.build(service, who), tag=service.tag,
                                        form=form_token(session), open=service.auth.open, refresh=refresh,
                                        usd=view.usd))

    @pages.post("/")
    def enter() -> Response:
        if not form_ok(session, request.environ, request.form.get("form")):
            return signed_out("The form had expired; please sign in again.", 403)
        if sign_in(service.auth, secret, session, request.form.get("token", "").strip(), time.time()) is None:
            log.warning("status page: sign-in refused from %s (not a token of a user or admin with access)",
                        request.remote_addr or "?")
            return signed_out("That is not the token of a user or admin with access here.", 401)
        return redirect(url_for(".page"), 303)  # type: ignore[return-value]

    @pages.post("/sign-out")
    def leave() -> Response:
        if form_ok(session, request.environ, request.form.get("form")):
            session.clear()
        return redirect(url_for(".page"), 303)  # type: ignore[return-value]

    @pages.get("/live")
    def live() -> Response:
        who = current()
        if who is None:
            return Response("", 401)
        return Response(render_template("ccm/live.html", page=view.build(service, who), usd=view.usd))

    return pages
