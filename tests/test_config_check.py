"""`ccm-wsgi check` as a subprocess: exit codes, one line per problem starting with its JSON path, no secret echoed.

The validation itself (every problem and its path) is tested without a process in tests/unit/test_config.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The server example of sing-box's docs/configuration/service/ccm.md, verbatim.
SINGBOX_DOCS_EXAMPLE = (ROOT / "tests" / "fixtures" / "singbox-docs-example.json").read_text()


def run_check(path: Path | str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ccm_wsgi", "check", "-c", str(path)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )





def test_check_ok(tmp_path: Path) -> None:
    path = tmp_path / "ok.json"
    path.write_text(SINGBOX_DOCS_EXAMPLE)
    result = run_check(path)
    assert (result.returncode, result.stdout) == (0, "ok\n")


def test_check_reports_every_problem_with_its_path(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({
        "outbounds": [{"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1080},
                      {"type": "socks", "tag": "proxy-a", "server": "127.0.0.1", "server_port": 1081}],
        "services": [{"type": "ccm", "listen_port": 70000, "detour": "nope", "foo": 1,
                      "users": [{"name": "alice", "token": "ak-ccm-secret-alice"},
                                {"name": "bob", "token": "ak-ccm-secret-alice"}]}],
    }))
    result = run_check(path)
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert sorted(lines) == sorted([
        'outbounds[1].tag: duplicate tag "proxy-a" (same as outbounds[0])',
        "services[0].foo: unknown key",
        "services[0].listen_port: must be an integer 0-65535",
        'services[0].detour: unknown outbound "nope"',
        "services[0].users[1].token: duplicate token (same as services[0].users[0])",
    ])
    assert "ak-ccm-secret-alice" not in result.stdout + result.stderr


def test_check_invalid_json_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "services": [\n    {"type": "ccm",}\n  ]\n}\n')
    result = run_check(path)
    assert result.returncode == 1
    assert result.stdout.startswith("$: invalid JSON: ")
    assert "(line 3, column 20)" in result.stdout


def test_check_missing_file(tmp_path: Path) -> None:
    result = run_check(tmp_path / "absent.json")
    assert result.returncode == 1
    assert result.stdout.startswith("$: cannot read config file ")
    assert "No such file or directory" in result.stdout
