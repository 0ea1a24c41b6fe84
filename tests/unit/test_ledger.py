"""The usage ledger and totals: a copy (the view with this host's records on top of the shared stream's) is
independent, and records added in batches of any size come out as added one by one (`Ledger.add`)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from ccm_wsgi.accounting.ledger import GROUPED_FROM, Ledger
from ccm_wsgi.accounting.pricing import Pricing
from ccm_wsgi.accounting.records import Record, Totals, render
from ccm_wsgi.accounting.tokens import Tokens

NOW = 1_790_000_000.0
NOW_NS = int(NOW * 1e9)
PRICING = Pricing()


def record(user: str, cost: float, readings: tuple[float, ...] = (), model: str = "claude-sonnet-4-5",
           tokens: Tokens | None = None) -> Record:
    return Record(user, model, 200_000, 0, 1, tokens or Tokens(input_tokens=10, output_tokens=5), cost, readings)


def test_a_copy_counts_on_without_changing_the_original() -> None:
    ledger = Ledger()
    ledger.add_all([(record("alice", 1.0, (10.0, NOW + 3600, 8.0)), NOW_NS)], PRICING)
    copy = ledger.copy()
    copy.add_all([(record("alice", 2.0, (12.0, NOW + 3600, 0.0)), NOW_NS), (record("bob", 4.0), NOW_NS)], PRICING)
    assert ledger.spent("alice", [0]) == [1.0] and ledger.spent("bob", [0]) == [0.0]
    assert ledger.shares("alice", NOW) == (2.0, 0.0)
    assert ledger.since("alice", 0).requests == 1 and ledger.since("bob", 0).requests == 0
    assert copy.spent("alice", [0]) == [3.0] and copy.spent("bob", [0]) == [4.0]
    assert copy.shares("alice", NOW) == (4.0, 0.0)
    assert copy.since("alice", 0).input == 20 and copy.since("bob", 0).output == 5
    assert ledger.to_json(NOW) != copy.to_json(NOW)


_counts = st.integers(min_value=0, max_value=10**6)
_records = st.builds(
    lambda user, model, day, cost, rise, five_m, one_h, counts: (
        record(user, cost, (10.0 + rise, NOW + 3600, 10.0) if rise else (), model,
               Tokens(*counts, five_m + one_h, five_m, one_h)),
        NOW_NS + day * 86_400 * 10**9 + 1),
    st.sampled_from(["", "alice", "bob"]),
    st.sampled_from(["claude-sonnet-4-5", "claude-opus-4-1", "claude-haiku-4-5"]),
    st.integers(min_value=-2, max_value=2),
    st.one_of(st.just(0.0), st.floats(min_value=0.0, max_value=50.0)),
    st.integers(min_value=0, max_value=5),
    _counts, _counts, st.tuples(_counts, _counts, _counts),
)


@settings(max_examples=200, deadline=None)
# batches below GROUPED_FROM records are added one by one, larger ones grouped by user and day: both kinds
@given(st.lists(_records, max_size=100), st.lists(st.integers(min_value=1, max_value=2 * GROUPED_FROM), max_size=8))
def test_records_in_batches_add_up_as_one_by_one(entries: list[tuple[Record, int]], sizes: list[int]) -> None:
    one_by_one, batched = (Totals(0), Ledger()), (Totals(0), Ledger())
    for entry in entries:
        one_by_one[0].add_all([entry])
        one_by_one[1].add(*entry, PRICING)  # a record read back alone
    at = 0
    for size in [*sizes, len(entries)]:
        batch = entries[at:at + size]
        batched[0].add_all(batch)
        batched[1].add_all(batch, PRICING)
        at += size
    assert render(batched[0], PRICING) == render(one_by_one[0], PRICING)  # bucket and user order too
    assert batched[1].to_json(NOW) == one_by_one[1].to_json(NOW)  # spend to the last bit, counts, windows
