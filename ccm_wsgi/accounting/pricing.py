"""USD cost of a usage bucket: sing-box's price table plus the config's own prices.

sing-box's table ships as package data (`pricing.json`) so a price change is a data edit,
not a code change. Config `pricing` entries are tried before it, so they override or extend it.
Claude Code keeps moving to models newer than any table (claude-opus-5-5, ...): instead of
sing-box's blanket "Sonnet 4" fallback, a model whose name says opus/sonnet/haiku is priced at the
newest known price of that family, and each such guess is logged once per model so the operator
knows to add a config price. Anything else still falls back to Sonnet 4 standard, as sing-box does.

Arithmetic is exact (prices as integers over a power of ten, one correctly rounded division) and rounding
is Go's `math.Round(x*100)/100` on the decimal value (half away from zero), so `0.125` becomes `0.13` and
float noise never flips a cent.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
from dataclasses import dataclass, replace
from decimal import ROUND_HALF_UP, Decimal
from importlib import resources
from typing import TYPE_CHECKING, Any

from ..config import Price
from ..config import Rates as PriceRates
from .tokens import Tokens

if TYPE_CHECKING:
    from .records import Record

LONG_CONTEXT = 1_000_000
_CENT = Decimal("0.01")
_FAMILIES = ("opus", "sonnet", "haiku")
_RATE_KEYS = ("input", "output", "cache_read", "cache_write_5m", "cache_write_1h")
OTHER = "other"  # the metrics label of a model no price row names
_LABELS_KEPT = 1024  # model names whose label is remembered (clients choose the names: bounded)


@dataclass(frozen=True, slots=True)
class Rates:
    """USD per million tokens (input, output, cache read, 5-minute and 1-hour cache writes), each held as an
    integer over one common divisor: a cost is then integer arithmetic, exact, with one correctly rounded
    division at the end (the same float the exact decimal value rounds to, several times faster)."""

    scaled: tuple[int, int, int, int, int]
    divisor: int  # 10**decimals * 1_000_000


@dataclass(frozen=True, slots=True)
class Row:
    name: str
    regex: re.Pattern[str]
    standard: Rates
    premium: Rates | None  # for a context window of 1M or more
    label: str  # how metrics name the models it prices: the table's row name, or the config's pattern


@dataclass(frozen=True, slots=True)
class _Table:
    rows: tuple[Row, ...]
    fallback: Row
    families: dict[str, Row]


def _dec(value: Any) -> Decimal:
    if isinstance(value, bool) or not isinstance(value, int | float | str | Decimal):
        raise TypeError(f"price must be a number, not {value!r}")
    return Decimal(repr(value)) if isinstance(value, float) else Decimal(value)


def _rates(source: dict[str, Any] | PriceRates) -> Rates:
    """Rates from a pricing.json mapping or from the config's prices."""
    get = source.get if isinstance(source, dict) else functools.partial(getattr, source)
    values = [_dec(get(key)) for key in _RATE_KEYS]
    if not all(v.is_finite() for v in values):
        raise ValueError(f"prices must be finite numbers, not {values}")
    decimals = max(0, *(-int(v.as_tuple().exponent) for v in values))
    scale = 10**decimals
    input_, output, cache_read, write_5m, write_1h = (int(v * scale) for v in values)
    return Rates((input_, output, cache_read, write_5m, write_1h), scale * 1_000_000)


@functools.cache
def _table() -> _Table:
    doc = json.loads(resources.files(__package__).joinpath("pricing.json").read_text("utf-8"))
    rows = tuple(
        Row(m["name"], re.compile(m["pattern"]), _rates(m), _rates(m["premium"]) if m.get("premium") else None,
            m["name"])
        for m in doc["models"]
    )
    by_name = {row.name: row for row in rows}
    fallback = replace(by_name[doc["fallback"]], premium=None)  # sing-box: standard even for a 1M window
    return _Table(rows, fallback, {family: by_name[name] for family, name in doc["families"].items()})


def _override_row(price: Price, log: logging.Logger) -> Row:
    pattern = price.model
    try:
        regex = re.compile(pattern)
    except re.error as exc:
        log.error("pricing pattern %r is not a valid regular expression (%s); matching it literally", pattern, exc)
        regex = re.compile(re.escape(pattern))
    premium = price.premium
    return Row(f"config pattern {pattern!r}", regex, _rates(price), _rates(premium) if premium else None, pattern)


class Pricing:
    """Picks a price row for a model and computes the cost of a bucket (one cost function for all)."""

    def __init__(self, overrides: tuple[Price, ...] = (), log: logging.Logger | None = None) -> None:
        self.log = log or logging.getLogger(__name__)
        table = _table()
        self._rows = tuple(_override_row(p, self.log) for p in overrides) + table.rows
        self._fallback = table.fallback
        self._families = table.families
        self._memo: dict[str, Row] = {}
        self._rates: dict[tuple[str, int], Rates] = {}
        self._labels: dict[str, str] = {}

    def row(self, model: str) -> Row:
        """The first matching row: config prices, then the table, then a family guess or the fallback."""
        row = self._memo.get(model)
        if row is None:
            row = self._memo[model] = self._lookup(model)
        return row

    def _lookup(self, model: str) -> Row:
        for row in self._rows:
            if row.regex.search(model):
                return row
        lowered = model.lower()
        family = next((f for f in _FAMILIES if f in lowered), None)
        row = self._families[family] if family else self._fallback
        how = f"the newest {family} price ({row.name})" if family else f"{row.name} standard (sing-box's default)"
        self.log.warning("model %r is not in the price table; priced as %s", model, how)
        return row

    def label(self, model: str) -> str:
        """The price row that names `model` (its row name, or a config price's pattern), else "other": a metrics
        label from a set the table and the config fix, whatever model names clients send. Unlike `row`, a
        model no row names is neither logged nor remembered."""
        label = self._labels.get(model)
        if label is None:
            label = next((row.label for row in self._rows if row.regex.search(model)), OTHER)
            if len(self._labels) < _LABELS_KEPT:
                self._labels[model] = label
        return label

    def rates(self, model: str, context_window: int) -> Rates:
        """The rates of `model` at a context window (remembered with the row: asked for every response)."""
        row = self.row(model)
        found = row.premium if row.premium is not None and context_window >= LONG_CONTEXT else row.standard
        self._rates[(model, context_window)] = found
        return found

    def cost_of(self, rec: Record) -> float:
        """A usage record's unrounded USD (a record's cache writes are already their total)."""
        tokens = rec.tokens
        return self._cost(rec.model, rec.context_window, tokens, tokens.cache_creation_input_tokens)

    def cost(self, model: str, context_window: int, tokens: Tokens) -> float:
        """Unrounded USD. Cache writes without a 5m/1h split (older data) are priced at the 5m rate, also the
        part of a bucket's writes that mixes such data with split data."""
        return self._cost(model, context_window, tokens, tokens.cache_creation)

    def _cost(self, model: str, context_window: int, tokens: Tokens, cache_writes: int) -> float:
        r = self._rates.get((model, context_window)) or self.rates(model, context_window)
        c5m, c1h = tokens.cache_creation_5m_input_tokens, tokens.cache_creation_1h_input_tokens
        unsplit = max(0, cache_writes - c5m - c1h)
        input_, output, cache_read, write_5m, write_1h = r.scaled
        total = (tokens.input_tokens * input_ + tokens.output_tokens * output
                 + tokens.cache_read_input_tokens * cache_read + (c5m + unsplit) * write_5m + c1h * write_1h)
        return total / r.divisor


def round_cents(x: float) -> float:
    """Go's math.Round(x*100)/100 on the decimal value of x: half away from zero, no float drift."""
    if not math.isfinite(x):
        return x
    return float(Decimal(repr(x)).quantize(_CENT, rounding=ROUND_HALF_UP))


def sum_cents(values: list[float]) -> float:
    """A summary figure: the sum of already rounded costs, rounded again (as sing-box's file does)."""
    return round_cents(math.fsum(values))
