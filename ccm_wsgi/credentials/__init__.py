"""Where a subscription's access token comes from: a Claude Code login (`oauth`) or another ccm (`peer`)."""

from __future__ import annotations

from typing import Any, Protocol


class Credential(Protocol):
    """What a pooled account needs of its credential."""

    tag: str

    def access_token(self) -> str:
        """A token to send now; raises CredentialError when there is none."""
        ...

    def renew(self, rejected: str) -> str | None:
        """The upstream refused `rejected` (401): a token to retry with, or None to pass the 401 on."""
        ...

    def available(self) -> bool: ...

    def info(self) -> dict[str, Any]:
        """Non-secret facts for status views."""
        ...
