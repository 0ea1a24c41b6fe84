"""What ccm-wsgi needs to know about a client request, worked out once per request.

The model (usage records, model limits), the message count (usage file), the session (sticky credential
in a pool) and the beta flags (the 1M-context price rule) all come from the request. They are read here,
once, and the decoded JSON is dropped at once: a request body can be 32 MiB, which Python would decode
into about 24 times as much memory, so it is never held across the upstream wait.

Bodies up to DECODE_BUDGET are decoded whole (exact). Larger ones are scanned without being decoded:
the top-level `model` and `metadata.user_id` come first in what Claude Code and the SDKs send and are read
from the head of the body; the messages are counted by their `{"role":` openings, which is exact unless a
message's content itself holds an object that starts with a `role` key. The count only feeds the usage
file's `messages_count`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from typing import Any

from ..accounting import fastjson
from ..anthropic import SESSION_HEADER

DECODE_BUDGET = 2 * 1024 * 1024
HEAD = 64 * 1024  # where `model` and `metadata` of a large body are looked for
MAX_SESSION_ID = 200  # longer client-supplied ids are hashed so that session tables stay small

_MODEL = re.compile(rb'"model"\s*:\s*("(?:[^"\\]|\\.)*")')
_USER_ID = re.compile(rb'"user_id"\s*:\s*("(?:[^"\\]|\\.)*")')
_MESSAGES = re.compile(rb'"messages"\s*:\s*\[')
_MESSAGE_START = re.compile(rb'[\[,]\s*\{\s*"role"\s*:')


@dataclass(slots=True, frozen=True)
class Facts:
    """The request facts ccm-wsgi acts on; empty values when the body is not a Messages request."""

    model: str = ""
    messages_count: int = 0
    session: str = ""


def facts(body: bytes, session_header: str | None) -> Facts:
    """The facts of a request body (and its session header); never raises."""
    if len(body) <= DECODE_BUDGET:
        model, count, user_id = _decoded(body)
    else:
        model, count, user_id = _scanned(body)
    header = session_header.strip() if session_header else ""
    session = header or _session_of(user_id)
    return Facts(model, count, _bounded(session) if session else "")


def _decoded(body: bytes) -> tuple[str, int, str]:
    try:
        request = fastjson.loads(body)
    except (ValueError, RecursionError):
        return "", 0, ""
    if not isinstance(request, dict):
        return "", 0, ""
    model = request.get("model")
    messages = request.get("messages")
    metadata = request.get("metadata")
    user_id = metadata.get("user_id") if isinstance(metadata, dict) else None
    return (model if isinstance(model, str) else "", len(messages) if isinstance(messages, list) else 0,
            user_id if isinstance(user_id, str) else "")


def _scanned(body: bytes) -> tuple[str, int, str]:
    head = body[:HEAD]
    messages = _MESSAGES.search(body)
    count = len(_MESSAGE_START.findall(body, messages.end() - 1)) if messages else 0
    return _string(_MODEL.search(head)), count, _string(_USER_ID.search(head))


def _string(match: re.Match[bytes] | None) -> str:
    if match is None:
        return ""
    try:
        value = fastjson.loads(match.group(1))
    except ValueError:
        return ""
    return value if isinstance(value, str) else ""


def _session_of(user_id: str) -> str:
    """The session inside `metadata.user_id`: a JSON string `{"device_id":..,"session_id":..}` in current
    Claude Code, `user_<hash>_account_<uuid>_session_<uuid>` in older ones."""
    text = user_id.strip()
    if text.startswith("{"):
        try:
            inner: Any = fastjson.loads(text).get("session_id")
        except (ValueError, RecursionError, AttributeError):
            inner = None
        return inner.strip() if isinstance(inner, str) else ""
    if "_session_" in text:
        return text.rsplit("_session_", 1)[1]
    return ""


def _bounded(session: str) -> str:
    """Client-chosen ids are kept as is when short, hashed when long, so memory stays bounded."""
    if len(session) <= MAX_SESSION_ID:
        return session
    return "sha256:" + hashlib.sha256(session.encode("utf-8", "surrogatepass")).hexdigest()


def session_header(environ: dict[str, Any]) -> str | None:
    return environ.get(_SESSION_KEY)


_SESSION_KEY = "HTTP_" + SESSION_HEADER.upper().replace("-", "_")
