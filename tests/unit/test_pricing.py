"""Prices and rounding: sing-box's table and rounding rules, config overrides, new models."""

from __future__ import annotations

import logging

import pytest

from ccm_wsgi.accounting.pricing import Pricing, round_cents, sum_cents
from ccm_wsgi.accounting.tokens import Tokens
from ccm_wsgi.config import Price, Rates

M = 1_000_000


def usd(pricing: Pricing, model: str, window: int = 200_000, **tokens: int) -> float:
    t = {"in_": 0, "out": 0, "cache_read": 0, "cache_creation": 0, "c5m": 0, "c1h": 0, **tokens}
    counts = (t["in_"], t["out"], t["cache_read"], t["cache_creation"], t["c5m"], t["c1h"])
    return pricing.cost(model, window, Tokens(*counts))


def test_worked_example() -> None:
    cost = usd(
        Pricing(), "claude-sonnet-4-5-20250929", in_=1000, out=500, cache_read=20000, cache_creation=3000, c5m=3000
    )
    assert cost == pytest.approx(0.02775)
    assert round_cents(cost) == 0.03


@pytest.mark.parametrize(
    ("model", "input_price"),
    [
        ("claude-opus-4-6", 5),
        ("claude-opus-4-6-20260201", 5),  # row 1, not row 3
        ("claude-opus-4-5-20251101", 5),
        ("claude-opus-4-1-20250805", 15),
        ("claude-opus-4-20250514", 15),
        ("claude-3-opus-20240229", 15),
        ("claude-sonnet-4-6", 3),
        ("claude-sonnet-4-20250514", 3),
        ("claude-3-7-sonnet-latest", 3),
        ("claude-haiku-4-5-20251001", 1),
        ("claude-3-5-haiku-20241022", 0.8),
        ("claude-3-haiku-20240307", 0.25),
    ],
)
def test_table_rows(model: str, input_price: float, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert usd(Pricing(), model, in_=M) == input_price
    assert not caplog.records


def test_premium_for_1m_window_only_where_the_family_has_it() -> None:
    p = Pricing()
    assert usd(p, "claude-sonnet-4-5", 1_000_000, in_=M, out=M, cache_read=M, c5m=M, c1h=M, cache_creation=2 * M) == (
        6 + 22.5 + 0.6 + 7.5 + 12
    )
    assert usd(p, "claude-sonnet-4-5", 200_000, in_=M) == 3
    assert usd(p, "claude-opus-4-6", 1_000_000, in_=M, out=M, cache_read=M) == 10 + 37.5 + 1.0
    assert usd(p, "claude-opus-4-5", 1_000_000, in_=M) == 5  # no premium row: standard price


def test_unknown_model_is_sonnet_4_standard_even_at_1m(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        assert usd(Pricing(), "gpt-5", 1_000_000, in_=M) == 3
    assert "gpt-5" in caplog.text


def test_cache_writes_split_legacy_and_mixed() -> None:
    p = Pricing()
    assert usd(p, "claude-sonnet-4-5", c5m=M, c1h=M, cache_creation=2 * M) == 3.75 + 6
    assert usd(p, "claude-sonnet-4-5", cache_creation=M) == 3.75  # legacy: no split, 5m price
    # a bucket mixing legacy and split data: the unsplit remainder is still priced
    assert usd(p, "claude-sonnet-4-5", cache_creation=3 * M, c5m=M, c1h=M) == 3.75 * 2 + 6
    assert usd(p, "claude-sonnet-4-5", cache_creation=0, c5m=M) == 3.75  # never negative


@pytest.mark.parametrize(
    ("model", "family_input"), [("claude-opus-5-5", 5), ("claude-sonnet-5-5", 3), ("claude-haiku-5-5", 1)]
)
def test_new_models_priced_by_family_with_one_warning(
    model: str, family_input: float, caplog: pytest.LogCaptureFixture
) -> None:
    p = Pricing()
    with caplog.at_level(logging.WARNING):
        for _ in range(5):
            assert usd(p, model, in_=M) == family_input
            usd(p, model, 1_000_000, in_=M)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert model in warnings[0].getMessage() and "not in the price table" in warnings[0].getMessage()


def test_new_opus_uses_the_newest_opus_premium() -> None:
    assert usd(Pricing(), "claude-opus-5-5", 1_000_000, in_=M) == 10


def test_config_override_beats_table_and_prices_new_models(caplog: pytest.LogCaptureFixture) -> None:
    premium = Rates(input=20, output=80, cache_read=2, cache_write_5m=25, cache_write_1h=40)
    overrides = (
        Price(model=r"^claude-sonnet-4-5(-|$)", input=4, output=16, cache_read=0.4, cache_write_5m=5,
              cache_write_1h=8),
        Price(model=r"^claude-opus-5-5", input=6, output=30, cache_read=0.6, cache_write_5m=7.5, cache_write_1h=12,
              premium=premium),
    )
    p = Pricing(overrides)
    with caplog.at_level(logging.WARNING):
        assert usd(p, "claude-sonnet-4-5-20250929", in_=M) == 4
        assert usd(p, "claude-sonnet-4-5", 1_000_000, in_=M) == 4  # the override has no premium
        assert usd(p, "claude-opus-5-5", in_=M, out=M) == 36
        assert usd(p, "claude-opus-5-5-20270101", 1_000_000, in_=M) == 20
        assert usd(p, "claude-sonnet-4-6", in_=M) == 3  # untouched rows still apply
    assert not caplog.records


def test_invalid_override_pattern_is_matched_literally(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        p = Pricing((Price.model_construct(model="claude-(x", input=9, output=9, cache_read=9, cache_write_5m=9,
                                           cache_write_1h=9, premium=None),))  # the config would refuse it
    assert "claude-(x" in caplog.text
    assert usd(p, "claude-(x-1", in_=M) == 9


@pytest.mark.parametrize(
    ("value", "cents"),
    [
        (0.005, 0.01),
        (0.015, 0.02),
        (0.125, 0.13),
        (1.005, 1.01),  # 1.005 * 100 is 100.49999... in floats; the decimal value rounds up
        (2.675, 2.68),
        (0.115, 0.12),
        (0.0049999, 0.0),
        (0.775, 0.78),
        (-0.125, -0.13),
        (123456.785, 123456.79),
        (10.0, 10.0),
    ],
)
def test_round_half_away_from_zero(value: float, cents: float) -> None:
    assert round_cents(value) == cents


def test_rounding_of_exact_costs_and_sums() -> None:
    p = Pricing()
    assert round_cents(usd(p, "claude-sonnet-4-5", out=1000)) == 0.02  # 0.015
    assert round_cents(usd(p, "claude-haiku-4-5", in_=5000)) == 0.01  # 0.005
    assert round_cents(usd(p, "claude-opus-4-6", in_=25, out=100)) == 0.0  # 0.002625
    assert sum_cents([0.1, 0.2]) == 0.3
    assert sum_cents([0.01] * 1000) == 10.0


def test_newer_minor_versions_are_not_priced_as_the_4_0_rows():
    """`claude-opus-4-8` is newer than the table: the Opus 4/4.1 row ($15/$75) must not catch it."""
    pricing = Pricing()
    assert pricing.cost("claude-opus-4-8", 200_000, Tokens(1_000_000)) == 5.0
    assert pricing.cost("claude-opus-4-1-20250805", 200_000, Tokens(1_000_000)) == 15.0
    assert pricing.cost("claude-sonnet-4-20250514", 200_000, Tokens(1_000_000)) == 3.0
    assert pricing.cost("claude-haiku-4-9", 200_000, Tokens(1_000_000)) == 1.0


def test_metrics_labels_come_from_the_table_and_the_config_never_from_the_model_name() -> None:
    pricing = Pricing((Price(model="^my-model$", input=1, output=2, cache_read=0, cache_write_5m=0, cache_write_1h=0),))
    assert pricing.label("claude-sonnet-4-6") == pricing.label("claude-sonnet-4-6-20260101") == "Sonnet 4.6"
    assert pricing.label("claude-haiku-4-5") == "Haiku 4.5"
    assert pricing.label("my-model") == "^my-model$"
    for unknown in ("claude-opus-9", "", "x" * 10_000, "<script>"):
        assert pricing.label(unknown) == "other"
    for n in range(5000):  # what is remembered stays bounded, whatever clients send
        pricing.label(f"model-{n}")
    assert len(pricing._labels) <= 1024
