"""Token healing: when every cover of a pruned beam would die on the next byte.

A pruned beam can commit to a partial token that cannot continue (say the
beam holds only `` th`` in the middle of a token, and the next byte is one no
token starting with `` th...`` has). Healing backs off inside the partial
token of each cover, heaviest first: it ends a shorter token at an earlier
byte of the partial token (a token that ends exactly there), then replays the
rest of the partial token and the new byte from the new context. The first
back-off that survives gives the new covers.

Works on covers (:class:`LazyTrieState`) only; the replay is a small beam of
its own (``K`` and ``prune_threshold`` of the caller, no healing inside).

Limits (``BeamParams``): ``heal_max_backoff`` bounds how many bytes a split may
back off from the end of the partial token; ``heal_max_splits`` bounds how many
splits (a shorter token ended, the rest replayed) one heal tries. Healing runs
only when a step leaves no cover at all.

Approximate by nature: the healed covers were pruned away before, so their
weights are exact but the beam no longer sums over everything it dropped.
"""

from __future__ import annotations

import asyncio
import logging
import math

from genlm_bytes.byte_lm.trie_state import LazyTrieState, heaviest, log_total

logger = logging.getLogger(__name__)


async def heal(covers: list[LazyTrieState], sym: int, params) -> list[LazyTrieState]:
    """Covers of the bytes of ``covers`` followed by byte ``sym``, found by re-splitting partial
    tokens (none: healing failed, or a limit of ``params`` stopped it).

    Args:
        covers: the beam's covers, heaviest first.
        sym: the byte none of them can take.
        params: the beam's ``BeamParams`` (``K``, ``prune_threshold``, the ``heal_max_*`` limits).
    """
    max_backoff, max_splits = params.heal_max_backoff, params.heal_max_splits
    splits = 0
    for state in covers:
        if state.terminated or state.node == 0:
            continue
        trie = state.space.trie
        partial = trie.path(state.node)
        shortest = 1 if max_backoff is None else max(1, len(partial) - max_backoff)
        # Back off from the longest split to the shortest: ancestors of the node, deepest first.
        for j in range(len(partial) - 1, shortest - 1, -1):
            anc = trie.walk(partial[:j])
            at = LazyTrieState(state.lm_state, anc, state.ctx_weight, state.dist, text=state.text)
            for token, _ in sorted(at.end_tokens(), key=lambda tw: -tw[1]):
                if max_splits is not None and splits >= max_splits:
                    logger.debug("healing %r + %r stopped after %d splits", partial, bytes([sym]), splits)
                    return []
                splits += 1
                new = await at.extend(token)
                healed = await replay([new], partial[j:] + bytes([sym]), params.K, params.prune_threshold)
                if healed:
                    logger.debug("healed %r + %r by ending %r after %d bytes", partial, bytes([sym]),
                                 trie.path(anc), j)
                    return healed
    return []


async def replay(covers: list[LazyTrieState], data: bytes, K: int, threshold: float) -> list[LazyTrieState]:
    """The covers after reading ``data`` from ``covers``, pruned to ``K`` / ``threshold`` before
    each byte (the last step unpruned, as a beam step leaves it); [] if none survives."""
    for b in data:
        covers = heaviest(sorted(covers, key=lambda c: -c.weight), K, threshold)
        cont = [c for s in covers if (c := s.consume(b)) is not None]
        ws = [c.weight for c in cont]
        bar = log_total(ws) + math.log(threshold) if threshold > 0 and ws else -math.inf
        ranked = sorted(ws, reverse=True)
        bar = max(bar, ranked[K - 1] if len(ranked) >= K else -math.inf)  # would be pruned anyway
        ends = [(s, t) for s in covers for t, w in s.end_tokens() if w > -math.inf and w >= bar]
        for e in await asyncio.gather(*(s.extend(t) for s, t in ends)):
            if (c := e.consume(b)) is not None:
                cont.append(c)
        if not cont:
            return []
        covers = cont
    return covers
