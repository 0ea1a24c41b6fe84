"""The top-level `log` object, as sing-box has it."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from ..names import LOG_LEVELS
from .base import Section, fail, quote
from .values import Bool, FilePath, plain, string


def log_level(value: object) -> str:
    text = string(value)
    level = {"warning": "warn"}.get(text.lower(), text.lower())
    if level not in LOG_LEVELS:
        fail(f"unknown level {quote(text)} (one of {', '.join(LOG_LEVELS)})")
    return level


class LogConfig(Section):
    level: Annotated[str, plain(log_level)] = Field(
        default="info", description="the least severe level written: trace, debug, info, warn, error, fatal or panic")
    disabled: Bool = Field(default=False, description="write nothing at all")
    output: FilePath = Field(default="", description="a file to append to instead of stderr")
    timestamp: Bool = Field(default=True, description="start each line with the time")
