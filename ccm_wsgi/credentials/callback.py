"""The loopback page of `ccm-wsgi login --callback-port N`: where the browser's redirect lands.

When Anthropic's hosted callback page is refused for the redirect URI (it has been, for weeks at a time), the
login asks for `http://localhost:N/callback` instead, as `claude` does on a desktop. On a server the browser is
on another machine, so the person forwards that port with `ssh -L N:127.0.0.1:N`; the redirect then reaches this
listener, which only ever listens on 127.0.0.1. It hands the address it was called with (code and state, or an
error) to the login, answers the browser with a short page that sends the person back to the terminal, and never
logs a request line (it holds the code).
"""

from __future__ import annotations

import html
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

PATH = "/callback"
REQUEST_TIMEOUT = 10.0  # a browser's speculative connection that never sends a request is dropped after this

PAGE = """<!doctype html><html><head><meta charset="utf-8"><title>ccm-wsgi login</title></head>
<body style="font-family: sans-serif; max-width: 40em; margin: 4em auto"><h1>{title}</h1><p>{text}</p></body></html>
"""


def page(title: str, text: str) -> bytes:
    return PAGE.format(title=html.escape(title), text=html.escape(text)).encode()


class CallbackServer:
    """A listener on 127.0.0.1:`port` (0: any free port); `deliver` gets the address of every callback."""

    def __init__(self, port: int, deliver: Callable[[str], None]):
        outer = self

        class Handler(BaseHTTPRequestHandler):
            timeout = REQUEST_TIMEOUT
            server_version = "ccm-wsgi-login"

            def do_GET(self) -> None:
                split = urlsplit(self.path)
                if split.path != PATH:
                    self.answer(404, page("Not found", "This is the ccm-wsgi login listener; nothing else is here."))
                    return
                query = parse_qs(split.query)
                if query.get("code"):
                    self.answer(200, page("Login received",
                                          "Go back to the terminal: it says whether the login worked. "
                                          "You can close this tab."))
                else:
                    self.answer(200, page("Login not completed",
                                          "The authorization did not give a code. Go back to the terminal."))
                deliver(outer.redirect_uri + ("?" + split.query if split.query else ""))

            def answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "text/html; charset=utf-8")
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Cache-Control", "no-store")
                self.send_header("Referrer-Policy", "no-referrer")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # the request line holds the code: never printed

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    @property
    def redirect_uri(self) -> str:
        """What the authorize request names, and so what the browser is sent to: Claude Code's loopback form."""
        return f"http://localhost:{self.port}{PATH}"

    def start(self) -> None:
        self._thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name="login-callback", daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join(REQUEST_TIMEOUT)
        self.server.server_close()
