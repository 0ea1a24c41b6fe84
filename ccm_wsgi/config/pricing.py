"""`pricing` on a service: USD per million tokens for models whose name a regular expression matches.

Entries are tried before the built-in price table. Cache prices default to Anthropic's published
ratios of the input price (read 0.1x, 5-minute write 1.25x, 1-hour write 2x).
"""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import Field

from .base import REQUIRED, Section, fail
from .values import name, number, plain


def regex(value: object) -> str:
    pattern = name(value)
    try:
        re.compile(pattern)
    except (re.error, RecursionError, OverflowError, ValueError) as exc:
        fail(f"invalid regular expression: {exc}")
    return pattern


def _times_input(ratio: float) -> Any:
    return Field(default_factory=lambda data: round(data.get("input", 0.0) * ratio, 12),
                 description=f"default: {ratio:g} x input")


PerMillion = Annotated[float, number()]
RequiredPrice = Annotated[float, number(), REQUIRED]
Pattern = Annotated[str, plain(regex), REQUIRED]


class Rates(Section):
    """USD per million tokens."""

    input: RequiredPrice = Field(default=0.0, description="input tokens")
    output: RequiredPrice = Field(default=0.0, description="output tokens")
    cache_read: PerMillion = _times_input(0.1)
    cache_write_5m: PerMillion = _times_input(1.25)
    cache_write_1h: PerMillion = _times_input(2.0)


class Price(Rates):
    """The prices of the models whose name `model` matches (`re.search`)."""

    model: Pattern = Field(default="", description="a regular expression over model names")
    premium: Rates | None = Field(default=None, description="the prices for a context window of 1M tokens or more")
