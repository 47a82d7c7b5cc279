"""Which one-token branches off a known token path a prefill will need.

During prefill of a known text, the beam follows the tokenizer's own encoding
(its distributions come from one forward pass) and, at each token boundary
``j`` of that path, may end a *different* token ``t`` that also matches the
text. Such a branch costs an LM call on the context ``path[:j] + [t]`` only
if it can survive pruning: its weight ``W_j + log p(t | path[:j])`` must reach
``prune_threshold`` × the weight the path's own cover has one byte later (that
cover is in the beam, so the beam's total is at least that). Listing those
branches up front lets the backend score them in one tree-masked pass instead
of one small pass per byte.

The path is handled in windows of boundaries, just ahead of the beam, so the
prepared distributions of a long text are never all in memory at once.
Deeper branches (a branch of a branch) are left to the beam's look-ahead and
to the ordinary batched path.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np

from genlm_bytes.byte_lm.trie_state import TrieSpace

WINDOW = 128  # token boundaries per speculation pass


class PathSpeculator:
    """Speculates the branches off ``ctx0 + path`` (the path spells ``data``), window by window.

    Args:
        lm: the model; it must implement ``prefetch`` (distributions along the path get cached).
        space: the beam's trie space.
        ctx0: the token context before ``data``.
        path: token ids spelling ``data`` (usually the tokenizer's encoding).
        data: the text.
        prune_threshold: the beam's threshold; 0 lists every matching branch.
    """

    def __init__(self, lm, space: TrieSpace, ctx0: tuple, path: tuple, data: bytes, prune_threshold: float):
        self.lm, self.space, self.ctx0, self.path, self.data = lm, space, ctx0, path, data
        self.log_thr = math.log(prune_threshold) if prune_threshold > 0 else -math.inf
        off = [0]
        for t in path:
            off.append(off[-1] + len(lm.byte_vocab[t]))
        self.off = off
        self.done = 0  # boundaries [0, done) speculated

    async def start(self) -> None:
        """Compute the distributions along the whole path (one pass, chunked by the backend)."""
        await self.lm.prefetch(list(self.ctx0 + self.path))

    async def ensure(self, j: int) -> None:
        """Make sure the branches at boundaries up to ``j`` (+ a margin) are computed."""
        while self.done < len(self.path) and j + WINDOW // 4 >= self.done:
            j0, j1 = self.done, min(len(self.path), self.done + WINDOW)
            self.done = j1
            branches = await self.branches(j0, j1)
            if branches:
                await self.lm.prefetch(list(self.ctx0 + self.path), alternatives=branches)

    async def branches(self, j0: int, j1: int) -> list[tuple[int, int]]:
        """``(i, t)`` pairs for boundaries ``[j0, j1)``: the context ``(ctx0 + path)[:i] + (t,)``."""
        lm, trie, data, path, off = self.lm, self.space.trie, self.data, self.path, self.off
        n0 = len(self.ctx0)
        full = self.ctx0 + path
        logps = await asyncio.gather(*(lm.next_token_logprobs(list(full[: n0 + j])) for j in range(j0, j1)))
        dists = self.space.dists_for(logps)
        W = [0.0]
        for j in range(j0, j1):
            W.append(W[-1] + float(logps[j - j0][path[j]]))
        N = len(data)
        # Weight (up to the common W_{j0}) of the path's own cover after each number of bytes.
        canon_w = np.full(N + 1, -math.inf)
        for k, d in enumerate(dists):
            j = j0 + k
            node = 0
            for i in range(off[j], off[j + 1]):
                node = trie.edges.get((node << 8) | data[i], -1)
                if node < 0:
                    break
                m = d.mass(int(trie.lo[node]), int(trie.hi[node]), True)
                canon_w[i + 1] = W[k] + (math.log(m) if m > 0 else -math.inf)
        limit = off[j1]
        out = []
        for k, d in enumerate(dists):
            j = j0 + k
            node = 0
            lp = logps[k]
            for i in range(off[j], N):
                node = trie.edges.get((node << 8) | data[i], -1)
                if node < 0:
                    break
                lo, end = int(trie.lo[node]), int(trie.end[node])
                if lo == end:
                    continue
                at = min(i + 2, N)
                bar = self.log_thr + canon_w[at] if at <= limit else -math.inf
                for t in trie.order[lo:end].tolist():
                    if t != path[j] and float(lp[t]) + W[k] >= bar:
                        out.append((n0 + j, t))
        return out
