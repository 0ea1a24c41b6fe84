"""What a test needs from the machine (a program, root's mount and chattr), and what happens when it is missing.

A test the README promises must not vanish quietly: when the machine cannot run it, it is skipped on a
developer's machine but fails under CI (`CI` set, as `.ci/run` is run), where `tests/install-system-deps.sh`
has installed every program and the runner is root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def unavailable(reason: str) -> NoReturn:
    """This machine cannot run the test: skip it, except under CI, where that is a failure."""
    if in_ci():
        pytest.fail(f"{reason} (under CI this is a failure, not a skip)")
    pytest.skip(reason)


def require(program: str, package: str) -> str:
    """The program's path; `unavailable` when it is missing (Debian package `package`)."""
    path = shutil.which(program) or next(
        (p for p in (f"/usr/sbin/{program}", f"/usr/bin/{program}") if os.access(p, os.X_OK)), None)
    if path:
        return path
    unavailable(f"{program} not installed (Debian package {package}; run `sh tests/install-system-deps.sh` as root)")


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small tmpfs at `path`: a disk that really fills up."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path)],
                          capture_output=True, text=True)
    if done.returncode:
        unavailable(f"cannot mount a tmpfs here (root with CAP_SYS_ADMIN needed): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` (a directory) as a read-only bind mount of itself: not writable, even for root."""
    done = subprocess.run(["mount", "--bind", str(path), str(path)], capture_output=True, text=True)
    if done.returncode:
        unavailable(f"cannot bind-mount here (root with CAP_SYS_ADMIN needed): {done.stderr.strip()}")
    try:
        done = subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], capture_output=True, text=True)
        if done.returncode:
            unavailable(f"cannot remount read-only here: {done.stderr.strip()}")
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[Path]:
    """`chattr +i`: no write, rename or unlink of `path`, even for root and through open descriptors."""
    chattr = require("chattr", "e2fsprogs")
    done = subprocess.run([chattr, "+i", str(path)], capture_output=True, text=True)
    if done.returncode:
        unavailable(f"chattr +i does not work here (root with CAP_LINUX_IMMUTABLE on a file system that has it "
                    f"needed): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run([chattr, "-i", str(path)], capture_output=True)
