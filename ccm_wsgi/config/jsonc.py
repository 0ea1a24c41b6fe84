"""Decoding a config file as sing-box reads it: JSON with `//`, `#` and `/* */` comments.

Two things plain `json.loads` would hide are kept: a key given twice in one object (the decoded dict
remembers it, and the model reports it at that key) and the non-JSON constants `NaN`/`Infinity`
(refused). A decoding problem is reported at `$` with the line and column.
"""

from __future__ import annotations

import json
import re
from typing import Any


class DecodeError(ValueError):
    """The text is not JSON; the message says why and where."""


class JsonObject(dict[str, object]):
    """A decoded JSON object that remembers which keys appeared more than once."""

    duplicates: frozenset[str] = frozenset()


def duplicate_keys(value: object) -> frozenset[str]:
    """The keys given more than once in this decoded object (none for a dict built in Python)."""
    return value.duplicates if isinstance(value, JsonObject) else frozenset()


def object_pairs(pairs: list[tuple[str, Any]]) -> JsonObject:
    result = JsonObject(pairs)
    if len(result) != len(pairs):
        keys = [key for key, _ in pairs]
        result.duplicates = frozenset(key for key in result if keys.count(key) > 1)
    return result


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def strip_comments(text: str) -> str:
    """Blank out `//`, `#` and `/* */` comments outside strings, keeping line and column numbers."""
    out: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == '"':
            j = i + 1
            while j < n and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            out.append(text[i : j + 1])
            i = j + 1
        elif c == "#" or text.startswith("//", i):
            j = text.find("\n", i)
            j = n if j < 0 else j
            out.append(" " * (j - i))
            i = j
        elif text.startswith("/*", i):
            j = text.find("*/", i + 2)
            j = n if j < 0 else j + 2
            out.append(re.sub(r"[^\n]", " ", text[i:j]))
            i = j
        else:
            out.append(c)
            i += 1
    return "".join(out)


def decode(text: str) -> Any:
    """The document in `text`; raises DecodeError."""
    try:
        return json.loads(strip_comments(text), object_pairs_hook=object_pairs, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise DecodeError(f"invalid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except RecursionError:
        raise DecodeError("invalid JSON: nested too deeply") from None
    except ValueError as exc:
        raise DecodeError(f"invalid JSON: {exc}") from None
