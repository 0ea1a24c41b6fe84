"""User tokens that Claude Code recognises as gateway tokens.

Claude Code shows its usage notices ("You've used 95% of your 5-hour limit") only for a subscription
login or, behind an `ANTHROPIC_BASE_URL`, for a bearer token that reads as a JWT whose audience is
`claude-gateway` (it decodes the payload without verifying it). `ccm-wsgi token` therefore mints tokens of
that shape: a JWT-style header and payload (`aud: claude-gateway`) and 256 random bits. To ccm-wsgi the
whole string is just a random secret, compared by its SHA-256 like any other token; any token of at least
eight printable characters still works, it only makes Claude Code ignore the per-user limit headers.
"""

from __future__ import annotations

import base64
import json
import secrets

AUDIENCE = "claude-gateway"


def _part(value: dict[str, str]) -> str:
    return base64.urlsafe_b64encode(json.dumps(value, separators=(",", ":")).encode()).rstrip(b"=").decode()


def new_token() -> str:
    """A fresh user token: URL-safe, 256 random bits, shaped so that Claude Code shows its usage notices."""
    header = _part({"alg": "none", "typ": "JWT"})
    payload = _part({"aud": AUDIENCE, "iss": "ccm-wsgi", "jti": secrets.token_urlsafe(12)})
    return f"{header}.{payload}.{secrets.token_urlsafe(32)}"
