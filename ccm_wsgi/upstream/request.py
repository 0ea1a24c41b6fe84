"""The upstream request: which client headers go to Anthropic, and how a send failure is reported.

Rules: hop-by-hop headers (and those named in `Connection`) are dropped, and so are
`Host` and the client's own credentials (`Authorization`, `x-api-key`), which belong to ccm-wsgi, not
to Anthropic. `anthropic-beta` always starts with the OAuth flag, followed by every value the client
sent (all header lines, de-duplicated). Configured `headers` replace same-named ones.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import urllib3
from urllib3.exceptions import (
    ConnectTimeoutError,
    HTTPError,
    NewConnectionError,
    ReadTimeoutError,
)
from urllib3.exceptions import (
    ProxyError as UrllibProxyError,
)

from ..anthropic import OAUTH_BETA, RATELIMIT_PREFIX
from ..errors import ProxyError
from ..names import HOP_BY_HOP
from .outbounds import Route

# Never forwarded: framing the HTTP client recomputes, and the client's credentials for ccm-wsgi.
NOT_FORWARDED = HOP_BY_HOP | {"host", "content-length", "expect", "authorization", "x-api-key", "api-key"}
# An obs-folded header line (RFC 9112 section 5.2) reaches the environ with its line break: one space instead.
_LINE_BREAKS = re.compile(r"[ \t]*[\r\n]+[ \t]*")


def merge_beta(*values: str | None) -> str:
    """`oauth-2025-04-20` first, then every other comma-separated feature once, in order."""
    seen = [OAUTH_BETA]
    for value in values:
        if not value:
            continue
        for item in value.split(","):
            item = item.strip()
            if item and item not in seen:
                seen.append(item)
    return ",".join(seen)


def request_headers(environ: Mapping[str, Any], configured: Mapping[str, tuple[str, ...]]) -> dict[str, str]:
    """The client's end-to-end headers as they go upstream (without `authorization`, set per credential)."""
    connection = environ.get("HTTP_CONNECTION")
    listed = {t.strip().lower() for t in connection.split(",")} if connection else ()
    headers: dict[str, str] = {}
    for key, value in environ.items():
        if key[:5] != "HTTP_":
            continue
        name = key[5:].replace("_", "-").lower()
        if name in NOT_FORWARDED or name in listed:
            continue
        if "\n" in value or "\r" in value:
            value = _LINE_BREAKS.sub(" ", value)
        headers[name] = value
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        if "\n" in content_type or "\r" in content_type:
            content_type = _LINE_BREAKS.sub(" ", content_type)
        headers["content-type"] = content_type
    for name, values in configured.items():
        headers[name.lower()] = ", ".join(values)
    headers["anthropic-beta"] = merge_beta(headers.get("anthropic-beta"))
    return headers


def response_headers(upstream: urllib3.BaseHTTPResponse, keep_length: bool,
                     keep_limits: bool = True) -> list[tuple[str, str]]:
    """End-to-end upstream response headers, unchanged (request-id, retry-after, encoding...); the
    subscription's limit headers (`anthropic-ratelimit-unified-*`) only with `keep_limits`."""
    drop = HOP_BY_HOP if keep_length else HOP_BY_HOP | {"content-length"}
    if keep_limits:
        return [(k, v) for k, v in upstream.headers.iteritems() if k.lower() not in drop]
    return [(k, v) for k, v in upstream.headers.iteritems()
            if (name := k.lower()) not in drop and not name.startswith(RATELIMIT_PREFIX)]


def header(headers: urllib3.HTTPHeaderDict, name: str) -> str | None:
    """A response header's value; None when it is absent (looked up without the `KeyError` that `.get` raises
    and catches inside urllib3 for every absent header)."""
    return headers[name] if name in headers else None  # noqa: SIM401 (see above)


_TIMEOUTS: dict[tuple[float, float], urllib3.Timeout] = {}


def send(
    route: Route, method: str, url: str, body: bytes, headers: dict[str, str], response_timeout: float,
) -> urllib3.BaseHTTPResponse:
    """Send and wait for the response headers; failures become 502 (cannot reach) or 504 (no answer)."""
    key = (route.connect_timeout, response_timeout)
    timeout = _TIMEOUTS.get(key)
    if timeout is None:  # one per configured pair (urllib3 clones it per request anyway)
        timeout = _TIMEOUTS[key] = urllib3.Timeout(connect=route.connect_timeout, read=response_timeout)
    try:
        return route.pool.urlopen(
            method, url, body=body or None, headers=headers, preload_content=False, decode_content=False,
            redirect=False, retries=False, timeout=timeout,
        )
    except (NewConnectionError, UrllibProxyError) as exc:  # NewConnectionError subclasses ConnectTimeoutError
        raise ProxyError(502, "api_error", f"upstream unreachable: {route.describe(exc)}") from None
    except (ReadTimeoutError, ConnectTimeoutError) as exc:
        what = "connect" if isinstance(exc, ConnectTimeoutError) else "answer"
        raise ProxyError(504, "api_error", f"upstream did not {what} in time: {route.describe(exc)}") from None
    except (HTTPError, OSError) as exc:
        raise ProxyError(502, "api_error", f"upstream unreachable: {route.describe(exc)}") from None
