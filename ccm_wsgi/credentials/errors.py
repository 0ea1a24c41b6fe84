"""What a credential that cannot give a token raises: the status a client gets and a message safe to show
(never a token, never what the token endpoint said beyond its status and OAuth error code)."""

from __future__ import annotations


class CredentialError(Exception):
    """The credential cannot give a token. `status` is what the client gets; the message is safe to show."""

    def __init__(self, status: int, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.retry_after = retry_after


class RefreshRejected(Exception):
    """The token endpoint answered 4xx (e.g. invalid_grant): the refresh token is spent or revoked."""
