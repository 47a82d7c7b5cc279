"""The prefill planner's bookkeeping of lineages of covers, and whether first look-aheads pay.

A *lineage* is the covers of a beam that share one token context (and the extensions the
planner computed for them): :class:`Lineage` holds how many uncached extensions it met in a row
and its last look-ahead path. A *new branch* is a lineage at its first uncached extension (or a
context a stall walk found missing); :class:`FirstAheads` measures, as a prefill goes, whether
new branches go on along the text's encoding often enough for a first look-ahead to pay (see
:class:`~genlm_bytes.byte_lm.speculate.PrefillPlanner`).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple


class Lineage(NamedTuple):
    """The planner's bookkeeping of one lineage of covers (those sharing a token context)."""

    miss: int  # uncached extensions in a row
    ahead: int  # its last look-ahead's length
    end: int  # the context length where that look-ahead ends
    branch: int = -1  # the new branch whose first look-ahead it measures (see FirstAheads)


NEW_LINEAGE = Lineage(0, 0, 0)  # a lineage the planner has not met


class FirstAheads:
    """Whether a new branch's first look-ahead pays, measured as a prefill goes: the share of
    the last ``WINDOW`` new branches whose next token was the first of the text's encoding from
    where they started (the first token of their look-ahead, had they one), against ``least``.
    A branch pruned before its next token counts as a miss. A look-ahead of a few tokens costs
    those tokens; a pass costs about what 16 do, and a branch with no look-ahead that goes on
    costs one when it gets there: where most new branches die within a token (identifiers on a
    tokenizer that splits them many ways: Gemma 3 on hex ids, 4-token look-aheads mostly unread),
    they wait for their second miss. Measured whether or not look-aheads are given, so a text
    that changes kind turns them back on."""

    WINDOW = 32
    MIN = 16  # new branches measured before any goes without a first look-ahead
    PENDING = 4 * WINDOW  # branches awaiting their outcome kept at most (the oldest go)

    def __init__(self, least: float):
        self.least = least
        self.tokens: dict[int, int] = {}  # branch -> its encoding's first token
        self.outcomes: deque[bool] = deque(maxlen=self.WINDOW)
        self.n = 0
        self._seen: dict[int, bool] = {}  # branch -> went on along the encoding, this step

    def start(self, token: int) -> int:
        """A new branch where the encoding's next token is ``token``: its number."""
        self.n += 1
        self.tokens[self.n] = token
        if len(self.tokens) > self.PENDING:
            del self.tokens[next(iter(self.tokens))]
        return self.n

    def token(self, branch: int) -> int:
        return self.tokens.get(branch, -1)

    def went_on(self, branch: int, token: int) -> None:
        """A cover of ``branch`` (-1: none) ends ``token`` here: an outcome when the step settles."""
        if branch >= 0:
            self._seen[branch] = self._seen.get(branch, False) or token == self.token(branch)

    def settle(self) -> None:
        """The outcomes of the branches that went on this step (hits: along the encoding)."""
        for branch, hit in self._seen.items():
            self.resolve(branch, hit)
        self._seen.clear()

    def died(self, branches) -> None:
        """Misses: ``branches`` (-1: none) left the beam before their next token."""
        for branch in branches:
            self.resolve(branch, False)

    def resolve(self, branch: int, hit: bool) -> None:
        if self.tokens.pop(branch, None) is not None:
            self.outcomes.append(hit)

    def worth(self) -> bool:
        """Whether new branches get a first look-ahead now."""
        n = len(self.outcomes)
        return n < self.MIN or sum(self.outcomes) >= self.least * n
