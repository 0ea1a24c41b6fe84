"""What a test needs from the machine (a program, root's mount and chattr), and what happens when it is missing.

A test the README promises must not vanish quietly: when the machine cannot run it, it is skipped on a
developer's machine but fails under CI (`CI` set, as `.ci/run` is run), where `tests/install-system-deps.sh`
has installed every program and the runner is root.
"""

from __future__ import annotations

import os
import shutil
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
