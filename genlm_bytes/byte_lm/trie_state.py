"""LazyTrieState: one cover of a byte prefix (a token context plus a position in the token trie).

A cover's weight is ``ctx_weight + log mass(node)``: the log-probability of its
token context, plus the log of the probability that the next token starts
with the bytes from the root to ``node`` (a range sum over the tokens sorted
by bytes, see :mod:`genlm_bytes.trie`). Moving along a byte changes the node
and needs no LM call; ending the token (EOT) extends the context and needs one.

Modes: in *text* mode (prefill) EOS tokens are ordinary text. In *generation*
mode they are taken out of the byte paths and reachable only as the EOS
symbol at a token boundary.
"""

from __future__ import annotations

import math
import threading
from collections import OrderedDict

import numpy as np
import torch

from genlm_bytes.byte_lm.lm_state import StatefulTokenizedLM
from genlm_bytes.dist import LazyByteProbs
from genlm_bytes.lm.base import kept_on_model
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS, check_symbol
from genlm_bytes.trie import TokenByteTrie

_TINY = 1e-9  # below this (relative) a sum with the EOS terms subtracted is recomputed term by term


class TrieSpace:
    """What the covers of one beam share: the trie and which tokens are EOS."""

    __slots__ = ("_dists", "_lock", "eos_ids", "eos_pos", "eos_set", "max_dists", "min_row", "n_blocks", "n_sorted",
                 "trie")

    MAX_DISTS = 256  # prepared distributions kept for reuse (keyed by the LM's cached tensor)

    def __init__(self, trie: TokenByteTrie, eos_ids=(), max_dists: int | None = None):
        self.trie = trie
        self.max_dists = self.MAX_DISTS if max_dists is None else max(1, int(max_dists))
        self.eos_ids = np.asarray(sorted({int(t) for t in eos_ids}), dtype=np.int64)
        self.eos_set = frozenset(self.eos_ids.tolist())
        self.eos_pos = np.nonzero(np.isin(trie.order, self.eos_ids))[0]
        self.n_sorted = len(trie.order)
        self.min_row = int(trie.order.max()) + 1 if self.n_sorted else 0  # a row shorter misses tokens
        self.n_blocks = max(1, -(-self.n_sorted // BLOCK))
        self._dists: OrderedDict[int, ContextDist] = OrderedDict()
        self._lock = threading.Lock()  # beams of one model in several threads share a space

    def dists_for(self, logps: list[torch.Tensor]) -> list[ContextDist]:
        """:meth:`dist_for` of many distributions, each prepared for range sums."""
        out = [self.dist_for(lp) for lp in logps]
        self.prepare_many(out)
        return out

    def prepare_many(self, dists) -> None:
        """Prepare ``dists`` (:meth:`ContextDist.prepare`). A large vocabulary's (~1 ms each at
        262k tokens) go to a few threads: numpy releases the GIL, and the model's thread waits
        for them (Gemma 3, the 9 texts: prefill 56.2 -> 53.1 s; at 49k tokens no gain, so
        not there; the beam's own extensions, a few at a time, gained nothing)."""
        # One at a time: measured faster than one batched gather/exp/sum, which needs a stacked
        # copy of the rows and a copy of each prepared row out of the batch (0.24 vs 0.3-0.8 ms).
        todo = list({id(d): d for d in dists if d._p is None}.values())
        if len(todo) >= POOL_MIN and self.n_sorted >= POOL_VOCAB:
            list(_prepare_pool().map(ContextDist.prepare, todo))
        else:
            for d in todo:
                d.prepare()

    def dist_for(self, logp: torch.Tensor) -> ContextDist:
        """The :class:`ContextDist` of ``logp``, shared when a backend returns the same cached tensor."""
        with self._lock:
            d = self._dists.get(id(logp))
            if d is not None and d.logp is logp:
                self._dists.move_to_end(id(logp))
                return d
            d = ContextDist(logp, self)
            self._dists[id(logp)] = d
            if len(self._dists) > self.max_dists:
                self._dists.popitem(last=False)
            return d


def shared_space(lm, eos_ids=()) -> TrieSpace:
    """The :class:`TrieSpace` of ``lm`` with these EOS tokens, one per model (kept on it): beams
    of one model share prepared distributions, so their memory is bounded by the model's
    ``prepared_dists`` (its cache budget's share for them), not by the number of beams."""
    key = tuple(sorted({int(t) for t in eos_ids}))
    trie = lm.trie
    spaces = kept_on_model(lm, "_genlm_trie_spaces", trie, dict)  # EOS ids -> space
    space = spaces.get(key)
    if space is None:
        space = spaces[key] = TrieSpace(trie, key, max_dists=getattr(lm, "prepared_dists", None))
    return space


class ContextDist:
    """The LM's next-token distribution after one context, prepared for range sums.

    ``logp``: ``(V,)`` log-probs. Prepared (on the first large range sum), it keeps the
    probabilities in byte order (float32, padded to whole blocks) and the float64 sum of each
    block of ``BLOCK`` of them, so a node mass is a sum of whole blocks plus the two partial
    blocks at its ends: no cumulative sums, hence no cancellation, and 4 bytes per token.
    In generation mode, EOS tokens are left out of every sum.
    """

    __slots__ = ("_bs", "_lp", "_p", "_p_eos", "logp", "space")

    def __init__(self, logp: torch.Tensor, space: TrieSpace):
        self.logp = logp
        self.space = space
        self._lp = self._p = self._bs = self._p_eos = None

    def logp_numpy(self) -> np.ndarray:
        """The log-probs as a ``(V,)`` numpy array (a view of a CPU tensor, made once)."""
        if self._lp is None:
            lp = self.logp.detach()
            self._lp = lp.numpy() if lp.device.type == "cpu" else lp.cpu().numpy()
        return self._lp

    def prepare(self) -> None:
        """Probabilities in byte order and their block sums (done once, on first need)."""
        if self._p is None:
            sp = self.space
            n = sp.n_sorted
            p = np.empty(sp.n_blocks * BLOCK, dtype=np.float32)
            p[n:] = 0.0
            # numpy, not torch: a torch op this large starts a parallel region on the calling
            # thread, whose OpenMP workers then spin on the cores the model's worker thread
            # runs its next pass on (measured: +6 ms per 60 ms decode step on 2 cores).
            lp = self.logp_numpy()
            if len(lp) < sp.min_row:
                raise ValueError(f"a distribution of {len(lp)} tokens for a vocabulary of {sp.min_row}")
            # mode="wrap": every index is in range (checked above), and numpy's take skips its
            # per-element bounds check (262k tokens: 204 -> 114 us); the same floats.
            if lp.dtype == np.float32:
                # The row was just written by the model's thread: copied in one sequential read
                # first, the gather's random reads hit this core's cache, not memory (a cold row:
                # ~110 -> ~85 us a prepare at 49k tokens). The same floats as a gather from it.
                row, g = _scratch(len(lp), n)
                np.copyto(row, lp)
                np.take(row, sp.trie.order, out=g, mode="wrap")
            else:
                g = np.take(lp, sp.trie.order, mode="wrap")
            np.exp(g, out=p[:n], dtype=np.float32, casting="unsafe")
            self._bs = p.reshape(sp.n_blocks, BLOCK).sum(axis=1, dtype=np.float64)
            self._p = p

    def _p32(self, idx) -> np.ndarray:
        """float32 probabilities of the sorted tokens ``idx`` (a slice or positions): the very
        values :meth:`prepare` stores, computed alone before it runs."""
        if self._p is not None:
            return self._p[idx]
        return np.exp(self.logp_numpy()[self.space.trie.order[idx]], dtype=np.float32, casting="unsafe")

    def _probs(self, idx) -> np.ndarray:
        """float64 probabilities of the sorted tokens ``idx`` (a slice or positions), from the log-probs."""
        return np.exp(self.logp_numpy()[self.space.trie.order[idx]].astype(np.float64))

    def _sum(self, lo: int, hi: int) -> float:
        """Sum of the probabilities of sorted tokens ``[lo, hi)`` (EOS included). The same float
        whether or not the distribution is prepared (which depends on what ran before: a beam's
        result must not), so the unprepared path sums whole blocks as :meth:`prepare` does."""
        if hi - lo <= 2 * BLOCK:
            return float(self._p32(slice(lo, hi)).sum(dtype=np.float64))
        if self._p is None and hi - lo > _LAZY_RANGE:
            self.prepare()
        a, b = -(-lo // BLOCK), hi // BLOCK  # whole blocks [a, b), partial ones at both ends
        if self._p is not None:
            whole = float(self._bs[a:b].sum())
        else:
            whole = float(self._p32(slice(a * BLOCK, b * BLOCK)).reshape(b - a, BLOCK)
                          .sum(axis=1, dtype=np.float64).sum())
        return (whole + float(self._p32(slice(lo, a * BLOCK)).sum(dtype=np.float64))
                + float(self._p32(slice(b * BLOCK, hi)).sum(dtype=np.float64)))

    def _eos_in(self, lo, hi) -> np.ndarray:
        eos = self.space.eos_pos
        return eos[(eos >= lo) & (eos < hi)]

    def _without_eos(self, lo: int, hi: int) -> float:
        """Term-by-term sum of ``[lo, hi)`` with the EOS terms zeroed (when subtracting them
        would cancel most of the sum)."""
        p = self._probs(slice(lo, hi))
        p[self._eos_in(lo, hi) - lo] = 0.0
        return float(p.sum())

    def mass(self, lo: int, hi: int, text: bool) -> float:
        """Probability that the next token is one of the sorted tokens ``[lo, hi)`` (in generation
        mode, EOS tokens are not among them)."""
        s = self._sum(lo, hi)
        if text or not len(self.space.eos_pos):
            return s
        inside = self._eos_in(lo, hi)
        if not len(inside):
            return s
        e = float(self._p32(inside).sum(dtype=np.float64))  # the very terms ``s`` summed
        m = s - e
        return m if m > _TINY * s else self._without_eos(lo, hi)

    def masses(self, lo: np.ndarray, hi: np.ndarray, text: bool) -> np.ndarray:
        """:meth:`mass` of many ranges; adjacent ranges in increasing order (a node's children)
        are summed in one pass over their span."""
        n = len(lo)
        if n > 4 and np.array_equal(hi[:-1], lo[1:]):
            a, b = int(lo[0]), int(hi[-1])
            if self._p is None and b - a > _LAZY_RANGE:
                self.prepare()
            m = np.add.reduceat(self._p32(slice(a, b)), (lo - a).astype(np.intp), dtype=np.float64)
            if not text and len(self.space.eos_pos):
                eos = self._eos_in(a, b)
                for k in set(np.searchsorted(lo, eos, side="right") - 1):  # the ranges holding EOS
                    m[k] = self.mass(int(lo[k]), int(hi[k]), text)
            return m
        return np.array([self.mass(int(a), int(b), text) for a, b in zip(lo.tolist(), hi.tolist())])

    def p_eos(self) -> float:
        if self._p_eos is None:
            ids = self.space.eos_ids
            self._p_eos = float(np.exp(self.logp_numpy()[ids].astype(np.float64)).sum()) if len(ids) else 0.0
        return self._p_eos


class _Pending:
    """The distribution of a cover not computed yet (see LazyTrieState.pending): only its space."""

    __slots__ = ("space",)

    def __init__(self, space: TrieSpace):
        self.space = space

    @property
    def logp(self):
        raise RuntimeError("this cover's distribution is not computed yet (await its beam's step first)")

    def logp_numpy(self):
        return self.logp


POOL_VOCAB = 1 << 17  # from this many tokens, a list of distributions is prepared on a few threads ...
POOL_MIN = 2  # ... when it holds at least this many
_POOL = None
_POOL_LOCK = threading.Lock()


def _prepare_pool():
    """The threads that prepare a large vocabulary's distributions (made on first use, and again
    in a forked child, which inherits the pool without its threads)."""
    global _POOL
    import os

    with _POOL_LOCK:
        if _POOL is None or _POOL[0] != os.getpid():
            from concurrent.futures import ThreadPoolExecutor

            _POOL = (os.getpid(), ThreadPoolExecutor(max_workers=max(2, min(4, os.cpu_count() or 2)),
                                                     thread_name_prefix="genlm-prepare"))
        return _POOL[1]


BLOCK = 256  # sorted tokens per block sum
_SCRATCH = threading.local()  # per thread (prepares also run on a pool): a row and its gather


def _scratch(v: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """This thread's float32 buffers of ``v`` and ``n`` entries (reused while the sizes hold)."""
    bufs = getattr(_SCRATCH, "bufs", None)
    if bufs is None or len(bufs[0]) != v or len(bufs[1]) != n:
        bufs = _SCRATCH.bufs = (np.empty(v, dtype=np.float32), np.empty(n, dtype=np.float32))
    return bufs


_LAZY_RANGE = 2048  # sorted tokens summed directly while a distribution is not prepared


def _log(x: float) -> float:
    return math.log(x) if x > 0 else -math.inf


def log_total(weights) -> float:
    """``log Σ exp(w)`` of log-weights (-inf when there are none or all are -inf)."""
    ws = [w for w in weights if w > -math.inf]
    if not ws:
        return -math.inf
    m = max(ws)
    return m + math.log(sum(math.exp(w - m) for w in ws))


def heaviest(covers: list, K: int, threshold: float) -> list:
    """The ``K`` heaviest of ``covers`` (sorted heaviest first) whose weight is at least
    ``threshold`` × their total (``threshold`` 0 keeps every weight)."""
    keep = covers
    if threshold > 0 and keep:
        cut = log_total(c.weight for c in covers) + math.log(threshold)
        keep = [c for c in keep if c.weight >= cut]
    return keep[:K]


class LazyTrieState:
    """One cover: a token context, a trie node, and the distribution of the next token.

    Immutable: ``await (s << b)`` returns a new state, or None when ``b`` cannot follow.

    Attributes:
        lm_state: the token context (:class:`StatefulTokenizedLM`).
        node: the trie node of the partial token.
        ctx_weight: log-probability of the token context (from the initial context).
        weight: ``ctx_weight + log mass(node)`` (+ EOS mass at the root in generation mode).
        terminated: the cover has produced EOS and accepts nothing.
        text: text mode (EOS tokens are ordinary text).
        canon: during prefill, the number of canonical tokens this cover has completed if it
            follows the tokenizer's own encoding, else -1.
    """

    __slots__ = (
        "_ends",
        "canon",
        "ctx_weight",
        "dist",
        "lm_state",
        "node",
        "terminated",
        "text",
        "weight",
    )

    def __init__(self, lm_state: StatefulTokenizedLM, node: int, ctx_weight: float, dist: ContextDist,
                 *, terminated: bool = False, text: bool = False, canon: int = -1, weight: float | None = None):
        self.lm_state = lm_state
        self.node = node
        self.ctx_weight = ctx_weight
        self.dist = dist
        self.terminated = terminated
        self.text = text
        self.canon = canon
        self._ends = None  # end_tokens(), made once (a step reads it in logp_next and again in <<)
        self.weight = self._weight() if weight is None else weight

    @classmethod
    async def initial(cls, lm, space: TrieSpace | None = None, initial_context=None,
                      max_context_length=None, text: bool = False) -> LazyTrieState:
        """The cover at the root of the initial context (one LM call)."""
        lm_state = StatefulTokenizedLM.initial(lm, initial_context, max_context_length)
        space = space or shared_space(lm)
        dist = space.dist_for(await lm_state.logp_next())
        return cls(lm_state, TokenByteTrie.root, 0.0, dist, text=text)

    @classmethod
    def pending(cls, lm, space: TrieSpace | None = None, initial_context=None,
                max_context_length=None) -> LazyTrieState:
        """The cover at the root of the initial context, its distribution not computed yet (no
        LM call): weight 0 (the root holds every token). :meth:`resolve` computes it."""
        lm_state = StatefulTokenizedLM.initial(lm, initial_context, max_context_length)
        return cls(lm_state, TokenByteTrie.root, 0.0, _Pending(space or shared_space(lm)), weight=0.0)

    @property
    def is_pending(self) -> bool:
        return type(self.dist) is _Pending

    async def resolve(self) -> None:
        """Compute the distribution of a :meth:`pending` cover (in place: it fills a lazy value)."""
        if self.is_pending:
            self.dist = self.dist.space.dist_for(await self.lm_state.logp_next())
            self.weight = self._weight()

    # ------------------------------------------------------------------ masses
    @property
    def space(self) -> TrieSpace:
        return self.dist.space

    def _node_mass(self, node: int) -> float:
        t = self.dist.space.trie
        m = self.dist.mass(int(t.lo[node]), int(t.hi[node]), self.text)
        if node == 0 and not self.text:
            m += self.dist.p_eos()
        return m

    def _weight(self) -> float:
        if self.terminated:
            return self.ctx_weight
        return self.ctx_weight + _log(self._node_mass(self.node))

    def with_mode(self, text: bool) -> LazyTrieState | None:
        """The same cover in text or generation mode (None if it has no mass there)."""
        if text == self.text:
            return self
        s = LazyTrieState(self.lm_state, self.node, self.ctx_weight, self.dist, terminated=self.terminated,
                          text=text, canon=-1)
        return s if s.weight > -math.inf else None

    # -------------------------------------------------------------- transitions
    def consume(self, b: int) -> LazyTrieState | None:
        """Move along byte ``b`` inside the current token (no LM call)."""
        if self.terminated:
            return None
        trie = self.dist.space.trie
        child = trie.edges.get((self.node << 8) | b, -1)
        if child < 0:
            return None
        m = self.dist.mass(int(trie.lo[child]), int(trie.hi[child]), self.text)
        if m <= 0.0:
            return None
        return LazyTrieState(self.lm_state, child, self.ctx_weight, self.dist, text=self.text,
                             canon=self.canon, weight=self.ctx_weight + math.log(m))

    def end_tokens(self) -> list[tuple[int, float]]:
        """``(token id, ctx_weight + log p(token))`` for each token ending exactly here."""
        if self._ends is None:
            self._ends = self._end_tokens()
        return self._ends

    def _end_tokens(self) -> list[tuple[int, float]]:
        if self.terminated or self.node == 0:
            return []
        trie = self.dist.space.trie
        lo, end = int(trie.lo[self.node]), int(trie.end[self.node])
        if lo == end:
            return []
        lp, w = self.dist.logp_numpy(), self.ctx_weight  # (numpy: a torch index costs ~1 us a token)
        tokens = trie.order[lo:end].tolist()
        eos = self.dist.space.eos_set
        if eos and not self.text:
            tokens = [t for t in tokens if t not in eos]
        return [(t, w + float(lp[t])) for t in tokens]

    async def extend(self, token: int, canon_tokens=None, peek: bool = False) -> LazyTrieState:
        """End the current token as ``token`` and start a new one (one LM call; ``peek``: as a
        reader ahead of the beam, see ``AsyncLM.peek_next_token_logprobs``)."""
        new_lm = self.lm_state << token
        logp = await (new_lm.lm.peek_next_token_logprobs(list(new_lm.context)) if peek else new_lm.logp_next())
        canon = -1
        if canon_tokens is not None and 0 <= self.canon < len(canon_tokens) and canon_tokens[self.canon] == token:
            canon = self.canon + 1
        return LazyTrieState(new_lm, 0, self.ctx_weight + float(self.dist.logp_numpy()[token]),
                             self.dist.space.dist_for(logp), text=self.text, canon=canon)

    def end_sequence(self) -> LazyTrieState | None:
        """Take EOS here (only at a token boundary, in generation mode)."""
        if self.terminated or self.node != 0 or self.text:
            return None
        p = self.dist.p_eos()
        if p <= 0:
            return None
        return LazyTrieState(self.lm_state, 0, self.ctx_weight + math.log(p), self.dist, terminated=True)

    async def __lshift__(self, sym) -> LazyTrieState | None:
        """Byte: move inside the token; EOT: end the most likely token ending here; EOS: end the sequence."""
        sym = check_symbol(sym, allow_eot=True)
        if sym == EOS:
            return self.end_sequence()
        if sym == EOT:
            ends = self.end_tokens()
            if not ends:
                return None
            token = max(ends, key=lambda tw: tw[1])[0]
            return await self.extend(token)
        return self.consume(sym)

    # ------------------------------------------------------------ distributions
    def add_next_masses(self, acc: np.ndarray, ref: float, include_end: bool) -> None:
        """Add this cover's next-symbol masses, scaled by ``exp(ctx_weight - ref)``, into ``acc`` (258,).

        Bytes get the masses of the children; EOS (at the root, generation mode) the EOS mass;
        EOT the mass of the tokens ending here when ``include_end``.
        """
        if self.terminated:
            return
        scale = math.exp(self.ctx_weight - ref)
        if scale == 0.0:
            return
        trie = self.dist.space.trie
        n = self.node
        k0, k1 = trie.kid_start[n], trie.kid_start[n + 1]
        if k1 > k0:
            kids = trie.kids[k0:k1]
            acc[trie.byte[kids]] += scale * self.dist.masses(trie.lo[kids], trie.hi[kids], self.text)
        if include_end and n != 0:
            lo, end = int(trie.lo[n]), int(trie.end[n])
            if end > lo:
                acc[EOT] += scale * self.dist.mass(lo, end, self.text)
        if n == 0 and not self.text:
            acc[EOS] += scale * self.dist.p_eos()

    async def logp_next(self) -> LazyByteProbs:
        """Next symbols of this one cover: bytes inside the token, EOT, and EOS at the root."""
        if self.terminated:
            raise ValueError("this state has ended (EOS) and accepts nothing")

        def compute():
            acc = np.zeros(N_SYMBOLS)
            self.add_next_masses(acc, self.ctx_weight, include_end=True)
            z = acc.sum()
            with np.errstate(divide="ignore"):
                return np.log(acc / z) if z > 0 else np.full(N_SYMBOLS, -np.inf)

        return LazyByteProbs(compute)

    @property
    def partial(self) -> bytes:
        """The bytes of the unfinished token."""
        return self.dist.space.trie.path(self.node)

    def __repr__(self) -> str:
        end = " EOS" if self.terminated else ""
        return (f"LazyTrieState(w={self.weight:.4f}, ctx=...{list(self.lm_state.context[-4:])}, "
                f"partial={self.partial!r}{end})")
