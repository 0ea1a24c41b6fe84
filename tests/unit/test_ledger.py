"""The usage ledger: a copy (the view with this host's records on top of the shared stream's) is independent."""

from __future__ import annotations

from ccm_wsgi.accounting.ledger import Ledger
from ccm_wsgi.accounting.tokens import Tokens

NOW = 1_790_000_000.0
TEN_IN = Tokens(input_tokens=10, output_tokens=5)


def test_a_copy_counts_on_without_changing_the_original() -> None:
    ledger = Ledger()
    ledger.apply("alice", NOW, 1.0, (10.0, NOW + 3600, 8.0), TEN_IN)
    copy = ledger.copy()
    copy.apply("alice", NOW, 2.0, (12.0, NOW + 3600, 0.0), TEN_IN)
    copy.apply("bob", NOW, 4.0, (), TEN_IN)
    assert ledger.spent("alice", [0]) == [1.0] and ledger.spent("bob", [0]) == [0.0]
    assert ledger.used("alice", "five_hour", NOW) == 2.0
    assert ledger.since("alice", 0).requests == 1 and ledger.since("bob", 0).requests == 0
    assert copy.spent("alice", [0]) == [3.0] and copy.spent("bob", [0]) == [4.0]
    assert copy.used("alice", "five_hour", NOW) == 4.0
    assert copy.since("alice", 0).input == 20 and copy.since("bob", 0).output == 5
    assert ledger.to_json(NOW) != copy.to_json(NOW)
