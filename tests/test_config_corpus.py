"""`ccm-wsgi check` keeps its contract: every problem of the corpus (tests/config_corpus) is found at its JSON path.

Each case file holds a config (or a file's text) and the problems recorded when the case was written
(see tests/config_corpus/make_corpus.py). The paths must match exactly, one line per problem; the
messages may have improved since.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from ccm_wsgi.config import ConfigError, load, parse

ROOT = Path(__file__).resolve().parent.parent
CORPUS = Path(__file__).resolve().parent / "config_corpus"
CASES = sorted(CORPUS.glob("*.json"))
# `ccm-wsgi check` as a subprocess costs a second each: every valid case, every multi-problem case and a
# spread of the others
SAMPLE = [p for i, p in enumerate(CASES) if i % 12 == 0 or p.stem.startswith("ok-") or p.stem in (
    "check-every-problem", "relations-beside-type-errors", "json-syntax", "json-duplicate-key-nested")]


def read(path: Path) -> dict[str, Any]:
    case: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return case


def write_config(case: dict[str, Any], directory: Path) -> Path:
    path = directory / "config.json"
    text = case["config_text"] if "config_text" in case else json.dumps(case["config"])
    path.write_text(text, encoding="utf-8")
    return path


def found_problems(case: dict[str, Any], directory: Path) -> list[str]:
    try:
        if "config_text" in case:
            load(str(write_config(case, directory)))
        else:
            parse(copy.deepcopy(case["config"]))
    except ConfigError as exc:
        return exc.problems
    return []


def paths_of(lines: list[str], expected: list[str]) -> list[str]:
    """The path each line starts with, among the expected ones (the longest that fits); `?` + line if none."""
    result = []
    for line in lines:
        fits = [p for p in expected if line.startswith(p + ": ")]
        result.append(max(fits, key=len) if fits else "? " + line)
    return result


def expected_paths(case: dict[str, Any]) -> list[str]:
    return [path for path, _message in case["problems"]]


def test_corpus_is_there() -> None:
    cases = [read(p) for p in CASES]
    assert len(cases) >= 250
    assert sum(1 for c in cases if not c["problems"]) >= 5  # valid documents too
    assert len({p for c in cases for p in expected_paths(c)}) >= 200


@pytest.mark.parametrize("path", CASES, ids=lambda p: p.stem)
def test_problems_are_found_at_the_same_paths(path: Path, tmp_path: Path) -> None:
    case = read(path)
    expected = expected_paths(case)
    found = found_problems(case, tmp_path)
    assert Counter(paths_of(found, expected)) == Counter(expected), "\n".join(found)


@pytest.mark.parametrize("path", SAMPLE, ids=lambda p: p.stem)
def test_check_command(path: Path, tmp_path: Path) -> None:
    case = read(path)
    config_path = write_config(case, tmp_path)
    result = subprocess.run([sys.executable, "-m", "ccm_wsgi", "check", "-c", str(config_path)],
                            capture_output=True, text=True, timeout=60, cwd=ROOT)
    expected = expected_paths(case)
    if not expected:
        assert (result.returncode, result.stdout) == (0, "ok\n"), result.stdout + result.stderr
        return
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert Counter(paths_of(lines, expected)) == Counter(expected), result.stdout
