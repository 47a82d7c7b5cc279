"""Which contexts a generation from the end of a known text asks for first.

A prefill's last pass runs anyway; the contexts a generation then asks for first can run in it,
one pass sooner, at a token's cost each. The beam at the text's end holds the cover that ends
the text's last token and covers still inside a longer token spelling it (a text ending " "
goes on inside ' "' or " the"), so both kinds of next token count, on one scale. A greedy
walk of the next bytes over both distributions (the byte whose tokens hold the most
probability, as the beam's next-byte distribution takes it) finds the tokens the beam ends
first: those on the walk's path that a beam keeps, and the one the walk stops at.
"""

from __future__ import annotations

import math

import torch

ON_PATH = 2  # tokens on the walk's path computed besides the one it stops at and the likeliest
MOST_BYTES = 32  # the walk's longest path (a token is rarely longer)


async def guesses_after(lm, space, full: tuple, k: int, log_thr: float) -> list[tuple[int, int]]:
    """``(i, t)``: the contexts ``full[:i] + (t,)`` a generation from the end of the text
    ``full`` (token ids, distributions cached) likely asks for first, not cached yet: the token
    a greedy byte walk (:func:`walk`) stops at and the likeliest tokens after ``full``, ``k``
    in all, and up to ``ON_PATH`` tokens the beam ends on the walk's way there. The walk goes
    over the tokens after ``full`` and, after ``full[:-1]``, those spelling ``full``'s last
    token and more (their probabilities divided by the last token's: one scale); never EOS (a
    generation writes no EOS bytes). ``space``: the beam's
    :class:`~genlm_bytes.byte_lm.trie_state.TrieSpace`; ``log_thr``: its log threshold."""
    if k < 1:
        return []
    trie, n = space.trie, len(full)
    logp = await lm.peek_next_token_logprobs(list(full))
    starts = [(n, 0, space.dist_for(logp), 1.0)]
    if n >= 2 and lm.has_logprobs(list(full[:-1])):
        node = trie.walk(lm.byte_vocab[full[-1]])
        prev = space.dist_for(await lm.peek_next_token_logprobs(list(full[:-1])))
        p_last = math.exp(float(prev.logp_numpy()[full[-1]]))
        if node > 0 and p_last > 0:
            starts.append((n - 1, node, prev, 1.0 / p_last))
    top = torch.topk(logp.float(), min(k + len(space.eos_ids), len(logp)))
    likeliest = [(n, t) for t, v in zip(top.indices.tolist(), top.values.tolist())
                 if t not in space.eos_set and v > -math.inf][:k]
    path = walk(space, starts, log_thr)
    guesses = list(dict.fromkeys(path[-1:] + likeliest))[:k]
    return [(i, t) for i, t in dict.fromkeys(guesses + path[:-1][:ON_PATH])
            if not lm.has_logprobs(list(full[:i]) + [t])]


def walk(space, starts: list[tuple], log_thr: float) -> list[tuple[int, int]]:
    """A greedy byte walk from ``starts`` ``(i, trie node, ContextDist, scale)`` (probabilities
    times ``scale``: one scale for all): take the next byte whose tokens below the nodes hold
    the most probability; stop at a token ending there that holds at least as much as that
    byte. Returns the ``(i, t)`` of the tokens ending on the way that hold at least
    ``exp(log_thr)`` of the probability at their nodes (a beam keeps their covers), nearest
    first (with the others ending where it stops), then the one the walk stops at. EOS tokens
    are left out."""
    trie, thr = space.trie, (math.exp(log_thr) if log_thr > -math.inf else 0.0)
    cur, out = starts, []
    for depth in range(MOST_BYTES):
        ends = [(math.exp(float(d.logp_numpy()[t])) * scale, (i, t)) for i, node, d, scale in cur if depth
                for t in trie.end_tokens(node).tolist() if t not in space.eos_set]
        groups: dict[int, float] = {}
        for _, node, d, scale in cur:
            bs, kids = trie.children(node)
            for b, m in zip(bs.tolist(), d.masses(trie.lo[kids], trie.hi[kids], False).tolist()):
                groups[b] = groups.get(b, 0.0) + m * scale
        heaviest = max(groups.values(), default=0.0)
        kept = [key for p, key in ends if p > 0 and p >= thr * (sum(e for e, _ in ends) + sum(groups.values()))]
        best = max(ends, default=(0.0, None), key=lambda e: e[0])
        if not heaviest > 0 or best[0] >= heaviest:
            stop = [best[1]] if best[0] > 0 else []
            return out + [key for key in kept if key not in stop] + stop
        out += kept
        byte = max(groups, key=groups.__getitem__)
        cur = [(i, kid, d, scale) for i, node, d, scale in cur if (kid := trie.child(node, byte)) >= 0]
    return out
