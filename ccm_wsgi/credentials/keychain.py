"""macOS keychain access through `keyring`, where Claude Code keeps its login on a Mac.

Claude Code stores the same JSON as `.credentials.json` in a generic-password item whose service is
`Claude Code-credentials`, or `Claude Code-credentials-<8 hex of sha256(CLAUDE_CONFIG_DIR)>` when a
non-default config directory is used, and whose account is the user name.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import sys

log = logging.getLogger("ccm_wsgi.credentials")

SERVICE = "Claude Code-credentials"


def service_name(config_dir: str | None, home: str) -> str:
    """The keychain service for a `CLAUDE_CONFIG_DIR` value (compared as a plain string, as Claude Code does)."""
    if not config_dir or config_dir == os.path.join(home, ".claude"):
        return SERVICE
    return SERVICE + "-" + hashlib.sha256(config_dir.encode()).hexdigest()[:8]


def enabled() -> bool:
    """The keychain is used on macOS; `CCM_KEYCHAIN=1` forces it elsewhere (tests, other keyring backends)."""
    forced = os.environ.get("CCM_KEYCHAIN")
    if forced is not None:
        return forced == "1"
    return sys.platform == "darwin"


class Keychain:
    """Read and write Claude Code's keychain item; `None`/False results mean "use the file instead"."""

    def __init__(self, service: str, account: str | None = None):
        self.service = service
        self.account = account or os.environ.get("SUDO_USER") or getpass.getuser()

    def read(self) -> bytes | None:
        import keyring
        import keyring.errors

        try:
            value = keyring.get_password(self.service, self.account)
        except keyring.errors.KeyringError as exc:
            log.warning("keychain item %s could not be read: %s", self.service, exc)
            return None
        return value.encode() if value else None

    def write(self, data: bytes) -> bool:
        import json

        import keyring
        import keyring.errors

        compact = json.dumps(json.loads(data), separators=(",", ":"))
        try:
            keyring.set_password(self.service, self.account, compact)
        except keyring.errors.KeyringError as exc:
            log.error("keychain item %s could not be written (%s); writing the file instead", self.service, exc)
            return False
        return True
