"""pytest plugin (tests/conftest.py loads it): gathers what tests/test_secrets.py checks at the end of the session.

procs.py already remembers the credentials it writes, the tokens in every config it starts a proxy with,
the tokens procs.request sends, every proxy's log file and the error bodies procs.request receives. This
plugin adds what the suite does around procs: the tokens given to the anthropic SDK and the error bodies
the SDK turned into exceptions, every token a fake upstream knew just before it stops (the ones its
refreshes issued included) and its log file. It also moves the final scan to the very end of the run.

`make test` runs the suite on two processes (pytest-xdist), then the final scan alone: with
`CCM_TEST_SCAN_DIR` set, every pytest process leaves what it gathered there when its session ends
(`Gathered`), and the scan reads what every process of the run left, besides its own.
"""

from __future__ import annotations

import base64
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.support import procs
from tests.support.fake_upstream import FakeUpstream

FINAL_SCAN = "test_secrets.py::test_no_secret_in_any_log_or_error_body"
SCAN_DIR_ENV = "CCM_TEST_SCAN_DIR"  # where each pytest process of a run leaves what it gathered
ANCHOR = procs.MIN_SECRET
# Token shapes: a string like these in a log is a leak even if no test registered it.
SHAPES = re.compile(r"sk-ant-(?:oat|ort|api|acct)\d\d-[A-Za-z0-9_-]{12,}|ak-ccm-[A-Za-z0-9_-]{12,}")


def mask(secret: str) -> str:
    return f"{secret[:7]}...({len(secret)} chars)"


def find_leaks(secrets: Iterable[str], texts: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """(where, masked secret) for every secret found in a text; linear in the text, whatever the number of secrets."""
    by_anchor: dict[str, list[str]] = {}
    for secret in secrets:
        if len(secret) >= ANCHOR:
            by_anchor.setdefault(secret[:ANCHOR], []).append(secret)
    hits: list[tuple[str, str]] = []
    for where, text in texts:
        found: set[str] = set()
        for run in re.finditer(rf"\S{{{ANCHOR},}}", text):
            word, start = run.group(), run.start()
            for i in range(len(word) - ANCHOR + 1):
                for secret in by_anchor.get(word[i:i + ANCHOR], ()):
                    if text.startswith(secret, start + i):
                        found.add(secret)
        found.update(m.group() for m in SHAPES.finditer(text))
        hits.extend((where, mask(secret)) for secret in sorted(found))
    return hits


@dataclass
class Gathered:
    """What pytest processes gathered for the final scan: secrets, log files, error bodies, and their temporary
    directories (every log under them is scanned too)."""

    secrets: set[str] = field(default_factory=set)
    logs: set[Path] = field(default_factory=set)
    bodies: list[tuple[str, bytes]] = field(default_factory=list)
    roots: set[Path] = field(default_factory=set)
    processes: int = 0  # how many processes' gatherings, this one's included

    @classmethod
    def here(cls, basetemp: Path) -> Gathered:
        """What this process gathered so far."""
        return cls(set(procs.SECRETS), set(procs.LOG_FILES), list(procs.ERROR_BODIES), {basetemp}, 1)

    def save(self, directory: Path) -> None:
        document = {"secrets": sorted(self.secrets), "logs": sorted(map(str, self.logs)),
                    "roots": sorted(map(str, self.roots)),
                    "bodies": [[where, base64.b64encode(body).decode()] for where, body in self.bodies]}
        path = directory / f"{os.getpid()}.json"
        path.write_text(json.dumps(document))
        path.chmod(0o600)

    def add_saved(self, directory: Path) -> None:
        """Add what every other process of the run left in `directory`."""
        for path in sorted(directory.glob("*.json")):
            if path.stem == str(os.getpid()):
                continue
            document = json.loads(path.read_text())
            self.secrets.update(document["secrets"])
            self.logs.update(map(Path, document["logs"]))
            self.roots.update(map(Path, document["roots"]))
            self.bodies += [(where, base64.b64decode(body)) for where, body in document["bodies"]]
            self.processes += 1


def scan_dir() -> Path | None:
    value = os.environ.get(SCAN_DIR_ENV)
    return Path(value) if value else None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    last = [item for item in items if item.nodeid.endswith(FINAL_SCAN)]
    if last:
        items[:] = [item for item in items if item not in last] + last


def remember_fake(fake: FakeUpstream) -> None:
    """The tokens a running fake knows (given by tests or issued by its token endpoint), and its log."""
    if fake.log_path is not None:
        procs.LOG_FILES.add(fake.log_path)
    if fake.proc is None or fake.proc.poll() is not None:
        return  # a fake that already exited (a test stopped it) has nothing left to tell
    # no suppression here: should the fake not answer, the scan would quietly cover less; fail loudly instead
    for account in fake.call("GET", "/_fake/accounts", timeout=10):
        procs.remember_secrets(*(t["token"] for t in account["access_tokens"] + account["refresh_tokens"]))
    for entry in fake.call("GET", "/_fake/stats", timeout=10)["token_requests"]:
        procs.remember_secrets(entry.get("refresh_token") or "")


@pytest.fixture(scope="session", autouse=True)
def secrets_guard(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    import anthropic

    original_init = anthropic.Anthropic.__init__
    original_status_error = anthropic.Anthropic._make_status_error
    original_stop = FakeUpstream.stop

    def init(self: Any, *args: Any, **kwargs: Any) -> None:
        procs.remember_secrets(kwargs.get("api_key") or "", kwargs.get("auth_token") or "")
        original_init(self, *args, **kwargs)

    def status_error(self: Any, err_msg: str, *, body: object, response: Any) -> Any:
        where = f"anthropic SDK {response.request.method} {response.request.url}"
        procs.ERROR_BODIES.append((where, (err_msg + json.dumps(body, default=str)).encode()))
        return original_status_error(self, err_msg, body=body, response=response)

    def stop(self: FakeUpstream, *args: Any, **kwargs: Any) -> Any:
        remember_fake(self)
        return original_stop(self, *args, **kwargs)

    anthropic.Anthropic.__init__ = init  # type: ignore[method-assign]
    anthropic.Anthropic._make_status_error = status_error  # type: ignore[method-assign]
    FakeUpstream.stop = stop  # type: ignore[method-assign]
    try:
        yield
    finally:
        anthropic.Anthropic.__init__ = original_init  # type: ignore[method-assign]
        anthropic.Anthropic._make_status_error = original_status_error  # type: ignore[method-assign]
        FakeUpstream.stop = original_stop  # type: ignore[method-assign]
        directory = scan_dir()
        if directory is not None:
            Gathered.here(tmp_path_factory.getbasetemp()).save(directory)
