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
Deeper branches (a branch of a branch) are left to the planner below: a walk of
the beam ahead over each window (a branch's next token), look-ahead paths, and
the ordinary batched path.
"""

from __future__ import annotations

import asyncio
import math

import numpy as np

from genlm_bytes.byte_lm.after_text import guesses_after
from genlm_bytes.byte_lm.lineage import NEW_LINEAGE, FirstAheads, Lineage
from genlm_bytes.byte_lm.trie_state import TrieSpace

WINDOW = 128  # token boundaries per speculation pass (unless the model asks for fewer)


def speculation_window(lm) -> int:
    """Token boundaries per speculation pass for ``lm``: its ``speculation_window`` if it has
    one (a backend under a small memory budget holds fewer distributions ahead), else WINDOW."""
    w = getattr(lm, "speculation_window", None)
    return WINDOW if not isinstance(w, int) or isinstance(w, bool) or w < 1 else w


def first_window(n_tokens: int, window: int = WINDOW) -> int:
    """Boundaries in the first window of a path of ``n_tokens`` tokens (no short last window:
    a remainder under half a window joins the window before it, one pass fewer)."""
    j1 = min(n_tokens, window)
    return n_tokens if n_tokens - j1 < window // 2 else j1


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

    def __init__(self, lm, space: TrieSpace, ctx0: tuple, path: tuple, data: bytes, prune_threshold: float,
                 base: int = 0):
        self.lm, self.space, self.ctx0, self.path, self.data = lm, space, ctx0, path, data
        self.base = base  # where ``data`` starts in the text being prefilled
        self.log_thr = math.log(prune_threshold) if prune_threshold > 0 else -math.inf
        off = [0]
        for t in path:
            off.append(off[-1] + len(lm.byte_vocab[t]))
        self.off = off
        self.done = 0  # boundaries [0, done) speculated
        self.computed = 0  # the path's distributions are cached up to boundary ``computed``
        self.alts_at: dict[int, set[int]] = {}  # text position -> tokens branching off there
        self.window = speculation_window(lm)
        self.on_computed = None  # awaited with (self, text end) once a window's branches are computed
        self.guess_after = 0  # the likeliest tokens after the path's end also computed with its last window

    async def start(self) -> None:
        """Compute the first window of the path (later windows follow the beam, see ensure_bytes)."""
        await self.ensure_bytes(self.base)

    async def start_deferred(self) -> list[tuple]:
        """:meth:`start` for a path computed already (a planner's look-ahead path) that fits one
        window: its branches are listed, not computed, and returned as contexts (token
        tuples) for the caller to compute with its next pass. A longer path starts as usual
        (its next window needs a pass anyway), returning nothing."""
        j1 = self._window_end(0)
        if j1 < len(self.path) or not self.lm.has_logprobs(list(self.ctx0 + self.path)):
            await self.start()
            return []
        self.done = self.computed = j1
        full = self.ctx0 + self.path
        return [full[:i] + (t,) for i, t in await self.branches(0, j1)
                if not self.lm.has_logprobs(list(full[:i] + (t,)))]

    def due(self, pos: int) -> bool:
        """Whether :meth:`ensure_bytes` at ``pos`` has work to do."""
        return self.done < len(self.path) and self.base + self.off[self.done] <= pos + 4 * self.window

    def followed_by(self, states) -> bool:
        """Whether some cover's context starts with this path's context (the path is still in use)."""
        n = len(self.ctx0)
        return any(len(c) >= n and c[n - 1] == self.ctx0[-1] and c[:n] == self.ctx0
                   for c in (s.lm_state.context for s in states))

    async def ensure_bytes(self, pos: int) -> None:
        """Make sure the branches at boundaries up to text position ``pos`` (+ a margin) are computed.

        Pipelined: the pass that computes the branches of one window also computes the path of
        the next window, whose branches then go with the window after it; so a long path costs
        about one pass per window. Window by window, so the cache holds what the beam is about
        to use, not the whole text.
        """
        n0 = len(self.ctx0)
        while self.due(pos):
            j0, j1 = self.done, self._window_end(self.done)
            if self.computed < j1:  # the first window: its path alone (the branches need it)
                await self.lm.prefetch(list(self.ctx0 + self.path[: j1 + 1]), start=max(0, n0 + j0 - 1))
                self.computed = j1
            self.done = j1
            branches = await self.branches(j0, j1)
            j2 = self._window_end(j1) if j1 < len(self.path) else j1
            if j1 == len(self.path) and self.guess_after:
                branches += await self._after_end()
            await self.lm.prefetch(list(self.ctx0 + self.path[: j2 + 1]), alternatives=branches,
                                   start=max(0, n0 + j1 - 1))
            self.computed = j2
            if self.on_computed is not None and branches:
                await self.on_computed(self, self.base + self.off[j1])

    async def _after_end(self) -> list[tuple[int, int]]:
        """``(i, t)``: what a generation from the end of a prompt asks for first (the path's
        distributions are cached by now), one pass sooner, at a token's cost each in a pass
        that runs anyway: ``guess_after`` guesses and the shorter tokens a beam ends on the
        way (see :func:`~genlm_bytes.byte_lm.after_text.guesses_after`)."""
        return await guesses_after(self.lm, self.space, self.ctx0 + self.path, self.guess_after,
                                   self.log_thr)

    def _window_end(self, j0: int) -> int:
        return j0 + first_window(len(self.path) - j0, self.window)

    async def branches(self, j0: int, j1: int) -> list[tuple[int, int]]:
        """``(i, t)`` pairs for boundaries ``[j0, j1)``: the context ``(ctx0 + path)[:i] + (t,)``."""
        lm, trie, data, path, off = self.lm, self.space.trie, self.data, self.path, self.off
        n0 = len(self.ctx0)
        full = self.ctx0 + path
        # Distributions the cache evicted since the window's pass (a small budget) are computed
        # again together, in one pass, not as one request per prefix (each of which would run
        # its whole suffix from the deepest cached past).
        await lm.prefetch(list(full[: n0 + j1 - 1]), start=n0 + j0 - 1)
        logps = await asyncio.gather(*(lm.peek_next_token_logprobs(list(full[: n0 + j])) for j in range(j0, j1)))
        dists = self.space.dists_for(logps)
        lps = [d.logp_numpy() for d in dists]  # (numpy: a torch index costs ~1 us a token)
        W = [0.0]
        for j in range(j0, j1):
            W.append(W[-1] + float(lps[j - j0][path[j]]))
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
            lp = lps[k]
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
                        self.alts_at.setdefault(self.base + off[j], set()).add(t)
        return out


class PrefillPlanner:
    """Plans the LM work of one prefill: the paths whose distributions are computed ahead.

    The first path is the tokenizer's encoding of the whole text. A branch off any path
    that survives two uncached extensions gets a path of its own: the encoding of the next
    part of the text, from where it is. The look-ahead doubles along a lineage (past its end,
    with the token the text's encoding takes there); a weak branch starts at 4 tokens and stops
    growing at ``MAX_AHEAD``, a strong one (within ``DOMINANT`` of the heaviest cover) starts at
    ``MAX_AHEAD`` and doubles up to ``MAX_STRONG``: a branch that dies soon wastes little.

    A new look-ahead path's own exact branches (the one-token branches off it that can survive,
    known once its pass ran) are not computed in a pass of their own: most are a token or two,
    and every pass reads all the weights whatever its size. They wait in ``pending`` and join
    the planner's next pass (or the beam asks for one when it gets there, which starts that
    pass). Either way the same distributions are computed; only the grouping changes.

    Once the first path's window and its one-token branches are computed, a copy of the beam
    walks that window on the distributions cached then (:meth:`walk_window`); the branches'
    next tokens it finds missing are computed in one pass before the beam gets there.

    The lineage bookkeeping (:class:`~genlm_bytes.byte_lm.lineage.Lineage`) is the planner's own,
    keyed by the token context object a cover holds; the covers carry none of it.
    """

    DOMINANT = math.log(0.5)
    MERGE_SLACK = 4  # paths whose contexts differ in at most this many last tokens share a pass
    FIRST_AHEAD = 4  # look-ahead of a branch at its first uncached extension (0: wait for the second)
    FIRST_HIT_MIN = 0.25  # ... while this share of new branches go on along it (see lineage.FirstAheads)
    MAX_AHEAD = 32
    MAX_STRONG = 128
    FIRST_STRONG = 32  # look-ahead of a strong branch at its first uncached extension
    MAX_PENDING = 256  # pending branch contexts kept (see ``pending``)
    WALK_AHEAD = True  # after a window's branches are computed, walk the beam over it (see walk_ahead)
    WALK_DEPTH = 2  # ... and compute what it misses that parts from the path at most this many tokens before its end
    PENDING_SLACK = 8  # a pending branch joins a pass whose path it parts from at most this many tokens before its end
    # A look-ahead reaches the end of the text when what is left after it is at most this many times
    # as long: one stopping short costs another pass for a few tokens (benchmarks/README.md, session 13)
    TO_END = 2
    GUESS_AFTER = 2  # the text's likeliest next tokens computed with its last window (a generation asks first)
    # A lineage past its look-ahead's end goes on doubling only with the token the text's encoding
    # takes there; its other covers there are new branches (benchmarks/README.md, session 24)
    GOING_ON_ENCODED = True
    STALL_WALK = 8  # bytes a copy of the beam walks ahead when it stalls for a pass (see stall_walk; 0: none)

    def __init__(self, beam, data: bytes):
        self.beam0 = beam
        self.lm = beam.lm
        self.space = beam.states[0].space
        self.data = data
        self.params = beam.params
        self.paths: list[PathSpeculator] = []
        # Branch contexts of new look-ahead paths, computed with the planner's next pass rather
        # than each in a pass of its own (see add_paths).
        self.pending: dict[tuple, None] = {}
        self._lineage: dict[int, Lineage] = {}  # id(a live cover's token context) -> its lineage
        self._planned: dict[tuple[int, int], Lineage] = {}  # (id(context), token) -> the extension's
        self._firsts = FirstAheads(self.FIRST_HIT_MIN)
        self._at = (0, beam)  # (text position, the beam about to read the byte there): where a walk starts
        self._walked = (-1, None)  # (text position, the copy there) where the last walk ended
        # context -> the lineage of a path a stall walk started for it (see stall_walk)
        self._walked_paths: dict[tuple, Lineage] = {}

    def fits(self, n_tokens: int) -> bool:
        m = self.params.max_context_length
        return m is None or n_tokens <= m

    async def add_path(self, ctx: tuple, enc: tuple, base: int, defer: bool = False) -> None:
        """Follow the path ``ctx + enc`` (``enc`` spells the text from ``base``). ``defer``: a
        path computed already whose exact branches go into ``pending`` (see
        :meth:`PathSpeculator.start_deferred`)."""
        data = self.data[base: base + sum(len(self.lm.byte_vocab[t]) for t in enc)]
        spec = PathSpeculator(self.lm, self.space, ctx, enc, data, self.params.prune_threshold, base=base)
        if defer:
            self.pending.update(dict.fromkeys(await spec.start_deferred()))
        else:
            # The first path: walk the beam over each window; not under a budget that shrinks the
            # window (at 256 MiB what the walk computes ahead is evicted before the beam reads it:
            # +28% LM tokens scoring 8 KB; at 512 MiB -20%, benchmarks/README.md, session 12).
            if not self.paths and self.WALK_AHEAD and spec.window >= WINDOW:
                spec.on_computed = self.walk_window
            if not self.paths:
                spec.guess_after = self.GUESS_AFTER
            await spec.start()
        self.paths.append(spec)

    async def advance(self, pos: int, beam) -> None:
        """Speculate the next windows of the paths the beam still follows; forget the others
        (and the bookkeeping of covers no longer in the beam: a key is the id of a live object)."""
        self._at = (pos, beam)
        held = {id(s.lm_state) for s in beam.states}
        if len(self.pending) > self.MAX_PENDING:  # (the oldest go: the beam has moved past them)
            self.pending = dict.fromkeys(list(self.pending)[-self.MAX_PENDING:])
        self._firsts.died(v.branch for k, v in self._lineage.items() if k not in held)
        self._lineage = {k: v for k, v in self._lineage.items() if k in held}
        self._planned.clear()
        live = []
        for k, spec in enumerate(self.paths):
            if spec.due(pos):
                if k > 0 and not spec.followed_by(beam.states):
                    continue
                await spec.ensure_bytes(pos)
            live.append(spec)
        self.paths = live

    async def before_extensions(self, beam, cands, pos: int) -> None:
        """Called by a beam step at text position ``pos`` before it computes extensions."""
        lm, firsts = self.lm, self._firsts
        top = max((s.weight for s in beam.states), default=-math.inf)
        first_ahead = self.FIRST_AHEAD if firsts.worth() else 0
        new, here = [], None
        for i, t, w in cands:
            s = beam.states[i]
            miss, ahead0, path_end, trial = self._lineage.get(id(s.lm_state), NEW_LINEAGE)
            firsts.went_on(trial, t)
            key = (id(s.lm_state), t)
            ctx = s.lm_state.context + (t,)
            if (i, t) in beam._ext or lm.has_logprobs(ctx):  # (made already, e.g. by beam._tighten)
                ahead_of = self._walked_paths.pop(ctx, None) if self._walked_paths else None
                self._planned[key] = ahead_of or Lineage(0, ahead0, path_end)
                continue
            strong = w >= top + self.DOMINANT
            # A first miss starts a new branch (its look-ahead starts small again), unless the
            # branch just ran past the end of its look-ahead along the text's encoding: then it
            # goes on doubling at once.
            first = miss == 0
            going_on = first and ahead0 > 0 and len(s.lm_state.context) >= path_end and (
                not self.GOING_ON_ENCODED or starts_encoding(self.lm, self.space.trie, self.data, pos, t, self.TO_END))
            base = ahead0 if (going_on or not first) else 0
            fresh = first and not going_on
            if fresh and self.FIRST_AHEAD and here is None:  # (the encoding from here: a first look-ahead's)
                here = self.encode_ahead(pos, self.FIRST_AHEAD)
            trial = firsts.start(here[0] if here else -1) if fresh and self.FIRST_AHEAD else -1
            self._planned[key] = Lineage(miss + 1, base, 0, trial)
            if fresh and not first_ahead:
                if self.fits(len(ctx)):
                    new.append((ctx, (), pos))  # the context alone, with the stall's pass
                continue
            if strong and fresh:
                ahead = self.FIRST_STRONG
            elif strong:
                ahead = min(self.MAX_STRONG, max(self.MAX_AHEAD, 2 * base))
            elif fresh:
                ahead = first_ahead
            else:
                ahead = min(self.MAX_AHEAD, max(4, 2 * base))
            enc = here if fresh and not strong else self.encode_ahead(pos, ahead)
            if enc and self.fits(len(ctx) + len(enc)):
                new.append((ctx, tuple(enc), pos))
                self._planned[key] = Lineage(0, ahead, len(ctx) + len(enc), trial)
        firsts.settle()
        if new:
            if self.STALL_WALK:
                new += await self.stall_walk(beam, pos, {c for c, _, _ in new}, first_ahead)
            await self.add_paths(new)

    def after_extensions(self, beam, cands, extensions) -> None:
        """Called by a beam step with the extensions it computed for ``cands``: each inherits the
        bookkeeping planned for it."""
        for (i, t, _), e in zip(cands, extensions):
            info = self._planned.pop((id(beam.states[i].lm_state), t), None)
            if info is not None:
                self._lineage[id(e.lm_state)] = info

    async def walk_window(self, spec: PathSpeculator, end: int) -> None:
        """A window of the first path and its one-token branches are computed: walk a copy of the
        beam over the text up to ``end`` on the distributions cached now (:meth:`walk_ahead`),
        and compute, in one tree pass, the contexts the walk found missing that part from the
        path at most ``WALK_DEPTH`` tokens before their end (a branch's next token): what the
        beam would otherwise ask for one stall, one small pass, at a time."""
        pos, beam = self._at
        if self._walked[0] > pos:  # go on from where the last walk ended: each byte walked once
            pos, beam = self._walked
        missing, beam = await self.walk_ahead(beam, pos, end)
        self._walked = (end, beam) if beam.states else (-1, None)  # (an empty copy finds nothing more)
        full = spec.ctx0 + spec.path
        items = []
        for ctx in missing:
            c = _common(full, ctx)
            if 0 < len(ctx) - c <= self.WALK_DEPTH and self.fits(len(ctx)):  # (not the path's own)
                items.append((c, ctx[c:]))
        if items:
            at = max(c for c, _ in items)
            await self.lm.prefetch(list(full[:at]), alternatives=items, start=at)

    async def walk_ahead(self, beam, pos: int, end: int) -> tuple[dict[tuple, int], object]:
        """The contexts, not cached, of the extensions a copy of ``beam`` (about to read the byte
        at ``pos``) asks for while it reads the text up to ``end`` as the prefill does, each with
        the text position where the copy first asked for it: the copy goes on without them (what
        they would ask for in turn is found when the beam gets there). Also returns the copy as
        it is at ``end``."""
        from genlm_bytes.byte_lm.beam import ByteBeamState

        missing: dict[tuple, int] = {}
        beam = ByteBeamState(beam.states, beam.params, canon=beam._canon)  # (the beam's own extensions untouched)
        for q in range(pos, min(end, len(self.data))):
            beam = await beam._step(self.data[q], pos=q, missing=missing)
            if not beam.states:
                break
            beam = beam.prune()
        return missing, beam

    async def stall_walk(self, beam, pos: int, have: set, ahead: int) -> list[tuple[tuple, tuple, int]]:
        """The beam stalls at ``pos`` for a pass: the look-ahead paths it would ask for over the
        next ``STALL_WALK`` bytes, so that the same pass computes them. The contexts a walk
        ahead over those bytes (:meth:`walk_ahead`) finds missing after ``pos`` (covers that end
        their tokens a byte or more later: other segmentations of the same stretch of text)
        each get a path from where they were missed (``ahead``: ``FIRST_AHEAD`` tokens as
        :meth:`encode_ahead` gives them), or none (``ahead`` 0: the context alone, counted as
        its branch's first miss); the beam would ask for them one byte after another, each a
        pass of its own. Returns
        ``(context, tokens, text position)`` paths; their look-ahead is remembered for the cover
        that reaches them (see :meth:`before_extensions`), and each is a new branch measured
        for :class:`~genlm_bytes.byte_lm.lineage.FirstAheads`."""
        missing, _ = await self.walk_ahead(beam, pos, pos + self.STALL_WALK)
        found, encs = [], {}
        for ctx, q in missing.items():
            if q == pos or ctx in have or ctx in self._walked_paths:
                continue
            if q not in encs:
                encs[q] = tuple(self.encode_ahead(q, self.FIRST_AHEAD))
            enc = encs[q] if ahead else ()
            if encs[q] and self.fits(len(ctx) + len(enc)):
                found.append((ctx, enc, q))
                trial = self._firsts.start(encs[q][0])
                self._walked_paths[ctx] = Lineage(0, ahead, len(ctx) + len(enc), trial) if ahead \
                    else Lineage(1, 0, 0, trial)
        if len(self._walked_paths) > self.MAX_PENDING:
            self._walked_paths = dict(list(self._walked_paths.items())[-self.MAX_PENDING:])
        return found

    async def add_paths(self, paths: list[tuple[tuple, tuple, int]]) -> None:
        """Start look-ahead paths ``(context, tokens, text position)`` in as few tree passes as possible:
        paths whose contexts differ in their last few tokens only go in one pass, and every
        path carries, as one-token branches, the branches the first (canonical) path has at
        the same text positions: likely branches of this path too, so that its exact branches
        (computed next) are mostly cached already."""
        groups: list[list[tuple[tuple, tuple, int]]] = []
        for path in paths:
            ctx = path[0]
            for g in groups:
                if _common(g[0][0], ctx) >= max(len(g[0][0]), len(ctx)) - self.MERGE_SLACK:
                    g.append(path)
                    break
            else:
                groups.append([path])
        requests = []
        for n, g in enumerate(groups):
            (ctx0, enc0, at0), rest = g[0], g[1:]
            items = [(len(ctx0) + k, (t,)) for k, t in self.likely_branches(enc0, at0)]
            if rest:
                c = min(min(_common(ctx0, ctx) for ctx, _, _ in rest), min(len(p[0]) for p in g) - 1)
                for ctx, enc, at in rest:
                    seq = ctx + enc
                    subs = [(len(ctx) - c + k, t) for k, t in self.likely_branches(enc, at)]
                    items.append((c, seq[c:], subs))
            if n == 0:
                items += self._take_pending(ctx0 + enc0)
            requests.append((list(ctx0 + enc0), items, len(ctx0) - 1))
        await self.lm.prefetch_many(requests)  # (the groups in one pass where they fit)
        for ctx, enc, at in paths:
            # Its exact branches wait for the next pass: most are a token or two, and a pass of
            # their own would cost what any pass costs (the weights are read once per pass).
            if enc:  # (a context alone has no path to follow)
                await self.add_path(ctx, enc, at, defer=True)

    def _take_pending(self, path: tuple) -> list[tuple]:
        """The pending branch contexts (see ``pending``) still uncached, as alternatives of a pass
        on ``path``: each branches off where it parts from ``path`` (the tokens it repeats there
        are few: the paths of one prefill share all but their last few tokens); those parting
        more than ``PENDING_SLACK`` tokens before their end wait for a pass nearer."""
        items = []
        for q in list(self.pending):
            if self.lm.has_logprobs(list(q)):
                del self.pending[q]
                continue
            c = min(_common(path, q), len(q) - 1)
            if len(q) - c <= self.PENDING_SLACK:
                items.append((c, q[c:]))
                del self.pending[q]
        return items

    def likely_branches(self, enc: tuple, pos: int) -> list[tuple[int, int]]:
        """``(k, t)``: token ``t`` in place of ``enc[k]``, where the first path branches off
        with ``t`` at the same text position."""
        if not self.paths:
            return []
        alts_at = self.paths[0].alts_at
        out, at = [], pos
        for k, tok in enumerate(enc):
            for t in alts_at.get(at, ()):
                if t != tok:
                    out.append((k, t))
            at += len(self.lm.byte_vocab[tok])
        return out

    def encode_ahead(self, pos: int, n_tokens: int) -> list[int]:
        """:func:`encode_ahead` of this prefill's text, with ``TO_END``."""
        return encode_ahead(self.lm, self.space.trie, self.data, pos, n_tokens, self.TO_END)


def encode_ahead(lm, trie, data: bytes, pos: int, n_tokens: int, to_end: int) -> list[int]:
    """About ``n_tokens`` tokens spelling ``data`` from ``pos`` on: the tokenizer's encoding
    (``lm.encode_bytes``) when the window is valid text, else the longest-match split along
    ``trie``. When the text left after them would be at most ``to_end`` times as long, up to
    ``(1 + to_end) * n_tokens`` tokens reaching the end of the text (a look-ahead that would
    stop short of the end costs another pass for a few tokens)."""
    end = min(len(data), pos + 8 * n_tokens)
    whole = len(data) - end <= to_end * 8 * n_tokens
    if whole:
        end = len(data)
    window = data[pos:end]
    enc = None
    for cut in range(4):  # the window may end inside a multi-byte character
        if cut and end == len(data):
            break
        enc = lm.encode_bytes(window[: len(window) - cut] if cut else window)
        if enc is not None:
            break
    if enc is None:
        enc = _longest_match(trie, window)
    if end < len(data) and enc:
        enc = enc[:-1]  # the window may cut the last token
    return enc if whole and len(enc) <= (1 + to_end) * n_tokens else enc[:n_tokens]


def starts_encoding(lm, trie, data: bytes, pos: int, t: int, to_end: int) -> bool:
    """Whether token ``t``, ending just before ``pos``, is the first token of the encoding of
    ``data`` from ``t``'s start (:func:`encode_ahead`)."""
    enc = encode_ahead(lm, trie, data, pos - len(lm.byte_vocab[t]), 2, to_end)
    return bool(enc) and enc[0] == t


def _longest_match(trie, window: bytes) -> list[int]:
    """Split ``window`` greedily into the longest tokens of ``trie`` (stops where no token matches)."""
    out, i = [], 0
    while i < len(window):
        node, best = 0, None
        for j in range(i, len(window)):
            node = trie.edges.get((node << 8) | window[j], -1)
            if node < 0:
                break
            if trie.end[node] > trie.lo[node]:
                best = (j + 1, int(trie.order[trie.lo[node]]))
        if best is None:
            break
        i, t = best
        out.append(t)
    return out


def _common(a: tuple, b: tuple) -> int:
    """Length of the common prefix of two token tuples."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
