"""JSON on the path of every request (the request's facts, the response's usage, the journal line): orjson, which
is several times faster than the standard library, and the standard library for what orjson refuses (NaN, lone
surrogates, and writing an integer beyond 64 bits). One reader for all of them also keeps its code in the CPU's
caches: the usage path's reads cost less when the request's own read ran the same code. orjson reads an integer
beyond 64 bits as a float: the usage path counts integers only, below 2**63, so such a number is not counted
either way."""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """The value of the JSON document `data`; raises ValueError (or RecursionError) as `json.loads` does."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON of finite numbers, strings, lists and dicts, as `json.dumps(value, separators=(",",
    ":"), ensure_ascii=False)` writes it (by the standard library where orjson refuses: 64-bit overflow)."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()
