"""Shared state (`state` on a service): where limits and counters live when several nodes serve one team.

Without it, state lives in the process and in files on one host.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from .base import REQUIRED, Section, fail
from .values import Str, choice, plain, split_url, string

REDIS_SCHEMES = ("redis", "rediss", "unix")


def redis_url(value: object) -> str:
    """redis://HOST:PORT/DB, rediss:// (TLS) or unix:///path; never quoted back (it may hold a password)."""
    text = string(value)
    parts = split_url(text)
    if parts is None or parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.scheme == "unix"):
        fail("must be a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix" and not parts.path:
        fail("a unix:// URL needs the socket's path")
    if any(c.isspace() or ord(c) < 0x20 for c in text):
        fail("must not contain whitespace or control characters")
    return text


class RedisState(Section):
    type: Annotated[str, choice("redis", what="state type"), REQUIRED] = Field(
        default="redis", description='"redis" (the only kind of shared state)')
    url: Annotated[str, plain(redis_url), REQUIRED] = Field(
        default="", description="redis://HOST:PORT/DB, rediss://... (TLS) or unix:///path/to/socket")
    key_prefix: Str = Field(
        default="ccm:", description="prepended to every key, so that several teams can share one server")
