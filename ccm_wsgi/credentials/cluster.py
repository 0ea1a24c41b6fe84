"""A subscription login shared by several nodes (shared state on Redis): the part of `OAuthCredential` that
talks to the cluster.

Redis holds the newest login of each credential (`state/credentials.py`). A node adopts a login another node
refreshed (and writes it through to its own file, under this host's locks), publishes one it refreshed or
found newer in its file (a new `ccm-wsgi login`, a local `claude`), and refreshes only under the cluster's
lock, taken before this host's locks. Only nodes that hold the credential file refresh at all; while Redis
is unreachable, only a node Redis last listed as the sole holder does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .. import files
from ..state.connection import Unavailable
from ..state.credentials import LockBusy, SharedCredential, digest, newer
from . import locks
from .store import OAUTH_KEY, CredentialStore

if TYPE_CHECKING:
    import gevent.lock

    from .errors import CredentialError

log = logging.getLogger("ccm_wsgi.credentials")


class ClusterMember:
    """Mixed into `OAuthCredential`, whose state it reads and changes (declared here for the type checker)."""

    shared: SharedCredential | None
    _cluster: dict[str, Any] | None  # the login Redis held when last read, if newer than the file
    _holder: bool  # this node holds the credential file (only holders refresh)

    if TYPE_CHECKING:
        tag: str
        store: CredentialStore
        _document: dict[str, Any] | None
        _error: str | None
        _signature: tuple[int, int, int] | None
        _unsaved: dict[str, Any] | None
        _hold: CredentialError | None
        _lock: gevent.lock.RLock

        def load(self, force: bool = False) -> None: ...

        @property
        def oauth(self) -> dict[str, Any]: ...

        def _remaining_ms(self) -> float: ...

        def _fail(self, status: int, message: str, long: bool = False) -> CredentialError: ...

    def _with_cluster(self, on_disk: dict[str, Any] | None) -> dict[str, Any]:
        """The newer of the file's login and the one Redis held (another node refreshed it)."""
        assert self._cluster is not None
        if on_disk is not None and not newer(self._cluster, on_disk[OAUTH_KEY]):
            self._cluster = None
            return on_disk
        return {**(on_disk or {}), OAUTH_KEY: self._cluster}

    def join_cluster(self) -> None:
        """At start and whenever Redis is back: count this node among the holders of the file if it has it,
        then make this node and Redis agree on the newest login (adopt Redis's, or publish the file's)."""
        assert self.shared is not None
        with self._lock:
            self.load(force=True)
            self._holder = self.store.keychain is None and self.store.signature() is not None and \
                self._document is not None
            try:
                if self._holder:
                    self.shared.register()
                self._sync_cluster(locked=False)
            except Unavailable:
                log.warning("credential %s: shared state unreachable; using this node's own login until it is back",
                            self.tag)

    def leave_cluster(self) -> None:
        assert self.shared is not None
        self.shared.stop()

    def _sync_cluster(self, locked: bool) -> None:
        """Take Redis's login when it is newer than ours (and write it through to our file, under the host's
        locks: `locked` when the caller holds them already); publish ours when it is newer than Redis's (a
        new `ccm-wsgi login`, a refresh made while Redis was unreachable, a local `claude` that refreshed).
        Redis being unreachable changes nothing here."""
        assert self.shared is not None
        try:
            remote = self.shared.read()
        except Unavailable:
            return
        mine = self.oauth if self._document is not None else None
        if newer(remote, mine):
            assert remote is not None
            self._cluster = remote
            self._document, self._error = {**(self._document or {}), OAUTH_KEY: remote}, None
            self._hold = None
            log.info("credential %s: adopted the login another node refreshed", self.tag)
            if self._holder:
                self._write_through(locked)
        elif mine is not None and self._holder and newer(mine, remote):
            self._publish()

    def _write_through(self, locked: bool) -> None:
        """Save the login adopted from Redis to this node's file, so that a restart and a local `claude` find
        it there; without the host's locks at hand, only if they are free right now (else the next refresh
        does it)."""
        if self._unsaved is not None or self._document is None:
            return
        try:
            if locked:
                self.store.write(self._document)
            else:
                with files.locked(self.store.lock_path(), fcntl.LOCK_EX, 1.0, mode_if_created=0o600):
                    lock = locks.ClaudeLock(locks.lock_path(self.store.path))
                    if not lock.try_acquire():
                        return
                    with lock:
                        try:
                            on_disk: dict[str, Any] | None = self.store.read()
                        except ValueError:
                            on_disk = None
                        if on_disk is not None and not newer(self.oauth, on_disk[OAUTH_KEY]):
                            return  # a local `claude` wrote a newer one meanwhile: the next look adopts it
                        self.store.write(self._document)
            self._signature = self.store.signature()
            self._cluster = None
        except (OSError, files.LockTimeout) as exc:
            log.error("credential %s: cannot write the login another node refreshed to %s (%s); using it from "
                      "memory", self.tag, self.store.describe(), exc)

    def _publish(self) -> None:
        assert self.shared is not None
        try:
            self.shared.publish(self.oauth)
        except Unavailable:
            log.error("credential %s: the refreshed login could not be published to the other nodes; it is "
                      "published as soon as Redis is back", self.tag)

    @contextlib.contextmanager
    def _cluster_lock(self) -> Iterator[None]:
        """The cluster's refresh lock; without Redis, nothing for a sole holder and a refusal for the others."""
        if self.shared is None:
            yield
            return
        with contextlib.ExitStack() as stack:
            try:
                stack.enter_context(self.shared.locked())
            except LockBusy as exc:
                raise self._fail(503, f"credential {self.tag}: not refreshing: {exc}") from None
            except Unavailable:
                if not self.shared.sole:
                    raise self._fail(503, f"credential {self.tag}: not refreshing while the shared state is "
                                          "unreachable (other nodes may refresh the same login)") from None
                log.warning("credential %s: refreshing without the cluster's lock: Redis is unreachable and this "
                            "node is the only one that holds the credential file", self.tag)
            yield

    def _declare_intent(self, refresh_token: str) -> None:
        """Refuse to send a refresh token another node may have spent already (its answer lost) while the
        current access token still works; otherwise say we are about to send it."""
        assert self.shared is not None
        try:
            found = self.shared.intent()
            if found is not None and found.get("sha256") == digest(refresh_token) and \
                    found.get("node") != self.shared.state.node and self._remaining_ms() > 60_000:
                raise self._fail(502, f"credential {self.tag}: another node sent this refresh token and its answer "
                                      "was lost; it is not sent again while the current access token still works")
            self.shared.intend(refresh_token)
        except Unavailable:
            pass  # a sole holder refreshing without Redis
