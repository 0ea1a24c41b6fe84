"""Where a Claude subscription login lives: Claude Code's `.credentials.json`, or the macOS keychain.

The document is Claude Code's own (`{"claudeAiOauth": {"accessToken", "refreshToken", "expiresAt", ...}}`
plus any other keys, which are always kept). Writes are atomic, keep the file's owner, group and mode,
and go through a symlink to its target, so the local `claude` keeps working with the same file.

A refreshed login that could not be written to disk is also kept in a *pending* file in a private
in-memory directory (`files.runtime_dir()`), so that the other ccm-wsgi processes of this host adopt it
instead of spending the refresh token the stale file still holds.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
from typing import Any

from .. import files
from . import keychain
from .keychain import Keychain

OAUTH_KEY = "claudeAiOauth"
FILE_MODE = 0o600
SIZE_SLACK = 4096  # room for longer tokens when space is reserved before a refresh


def real_home() -> str:
    """The home of the user who ran sudo, else ours (Claude Code's own rule)."""
    sudo_user = os.environ.get("SUDO_USER")
    if sudo_user:
        with contextlib.suppress(KeyError):
            return pwd.getpwnam(sudo_user).pw_dir
    return os.path.expanduser("~")


def default_path() -> str:
    """`$CLAUDE_CONFIG_DIR/.credentials.json`, else `~/.claude/.credentials.json` of the real user."""
    config_dir = os.environ.get("CLAUDE_CONFIG_DIR")
    if config_dir:
        return os.path.join(config_dir, ".credentials.json")
    return os.path.join(real_home(), ".claude", ".credentials.json")


def parse_document(raw: bytes, source: str) -> dict[str, Any]:
    """Validate the Claude Code credentials JSON; the message names `source`, never a token."""
    if not raw.strip():
        raise ValueError(f"{source}: file is empty")
    try:
        document = json.loads(raw)
    except ValueError as exc:
        line = f" at line {exc.lineno}" if isinstance(exc, json.JSONDecodeError) else ""
        raise ValueError(f"{source}: invalid JSON{line}") from None
    if not isinstance(document, dict) or not isinstance(document.get(OAUTH_KEY), dict):
        raise ValueError(f"{source}: no {OAUTH_KEY} object (log in first)")
    oauth = document[OAUTH_KEY]
    if not isinstance(oauth.get("accessToken"), str) or not oauth["accessToken"]:
        raise ValueError(f"{source}: {OAUTH_KEY}.accessToken is missing")
    if not isinstance(oauth.get("expiresAt", 0), (int, float)) or isinstance(oauth.get("expiresAt"), bool):
        raise ValueError(f"{source}: {OAUTH_KEY}.expiresAt is not a number")
    return document


def dumps(document: dict[str, Any]) -> bytes:
    return json.dumps(document, indent=2).encode()


def credential_store(path: str) -> CredentialStore:
    """An explicit path means that file; no path means Claude Code's own location (keychain first on macOS)."""
    if path:
        return CredentialStore(os.path.abspath(os.path.expanduser(path)))
    chain = None
    if keychain.enabled():
        chain = Keychain(keychain.service_name(os.environ.get("CLAUDE_CONFIG_DIR"), real_home()))
    return CredentialStore(default_path(), chain)


class CredentialStore:
    """Read and write one login: a file, or (macOS) the keychain with the file as fallback."""

    def __init__(self, path: str, keychain: Keychain | None = None):
        self.path = path
        self.keychain = keychain

    def describe(self) -> str:
        return self.path if self.keychain is None else "keychain " + self.keychain.service

    def signature(self) -> tuple[int, int, int] | None:
        """Changes whenever the file is replaced or rewritten; None when it is missing."""
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def read(self) -> dict[str, Any]:
        """The whole JSON document (all keys); raises ValueError with a message that names the source."""
        if self.keychain is not None:
            data = self.keychain.read()
            if data is not None:
                with contextlib.suppress(ValueError):
                    return parse_document(data, "the keychain item " + self.keychain.service)
        try:
            with open(self.path, "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            raise ValueError(f"{self.path}: file not found") from None
        except OSError as exc:
            raise ValueError(f"{self.path}: {exc.strerror}") from None
        return parse_document(raw, self.path)

    def reserve(self, document: dict[str, Any]) -> files.Reservation | None:
        """Set aside the space a refreshed `document` needs, before its refresh token is spent. None for
        the keychain (nothing to reserve); raises OSError (no space, read-only, no permission)."""
        if self.keychain is not None:
            return None
        return files.Reservation(self.path, len(dumps(document)) + SIZE_SLACK, FILE_MODE)

    def write(self, document: dict[str, Any], reservation: files.Reservation | None = None) -> None:
        """Save `document` (into `reservation` when given); raises OSError."""
        data = dumps(document)
        if self.keychain is not None and self.keychain.write(data):
            return
        if reservation is None:
            reservation = files.Reservation(self.path, len(data), FILE_MODE)
        reservation.commit(data)

    def unwritable(self) -> str | None:
        """Why a new login could not be saved here, None when it can be (a keychain item always can)."""
        if self.keychain is not None:
            return None
        target = os.path.realpath(self.path)
        directory = os.path.dirname(target)
        if not os.access(directory, os.W_OK):
            return f"the directory {directory} is not writable"
        if os.path.exists(target) and not os.access(target, os.W_OK):
            return f"{self.path} is not writable"
        return None

    def lock_path(self) -> str:
        """Our own cross-process lock (flock), beside the file."""
        return self.path + ".lock"

    # -- a refreshed login that is not on disk yet ------------------------------------------------

    def pending_path(self) -> str:
        digest = hashlib.sha256(os.path.realpath(self.path).encode()).hexdigest()[:24]
        return os.path.join(files.runtime_dir(), f"pending-{digest}.json")

    def write_pending(self, document: dict[str, Any], spent: str) -> None:
        """Remember `document` (which replaced the refresh token `spent`) for the other processes."""
        record = {"spent_sha256": _sha256(spent), "document": document}
        files.replace_atomically(self.pending_path(), json.dumps(record).encode(), FILE_MODE)

    def read_pending(self, on_disk_refresh_token: str | None) -> dict[str, Any] | None:
        """The pending document that replaced the refresh token the file still holds, if any."""
        try:
            with open(self.pending_path(), "rb") as f:
                record = json.loads(f.read())
            document = record["document"]
            parse_document(json.dumps(document).encode(), "pending login")
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if on_disk_refresh_token is None or record.get("spent_sha256") != _sha256(on_disk_refresh_token):
            return None
        return document if isinstance(document, dict) else None

    def clear_pending(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(self.pending_path())


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()
