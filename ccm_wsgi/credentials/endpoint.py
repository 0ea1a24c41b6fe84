"""Claude's OAuth token endpoint: one POST dressed as Claude Code's, and what its answers say.

Shared by the refresh (`oauth.py`) and the login (`login.py`). Nothing here retries: a grant (a refresh
token, an authorization code) can be spent only once, so whether to send it again is the caller's call.
Only the OAuth error code of a refusal is ever repeated, never the rest of what the endpoint says.
"""

from __future__ import annotations

import json
import re
import time
from email.utils import parsedate_to_datetime
from typing import Any

import urllib3

from ..anthropic import TOKEN_USER_AGENT
from ..upstream.outbounds import Route

RETRY_AFTER_DEFAULT, RETRY_AFTER_MAX = 60.0, 3600.0
OAUTH_ERROR = re.compile(r"[a-z_]{1,40}")


def post_token(route: Route, token_url: str, body: dict[str, Any]) -> urllib3.BaseHTTPResponse:
    """One POST of `body` (JSON) to the token endpoint, dressed as Claude Code's; never retried here (a grant
    can be spent only once: whether to send it again is the caller's decision)."""
    headers = {"Content-Type": "application/json", "Accept": "application/json", "User-Agent": TOKEN_USER_AGENT}
    return route.pool.request(
        "POST", token_url, body=json.dumps(body).encode(), headers=headers,
        timeout=urllib3.Timeout(connect=route.connect_timeout, read=30.0), retries=False, redirect=False,
    )


def token_answer(resp: urllib3.BaseHTTPResponse) -> dict[str, Any] | None:
    """The decoded answer of a successful grant (it holds an `access_token`), None for anything else."""
    try:
        answer = json.loads(resp.data)
    except ValueError:
        return None
    if resp.status == 200 and isinstance(answer, dict) and isinstance(answer.get("access_token"), str):
        return answer
    return None


def oauth_error(resp: urllib3.BaseHTTPResponse) -> str:
    """The OAuth error code of a refused grant (`invalid_grant`, ...), "" when it has none."""
    try:
        answer = json.loads(resp.data)
    except ValueError:
        return ""
    code = answer.get("error") if isinstance(answer, dict) else None
    return code if isinstance(code, str) and OAUTH_ERROR.fullmatch(code) else ""


def refusal(resp: urllib3.BaseHTTPResponse) -> str:
    """`HTTP <status>` and the OAuth error code: whatever else the endpoint says is never repeated."""
    code = oauth_error(resp)
    return f"HTTP {resp.status}" + (f" {code}" if code else "")


def retry_after_seconds(value: str | None) -> float:
    """`Retry-After` as seconds (delta-seconds or an HTTP date), within sane bounds."""
    if value:
        value = value.strip()
        try:
            seconds = float(value) if value.replace(".", "", 1).isdigit() else (
                parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError, OverflowError):
            seconds = RETRY_AFTER_DEFAULT
        return min(max(seconds, 1.0), RETRY_AFTER_MAX)
    return RETRY_AFTER_DEFAULT
