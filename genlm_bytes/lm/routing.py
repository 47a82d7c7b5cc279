"""PrefixRouter: which model replica serves a context, so that replicas' caches stay warm.

A replica that computed a context holds its keys/values (and its log-probs), so a request
extending that context costs it only the new tokens, where another replica would run the
whole context again. The router therefore remembers which replica each served context went
to (a bounded map from a hash of the context to the replica) and sends a request to the
replica that served its longest prefix: a beam's covers and an SMC particle's steps stay on
one replica. A context with no served prefix goes to the least loaded replica, and so does
one whose replica is busier than the least loaded by more than ``slack`` requests in flight
(recomputing a short prefix elsewhere is cheaper than queueing behind a full batch).

Prefix hashes are chained (``h_i = hash((h_{i-1}, t_i))``), so all prefixes of a context of
``n`` tokens are hashed in ``O(n)``. A collision only sends a request to a replica that lacks
its prefix (slower, never wrong: every replica computes the same answer).

Not handled: a replica's own evictions (the router believes a prefix is still cached there
until the map forgets it), and sharing: a prefix two replicas both hold is remembered for the
replica that served it last.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

ROUTE_ENTRIES = 1 << 16  # contexts remembered (LRU); ~100 bytes each, and more than the replicas' caches hold
ROUTE_SLACK = 4  # requests in flight a replica may have beyond the least loaded before a context moves


def prefix_hashes(ids: Sequence[int]) -> list[int]:
    """Chained hashes of every non-empty prefix of ``ids``: ``out[i]`` stands for ``ids[:i + 1]``.

    >>> a, b = prefix_hashes([5, 7]), prefix_hashes([5, 8])
    >>> a[0] == b[0], a[1] == b[1]
    (True, False)
    """
    out, h = [], 0
    for t in ids:
        h = hash((h, t))
        out.append(h)
    return out


class PrefixRouter:
    """Chooses a replica for each context (see the module docstring).

    Args:
        n_replicas: how many replicas there are (numbered ``0..n_replicas-1``).
        max_entries: served contexts remembered (least recently used forgotten first).
        slack: requests in flight a prefix's replica may have beyond the least loaded one.

    Attributes:
        n_routed, n_affine: requests routed, and those sent to a replica that served a prefix.
        tokens_routed, tokens_affine: their tokens, and the tokens of those prefixes (the share
            of context a replica already held, as far as the router knows).
    """

    def __init__(self, n_replicas: int, *, max_entries: int = ROUTE_ENTRIES, slack: int = ROUTE_SLACK):
        if isinstance(n_replicas, bool) or not isinstance(n_replicas, int) or n_replicas < 1:
            raise ValueError(f"n_replicas must be a positive int, got {n_replicas!r}")
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        if isinstance(slack, bool) or not isinstance(slack, int) or slack < 0:
            raise ValueError(f"slack must be a non-negative int, got {slack!r}")
        self.n_replicas = n_replicas
        self.max_entries = max_entries
        self.slack = slack
        self._served: OrderedDict[int, int] = OrderedDict()  # context hash -> replica
        self._turn = 0  # where ties between equally loaded replicas start (round robin)
        self.n_routed = self.n_affine = self.tokens_routed = self.tokens_affine = 0

    def choose(self, ids: Sequence[int], loads: Sequence[int], alive: Sequence[bool]) -> int:
        """The replica for context ``ids`` given each replica's requests in flight (``loads``)
        and which are ``alive``; remembers the choice.

        Raises:
            RuntimeError: no replica is alive.
        """
        candidates = [r for r in range(self.n_replicas) if alive[r]]
        if not candidates:
            raise RuntimeError("no replica is alive")
        hashes = prefix_hashes(ids)
        least = min(candidates, key=lambda r: (loads[r], (r - self._turn) % self.n_replicas))
        chosen, matched = least, 0
        for n in range(len(hashes), 0, -1):
            r = self._served.get(hashes[n - 1])
            if r is not None and alive[r]:
                if loads[r] <= loads[least] + self.slack:
                    chosen, matched = r, n
                break
        if matched == 0:
            self._turn = (least + 1) % self.n_replicas
        self.n_routed += 1
        self.tokens_routed += len(hashes)
        if matched:
            self.n_affine += 1
            self.tokens_affine += matched
        if hashes:
            self._served[hashes[-1]] = chosen
            self._served.move_to_end(hashes[-1])
            if len(self._served) > self.max_entries:
                self._served.popitem(last=False)
        return chosen

    def __len__(self) -> int:
        return len(self._served)

    def hit_rates(self) -> dict[str, float]:
        """``requests``: share of requests sent where a prefix was served; ``tokens``: share of
        their tokens that prefix covered (0.0 before any request)."""
        return {"requests": self.n_affine / max(1, self.n_routed),
                "tokens": self.tokens_affine / max(1, self.tokens_routed)}
