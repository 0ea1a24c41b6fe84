"""Header objects (`headers` on a service and on an http outbound): name -> one value or a list of values.

Names must be valid HTTP tokens, given once whatever their case; values must not break a header line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Annotated

from pydantic import PlainValidator

from .base import REF, Problem, fail, problem_error
from .jsonc import duplicate_keys
from .values import plain

_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def headers(forbidden: Mapping[str, str]) -> PlainValidator:
    """An object of header name -> string or list of strings; `forbidden` names (lower case) -> why not."""

    def check(value: object) -> dict[str, tuple[str, ...]]:
        if not isinstance(value, Mapping) or not all(isinstance(key, str) for key in value):
            fail("must be an object")
        problems = [Problem((key,), "duplicate key") for key in sorted(duplicate_keys(value))]
        result: dict[str, tuple[str, ...]] = {}
        first: dict[str, str] = {}
        for key, values in value.items():
            lowered = key.lower()
            if not _TOKEN_CHARS.fullmatch(key):
                problems.append(Problem((key,), "not a valid header name"))
            elif lowered in forbidden:
                problems.append(Problem((key,), f"cannot be configured: {forbidden[lowered]}"))
            elif lowered in first:
                problems.append(Problem((key,), f"duplicate header (same as {REF})", ((first[lowered],),)))
            else:
                first[lowered] = key
                found = _header_values(key, values)
                if isinstance(found, tuple):
                    result[key] = found
                else:
                    problems += found
        if problems:
            raise problem_error(problems)
        return result

    return plain(check)


def _header_values(key: str, value: object) -> tuple[str, ...] | list[Problem]:
    if isinstance(value, (list, tuple)):
        bad = [Problem((key, i), "must be a string") for i, item in enumerate(value) if not isinstance(item, str)]
        if bad:
            return bad
    elif not isinstance(value, str):
        return [Problem((key,), "must be a string or a list of strings")]
    values = (value,) if isinstance(value, str) else tuple(value)
    if not values:
        return [Problem((key,), "must have at least one value")]
    if any(c in v for v in values for c in "\r\n\0"):
        return [Problem((key,), "header values must not contain CR, LF or NUL")]
    return values


Headers = Annotated[dict[str, tuple[str, ...]], headers({})]
