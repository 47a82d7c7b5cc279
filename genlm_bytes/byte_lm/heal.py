"""Token healing: when every cover of a pruned beam would die on the next byte.

A pruned beam can commit to a partial token that cannot continue (say the
beam holds only `` th`` in the middle of a token, and the next byte is one no
token starting with `` th...`` has). Healing backs off inside the partial
token of each cover, heaviest first: it ends a shorter token at an earlier
byte of the partial token (a token that ends exactly there), then replays the
rest of the partial token and the new byte from the new context. The first
back-off that survives gives the new covers.

Approximate by nature: the healed covers were pruned away before, so their
weights are exact but the beam no longer sums over everything it dropped.
"""

from __future__ import annotations

import logging

from genlm_bytes.byte_lm.trie_state import LazyTrieState

logger = logging.getLogger(__name__)


async def heal(beam, sym: int) -> list[LazyTrieState]:
    """Covers of ``beam``'s bytes followed by ``sym``, found by re-splitting partial tokens."""
    from genlm_bytes.byte_lm.beam import ByteBeamState

    params = beam.params
    no_heal = type(params)(K=params.K, prune_threshold=params.prune_threshold, eos_tokens=params.eos_tokens,
                           heal=False, max_context_length=params.max_context_length)
    trie = None
    for state in beam.states:
        if state.terminated or state.node == 0:
            continue
        trie = state.dist.space.trie
        partial = trie.path(state.node)
        # Back off from the longest split to the shortest: ancestors of the node, deepest first.
        for j in range(len(partial) - 1, 0, -1):
            anc = trie.walk(partial[:j])
            at = LazyTrieState(state.lm_state, anc, state.ctx_weight, state.dist, text=state.text)
            for token, _ in sorted(at.end_tokens(), key=lambda tw: -tw[1]):
                new = await at.extend(token)
                mini = ByteBeamState([new], no_heal)
                for b in partial[j:] + bytes([sym]):
                    mini = await (mini.prune() << b)
                    if not mini.states:
                        break
                if mini.states:
                    logger.debug("healed %r + %r by ending %r after %d bytes", partial, bytes([sym]),
                                 trie.path(anc), j)
                    return mini.states
    return []
