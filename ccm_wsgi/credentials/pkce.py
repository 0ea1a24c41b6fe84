"""The parts of Claude's OAuth login that involve no I/O: PKCE, the authorize URL, and reading what a person pastes.

PKCE (S256) as Claude Code does it: the verifier is 32 random bytes in base64url (43 characters), the challenge
is the base64url SHA-256 of the verifier, and `state` is 32 more random bytes. The authorize URL carries its
parameters in Claude Code's order and encoding, so that it is the URL `claude /login` would print.

What a person pastes back may be `code#state` (what the hosted callback page shows), a bare code, or the whole
address of the page the browser landed on (`...?code=...&state=...`); all three are read here.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from dataclasses import dataclass
from urllib.parse import parse_qs, urlencode, urlsplit

from ..anthropic import CLIENT_ID, LOGIN_SCOPES
from .endpoint import OAUTH_ERROR

# Codes and states are base64url-like; anything else was not copied right (or is not a code at all).
CODE_CHARS = re.compile(r"[A-Za-z0-9._~-]{1,4096}")


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


@dataclass(frozen=True, slots=True)
class Pkce:
    """One login attempt's secrets: the verifier (never leaves this process before the exchange), the
    challenge derived from it, and the state that ties the answer to this attempt."""

    verifier: str
    challenge: str
    state: str

    @classmethod
    def new(cls) -> Pkce:
        verifier = b64url(secrets.token_bytes(32))
        return cls(verifier, b64url(hashlib.sha256(verifier.encode()).digest()), b64url(secrets.token_bytes(32)))


def authorize_url(base: str, redirect_uri: str, pkce: Pkce) -> str:
    """The page to open in a browser: `base` (the service's `authorize_url`) with Claude Code's parameters."""
    params = [
        ("code", "true"),
        ("client_id", CLIENT_ID),
        ("response_type", "code"),
        ("redirect_uri", redirect_uri),
        ("scope", " ".join(LOGIN_SCOPES)),
        ("code_challenge", pkce.challenge),
        ("code_challenge_method", "S256"),
        ("state", pkce.state),
    ]
    return base + ("&" if "?" in base else "?") + urlencode(params)


class PasteError(ValueError):
    """What was pasted is not a code; the message says what was expected."""


class Refused(ValueError):
    """The browser came back with an OAuth error instead of a code (the person declined, for instance)."""


def read_pasted(text: str) -> tuple[str, str | None]:
    """(code, state) from `code#state`, the callback address, or a bare code (state None: nothing to compare)."""
    text = text.strip()
    if not text:
        raise PasteError("nothing was pasted")
    state: str | None
    if "://" in text or text.startswith("?"):
        query = parse_qs(urlsplit(text).query)
        error = (query.get("error") or [""])[0]
        if error:
            shown = error if OAUTH_ERROR.fullmatch(error) else "an error"
            raise Refused(f"the authorization was refused ({shown})")
        code = (query.get("code") or [""])[0]
        state = (query.get("state") or [""])[0] or None
    else:
        code, _, rest = text.partition("#")
        state = rest or None
    code = re.split(r"[#&]", code, maxsplit=1)[0]  # a bare code: whatever follows # or & is not part of it
    if not CODE_CHARS.fullmatch(code):
        raise PasteError("that does not look like an authorization code: paste the code#state the page shows, "
                         "or the address of the page the browser landed on")
    if state is not None and not CODE_CHARS.fullmatch(state):
        raise PasteError("the part after # is not a state this login could have made: copy the whole code again")
    return code, state
