"""The six token counters of a Messages response, declared once.

A response's usage (the SSE/JSON tap), a usage record and a bucket of the usage file all count the same
six numbers, under the names the usage file uses, and add them by one rule: cache writes are reported
either as one total or split into 5-minute and 1-hour writes, and the total is their sum when only the
split is known.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, fields


@dataclass(slots=True)
class Tokens:
    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_creation_5m_input_tokens: int = 0
    cache_creation_1h_input_tokens: int = 0

    @property
    def cache_creation(self) -> int:
        """Cache writes: the reported total, else the sum of the 5-minute and 1-hour writes."""
        return self.cache_creation_input_tokens or (self.cache_creation_5m_input_tokens +
                                                    self.cache_creation_1h_input_tokens)

    @property
    def any(self) -> bool:
        """Whether the response used anything worth recording (sing-box counts only these)."""
        return self.input_tokens > 0 or self.output_tokens > 0

    def add(self, other: Tokens, sign: int = 1) -> None:
        """Add (or with sign -1 subtract) `other`, counter by counter, its cache writes as their total."""
        if sign == 1:  # every record added to a bucket: no multiplications
            self.input_tokens += other.input_tokens
            self.output_tokens += other.output_tokens
            self.cache_read_input_tokens += other.cache_read_input_tokens
            self.cache_creation_input_tokens += other.cache_creation
            self.cache_creation_5m_input_tokens += other.cache_creation_5m_input_tokens
            self.cache_creation_1h_input_tokens += other.cache_creation_1h_input_tokens
            return
        self.input_tokens += sign * other.input_tokens
        self.output_tokens += sign * other.output_tokens
        self.cache_read_input_tokens += sign * other.cache_read_input_tokens
        self.cache_creation_input_tokens += sign * other.cache_creation
        self.cache_creation_5m_input_tokens += sign * other.cache_creation_5m_input_tokens
        self.cache_creation_1h_input_tokens += sign * other.cache_creation_1h_input_tokens

    def values(self) -> tuple[int, ...]:
        """The six counters in declaration order."""
        return _values(self)

    def is_zero(self) -> bool:
        return not any(self.values())


NAMES = tuple(f.name for f in fields(Tokens))
_values = operator.attrgetter(*NAMES)  # on the path of every record: one C call
