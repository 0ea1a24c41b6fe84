"""Files shared by processes: advisory locks that never block the gevent hub, and atomic writes.

Both the credential file (token refresh) and the usage file (journal fold) are written by several
processes at once (gunicorn workers, a second `ccm-wsgi`, a local `claude`); these are the primitives
both use: an `flock` polled without blocking, and a write that a reader sees whole or not at all.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
import time
from collections.abc import Iterator

import gevent


class LockTimeout(TimeoutError):
    """The lock was held by someone else for longer than we were willing to wait."""


def acquire(fd: int, mode: int, timeout: float) -> bool:
    """flock without blocking the gevent hub: non-blocking attempts with short sleeps in between."""
    deadline = time.monotonic() + timeout
    delay = 0.0005
    while True:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            pass
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
        if time.monotonic() >= deadline:
            return False
        gevent.sleep(delay)
        delay = min(delay * 2, 0.05)


@contextlib.contextmanager
def locked(
    lock_path: str, mode: int, timeout: float, create: bool = True, mode_if_created: int = 0o644
) -> Iterator[int | None]:
    """Hold `mode` on a fresh descriptor of the lock file, yielded (None: a read-only user found no lock file,
    and skips it)."""
    try:
        fd = os.open(lock_path, (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | os.O_CLOEXEC, mode_if_created)
    except FileNotFoundError:
        if create:
            raise
        yield None  # nobody has ever written here with this program: there is no one to exclude
        return
    try:
        if not acquire(fd, mode, timeout):
            raise LockTimeout(f"timed out after {timeout:g}s waiting for the lock {lock_path}")
        yield fd
    finally:
        close(fd)


def identity(path: str) -> tuple[int, int] | None:
    """(inode, device) of the file `path` names now, None when it names nothing."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return None
    return st.st_ino, st.st_dev


def close(fd: int) -> None:
    with contextlib.suppress(OSError):
        os.close(fd)


def fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems cannot sync a directory; the rename is still atomic
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def write_tmp(path: str, data: bytes, mode: int) -> str:
    """A fully written, fsynced temp file beside `path`, with a name no other writer uses."""
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
        write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink(tmp)
        raise
    os.close(fd)
    return tmp


def replace_atomically(path: str, data: bytes, mode: int) -> None:
    tmp = write_tmp(path, data, mode)
    try:
        os.replace(tmp, path)
    except BaseException:
        unlink(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")


class Reservation:
    """Disk space set aside beside `path` for a later atomic replace that must not fail for lack of space.

    The credential refresh spends a refresh token that cannot be spent again; reserving the space of the
    new file before spending it turns "disk full" into "do not refresh" instead of "refreshed, then could
    not save". The replacement keeps the owner, group and mode of the file it replaces (a refresh run as
    root must not take a user's login away from them; `keep_mode=False` sets `mode` instead) and writes
    through a symlink to its target.
    """

    def __init__(self, path: str, size: int, mode: int, keep_mode: bool = True):
        self.target = os.path.realpath(path)
        self.mode = mode
        self.owner: tuple[int, int] | None = None
        try:
            st = os.stat(self.target)
        except FileNotFoundError:
            pass
        else:
            self.owner = (st.st_uid, st.st_gid)
            if keep_mode:
                self.mode = st.st_mode & 0o7777
        self.tmp = f"{self.target}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
        self.fd: int | None = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.posix_fallocate(self.fd, 0, size)
        except BaseException:
            self.abandon()
            raise

    def commit(self, data: bytes) -> None:
        """Write `data` into the reserved file and rename it over the target; the reservation is used up."""
        fd = self.fd
        if fd is None:
            raise OSError(errno.EBADF, "reservation already used")
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            write_all(fd, data)
            os.ftruncate(fd, len(data))
            if self.owner is not None and (os.geteuid() == 0 or self.owner[0] == os.geteuid()):
                os.fchown(fd, *self.owner)
            os.fchmod(fd, self.mode)
            os.fsync(fd)
            os.replace(self.tmp, self.target)
        except BaseException:
            self.abandon()
            raise
        self.fd = None
        close(fd)
        fsync_dir(os.path.dirname(self.target) or ".")

    def abandon(self) -> None:
        fd, self.fd = self.fd, None
        if fd is not None:
            close(fd)
            unlink(self.tmp)


def runtime_dir() -> str:
    """A private directory in memory (tmpfs) for state that must outlive a failed disk write: the
    user's `$XDG_RUNTIME_DIR`, else `/dev/shm/ccm-wsgi-<uid>`; created with mode 0700."""
    base = os.environ.get("XDG_RUNTIME_DIR")
    if base and os.path.isdir(base) and os.access(base, os.W_OK):
        directory = os.path.join(base, "ccm-wsgi")
    else:
        directory = os.path.join("/dev/shm" if os.path.isdir("/dev/shm") else "/tmp", f"ccm-wsgi-{os.getuid()}")
    with contextlib.suppress(FileExistsError):
        os.mkdir(directory, 0o700)
    st = os.lstat(directory)
    if st.st_uid != os.getuid() or st.st_mode & 0o077:
        raise OSError(errno.EPERM, f"{directory} is not a private directory of this user")
    return directory


def create_if_missing(path: str, data: bytes, mode: int) -> None:
    """Create `path` with `data` unless it exists (hard link: atomic, never replaces a file)."""
    tmp = write_tmp(path, data, mode)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        unlink(tmp)


def unwritable_directory(directory: str) -> str | None:
    """Why a new file cannot be created in `directory` (tried for real, so read-only mounts and root count
    right), None when it can."""
    probe = os.path.join(directory, f".ccm-wsgi-probe-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        return exc.strerror or str(exc)
    os.close(fd)
    unlink(probe)
    return None


def unlink(path: str) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)
