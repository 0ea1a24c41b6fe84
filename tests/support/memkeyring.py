"""An in-memory keyring backend for tests: `PYTHON_KEYRING_BACKEND=tests.support.memkeyring.MemoryKeyring`
(with the repository on PYTHONPATH) in a `ccm-wsgi serve` child process stands in for the macOS keychain.

* `MEMKEYRING_SEED`: the items it starts with, JSON `{service: {account: secret}}`.
* `MEMKEYRING_DUMP`: a path where every change is written (same JSON), so the test sees what the
  process stored; the items themselves live only in this process's memory.
* `MEMKEYRING_FAIL_WRITES=1`: every write fails as a locked keychain would (`PasswordSetError`).
"""

from __future__ import annotations

import json
import os

from keyring.backend import KeyringBackend
from keyring.errors import PasswordDeleteError, PasswordSetError


class MemoryKeyring(KeyringBackend):
    priority = 1  # type: ignore[assignment]  (only ever selected explicitly)

    def __init__(self) -> None:
        super().__init__()
        self.items: dict[str, dict[str, str]] = json.loads(os.environ.get("MEMKEYRING_SEED") or "{}")

    def get_password(self, service: str, username: str) -> str | None:
        return self.items.get(service, {}).get(username)

    def set_password(self, service: str, username: str, password: str) -> None:
        if os.environ.get("MEMKEYRING_FAIL_WRITES") == "1":
            raise PasswordSetError("the keychain is locked (memkeyring)")
        self.items.setdefault(service, {})[username] = password
        self._dump()

    def delete_password(self, service: str, username: str) -> None:
        if username not in self.items.get(service, {}):
            raise PasswordDeleteError("no such item")
        del self.items[service][username]
        self._dump()

    def _dump(self) -> None:
        path = os.environ.get("MEMKEYRING_DUMP")
        if path:
            with open(path + ".tmp", "w") as f:
                json.dump(self.items, f)
            os.replace(path + ".tmp", path)
