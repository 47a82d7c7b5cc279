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

import numpy as np

ON_PATH = 2  # tokens on the walk's path computed besides the one it stops at and the likeliest
MOST_BYTES = 32  # the walk's longest path (a token is rarely longer)


async def guesses_after(lm, trie, full: tuple, k: int, log_thr: float) -> list[tuple[int, int]]:
    """``(i, t)``: the contexts ``full[:i] + (t,)`` a generation from the end of the text
    ``full`` (token ids, distributions cached) likely asks for first, not cached yet: the token
    a greedy byte walk (:func:`walk`) stops at and the likeliest tokens after ``full``, ``k``
    in all, and up to ``ON_PATH`` tokens the beam ends on the walk's way there. The
    walk goes over the tokens after ``full`` and, after ``full[:-1]``, those spelling
    ``full``'s last token and more (their probabilities divided by the last token's: one
    scale). ``trie``: the beam's token-byte trie; ``log_thr``: the beam's log threshold."""
    if k < 1:
        return []
    n, eos = len(full), np.asarray(trie.eos_ids, dtype=np.int64)
    lp = np.asarray(await lm.peek_next_token_logprobs(list(full)), dtype=np.float64)
    lp[eos] = -math.inf  # (a generation writes no EOS bytes)
    starts = [(n, 0, np.exp(lp))]
    if n >= 2 and lm.has_logprobs(list(full[:-1])):
        node = trie.walk(lm.byte_vocab[full[-1]])
        prev = np.asarray(await lm.peek_next_token_logprobs(list(full[:-1])), dtype=np.float64)
        if node > 0 and prev[full[-1]] > -math.inf:
            prev[eos] = -math.inf
            starts.append((n - 1, node, np.exp(prev - prev[full[-1]])))
    likeliest = [(n, t) for t in np.argsort(-lp, kind="stable")[:k].tolist() if lp[t] > -math.inf]
    *on_path, stop = walk(trie, starts, log_thr) or likeliest[:1] or [None]
    guesses = [g for g in dict.fromkeys([stop] + likeliest) if g is not None][:k]
    return [(i, t) for i, t in dict.fromkeys(guesses + on_path[:ON_PATH]) if not lm.has_logprobs(list(full[:i]) + [t])]


def walk(trie, starts: list[tuple[int, int, np.ndarray]], log_thr: float) -> list[tuple[int, int]]:
    """A greedy byte walk from ``starts`` ``(i, trie node, token probabilities)``, one scale
    for all: take the next byte whose tokens below the nodes hold the most probability; stop
    at a token ending there that holds at least as much as that byte. Returns the ``(i, t)``
    of the tokens ending on the way that hold at least ``exp(log_thr)`` of the probability at
    their nodes (a beam keeps their covers), nearest first, then the one the walk stops at."""
    thr = math.exp(log_thr) if log_thr > -math.inf else 0.0
    cur = [(i, node, p, np.concatenate([[0.0], np.cumsum(p[trie.order])])) for i, node, p in starts]
    out = []
    for depth in range(MOST_BYTES):
        ends = [(float(p[t]), (i, int(t))) for i, node, p, _ in cur if depth
                for t in trie.end_tokens(node).tolist()]
        groups: dict[int, float] = {}
        for _, node, _, cum in cur:
            for b, kid in zip(*trie.children(node)):
                groups[int(b)] = groups.get(int(b), 0.0) + float(cum[trie.hi[kid]] - cum[trie.lo[kid]])
        best = max(ends, default=None, key=lambda e: e[0])
        heaviest = max(groups.values(), default=0.0)
        node_mass = sum(p for p, _ in ends) + sum(groups.values())
        kept = [key for p, key in ends if p > 0 and p >= thr * node_mass]
        if not heaviest > 0 or (best is not None and best[0] >= heaviest):
            if best is None or not best[0] > 0:
                return out + kept
            return out + [key for key in kept if key != best[1]] + [best[1]]
        out += kept
        byte = max(groups, key=groups.__getitem__)
        cur = [(i, kid, p, cum) for i, node, p, cum in cur if (kid := trie.child(node, byte)) >= 0]
    return out
