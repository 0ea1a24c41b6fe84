"""A credential that is another ccm instance (an `external` credential): our "access token" is a user token of
that instance, which holds and refreshes its own subscription login."""

from __future__ import annotations

from typing import Any

from .errors import CredentialError


class PeerCredential:
    def __init__(self, tag: str, token: str):
        self.tag = tag
        self._token = token

    def access_token(self) -> str:
        return self._token

    def renew(self, rejected: str) -> str | None:
        raise CredentialError(502, f"credential {self.tag}: the peer ccm instance rejected our token")

    def available(self) -> bool:
        return True

    def info(self) -> dict[str, Any]:
        return {"available": True}
