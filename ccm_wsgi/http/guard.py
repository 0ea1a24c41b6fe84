"""An open service (no users) answers only local clients, never a web page.

An open service trusts whoever can reach it. On loopback that is the operator, and also any web page the
operator visits: DNS rebinding points a page's own host name at 127.0.0.1, and the page's scripts can then
talk to ccm-wsgi as if it were their own origin. A browser always names the page's host in `Host`, and
marks a cross-site request with `Origin` and `Sec-Fetch-Site`; Claude Code and the SDKs never do either.
So an open service refuses a request whose `Host` is not an IP address, `localhost` or a configured name
(the TLS `server_name`), and any request a browser marks as coming from another site. A service with users
needs none of this: a page cannot know a user token.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Iterable
from typing import Any

from ..errors import ProxyError

REFUSED = ("this ccm-wsgi service has no users, so it only answers local clients by IP address or localhost, "
           "and never a web page; configure users to serve other names")


def host_name(authority: str) -> str:
    """The host of a `Host` value or of a URL's authority, without port or brackets, lower-case."""
    authority = authority.strip().lower()
    if authority.startswith("["):
        return authority[1:].split("]", 1)[0]
    return authority.rsplit(":", 1)[0] if authority.count(":") == 1 else authority


class OpenGuard:
    def __init__(self, names: Iterable[str]):
        self.names = frozenset({"localhost", *(n.lower() for n in names if n)})

    def allowed(self, host: str) -> bool:
        if host in self.names:
            return True
        try:
            ipaddress.ip_address(host)
        except ValueError:
            return False
        return True

    def check(self, environ: dict[str, Any]) -> None:
        """Raise a 403 for a request this open service must not answer."""
        if not self.allowed(host_name(environ.get("HTTP_HOST", ""))):
            raise ProxyError(403, "permission_error", REFUSED)
        if environ.get("HTTP_SEC_FETCH_SITE", "").lower() == "cross-site":
            raise ProxyError(403, "permission_error", REFUSED)
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None and not self.allowed(host_name(urllib.parse.urlsplit(origin).netloc)):
            raise ProxyError(403, "permission_error", REFUSED)
