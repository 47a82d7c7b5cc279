"""Speculation: computing distributions before they are asked for, for lone generation.

Two mechanisms, both exact (every distribution cached is the model's own; a wrong guess
costs a little time, never a result):

- :class:`Drafter`: a pass run for one context alone also runs a few guessed tokens in the same
  tree pass (``draft_tokens``): longer siblings of a short last token (" the" when the context
  ends with " "), then the tokens that followed the last earlier occurrence of its last two
  tokens (:func:`lookup_draft`, "prompt lookup"). A few generation requests asked together
  (up to ``ahead_group``: a beam whose covers copy text in different segmentations) each run
  their own prompt-lookup draft in one ragged tree pass (``Scheduler._with_guesses``;
  ``group_drafts``).
- :class:`LookAhead`: after serving a lone request (or a few generation requests asked
  together), the model's thread runs the context extended by its guessed next token while the
  caller works through that token's bytes, and after it the tokens a prompt lookup drafts
  (with the shorter tokens spelling each one's start, for a lone request). Asking for a guessed context starts
  the next guess, from the first guess along the drafts that is not computed yet (text that
  repeats itself then costs a pass per few tokens); asking for any other context stops the
  pass at its next layer (the check runs in
  :class:`~genlm_bytes.lm.hf.pass_cache.PassLayer.update`, in the look-ahead's thread only).

Not handled: guessing for batches larger than ``ahead_group`` (a beam's requests are many and
varied), and for requests of a known text (prefill asks for what it needs).
"""

from __future__ import annotations

import asyncio
import logging
import threading

import numpy as np
import torch

logger = logging.getLogger(__name__)


class Spellings:
    """The byte spelling of every token, end-of-sequence ids, and the token of each spelling."""

    def __init__(self, byte_vocab, eos_ids):
        self.byte_vocab, self.eos_ids = byte_vocab, eos_ids
        self._by_bytes: dict[bytes, int] | None = None

    @property
    def by_bytes(self) -> dict[bytes, int]:
        """The token id of each spelling (built on first use)."""
        if self._by_bytes is None:
            self._by_bytes = {b: t for t, b in enumerate(self.byte_vocab) if b}
        return self._by_bytes

    def prefix_tokens(self, tok: int, shortest: int = 1) -> list[int]:
        """The tokens spelling proper prefixes of ``tok``'s bytes at least ``shortest`` bytes
        long, longest first (" th" and " t" for " the")."""
        spelled, by_bytes = self.byte_vocab[tok], self.by_bytes
        return [t for n in range(len(spelled) - 1, shortest - 1, -1) if (t := by_bytes.get(spelled[:n])) is not None]


def top_tokens(lp, k: int) -> list[int]:
    """The ``k`` largest entries' indices of the numpy row ``lp``, largest first."""
    k = min(k, len(lp))
    idx = np.argpartition(lp, len(lp) - k)[len(lp) - k:]
    return idx[np.argsort(-lp[idx], kind="stable")].tolist()


def np_row(row: torch.Tensor):
    """A (V,) log-prob row as a float32 numpy array (a view when it already is one on the CPU)."""
    row = row.detach()
    if row.device.type != "cpu" or row.dtype != torch.float32:
        row = row.float().cpu()
    return row.numpy()


def byte_mode(lp, top: list[int], vocab, eos_ids) -> int | None:
    """The token a byte-by-byte greedy walk through the spellings of the tokens ``top`` (their
    log-probs in ``lp``) ends at: from the empty prefix, take the next byte whose tokens hold
    the most probability, and stop at a token whose own probability is at least that of the
    best longer group. What a byte-level beam generating greedily ends its next token at,
    more often than at the likeliest token (" the" from " t..." holding more than " a")."""
    cands = [(vocab[t], float(np.exp(lp[t])), t) for t in top if vocab[t] and t not in eos_ids]
    prefix = b""
    while cands:
        n = len(prefix)
        end, groups = None, {}
        for b, p, t in cands:
            if len(b) == n:
                end = (p, t) if end is None or p > end[0] else end
            else:
                groups[b[n]] = groups.get(b[n], 0.0) + p
        if not groups:
            return end[1] if end else None
        byte, mass = max(groups.items(), key=lambda kv: kv[1])
        if end is not None and end[0] >= mass:
            return end[1]
        prefix += bytes([byte])
        cands = [c for c in cands if len(c[0]) > n and c[0][n] == byte]
    return None


def lookup_draft(ids: tuple, k: int, window: int = 2048, most: int = 0) -> tuple:
    """Up to ``k`` tokens guessed to follow ``ids``: the tokens after the most recent earlier
    occurrence (within the last ``window`` positions) of its last two tokens, preferring one
    where its last three match. ``()`` when they did not occur before. With ``most`` > ``k``, a
    copy under way drafts longer: as many tokens as the occurrence already matches (the tokens
    before it equal the last ones of ``ids``), up to ``most``.

    >>> lookup_draft((1, 2, 3, 1, 2), 2)
    (3, 1)
    >>> lookup_draft((5, 6, 7, 8, 9, 1, 5, 6, 7), 1, most=4)
    (8, 9, 1)
    """
    n = len(ids)
    if n < 3 or k < 1:
        return ()
    a, b = ids[-2], ids[-1]
    c = ids[-3]
    best = -1
    for j in range(n - 2, max(1, n - window) - 1, -1):  # ids[j - 1:j + 1] == (a, b), j < n - 1
        if ids[j] == b and ids[j - 1] == a:
            if j >= 2 and ids[j - 2] == c:
                best = j
                break
            if best < 0:
                best = j
    if best < 0:
        return ()
    if most > k:  # (the match's length: ids[best - m + 1:best + 1] == ids[n - m:])
        m = 2
        while m < most and best - m >= 0 and ids[best - m] == ids[n - 1 - m]:
            m += 1
        k = max(k, m)
    return ids[best + 1: best + 1 + k]


def clipped_draft(ids: tuple, k: int, config, max_positions: int | None) -> tuple:
    """:func:`lookup_draft` of up to ``k`` tokens (a copy under way: up to ``draft_most``) with
    the engine's ``config``, within the model's window ``max_positions`` (None: unbounded)."""
    draft = lookup_draft(ids, k, config.draft_search, config.draft_most) if k > 0 else ()
    return draft[: max(0, max_positions - len(ids))] if max_positions else draft


class Drafter:
    """Guessed tokens run with a lone request (see the module docstring).

    Args:
        runner: the :class:`~genlm_bytes.lm.hf.passes.PassRunner`.
        spellings: a :class:`Spellings`.
        draft_tokens: the most guessed tokens per pass (0: off).
        max_positions: the model's window (None: unbounded).
    """

    def __init__(self, runner, spellings: Spellings, draft_tokens: int, max_positions: int | None):
        self.runner, self.cache, self.config = runner, runner.cache, runner.config
        self.spellings, self.draft_tokens, self.max_positions = spellings, draft_tokens, max_positions

    def drafted(self, ids: tuple, ref, p: int) -> torch.Tensor | None:
        """One context alone, a few new tokens: runs it with the tokens guessed to be asked for
        next (longer siblings first, then tokens drafted from its own text) in one tree pass,
        and returns its row; None when there is no guess."""
        if not self.draft_tokens or not self.runner.store.kv_reuse or len(ids) - p > self.config.draft_max_new:
            return None
        siblings = self.siblings(ids, self.draft_tokens) if p == len(ids) - 1 else []
        draft = self.lookup(ids, self.draft_tokens - len(siblings))
        # One row, one tree pass: the context, then each sibling's token in place of its last
        # one, and the draft after it (branches: the context's own keys/values stay one path).
        items = [(p, (t,), ()) for t in siblings] + ([(len(ids), draft, ())] if draft else [])
        if not items:
            return None
        self.runner.tree_pass(ids, p, ref, len(ids) - p, items, grow=True)
        # The guessed rows stay cached for the requests to come; this one is handed out.
        return self.cache.get_logp(ids, held=True)  # (None if a tiny budget evicted it at once)

    def lookup(self, ids: tuple, k: int) -> tuple:
        """Up to ``k`` tokens drafted to follow ``ids`` from its own text (:func:`lookup_draft`),
        within the model's window."""
        return clipped_draft(ids, k, self.config, self.max_positions)

    def draft_items(self, ids: tuple, p: int) -> list[tuple[int, tuple, tuple]]:
        """The tree-pass item of ``ids``'s prompt-lookup draft (:meth:`lookup`), ``[]`` when there
        is none or the context has more than ``draft_max_new`` uncached tokens (past ``p``)."""
        draft = self.lookup(ids, self.draft_tokens) if len(ids) - p <= self.config.draft_max_new else ()
        return [(len(ids), draft, ())] if draft else []

    def longer_tokens(self, ids: tuple) -> tuple[list[int], object]:
        """The tokens ``t`` among the ``sibling_top`` likeliest after ``ids[:-1]`` that spell
        ``ids[-1]``'s bytes and more (``ids`` ends a short token, " ", while a byte-level beam
        may be inside a longer one, " the"), likeliest first, and that distribution as a numpy
        row (``[], None`` when it is not cached)."""
        row = self.cache.get_logp(ids[:-1]) if len(ids) >= 2 else None
        if row is None:
            return [], None
        lp = np_row(row)
        vocab = self.spellings.byte_vocab
        last = vocab[ids[-1]]
        return [t for t in top_tokens(lp, self.config.sibling_top)
                if len(vocab[t]) > len(last) and vocab[t].startswith(last)], lp

    def siblings(self, ids: tuple, k: int) -> list[int]:
        """Up to ``k`` tokens, likeliest first, whose contexts ``ids[:-1] + (t,)`` a byte-level
        beam may ask for next and that are not cached: the longer tokens (see
        :meth:`longer_tokens`) and the tokens spelling their starts on the way (at " c", " ch"
        on the way to " cheese")."""
        longer, lp = self.longer_tokens(ids) if k >= 1 else ([], None)
        if not longer:
            return []
        n0, found = len(self.spellings.byte_vocab[ids[-1]]), set(longer)
        for t in longer:
            found.update(self.spellings.prefix_tokens(t, n0 + 1))
        out = [t for t in found if self.cache.get_logp(ids[:-1] + (t,)) is None]
        out.sort(key=lambda t: -lp[t])
        return out[:k]

    def longer_sibling(self, ids: tuple) -> int | None:
        """The likeliest longer token (see :meth:`longer_tokens`) whose context
        ``ids[:-1] + (t,)`` is cached (computed with ``ids``, see :meth:`siblings`), else None."""
        return next((t for t in self.longer_tokens(ids)[0] if self.cache.get_logp(ids[:-1] + (t,)) is not None),
                    None)


class Stopped(Exception):
    """A look-ahead pass stopped because a request for another context came."""


class Ahead:
    """A look-ahead pass: the contexts it guesses the caller goes on with (``paths``: asking for
    one starts the next guess), every context it computes, and the event that stops it."""

    __slots__ = ("abort", "hits", "paths", "targets")

    def __init__(self, paths: frozenset, targets: frozenset, abort: threading.Event):
        self.paths, self.targets, self.abort = paths, targets, abort
        self.hits: dict[tuple, torch.Tensor] = {}  # paths asked for this turn (group passes)


class LookAhead:
    """Look-ahead passes (see the module docstring) in the model's thread.

    Args:
        runner: the :class:`~genlm_bytes.lm.hf.passes.PassRunner`.
        spellings: a :class:`Spellings`.
        enabled: False: no look-ahead passes.
        max_positions: the model's window (None: unbounded).
        check_model: run under the model's lock before a look-ahead pass is planned (drops
            stale cached results when the model changed).
        draft_tokens: the most tokens a look-ahead pass also runs after its guess, drafted from
            the context's own text (:func:`lookup_draft`); 0: none.
    """

    def __init__(self, runner, spellings: Spellings, enabled: bool, max_positions: int | None, check_model,
                 draft_tokens: int = 0):
        self.runner, self.cache, self.config = runner, runner.cache, runner.config
        self.draft_tokens = draft_tokens
        self.spellings, self.max_positions, self.check_model = spellings, max_positions, check_model
        self.enabled = enabled and runner.store.kv_reuse
        self.batcher = None  # set by the backend (the model's thread and lock)
        self.ahead: Ahead | None = None  # the look-ahead pass queued or running
        # (event, thread id) of a look-ahead pass running: once the event is set, the pass stops at
        # its next layer (in that thread only: the model may run elsewhere meanwhile)
        self.abort: tuple[threading.Event, int] | None = None

    def _fits(self, ids: tuple) -> bool:
        return not (self.max_positions and len(ids) + 1 > self.max_positions)

    def _guess(self, lp, top) -> int | None:
        return byte_mode(lp, top, self.spellings.byte_vocab, self.spellings.eos_ids)

    # ------------------------------------------------------------------ on the event loop
    def on_hit(self, key: tuple, row: torch.Tensor) -> None:
        """A cached row was handed out: if it was guessed, guess what follows."""
        ahead = self.ahead
        if ahead is not None and key in ahead.paths:
            if len(ahead.paths) > 1:
                self._group_hit(ahead, key, row)
            else:
                self.start(key, row)

    def on_miss(self, key: tuple) -> None:
        """A context no look-ahead pass computes was asked for: stop the pass."""
        ahead = self.ahead
        if ahead is not None and key not in ahead.targets:
            ahead.abort.set()

    def stop(self) -> None:
        ahead = self.ahead
        if ahead is not None:
            ahead.abort.set()

    def start(self, ids: tuple, row: torch.Tensor, sibling: int | None = None) -> None:
        """Queue a look-ahead pass after the lone context ``ids`` (its distribution ``row``):
        ``ids`` extended by the token a byte-by-byte greedy walk of that distribution ends at
        (:func:`byte_mode`; the path, kept in the context's arena), and by the likeliest
        token if that differs; with ``sibling`` (a longer token in place of the last one, its
        distribution cached), that sibling's context extended by its own likeliest token;
        else ``ids`` extended by up to ``ahead_shorter`` tokens that spell a proper prefix of
        the path's token with probability at least ``ahead_shorter_p``."""
        cfg = self.config
        if not self.enabled or not self._fits(ids):
            return
        # Guesses computed already (drafts of an earlier pass) are followed to the first one
        # that is not: the pass for it starts while the caller still works through those.
        n = len(ids)
        ids, a, lp, top = self._follow(ids, np_row(row))  # (numpy: no torch parallel region on this thread)
        if len(ids) > n:
            sibling = None
        if a is None or self.cache.get_logp(ids + (a,)) is not None:
            return
        items, paths = [], [ids + (a,)]
        eos = self.spellings.eos_ids
        if top[0] != a and top[0] not in eos:
            items.append((len(ids), (top[0],), ()))
        sib_row = self.cache.get_logp(ids[:-1] + (sibling,)) if sibling is not None and cfg.ahead_sibling else None
        if sib_row is not None and not items:
            b = int(np_row(sib_row).argmax())
            if b not in eos:
                items.append((len(ids) - 1, (sibling, b), ()))
                paths.append(ids[:-1] + (sibling, b))
        if len(items) < cfg.ahead_shorter and not (items and len(items[0][1]) > 1):
            least = cfg.ahead_shorter_logp
            for t in self.spellings.prefix_tokens(a):
                if t != top[0] and lp[t] >= least and len(items) < cfg.ahead_shorter:  # (top[0]: a branch already)
                    items.append((len(ids), (t,), ()))
        # The tokens that followed the last earlier occurrence of the guess's context, run after
        # it in the same pass (text that repeats itself is then a few tokens per pass).
        draft = self._draft(ids + (a,))
        if draft:
            # With each drafted token, the tokens spelling a proper prefix of it (a byte-level
            # beam also asks for the contexts ending in those: its shorter covers).
            subs = tuple((k, t) for k, tok in enumerate(draft[: self.draft_tokens])
                         for t in self.spellings.prefix_tokens(tok)[: cfg.ahead_shorter])
            items.append((len(ids) + 1, tuple(draft), subs))
        base = ids + (a,)
        targets = frozenset(paths + [base[:i] + chain[:k] for i, chain, _ in items for k in range(1, len(chain) + 1)]
                            + [base[:i] + chain[:k] + (t,) for i, chain, subs in items for k, t in subs])
        self._queue(Ahead(frozenset(paths), targets, threading.Event()), self._run_one, ids, a, tuple(items))

    def start_group(self, contexts: list[tuple], rows: list) -> None:
        """Queue one look-ahead pass for a few contexts asked for together (a beam whose covers
        follow the same text in different segmentations, or a few states stepping together):
        each extended by the token a greedy byte walk of its distribution ends at (guesses
        computed already are followed to the first one that is not, as for one context), and
        by the tokens a prompt lookup drafts after that, as one ragged batch. Asking for all of
        the guesses (or some, in one go) starts the next guess; asking for any other context
        stops it, as for one context."""
        if not self.enabled:
            return
        jobs = {}
        for ids, row in zip(contexts, rows):
            if not self._fits(ids):
                continue
            ids, a, _, _ = self._follow(ids, np_row(row))
            if a is None or self.cache.get_logp(ids + (a,)) is not None:
                continue
            path = ids + (a,)
            jobs.setdefault(path, self._draft(path) if self.config.group_drafts else ())
        if jobs:
            targets = frozenset(jobs) | frozenset(path + d[:k] for path, d in jobs.items() for k in range(1, len(d) + 1))
            self._queue(Ahead(frozenset(jobs), targets, threading.Event()), self._run_group, tuple(jobs.items()))

    def _follow(self, ids: tuple, lp) -> tuple:
        """``(ids', a, lp', top')``: ``ids`` extended along the guesses whose distributions are
        cached (drafts of an earlier pass), the guess after ``ids'`` (None: no guess), and the
        numpy distribution after ``ids'`` with its likeliest tokens; ``lp``: the distribution
        after ``ids``."""
        k = self.config.ahead_top
        top = top_tokens(lp, k)
        a = self._guess(lp, top)
        longest = max(self.draft_tokens, self.config.draft_most) if self.draft_tokens else 0  # (a pass's draft)
        for _ in range(longest + 1):
            nxt = self.cache.get_logp(ids + (a,)) if a is not None else None
            if nxt is None or not self._fits(ids + (a,)):
                break
            ids = ids + (a,)
            lp = np_row(nxt)
            top = top_tokens(lp, k)
            a = self._guess(lp, top)
        return ids, a, lp, top

    def _draft(self, ids: tuple) -> tuple:
        """The tokens a prompt lookup drafts after ``ids`` (up to ``draft_tokens``), within the
        model's window."""
        return clipped_draft(ids, self.draft_tokens, self.config, self.max_positions)

    def _arm(self, ahead: Ahead) -> None:
        """Make ``ahead`` the look-ahead (stopping the one before)."""
        old, self.ahead = self.ahead, ahead
        if old is not None:
            old.abort.set()

    def _queue(self, ahead: Ahead, job, *args) -> None:
        """Make ``ahead`` the look-ahead pass (stopping the one before) and queue ``job(ahead,
        *args)`` in the model's thread."""
        self._arm(ahead)
        self.batcher._executor.submit(job, ahead, *args)

    def _group_hit(self, ahead: Ahead, key: tuple, row: torch.Tensor) -> None:
        """A path of a group look-ahead was asked for: once the requests of this turn of the
        event loop are in, guess what follows the paths asked for."""
        first = not ahead.hits
        ahead.hits[key] = row
        if first:
            asyncio.get_running_loop().call_soon(self._after_group_hits, ahead)

    def _after_group_hits(self, ahead: Ahead) -> None:
        if ahead.abort.is_set() or self.ahead is not ahead:
            return  # (another context was asked for meanwhile: its own pass guesses next)
        hits, ahead.hits = ahead.hits, {}
        if len(hits) == 1:
            (key, row), = hits.items()
            self.start(key, row)
        else:
            self.start_group(list(hits), list(hits.values()))

    # ------------------------------------------------------------------ in the model's thread
    def _run_one(self, ahead: Ahead, ids: tuple, a: int, items: tuple) -> None:
        """Run a look-ahead pass for one context unless stopped."""
        cache, runner = self.cache, self.runner

        def prepare():
            if cache.get_logp(ids + (a,)) is not None:
                return None
            P, ref = cache.deepest_kv(ids, len(ids))
            if P < len(ids):
                return None  # (the context's past was evicted: no guessing then)
            if items:
                return lambda: runner.tree_pass(ids + (a,), P, ref, 1, list(items), grow=True)
            return lambda: runner.forward([(ids + (a,), ref, P)], all_positions=True, grow=True)

        self._guarded(ahead, prepare)

    def _run_group(self, ahead: Ahead, jobs: tuple) -> None:
        """Run a group look-ahead pass unless stopped: the paths ``(path, draft)`` whose contexts
        are cached, in one batch, each with its draft after it (a ragged tree pass)."""
        def prepare():
            rows = []
            for path, draft in jobs:
                if self.cache.get_logp(path) is None:
                    P, ref = self.cache.deepest_kv(path, len(path) - 1)
                    if P == len(path) - 1:  # (a context whose past was evicted: no guess)
                        rows.append((path, ref, P, [(len(path), draft, ())] if draft else []))
            if not rows:
                return None
            if any(items for *_, items in rows):
                return lambda: self.runner.tree_rows(rows, hand_out=0)
            return lambda: self.runner.forward([r[:3] for r in rows], all_positions=True, grow=len(rows) == 1)

        self._guarded(ahead, prepare)

    def _guarded(self, ahead: Ahead, prepare) -> None:
        """Unless ``ahead`` was stopped, ``prepare()`` (under the model's lock) returns the pass
        to run (or None), which runs with the stop check on (see :meth:`check_abort`); a stopped
        or failed pass caches nothing and fails no caller."""
        runner = self.runner
        try:
            with self.batcher._lock, torch.inference_mode():
                if ahead.abort.is_set():
                    return
                self.check_model()
                run = prepare()
                if run is None:
                    return
                self.abort = (ahead.abort, threading.get_ident())
                runner.before_layer = self.check_abort
                try:
                    run()
                except Stopped:
                    runner.store.end_pass(None, 0)
                    logger.debug("look-ahead pass stopped")
                finally:
                    self.abort = runner.before_layer = None
        except Exception:  # a failed guess fails no caller (a real request would report the error)
            logger.debug("look-ahead pass failed", exc_info=True)
        finally:
            if self.ahead is ahead and ahead.abort.is_set():
                self.ahead = None

    def check_abort(self, *args) -> None:
        """Stop a look-ahead pass whose abort event is set (raises :class:`Stopped`), in the
        look-ahead's thread only (see ``abort``); run once per layer."""
        stop = self.abort
        if stop is not None and stop[0].is_set() and stop[1] == threading.get_ident():
            raise Stopped
