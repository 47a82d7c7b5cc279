"""ByteBeamState: a byte-level LM state that sums over a beam of covers.

``P(x) = Σ_covers weight``. Each step ``beam << a`` moves every cover along
byte ``a`` inside its token, and also ends the token of every cover that can
(EOT: one batched LM call for all of them), then moves the new covers along
``a``. ``prune()`` keeps the ``K`` heaviest covers whose weight is at least
``prune_threshold`` × the total. With ``prune_threshold=0`` and ``K`` large
enough to hold every cover, ``logZ`` is exactly ``log P(x)``; otherwise it is
a lower bound.

The next-symbol distribution is the step's: ``logp_next()`` and ``<<`` end the
tokens of the same covers (every token ending whose weight reaches
``prune_threshold`` × the total), so ``logp_next()[a] - ((beam << a).logZ -
beam.logZ)`` is one constant for every symbol ``a`` the step takes (0 with no
threshold), and a symbol with log-probability -inf is one the step rejects.
``K`` limits the beam after a step (``prune``), never the symbols a step can
take. With ``heal=True`` a step that leaves no cover is rescued (the skipped
token endings, then :mod:`~genlm_bytes.byte_lm.heal`): the one exception.

Prefill of a known text:
- the cover that follows the vocabulary's encoding of the text (the tokenizer's
  own, see :class:`~genlm_bytes.lm.base.ByteVocabulary`) is never pruned, so
  ``logZ`` is never below the log-probability of that encoding, on any backend;
- an extension whose weight bound already rules it out of the next prune
  (below the threshold, or beaten by ``K`` covers) is not computed at all; the
  covers that bound the next total include the extensions already cached (not
  at the text's last byte, whose beam is returned unpruned);
- on a backend that prefetches (``supports_prefetch``), the encoding's
  distributions come from one forward pass and the planner
  (:mod:`~genlm_bytes.byte_lm.speculate`) computes likely extensions ahead.
  That changes how passes are grouped, never which covers the beam keeps: the
  choice of covers depends on the weights alone.

Not handled: a backend whose distributions depend on how requests were grouped
(beyond float rounding) gives different beams on different groupings.
"""

from __future__ import annotations

import asyncio
import logging
import math
import numbers
from dataclasses import dataclass

import numpy as np

from genlm_bytes.byte_lm import heal as healing
from genlm_bytes.byte_lm.lm_state import (
    StatefulByteLM,
    StatefulTokenizedLM,
    check_prompt,
)
from genlm_bytes.byte_lm.trie_state import (
    LazyTrieState,
    heaviest,
    log_total,
    shared_space,
)
from genlm_bytes.dist import LazyByteProbs
from genlm_bytes.lm.base import (
    GUESS_AHEAD,
    AsyncLM,
    kept_on_model,
    known_text,
    vocabulary_of,
)
from genlm_bytes.symbols import EOS, N_SYMBOLS, check_symbol

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BeamParams:
    """Beam settings, validated on construction.

    Args:
        K: the most covers kept by :meth:`ByteBeamState.prune`.
        prune_threshold: drop covers whose weight is below this fraction of the total (0 keeps all).
        eos_tokens: byte strings (or ids) of tokens that end a sequence (symbol EOS = 257).
        heal: re-split the partial token when every cover would die on the next byte.
        max_context_length: keep only the last this many tokens of each context (None: all).
        heal_max_backoff: the most bytes a heal may back off inside a partial token (None: any).
        heal_max_splits: the most re-splits (a shorter token ended, the rest replayed) one heal
            may try (None: any).
    """

    K: int
    prune_threshold: float = 0.0
    eos_tokens: tuple = ()
    heal: bool = True
    max_context_length: int | None = None
    heal_max_backoff: int | None = None
    heal_max_splits: int | None = None

    def __post_init__(self):
        if isinstance(self.K, bool) or not isinstance(self.K, numbers.Integral) or self.K < 1:
            raise ValueError(f"K must be a positive int (the beam width), got {self.K!r}")
        thr = self.prune_threshold
        if isinstance(thr, bool) or not isinstance(thr, numbers.Real) or not 0 <= thr < 1 or math.isnan(thr):
            raise ValueError(f"prune_threshold must be a number in [0, 1), got {thr!r}")
        if isinstance(self.eos_tokens, (str, bytes)):
            raise TypeError("eos_tokens must be a tuple of byte strings, e.g. (b'<|endoftext|>',), "
                            "not a single string")
        eos = tuple(bytes(e) if isinstance(e, bytearray) else e for e in self.eos_tokens)
        for e in eos:
            if not isinstance(e, (bytes, numbers.Integral)) or isinstance(e, bool):
                raise TypeError(f"an EOS token must be a byte string (or a token id), got {e!r}")
        object.__setattr__(self, "eos_tokens", eos)
        if not isinstance(self.heal, bool):
            raise TypeError(f"heal must be a bool, got {self.heal!r}")
        m = self.max_context_length
        if m is not None and (isinstance(m, bool) or not isinstance(m, numbers.Integral) or m < 1):
            raise ValueError(f"max_context_length must be a positive int or None, got {m!r}")
        for name in ("heal_max_backoff", "heal_max_splits"):
            v = getattr(self, name)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise TypeError(f"{name} must be an int or None (no limit), got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0 or None (no limit), got {v!r}")


def eos_token_ids(lm: AsyncLM, eos_tokens) -> list[int]:
    """Token ids of ``lm`` named by ``eos_tokens`` (byte strings match every token spelling them)."""
    wanted = {e for e in eos_tokens if isinstance(e, bytes)}
    ids = {int(e) for e in eos_tokens if not isinstance(e, bytes)}
    for t in ids:
        if not 0 <= t < lm.vocab_size:
            raise ValueError(f"EOS token id {t} is out of range for {lm.vocab_size} tokens")
    found = set()
    if wanted:
        index = _spelling_index(lm)
        for b in wanted:
            if b in index:
                ids.update(index[b])
                found.add(b)
    if wanted - found:
        raise ValueError(f"EOS token(s) {sorted(wanted - found)!r} are not in the model's vocabulary")
    return sorted(ids)


def _spelling_index(lm: AsyncLM) -> dict[bytes, list[int]]:
    """bytes -> the token ids spelling them, built once per model (kept on the model)."""
    def build() -> dict[bytes, list[int]]:
        index: dict[bytes, list[int]] = {}
        for t, b in enumerate(lm.byte_vocab):
            index.setdefault(b, []).append(t)
        return index

    return kept_on_model(lm, "_genlm_spelling_index", lm.byte_vocab, build)


async def _warm_first_window(lm: AsyncLM, params: BeamParams, initial_context, data: bytes) -> None:
    """Cache the distributions after the initial context and along the first speculation window
    of ``data``'s encoding, in one pass (what ``prefill`` computes first)."""
    if not data or not lm.supports_prefetch:
        return
    from genlm_bytes.byte_lm.speculate import first_window, speculation_window

    ctx0 = StatefulTokenizedLM.initial(lm, initial_context, params.max_context_length).context
    enc = vocabulary_of(lm).encode(data)
    if not enc or lm.has_logprobs(ctx0):
        return
    ids = list(ctx0) + list(enc[: first_window(len(enc), speculation_window(lm)) + 1])
    if params.max_context_length is None or len(ids) <= params.max_context_length:
        await lm.prefetch(ids, start=len(ctx0) - 1)


def _cached_only(beam: ByteBeamState, cands, missing: dict, pos: int) -> list:
    """The candidates of ``beam`` (about to read the byte at text position ``pos``) whose
    distributions are cached; the contexts of the others go into ``missing``, each with the
    position where it was first missed (see ``ByteBeamState._step``)."""
    lm, out = beam.lm, []
    for i, t, w in cands:
        ctx = beam.states[i].lm_state.context + (t,)
        if lm.has_logprobs(list(ctx)):
            out.append((i, t, w))
        else:
            missing.setdefault(ctx, pos)
    return out


async def _tighten(beam: ByteBeamState, cands, sym: int, ws: list[float]) -> list:
    """Prefill's candidates ``cands`` (of ``beam``, about to read ``sym``) less those the
    extensions already cached rule out.

    ``_candidates`` bounds the next total below by the covers that go on inside their
    tokens. When the heaviest covers all end a token at this byte that bound is loose, and
    every extension passes it (Gemma 3 on a chat template: extensions 30 nats below the
    total, each with a look-ahead path). The cached extensions' exact weights after ``sym``
    raise the bound at no LM cost; a candidate still below it is pruned after this byte
    whatever its distribution says, so the beam after the prune is the same. Not at the
    text's last byte, whose beam is returned unpruned."""
    has = getattr(beam.lm, "has_logprobs", None)
    if has is None or len(cands) < 2:
        return cands
    known = [(i, t, w) for i, t, w in cands
             if (i, t) in beam._ext or has(list(beam.states[i].lm_state.context + (t,)))]
    if not known:
        return cands
    more = [c.weight for e in await beam._extend(known) if (c := e.consume(sym)) is not None]
    if not more:
        return cands
    others = ws + more
    keep = {(i, t) for i, t, _ in beam._candidates(others, log_total(others))} | {(i, t) for i, t, _ in known}
    return [c for c in cands if (c[0], c[1]) in keep]


HINT_CONTEXTS = 4  # contexts a generating beam hints per pass it waits on (the backend takes what it can)
HINT_BYTES = 8  # ... found within this many guessed bytes


def _hint_next(beam: ByteBeamState, cands) -> None:
    """Before a step waits on the distributions of ``cands`` (some uncached), tell the backend
    (``AsyncLM.hint_next``) which contexts the beam will likely ask for next: walking the bytes
    the covers it already has make likeliest, the token endings that would pass the step's cut
    there, nearest first. The walk stops where the endings met so far (whose next bytes are not
    known yet) weigh more than the byte it would take."""
    lm = beam.lm
    has = getattr(lm, "has_logprobs", None)
    if has is None or not lm.wants_hints or all(has(list(beam.states[i].lm_state.context + (t,))) for i, t, _ in cands):
        return
    thr, asked = beam.params.prune_threshold, {beam.states[i].lm_state.context + (t,) for i, t, _ in cands}
    covers, hints = [s for s in beam.states if not s.terminated], []
    if not covers:
        return
    ref = max(s.weight for s in covers)
    unknown = sum(math.exp(w - ref) for _, _, w in cands)  # the endings' mass, spread over unknown next bytes
    for _ in range(HINT_BYTES):
        if not covers or len(hints) >= HINT_CONTEXTS:
            break
        acc = np.zeros(N_SYMBOLS)
        for s in covers:
            s.add_next_masses(acc, ref, include_end=False)
        b = int(acc[:256].argmax())
        if not acc[b] > unknown:
            break
        covers = [c for s in covers if (c := s.consume(b)) is not None]
        ws = [c.weight for c in covers]
        cut = log_total(ws) + math.log(thr) if thr > 0 and covers else -math.inf
        ends = sorted(((w, c.lm_state.context + (t,)) for c in covers for t, w in c.end_tokens() if w >= cut),
                      key=lambda e: -e[0])
        unknown += sum(math.exp(w - ref) for w, _ in ends)
        for _, ctx in ends:
            if ctx not in asked and ctx not in hints and not has(list(ctx)):
                hints.append(ctx)
    if hints:
        lm.hint_next(hints[:HINT_CONTEXTS])


class ByteBeamState(StatefulByteLM):
    """A beam of covers; immutable (every operation returns a new beam).

    Attributes:
        states: the covers (:class:`LazyTrieState`), heaviest first.
        params: the :class:`BeamParams`.
        logZ: log of the summed weight: the log-probability of the bytes so far (a lower bound
            when pruned).
    """

    def __init__(self, states, params: BeamParams, *, canon: tuple | None = None):
        if not isinstance(params, BeamParams):
            raise TypeError(f"params must be a BeamParams, got {type(params).__name__}")
        self.states: list[LazyTrieState] = sorted(states, key=lambda s: -s.weight)
        self.params = params
        self.logZ: float = log_total([s.weight for s in self.states])
        self._canon = canon  # the tokenizer's encoding of the text being prefilled
        self._ext: dict[tuple[int, int], LazyTrieState] = {}  # (state index, token) -> extension

    @classmethod
    async def initial(cls, lm: AsyncLM, params: BeamParams, initial_context=None, *,
                      text_hint: bytes | None = None, chat=None) -> ByteBeamState:
        """The beam of the empty byte string: one cover at the root of the initial context.

        ``chat``: a conversation ``[{"role": ..., "content": ...}, ...]``; the beam starts after
        the tokenizer's chat template with the generation prompt (instead of
        ``initial_context``), so bytes generated from it are the assistant's reply. When
        ``params.eos_tokens`` is empty, the reply ends (EOS) at the template's end-of-turn
        token or the model's EOS tokens; the returned beam's ``params`` say which.
        Needs ``lm.tokenizer`` with a chat template (else ``ValueError``).

        ``text_hint``: the text a ``prefill`` will consume next, if known (scoring). The
        distribution after the initial context is then computed in the same pass as the
        first window of the text's encoding, instead of a pass of its own. Without it, on a
        backend that prefetches (``AsyncTransformer``), that distribution is computed on the
        beam's first use: with the text of a first ``prefill`` (a prompt), or alone.
        """
        if not isinstance(lm, AsyncLM):
            raise TypeError(f"lm must be an AsyncLM, got {type(lm).__name__}")
        if not isinstance(params, BeamParams):
            raise TypeError(f"params must be a BeamParams, got {type(params).__name__}")
        if chat is not None:
            from dataclasses import replace

            from genlm_bytes.lm.chat import chat_prompt, tokenizer_of

            if initial_context is not None:
                raise ValueError("pass chat= or initial_context=, not both (chat= sets the initial context)")
            prompt = chat_prompt(tokenizer_of(lm), chat, end_of_turn=not params.eos_tokens)
            initial_context = prompt.token_ids
            if not params.eos_tokens:
                ends = tuple(dict.fromkeys([*prompt.end_of_turn_ids, *lm.eos_token_ids]))
                params = replace(params, eos_tokens=ends)
        space = shared_space(lm, eos_token_ids(lm, params.eos_tokens))
        if text_hint is None and lm.supports_prefetch:
            return cls([LazyTrieState.pending(lm, space, initial_context, params.max_context_length)], params)
        if text_hint is not None:
            await _warm_first_window(lm, params, initial_context, check_prompt(text_hint))
        state = await LazyTrieState.initial(lm, space, initial_context, params.max_context_length)
        return cls([state], params)

    async def _ready(self, text: bytes | None = None) -> None:
        """Compute the distribution of a pending initial cover (see :meth:`initial`), in the
        same pass as the first window of ``text`` if given."""
        todo = [s for s in self.states if s.is_pending]
        if not todo:
            return
        if text:
            await _warm_first_window(self.lm, self.params, list(todo[0].lm_state.context), text)
        for s in todo:
            await s.resolve()
        self.states.sort(key=lambda s: -s.weight)
        self.logZ = log_total([s.weight for s in self.states])

    # ---------------------------------------------------------------- basics
    def __len__(self) -> int:
        return len(self.states)

    def __iter__(self):
        return iter(self.states)

    @property
    def lm(self) -> AsyncLM | None:
        return self.states[0].lm_state.lm if self.states else None

    @property
    def terminated(self) -> bool:
        """True when every cover has produced EOS."""
        return bool(self.states) and all(s.terminated for s in self.states)

    def __repr__(self) -> str:
        return f"ByteBeamState(logZ={self.logZ:.4f}, {len(self.states)} covers)"

    def _pinned(self) -> int:
        """Index of the cover following the tokenizer's encoding (prefill only), else -1."""
        if self._canon is None:
            return -1
        for i, s in enumerate(self.states):
            if s.canon >= 0:
                return i
        return -1

    def prune(self) -> ByteBeamState:
        """The ``K`` heaviest covers with weight >= ``prune_threshold`` × total."""
        K = self.params.K
        keep = heaviest(self.states, K, self.params.prune_threshold)
        pin = self._pinned()
        if pin >= 0 and self.states[pin] not in keep:
            keep = keep[: K - 1] + [self.states[pin]]
        if len(keep) == len(self.states):
            return self
        new = ByteBeamState(keep, self.params, canon=self._canon)
        if self._ext:  # extensions already computed (e.g. by logp_next) stay valid for kept covers
            where = {id(s): i for i, s in enumerate(new.states)}
            for (i, t), e in self._ext.items():
                j = where.get(id(self.states[i]))
                if j is not None:
                    new._ext[(j, t)] = e
        return new

    # ------------------------------------------------------------- extensions
    def _extensions(self, threshold: float | None = None) -> list[tuple[int, int, float]]:
        """The token endings ``(i, token, weight)`` that ``<<`` and ``logp_next`` extend: those
        whose weight reaches ``prune_threshold`` × the total (every one with no threshold). The
        same set whatever symbol comes next, so the next-symbol distribution is the step's; ``K``
        plays no part (a symbol only an extension can take is not lost to a narrow beam)."""
        thr = self.params.prune_threshold if threshold is None else threshold
        cut = self.logZ + math.log(thr) if thr > 0 and self.logZ > -math.inf else -math.inf
        return [(i, t, w) for i, s in enumerate(self.states) for t, w in s.end_tokens()
                if w > -math.inf and w >= cut]

    def _candidates(self, others: list[float], ref_logZ: float):
        """Prefill's extensions ``(i, token, bound)``: those that could survive the prune after
        the (known) next byte, and the one following the canonical encoding.

        ``others``: weights of covers certainly in the next beam; ``ref_logZ``: a lower bound of
        the next total. A candidate's final weight is at most its bound.
        """
        K, thr = self.params.K, self.params.prune_threshold
        cut = ref_logZ + math.log(thr) if thr > 0 and ref_logZ > -math.inf else -math.inf
        ranked = sorted(others, reverse=True)
        kth = ranked[K - 1] if len(ranked) >= K else -math.inf
        out = []
        for i, s in enumerate(self.states):
            for t, w in s.end_tokens():
                if w == -math.inf:
                    continue
                pinned = s.canon >= 0 and self._canon is not None and s.canon < len(self._canon) \
                    and self._canon[s.canon] == t
                if pinned or (w >= cut and w >= kth):
                    out.append((i, t, w))
        return out

    async def _extend(self, cands, peek: bool = False) -> list[LazyTrieState]:
        todo = [(i, t) for i, t, _ in cands if (i, t) not in self._ext]
        if todo:
            new = await asyncio.gather(*(self.states[i].extend(t, self._canon, peek) for i, t in todo))
            self._ext.update(zip(todo, new))
        return [self._ext[(i, t)] for i, t, _ in cands]

    # ------------------------------------------------------------------ steps
    async def __lshift__(self, sym) -> ByteBeamState:
        """The beam after one more symbol (a byte 0-255, or EOS=257). Impossible: an empty beam."""
        return await self._step(check_symbol(sym))

    async def _step(self, sym: int, planner=None, pos: int | None = None, missing: dict | None = None,
                    final: bool = False) -> ByteBeamState:
        """One symbol. ``pos``: its position in the text a prefill reads (extensions follow
        :meth:`_candidates` and :func:`_tighten`, but not at the ``final`` byte), else None.

        ``missing`` (a prefill planner's walk ahead, see ``PrefillPlanner.walk_ahead``): only the
        extensions whose distributions are cached are made (read as peeks), the others' contexts
        go into ``missing`` (-> the text position first missed at), and nothing is healed."""
        if not self.states:
            return self
        await self._ready()
        if sym == EOS:
            exts = await self._extend(self._extensions())
            ended = [e for s in (*self.states, *exts) if (e := s.end_sequence()) is not None]
            return ByteBeamState(ended, self.params)
        cont = [c for s in self.states if (c := s.consume(sym)) is not None]
        if pos is None:
            cands = self._extensions()
        else:
            if self._canon is not None:
                self._drop_stale_canon(cont)
            ws = [c.weight for c in cont]
            cands = self._candidates(ws, log_total(ws))
            if missing is None and not final:
                cands = await _tighten(self, cands, sym, ws)
            if missing is not None:
                cands = _cached_only(self, cands, missing, pos)
            elif planner is not None:
                await planner.before_extensions(self, cands, pos)
        exts = await self._extend(cands, peek=missing is not None)
        if planner is not None:
            planner.after_extensions(self, cands, exts)
        for e in exts:
            c = e.consume(sym)
            if c is not None:
                cont.append(c)
        if not cont and self.params.heal and not self.terminated and missing is None:
            cont = await self._rescue(sym)
        return ByteBeamState(cont, self.params, canon=self._canon)

    async def _rescue(self, sym: int) -> list[LazyTrieState]:
        """Covers taking ``sym`` when the step left none: first the token endings it skipped
        (below the threshold), then re-split partial tokens (:mod:`~genlm_bytes.byte_lm.heal`)."""
        cont = [c for e in await self._extend(self._extensions(threshold=0.0)) if (c := e.consume(sym)) is not None]
        return cont or await healing.heal(self.states, sym, self.params)

    def _drop_stale_canon(self, covers) -> None:
        """A cover that moved past the end of the canonical token it was inside (into a longer
        token) no longer follows the canonical encoding: it must not take the pinned slot."""
        canon, lm = self._canon, self.lm
        for c in covers:
            if c.canon >= 0 and (c.canon >= len(canon)
                                 or c.space.trie.depth[c.node] > len(lm.byte_vocab[canon[c.canon]])):
                c.canon = -1

    async def logp_next(self) -> LazyByteProbs:
        """Next-symbol log-probs (bytes and EOS; EOT is always -inf for a beam)."""
        if not self.states:
            raise ValueError("logp_next() on an empty beam: no cover survived the last byte "
                             "(the bytes so far have probability 0 under this beam)")
        if self.terminated:
            raise ValueError("this beam has ended (EOS) and accepts nothing")
        await self._ready()
        cands = self._extensions()
        if GUESS_AHEAD.get():
            _hint_next(self, [c for c in cands if (c[0], c[1]) not in self._ext])
        exts = await self._extend(cands)
        covers = [s for s in (*self.states, *exts) if not s.terminated]
        ref = max(s.weight for s in covers)
        acc = np.zeros(N_SYMBOLS)
        for s in covers:
            s.add_next_masses(acc, ref, include_end=False)
        z = acc.sum()
        if not z > 0:
            raise ValueError("no next symbol has positive probability under this beam")
        with np.errstate(divide="ignore"):
            return LazyByteProbs(np.log(acc / z))

    async def prefill(self, data: bytes, progress=None) -> ByteBeamState:
        """Consume ``data`` (EOS tokens count as ordinary text), pruning after every byte.

        The tokenizer's encoding of ``data`` is computed in one pass and its cover is kept
        through every prune, so ``logZ`` >= the log-probability of that encoding.

        Args:
            data: the bytes.
            progress: optional callable receiving the number of bytes consumed so far
                (called after each byte; for progress bars).
        """
        data = check_prompt(data)
        if not data or not self.states:
            return self
        with known_text():  # the backend needs no guesses of what follows: the text says it
            await self._ready(data)
            return await self._prefill(data, progress)

    async def _prefill(self, data: bytes, progress) -> ByteBeamState:
        lm = self.lm
        canon = None
        states = [s.with_mode(True) for s in self.states]
        anchor = next((i for i, s in enumerate(states) if s is not None and s.node == 0 and not s.terminated),
                      None)
        planner = None
        if anchor is not None:
            enc = vocabulary_of(lm).encode(data)
            if enc:
                canon = tuple(enc)
                a = states[anchor]
                states[anchor] = LazyTrieState(a.lm_state, 0, a.ctx_weight, a.dist, text=True, canon=0)
        beam = ByteBeamState([s for s in states if s is not None], self.params, canon=canon)
        if canon is not None and lm.supports_prefetch:
            from genlm_bytes.byte_lm.speculate import PrefillPlanner

            planner = PrefillPlanner(beam, data)
            ctx0 = tuple(states[anchor].lm_state.context)
            if planner.fits(len(ctx0) + len(canon)):
                await planner.add_path(ctx0, canon, 0)
        for pos, b in enumerate(data):
            beam = beam.prune()
            if planner is not None:
                await planner.advance(pos, beam)
            beam = await beam._step(b, planner, pos, final=pos == len(data) - 1)
            if progress is not None:
                progress(pos + 1)
            if not beam.states:
                logger.debug("prefill: no cover survived byte %r", bytes([b]))
                break
        states = [g for s in beam.states if (g := s.with_mode(False)) is not None]
        return ByteBeamState(states, self.params)

    async def cleanup(self) -> None:
        """Drop the covers (and their distributions); the beam is empty afterwards."""
        self.states = []
        self._ext.clear()
        self.logZ = -math.inf
