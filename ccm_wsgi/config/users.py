"""A service's `users`: who may call it, with which token, through which credential, within which limits."""

from __future__ import annotations

import datetime
import hashlib
from collections.abc import Iterator
from typing import Annotated

from pydantic import Field

from .base import REQUIRED, Problem, Reading, Section
from .limits import Limits
from .values import Bool, Sha256Hex, Str, UserToken, name, plain, rfc3339


def token_digest(token: str) -> bytes:
    """The SHA-256 a token is known by (tokens are compared and looked up by digest only)."""
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


UserName = Annotated[str, plain(name), REQUIRED]
Expires = Annotated[datetime.datetime | None, plain(rfc3339)]


class User(Section):
    name: UserName = Field(default="", description="shown in logs, usage and the status page")
    token: UserToken = Field(default="", description="the user's bearer token (at least 8 printable characters)")
    token_sha256: Sha256Hex = Field(default="", description="instead of token: its SHA-256, in hex")
    credential: Str = Field(
        default="", description="pooled services: the tag of the credential or balancer serving the user")
    external_credential: Str = Field(
        default="", description="pooled services: the external credential this user is (never routed back to it)")
    allow_external_usage: Bool = Field(
        default=False, description="pooled services: may be served by external credentials")
    limits: Limits | None = Field(default=None, description="this user's limits, replacing the service's limits")
    disabled: Bool = Field(default=False, description="refuse every request of this user")
    expires: Expires = Field(
        default=None, description="refuse requests from this RFC 3339 time on (with a zone)")

    def relations(self, read: Reading) -> Iterator[Problem]:
        if ("token" in read.given) == ("token_sha256" in read.given):
            yield Problem((), "needs exactly one of token or token_sha256")

    @property
    def digest(self) -> bytes:
        """The SHA-256 of the user's token (given, or computed from the token)."""
        return bytes.fromhex(self.token_sha256) if self.token_sha256 else token_digest(self.token)
