"""Names that pass between stages and that no stage owns: split keys and the strategy of unrelated requests.

A split key groups the rows that must land on the same side of the train/held-out split (every phrasing of one
experience, every answer of one self-study chunk). It is written into each record's metadata as
``<kind>-<index>``; the split holds out a share of each kind separately.
"""

from __future__ import annotations

from dataclasses import dataclass

# the strategy of rows the teacher answered with no memory (evaluation leaves them out of the ICL gap)
GENERAL_STRATEGY = "general/bare"


@dataclass(frozen=True)
class SplitKey:
    """``kind``: entry (a replayed experience), recite, chunk (a self-study chunk) or general;
    ``index``: which one of that kind (a chunk's is its ``start-end``)."""

    kind: str
    index: str

    def __str__(self) -> str:
        return f"{self.kind}-{self.index}"

    @classmethod
    def parse(cls, text: str) -> SplitKey:
        kind, _, index = text.partition("-")
        return cls(kind, index)
