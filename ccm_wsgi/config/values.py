"""The value types of the config: each an `Annotated` type whose validator says what is wrong in one phrase.

Values are never coerced (no `true` for 1, no `"80"` for 80), as in sing-box's Go reader, and a
message never repeats the value when it may be a secret (tokens, passwords, URLs). sing-box's own
shapes are here too: Go durations ("1h30m"), string-or-list ("listable") fields, PEM as a list of lines.
"""

from __future__ import annotations

import datetime
import ipaddress
import math
import os
import re
import urllib.parse
from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, PlainValidator

from .base import Problem, fail, problem_error, quote


def plain(check: Callable[[Any], Any]) -> PlainValidator:
    return PlainValidator(check, json_schema_input_type=Any)


# --------------------------------------------------------------------------------------------------
# Scalars
# --------------------------------------------------------------------------------------------------


def string(value: object) -> str:
    if isinstance(value, str):
        return value
    fail("must be a string")


def name(value: object) -> str:
    """A non-empty string without control characters (tags, names, hosts)."""
    text = string(value)
    if not text.strip():
        fail("must not be empty")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
        fail("must not contain control characters")
    return text


_UNUSABLE_PATH = "not a usable file name (NUL or an unpaired surrogate)"


def _usable_path(text: str) -> bool:
    try:
        return b"\0" not in os.fsencode(text)
    except UnicodeError:
        return False


def file_path(value: object) -> str:
    text = string(value)
    if not _usable_path(text):
        fail(_UNUSABLE_PATH)
    return text


def boolean(value: object) -> bool:
    if isinstance(value, bool):
        return value
    fail("must be true or false")


def integer(low: int, high: int | None = None) -> PlainValidator:
    """An integer in [low, high] (not a boolean, not a float)."""
    bound = f"{low}-{high}" if high is not None else f">= {low}"

    def check(value: object) -> int:
        if isinstance(value, int) and not isinstance(value, bool) and low <= value and (high is None or value <= high):
            return value
        fail(f"must be an integer {bound}")

    return plain(check)


def number(low: float = 0.0, high: float | None = None, *, above: bool = False) -> PlainValidator:
    """A finite number >= low (> low if `above`), <= high if given."""
    if high is None:
        bound = f"{'>' if above else '>='} {low:g}"
    else:
        bound = f"> {low:g} and at most {high:g}" if above else f"{low:g}-{high:g}"

    def check(value: object) -> float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                result = float(value)
            except OverflowError:
                result = math.inf
            in_range = (result > low if above else result >= low) and (high is None or result <= high)
            if math.isfinite(result) and in_range:
                return result
        fail(f"must be a number {bound}")

    return plain(check)


def choice(*values: str, what: str = "") -> PlainValidator:
    """One of `values` (e.g. `"allow" or "deny"`)."""
    spelled = quote(values[-1])
    if len(values) > 1:
        spelled = ", ".join(quote(v) for v in values[:-1]) + " or " + spelled

    def check(value: object) -> str:
        text = string(value)
        if text in values:
            return text
        fail(f"unknown {what} {quote(text)} (must be {spelled})" if what else f"must be {spelled}")

    return plain(check)


Str = Annotated[str, plain(string)]
Name = Annotated[str, plain(name)]
FilePath = Annotated[str, plain(file_path)]
Bool = Annotated[bool, plain(boolean)]
Port = Annotated[int, integer(0, 65535)]


# --------------------------------------------------------------------------------------------------
# Durations (Go's syntax, as sing-box writes them)
# --------------------------------------------------------------------------------------------------

_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "\u00b5s": 1e-6, "\u03bcs": 1e-6, "ms": 1e-3,
    "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0,
}
_DURATION_PART = re.compile(r"([0-9]*(?:\.[0-9]*)?)([^0-9.]*)")
_MAX_DURATION = (2**63 - 1) / 1e9  # Go's time.Duration range, in seconds


def parse_duration(value: str) -> float:
    """A sing-box (Go) duration such as "300ms", "1.5h", "2h45m" or "1d", in seconds.

    Every number needs a unit (ns, us, µs, ms, s, m, h, d); only "0" may stand alone, as in Go.
    Raises ValueError.
    """
    if not isinstance(value, str):
        raise ValueError("a duration must be a string")
    text = value[1:] if value[:1] in ("+", "-") else value
    sign = -1.0 if value[:1] == "-" else 1.0
    if text == "0":
        return 0.0
    if not text:
        raise ValueError(f"invalid duration {value!r}")
    total, pos = 0.0, 0
    while pos < len(text):
        match = _DURATION_PART.match(text, pos)
        assert match is not None  # the pattern can match the empty string
        number_text, unit = match.groups()
        if number_text in ("", "."):
            raise ValueError(f"invalid duration {value!r}")
        if unit not in _DURATION_UNITS:
            what = "missing unit" if not unit else f"unknown unit {unit!r}"
            raise ValueError(f"{what} in duration {value!r}")
        total += float(number_text) * _DURATION_UNITS[unit]
        pos = match.end()
    if total > _MAX_DURATION:
        raise ValueError(f"duration {value!r} out of range")
    return sign * total


def duration(*, allow_zero: bool = False, zero_means: float | None = None) -> PlainValidator:
    """A duration in seconds, > 0 (or >= 0 with `allow_zero`); `zero_means` replaces 0 ("use the default")."""
    what = ">= 0" if allow_zero or zero_means is not None else "> 0"

    def check(value: object) -> float:
        try:
            seconds = parse_duration(value)  # type: ignore[arg-type]
        except ValueError:
            fail(f'must be a duration {what} such as "30s", "5m" or "1h30m" (a number needs a unit)')
        if seconds < 0 or (seconds == 0 and what == "> 0"):
            fail(f"must be a duration {what}")
        return zero_means if seconds == 0 and zero_means is not None else seconds

    return plain(check)


Duration = Annotated[float, duration()]
OptionalDuration = Annotated[float, duration(allow_zero=True)]


# --------------------------------------------------------------------------------------------------
# Strings or lists of strings
# --------------------------------------------------------------------------------------------------


def strings(value: object) -> tuple[str, ...]:
    """A string or a list of strings (sing-box's "listable"), as a tuple; a bad item is reported at its index.
    (A tuple is taken too: the model's own value, when an object is built in Python.)"""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, (list, tuple)):
        fail("must be a string or a list of strings")
    bad = [Problem((i,), "must be a string") for i, item in enumerate(value) if not isinstance(item, str)]
    if bad:
        raise problem_error(bad)
    return tuple(value)


def pem(value: object) -> str:
    """PEM text, given as one string or a list of lines; empty means not given."""
    text = "\n".join(strings(value))
    if text and "-----BEGIN " not in text:
        fail('must be PEM text (a "-----BEGIN ...-----" block)')
    return text


Strings = Annotated[tuple[str, ...], plain(strings)]
Pem = Annotated[str, plain(pem)]


def each(check: Callable[[str], str | None]) -> AfterValidator:
    """Check every string of a `Strings` value; `check` returns the problem, reported at the field."""

    def run(values: tuple[str, ...]) -> tuple[str, ...]:
        for value in values:
            problem = check(value)
            if problem:
                fail(problem)
        return values

    return AfterValidator(run)


# --------------------------------------------------------------------------------------------------
# Addresses, URLs, tokens, times
# --------------------------------------------------------------------------------------------------


def ip_address(value: object) -> str:
    text = string(value)
    try:
        ipaddress.ip_address(text)
    except ValueError:
        fail("must be an IP address (not a host name)")
    return text


def split_url(text: str) -> urllib.parse.SplitResult | None:
    """`text` split as a URL; None when it is none (a port that is not a number 0-65535 included)."""
    try:
        parts = urllib.parse.urlsplit(text)
        _ = parts.port  # raises ValueError for a port that is not a number 0-65535
    except ValueError:
        return None
    return parts


def url(*, base: bool = False) -> PlainValidator:
    """An absolute http(s) URL with a host, without query, fragment or user info; never quoted back (it may
    hold a secret). `base` drops trailing slashes (a prefix that paths are appended to)."""

    def check(value: object) -> str:
        text = string(value)
        parts = split_url(text)
        if parts is None or parts.scheme not in ("http", "https") or not parts.hostname:
            fail("must be an http:// or https:// URL with a host")
        if parts.query or parts.fragment or "?" in text or "#" in text:
            fail("must not have a query or fragment")
        if parts.username is not None or parts.password is not None:
            fail("must not contain user info")
        if any(c.isspace() or ord(c) < 0x20 for c in text):
            fail("must not contain whitespace or control characters")
        return text.rstrip("/") if base else text

    return plain(check)


IpAddress = Annotated[str, plain(ip_address)]
Url = Annotated[str, url()]
BaseUrl = Annotated[str, url(base=True)]

MIN_TOKEN_LENGTH = 8
# The placeholder the example configs carry; a token containing it was copied, not generated.
PLACEHOLDERS = ("change-me", "changeme")


def token(min_length: int = 1, *, placeholder: bool = False) -> PlainValidator:
    """A bearer token: printable ASCII without spaces. The value is never quoted back."""

    def check(value: object) -> str:
        text = string(value)
        if not text:
            fail("must not be empty")
        if len(text) < min_length:
            fail(f"must be at least {min_length} characters long")
        if not all("\x21" <= c <= "\x7e" for c in text):
            fail("must be printable ASCII without spaces")
        if placeholder and any(p in text.lower() for p in PLACEHOLDERS):
            fail("is the example's placeholder, not a secret: generate a token with `ccm-wsgi token`")
        return text

    return plain(check)


def sha256_hex(value: object) -> str:
    text = string(value)
    if re.fullmatch(r"[0-9A-Fa-f]{64}", text):
        return text.lower()
    fail("must be 64 hexadecimal characters (the SHA-256 of the token)")


Sha256Hex = Annotated[str, plain(sha256_hex)]
# what ccm-wsgi's own users and admins present: long enough, and never the example's placeholder
UserToken = Annotated[str, token(MIN_TOKEN_LENGTH, placeholder=True)]

_RFC3339 = re.compile(r"(\d{4}-\d{2}-\d{2})[Tt ](\d{2}:\d{2}:\d{2})(\.\d+)?([Zz]|[+-]\d{2}:\d{2})")


def rfc3339(value: object) -> datetime.datetime:
    """An RFC 3339 time with its zone ("2026-12-31T23:59:59Z", "...+02:00"), as an aware datetime."""
    if isinstance(value, datetime.datetime) and value.tzinfo is not None:
        return value
    text = string(value)
    match = _RFC3339.fullmatch(text)
    try:
        if match is None:
            raise ValueError(text)
        day, clock, fraction, zone = match.groups()
        zone = "+00:00" if zone in ("Z", "z") else zone
        return datetime.datetime.fromisoformat(f"{day}T{clock}{(fraction or '')[:7]}{zone}")
    except ValueError:
        fail('must be an RFC 3339 time with a zone, such as "2026-12-31T23:59:59Z"')


Rfc3339 = Annotated[datetime.datetime, plain(rfc3339)]


# --------------------------------------------------------------------------------------------------
# Switches sing-box has and ccm-wsgi cannot honour
# --------------------------------------------------------------------------------------------------


def switched_off(value: object) -> bool:
    """Whether an unsupported option is present but off: null, false, empty, or `{"enabled": false}`."""
    if value in (None, False, "", [], {}):
        return True
    return isinstance(value, dict) and value.get("enabled", True) is False


def unsupported(why: str) -> PlainValidator:
    """Accepted only when switched off (see `switched_off`), and then read as None; else "not supported by
    ccm-wsgi (why)"."""

    def check(value: object) -> None:
        if not switched_off(value):
            fail(f"not supported by ccm-wsgi ({why})")
        return None  # switched off: nothing to keep

    return plain(check)


Anything = Annotated[object, plain(lambda value: value)]  # sing-box keys read by nothing here



def file_paths(value: object) -> tuple[str, ...]:
    """One path or a list of paths (empty ones dropped); a bad item is reported at its index."""
    items = strings(value)
    bad = [Problem((i,) if isinstance(value, (list, tuple)) else (), _UNUSABLE_PATH)
           for i, item in enumerate(items) if not _usable_path(item)]
    if bad:
        raise problem_error(bad)
    return tuple(item for item in items if item)


FilePaths = Annotated[tuple[str, ...], plain(file_paths)]
