"""AsyncTransformer: any transformers causal LM as an AsyncLM, batched, with automatic KV reuse.

How a request is served:
1. a cache hit (the exact context was computed before) returns at once;
2. otherwise the request joins the batcher's queue; the worker runs the queued
   contexts as one ragged forward pass: each row starts from the longest
   cached prefix of its context (its *past*) and runs only the remaining
   tokens. Pasts are left-padded to a common length, new tokens right-padded,
   and a 2-D attention mask plus per-row ``position_ids`` keep every row exact.
3. the keys/values of the pass are kept (one :class:`KVBlock`) and every new
   prefix points into it, so the next request extending any of them runs
   only its own new tokens.

``prefetch(ids)`` computes the distributions after every prefix of ``ids`` in
one pass (in chunks), which is what prefill and scoring of a known text need.

Not handled: models whose cache layers are not plain full-attention layers
(sliding windows, recurrent states). For those, KV reuse is switched off and
every request runs its whole context (results are still cached).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import os
import threading
import time

import numpy as np
import torch

from genlm_bytes.batching import Batcher
from genlm_bytes.lm.base import GUESS_AHEAD, AsyncLM, check_token_ids
from genlm_bytes.lm.cache import KVBlock, KVRef, PrefixCache
from genlm_bytes.lm.lean import LeanCache, decoder_of, lean_decoder

logger = logging.getLogger(__name__)

DEFAULT_CACHE_BUDGET = 1 << 30  # 1 GiB of cached log-probs and KV
PREFETCH_CHUNK = 512  # tokens per forward pass when prefetching a long text
ALT_CHUNK = 256  # alternative tokens per tree-masked forward pass
# Distributions the byte level holds prepared (probabilities in byte order plus the log-prob row
# each keeps, 8 bytes per token): up to PREPARED_DISTS kept for reuse at the default budget (in
# proportion below it, see AsyncTransformer.prepared_dists) plus a speculation window's worth
# (1.5 distributions per boundary of ``speculation_window``) being built.
PREPARED_DISTS = 256
# Token boundaries a prefill speculates per pass (see genlm_bytes.byte_lm.speculate): up to
# SPECULATION_WINDOW from a budget of WINDOW_BUDGET up, in proportion below it (at least 16):
# two windows of log-prob rows (and their alternatives') are cached ahead of the beam, which a
# small budget cannot hold next to a long text's keys/values.
SPECULATION_WINDOW = 128
WINDOW_BUDGET = 512 << 20
PASS_SHARE = 0.2  # of the budget: what one pass's temporary tensors may take (longer passes are split)
MAX_SEGMENTS = 64  # a past chained from more segments than this is stored whole by the next pass
MIN_SEGMENTS = 8  # ... and one from this many, on a short past (see _chain_full)
LOGP_CHUNK = 64  # output positions whose logits are in memory at once
DRAFT_TOKENS = 2  # default of AsyncTransformer(draft_tokens=): guessed tokens run with a lone request
# (on a CPU a pass of 2-3 tokens costs 1-1.25 passes of one: measured 57-72 ms for one token, 61-89
# for two, 60-85 for three, 82-125 for four on the embedded model, on a past of ~20 tokens)
DRAFT_MAX_NEW = 8  # ... whose context has at most this many uncached tokens
DRAFT_SEARCH = 2048  # positions searched back for the draft
SIBLING_TOP = 8  # ... and the likeliest tokens searched for longer siblings (see _siblings)
AHEAD_SHORTER = 2  # a look-ahead pass also runs up to this many shorter tokens of its guess ...
AHEAD_SHORTER_P = 0.01  # ... that have at least this probability (see _start_lookahead)
AHEAD_SIBLING = True  # ... or the likeliest token after a longer sibling computed with the context
AHEAD_TOP = 64  # tokens a look-ahead's greedy byte walk considers (see _byte_mode)
AHEAD_GROUP = 4  # a batch of at most this many generation requests gets a look-ahead pass too
# Arenas (see KVBlock): a lone request's pass (sequential generation) stores its whole context in
# one block with room for ARENA_SPARE_MIN slots or ARENA_SPARE_SHARE of the context more (whichever
# is more), if that block takes at most ARENA_BUDGET_SHARE of the budget; the passes extending it
# write into it in place. 0 slots: off.
ARENA_SPARE_MIN = 64
ARENA_SPARE_SHARE = 0.25
ARENA_BUDGET_SHARE = 0.25
TRIM_AFTER_BYTES = 16 << 20  # hand free heap pages back after evictions freed this much
TRIM_SLACK_BYTES = 0  # ... or when the resident set exceeds the accounted memory (HEAP_SHARE included) by this much,
TRIM_TIME_SHARE = 0.1  # spending at most this share of the model passes' time on such trims
HEAP_SHARE = 0.05  # of the cache budget, kept for free heap pages between trims (see _maybe_trim)


class AsyncTransformer(AsyncLM):
    """A transformers causal LM behind the AsyncLM interface.

    Args:
        hf_model: a loaded ``AutoModelForCausalLM`` (put in eval mode here).
        hf_tokenizer: its tokenizer (gives the byte vocabulary).
        batch_size: the most contexts in one forward pass.
        cache_budget_bytes: memory for cached log-probs and KV blocks (LRU eviction).
        initial_context: token ids byte-level states start from (default: the BOS token,
            else the first EOS token).
        eos_token_ids: end-of-sequence ids (default: from the tokenizer and generation config).
        kv_reuse: run only the new tokens of a context whose prefix was computed before.
        draft_tokens: a pass run for one context alone (sequential generation) also runs up to
            this many guessed tokens and caches the distributions after them: when the context
            ends with a short token (" ") that begins likelier tokens after the same prefix,
            those siblings (" the", or " th" on the way to " their": a byte-level beam inside
            " the" asks for " " and " the" a few bytes apart), likeliest first; with the room
            left, the tokens that followed the last earlier occurrence of its last two tokens
            ("prompt lookup"). On a CPU a pass of 2-3 tokens costs 1-1.25 passes of one, so a
            right guess saves a later pass and a wrong one costs little. 0: off. Results are
            exact either way (every distribution is the model's own).
        lookahead: after serving a lone request (sequential generation), the model's thread
            runs the context extended by its likeliest next token (and by the likely shorter
            tokens that spell the start of that token, which a byte-level beam asks for first)
            while the caller is still working through that token's bytes; asking for it
            starts the next such pass, asking for any other context stops it at its next layer
            (:meth:`stop_lookahead` too). A batch of at most AHEAD_GROUP generation requests
            gets one batched pass of each context's guess. Exact either way; False: off.
        lean: run the passes of a LLaMA-family model with :mod:`genlm_bytes.lm.lean` (the same
            decoder without transformers' per-module overhead; used only if a check on a few
            tokens agrees with the model's own forward). False: transformers' forward always.
    """

    _trusted_output = True

    def __init__(self, hf_model, hf_tokenizer, *, batch_size: int = 32,
                 cache_budget_bytes: int = DEFAULT_CACHE_BUDGET, initial_context=None,
                 eos_token_ids=None, kv_reuse: bool = True, byte_vocab=None,
                 draft_tokens: int = DRAFT_TOKENS, lookahead: bool = True, lean: bool = True):
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
            raise ValueError(f"draft_tokens must be a non-negative int, got {draft_tokens!r}")
        if not isinstance(lookahead, bool):
            raise TypeError(f"lookahead must be True or False, got {lookahead!r}")
        if not isinstance(lean, bool):
            raise TypeError(f"lean must be True or False, got {lean!r}")
        if byte_vocab is None:
            from genlm_bytes.lm.vocab import byte_vocab_from_tokenizer

            byte_vocab = byte_vocab_from_tokenizer(hf_tokenizer)
        if eos_token_ids is None:
            eos_token_ids = _eos_ids(hf_model, hf_tokenizer)
        if initial_context is None:
            bos = hf_tokenizer.bos_token_id
            initial_context = [bos] if bos is not None else list(eos_token_ids[:1])
        n_out = hf_model.get_output_embeddings().weight.shape[0]
        if len(byte_vocab) < n_out:  # the output layer is padded beyond the tokenizer
            byte_vocab = list(byte_vocab) + [b""] * (n_out - len(byte_vocab))
        elif len(byte_vocab) > n_out:
            raise ValueError(f"the tokenizer has {len(byte_vocab)} tokens but the model outputs {n_out} logits")
        super().__init__(byte_vocab=byte_vocab, initial_context=initial_context, eos_token_ids=eos_token_ids)
        self.model = hf_model.eval()
        self.tokenizer = hf_tokenizer
        self.device = next(hf_model.parameters()).device
        self.cache = PrefixCache(cache_budget_bytes)
        self.batcher = Batcher(self._process, max_batch_size=batch_size, name="AsyncTransformer")
        # Flush denormals to zero in the model's worker thread (a per-thread CPU flag): forwards on a
        # cached past otherwise run into denormal floats and slow down up to 5x on x86.
        self.batcher._executor.submit(torch.set_flush_denormal, True).result()
        self.kv_reuse = bool(kv_reuse) and _plain_cache(hf_model)
        self.draft_tokens = draft_tokens
        self.lookahead = lookahead
        self.max_positions = getattr(hf_model.config, "max_position_embeddings", None)
        self._softcap = getattr(hf_model.config, "final_logit_softcapping", None)
        self.n_forward_tokens = 0  # tokens run through the model: for tests and benchmarks
        # Memory the budget keeps free besides cached payloads: the byte-level working set
        # (prepared distributions, see PREPARED_DISTS), a share for the allocator (free heap pages
        # between two trims) and, during a pass, its temporary tensors.
        budget = self.cache.budget_bytes
        self.prepared_dists = max(32, min(PREPARED_DISTS, PREPARED_DISTS * budget // DEFAULT_CACHE_BUDGET))
        self.speculation_window = max(16, min(SPECULATION_WINDOW, SPECULATION_WINDOW * budget // WINDOW_BUDGET))
        self._base_reserve = ((self.prepared_dists + self.speculation_window * 3 // 2) * len(byte_vocab) * 8
                              + int(HEAP_SHARE * budget))
        self._kv_per_token = _kv_bytes_per_token(hf_model)  # (0: measured by the first pass)
        cfg = hf_model.config  # (transformers' config attributes are slow to read on a hot path)
        self._dims = (getattr(cfg, "hidden_size", 0) or 0, getattr(cfg, "num_attention_heads", 1) or 1,
                      getattr(cfg, "num_hidden_layers", 1) or 1)  # for _pass_bytes
        self.cache.reserve(self._base_reserve)
        # The resident set with the model loaded: what grows past it beyond the cache's accounting
        # is mostly free heap pages, handed back by _maybe_trim.
        self._rss0 = _rss_bytes() if _MALLOC_TRIM is not None else None
        _fix_mmap_threshold()
        self._pass_seconds = self._trim_seconds = 0.0
        self._pass_t0 = 0.0
        self._ahead: _Ahead | None = None  # the look-ahead pass queued or running (see _start_lookahead)
        # (event, thread id) of a look-ahead pass running: once the event is set, the pass stops at
        # its next layer (in that thread only: the model may run elsewhere meanwhile)
        self._abort: tuple[threading.Event, int] | None = None
        self._hooked = False  # the layers' abort checks are registered (see _abort_hooks)
        self._by_bytes: dict[bytes, int] | None = None  # see by_bytes
        # The decoder's passes without transformers' per-module overhead, when the model is one
        # it computes exactly (checked on a few tokens; see genlm_bytes.lm.lean).
        self.lean = None
        if lean and self.kv_reuse:
            self.lean = lean_decoder(hf_model)

    # ---------------------------------------------------------------- loading
    @classmethod
    def from_name(cls, path_or_id: str, *, device: str | None = None, dtype=torch.float32, **kwargs):
        """Load a transformers causal LM from a local folder (or a hub id already in the local cache)."""
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(path_or_id, (str, os.PathLike)):
            raise TypeError(f"path_or_id must be a string, got {type(path_or_id).__name__}")
        path = os.fspath(path_or_id)
        if not os.path.isdir(path) and (os.path.exists(path) or path.startswith((".", "/", "~"))
                                        or path.count("/") > 1):
            raise ValueError(f"model folder {path!r} does not exist or is not a folder")
        try:
            # Offline: a folder, or a hub id already in the local cache; never a download.
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ValueError(f"cannot load a causal LM from {path!r}: {str(e).splitlines()[0]}") from e
        if device:
            model = model.to(device)
        return cls(model, tok, **kwargs)

    # ---------------------------------------------------------------- queries
    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(token_ids)
        hit = self.cache.get_logp(key, held=True)  # the caller holds it now: the cache's copy goes first
        ahead = self._ahead
        if hit is not None:
            if ahead is not None and key in ahead.paths and GUESS_AHEAD.get():  # the guess was right:
                if len(ahead.paths) > 1:  # guess the next one(s)
                    self._group_hit(ahead, key, hit)
                else:
                    self._start_lookahead(key, hit)
            return hit
        if ahead is not None and key not in ahead.targets:
            ahead.abort.set()  # a look-ahead pass for other contexts: stop it
        self._check_length(len(key))
        return await self.batcher.submit(key, (key, GUESS_AHEAD.get()))

    async def peek_next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(check_token_ids(token_ids, self.vocab_size))
        hit = self.cache.get_logp(key)  # marked recently used: kept for the reader to come
        if hit is not None:
            return hit
        row = await self.next_token_logprobs(token_ids)
        self.cache.get_logp(key)
        return row

    def has_logprobs(self, token_ids) -> bool:
        """Whether the distribution after ``token_ids`` is cached."""
        return self.cache.get_logp(tuple(token_ids)) is not None

    def encode_bytes(self, data: bytes) -> list[int] | None:
        from genlm_bytes.lm.vocab import encode_bytes

        return encode_bytes(self.tokenizer, self.byte_vocab, data)

    def clear_cache(self) -> None:
        self.stop_lookahead()
        self.cache.clear()

    def stop_lookahead(self) -> None:
        """Stop a look-ahead pass (see ``lookahead``) queued or running, if any: the model's
        thread is then free within one layer."""
        ahead = self._ahead
        if ahead is not None:
            ahead.abort.set()

    async def prefetch(self, token_ids: list[int], alternatives=None, *, start: int = 0) -> None:
        """Compute and cache the distribution after every prefix of ``token_ids`` longer than
        ``start`` tokens (shorter ones are not recomputed if they were evicted).

        ``alternatives``: ``(i, t)`` pairs, or ``(i, (t1, t2, ...))`` chains: the contexts
        ``token_ids[:i] + [t1, ..., tk]`` (every k) will be needed too. The uncached end of
        the path and the alternatives run together in tree-masked passes (each alternative
        attends to its own prefix only); a long uncached path first runs in chunks.
        """
        from genlm_bytes.lm.base import parse_alternative

        ids = tuple(check_token_ids(token_ids, self.vocab_size))
        self._check_length(len(ids))
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        items = {}
        for alt in alternatives or ():
            i, chain, subs = parse_alternative(alt, len(ids), self.vocab_size)
            if self.max_positions and i + len(chain) > self.max_positions:  # positions 0..max-1
                chain = chain[: self.max_positions - i]
                if not chain:
                    continue
            subs = tuple((k, t) for k, t in subs if k <= len(chain) and not (
                self.max_positions and i + k + 1 > self.max_positions))
            if ids[i:i + len(chain)] == chain:  # the path itself: its sub-branches branch off the path
                for k, t in subs:
                    if self.cache.get_logp(ids[:i + k] + (t,)) is None:
                        items[(i + k, (t,), ())] = None
                continue
            subs = tuple((k, t) for k, t in subs if self.cache.get_logp(ids[:i] + chain[:k] + (t,)) is None)
            if subs or self.cache.get_logp(ids[:i] + chain) is None:
                items[(i, chain, subs)] = None
        start = min(start, len(ids))
        path = self.cache.walk(ids)
        path_done = len(path) == len(ids) and all(n.logp is not None for n in path[start:])
        if path_done and not items:
            return
        self.stop_lookahead()
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.batcher._executor, self._locked, self._prefetch, ids, list(items), start)

    def _locked(self, fn, *args):
        with self.batcher._lock:
            return fn(*args)

    def _check_length(self, n: int) -> None:
        if self.max_positions and n > self.max_positions:
            raise ValueError(f"a context of {n} tokens is longer than the model's window of "
                             f"{self.max_positions} tokens; use max_context_length to truncate")

    # ---------------------------------------------------------------- compute
    @torch.inference_mode()
    def _process(self, requests: list[tuple[tuple, bool]]) -> list[torch.Tensor]:
        """Run a batch of ``(context, may draft)`` requests (worker thread). Returns one (V,)
        log-prob tensor each."""
        rows = []
        for ids, _ in requests:
            hit = self.cache.get_logp(ids, held=True)
            if hit is not None:  # computed by an earlier batch while this one waited
                rows.append((ids, None, 0, hit))
                continue
            past_len, ref = (self.cache.deepest_kv(ids, len(ids) - 1) if self.kv_reuse else (0, None))
            past_len, ref = self._run_ahead(ids, ref, past_len)
            rows.append((ids, ref, past_len, None))
        todo = [(ids, ref, p) for ids, ref, p, hit in rows if hit is None]
        done = {}
        lone = len(requests) == 1 and requests[0][1]  # a lone request, not from a known text
        if lone and todo and (row := self._drafted(*todo[0])) is not None:
            done[todo[0][0]] = row
            todo = []
        generating = all(may for _, may in requests)  # (no known text: see _chain_full)
        for group in self._memory_groups(todo):
            for (ids, _, _), logp in zip(group, self._forward(group, all_positions=False, grow=lone,
                                                              short_chains=generating)):
                done[ids] = logp
        out = [hit if hit is not None else done[ids] for ids, _, _, hit in rows]
        if lone:
            # The caller goes on with this context, or (it ends with a short token, " ") with
            # the likeliest longer sibling computed with it (" the", see _drafted): guess both.
            ids = requests[0][0]
            self._start_lookahead(ids, out[0], self._longer_sibling(ids))
        elif generating and 1 < len(requests) <= AHEAD_GROUP:
            self._start_group_lookahead([ids for ids, _ in requests], out)
        return out

    def _start_group_lookahead(self, contexts: list[tuple], rows: list) -> None:
        """Queue one look-ahead pass for a few contexts asked for together (a beam whose covers
        follow the same text in different segmentations, or a few states stepping together):
        each extended by the token a greedy byte walk of its distribution ends at (see
        :func:`_byte_mode`), as one batch. Asking for all of them (or some, in one go) starts
        the next guess; asking for any other context stops it, as for one context."""
        if not self.lookahead or not self.kv_reuse:
            return
        paths = []
        for ids, row in zip(contexts, rows):
            if self.max_positions and len(ids) + 1 > self.max_positions:
                continue
            lp = _np_row(row)
            a = _byte_mode(lp, _top(lp, AHEAD_TOP), self.byte_vocab, self.eos_token_ids)
            if a is not None and self.cache.get_logp(ids + (a,)) is None:
                paths.append(ids + (a,))
        paths = tuple(dict.fromkeys(paths))
        if not paths:
            return
        self._queue_ahead(_Ahead(frozenset(paths), frozenset(paths), threading.Event()), self._lookahead_rows, paths)

    def _queue_ahead(self, ahead: _Ahead, job, *args) -> None:
        """Make ``ahead`` the look-ahead pass (stopping the one before) and queue ``job(ahead,
        *args)`` in the model's thread."""
        old, self._ahead = self._ahead, ahead
        if old is not None:
            old.abort.set()
        self.batcher._executor.submit(job, ahead, *args)

    def _lookahead_rows(self, ahead: _Ahead, paths: tuple) -> None:
        """Run a group look-ahead pass (model's thread; see :meth:`_start_group_lookahead`)
        unless stopped: the paths whose contexts are cached, in one batch."""
        def prepare():
            rows = []
            for path in paths:
                if self.cache.get_logp(path) is None:
                    P, ref = self.cache.deepest_kv(path, len(path) - 1)
                    if P == len(path) - 1:  # (a context whose past was evicted: no guess)
                        rows.append((path, ref, P))
            return (lambda: self._forward(rows, all_positions=True, grow=len(rows) == 1)) if rows else None

        self._guarded_pass(ahead, prepare)

    def _group_hit(self, ahead: _Ahead, key: tuple, row: torch.Tensor) -> None:
        """A path of a group look-ahead was asked for: once the requests of this turn of the
        event loop are in, guess what follows the paths asked for (see
        :meth:`_start_group_lookahead`)."""
        first = not ahead.hits
        ahead.hits[key] = row
        if first:
            asyncio.get_running_loop().call_soon(self._after_group_hits, ahead)

    def _after_group_hits(self, ahead: _Ahead) -> None:
        if ahead.abort.is_set() or self._ahead is not ahead:
            return  # (another context was asked for meanwhile: its own pass guesses next)
        hits, ahead.hits = ahead.hits, {}
        if len(hits) == 1:
            (key, row), = hits.items()
            self._start_lookahead(key, row)
        else:
            self._start_group_lookahead(list(hits), list(hits.values()))

    def _start_lookahead(self, ids: tuple, row: torch.Tensor, sibling: int | None = None) -> None:
        """Queue a look-ahead pass after the lone context ``ids`` (its distribution ``row``):
        ``ids`` extended by the token a byte-by-byte greedy walk of that distribution ends at
        (see :func:`_byte_mode`; the path, kept in the context's arena), and by the likeliest
        token if that differs; with ``sibling`` (a longer token in place of the last one, its
        distribution cached), that sibling's context extended by its own likeliest token;
        else ``ids`` extended by up to AHEAD_SHORTER tokens that spell a proper prefix of the
        path's token with probability at least AHEAD_SHORTER_P (a byte-level beam reaching
        " the" asks for " " first)."""
        if not self.lookahead or not self.kv_reuse:
            return
        if self.max_positions and len(ids) + 1 > self.max_positions:
            return
        lp = _np_row(row)  # numpy: no torch parallel region on the caller's thread
        top = _top(lp, AHEAD_TOP)
        a = _byte_mode(lp, top, self.byte_vocab, self.eos_token_ids)
        if a is None or self.cache.get_logp(ids + (a,)) is not None:
            return
        items, paths = [], [ids + (a,)]
        if top[0] != a and top[0] not in self.eos_token_ids:
            items.append((len(ids), (top[0],), ()))
        sib_row = self.cache.get_logp(ids[:-1] + (sibling,)) if sibling is not None and AHEAD_SIBLING else None
        if sib_row is not None and not items:
            b = int(_np_row(sib_row).argmax())
            if b not in self.eos_token_ids:
                items.append((len(ids) - 1, (sibling, b), ()))
                paths.append(ids[:-1] + (sibling, b))
        if len(items) < AHEAD_SHORTER and not (items and len(items[0][1]) > 1):
            spelled = self.byte_vocab[a]
            for n in range(len(spelled) - 1, 0, -1):
                t = self.by_bytes.get(spelled[:n])
                if (t is not None and t != a and t != top[0] and lp[t] >= AHEAD_SHORTER_P_LOG
                        and len(items) < AHEAD_SHORTER):  # (top[0]: already a branch if not a)
                    items.append((len(ids), (t,), ()))
        targets = frozenset(paths + [ids[:i] + chain for i, chain, _ in items])
        self._queue_ahead(_Ahead(frozenset(paths), targets, threading.Event()), self._lookahead, ids, a, tuple(items))

    @property
    def by_bytes(self) -> dict[bytes, int]:
        """The token id of each spelling (built on first use)."""
        if self._by_bytes is None:
            self._by_bytes = {b: t for t, b in enumerate(self.byte_vocab) if b}
        return self._by_bytes

    def _lookahead(self, ahead: _Ahead, ids: tuple, a: int, items: tuple) -> None:
        """Run a look-ahead pass (model's thread; see :meth:`_start_lookahead`) unless stopped."""
        def prepare():
            if self.cache.get_logp(ids + (a,)) is not None:
                return None
            P, ref = self.cache.deepest_kv(ids, len(ids))
            if P < len(ids):
                return None  # (the context's past was evicted: no guessing then)
            if items:
                return lambda: self._tree_pass(ids + (a,), P, ref, 1, list(items), grow=True)
            return lambda: self._forward([(ids + (a,), ref, P)], all_positions=True, grow=True)

        self._guarded_pass(ahead, prepare)

    def _guarded_pass(self, ahead: _Ahead, prepare) -> None:
        """In the model's thread: unless ``ahead`` was stopped, ``prepare()`` (under the model's
        lock) returns the look-ahead pass to run (or None), which runs with the abort check on
        (see :meth:`_check_abort`); a stopped or failed pass caches nothing and fails no caller."""
        try:
            with self.batcher._lock, torch.inference_mode():
                if ahead.abort.is_set():
                    return
                run = prepare()
                if run is None or not self._abort_hooks():
                    return
                self._abort = (ahead.abort, threading.get_ident())
                try:
                    run()
                except _Stopped:
                    self.cache.reserve(self._base_reserve)
                    logger.debug("look-ahead pass stopped")
                finally:
                    self._abort = None
        except Exception:  # a failed guess fails no caller (a real request would report the error)
            logger.debug("look-ahead pass failed", exc_info=True)
        finally:
            if self._ahead is ahead and ahead.abort.is_set():
                self._ahead = None

    def _check_abort(self, *args) -> None:
        """Stop a look-ahead pass whose abort event is set (raises :class:`_Stopped`), in the
        model's thread only (see ``_abort``); run before every decoder layer."""
        stop = self._abort
        if stop is not None and stop[0].is_set() and stop[1] == threading.get_ident():
            raise _Stopped

    def _abort_hooks(self) -> bool:
        """Register (once) :meth:`_check_abort` before every decoder layer (the lean decoder
        calls it itself); False when the model's layers are not found."""
        if self.lean is not None:
            return True
        if not self._hooked:
            layers = getattr(decoder_of(self.model), "layers", None)
            if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
                return False
            for layer in layers:
                layer.register_forward_pre_hook(self._check_abort)
            self._hooked = True
        return True

    def _body(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        """The decoder's final hidden states ``(B, T, H)`` for one pass (lean when possible)."""
        if self.lean is not None:
            return self.lean(input_ids, attention_mask, position_ids, cache,
                             self._check_abort if self._abort is not None else None)
        with _grouped_attention(self.model):
            return decoder_of(self.model)(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                        past_key_values=cache, use_cache=True).last_hidden_state

    def _drafted(self, ids: tuple, ref, p: int) -> torch.Tensor | None:
        """One context alone, a few new tokens: runs it with the tokens guessed to be asked for
        next (see ``draft_tokens``: longer siblings first, then tokens drafted from its own
        text) in one pass, and returns its row; None when there is no guess."""
        if not self.draft_tokens or not self.kv_reuse or len(ids) - p > DRAFT_MAX_NEW:
            return None
        siblings = self._siblings(ids, self.draft_tokens) if p == len(ids) - 1 else []
        room = self.draft_tokens - len(siblings)
        draft = lookup_draft(ids, room) if room else ()
        if self.max_positions:
            draft = draft[: max(0, self.max_positions - len(ids))]
        # One row, one tree pass: the context, then each sibling's token in place of its last
        # one, and the draft after it (branches: the context's own keys/values stay one path).
        items = [(p, (t,), ()) for t in siblings] + ([(len(ids), draft, ())] if draft else [])
        if not items:
            return None
        self._tree_pass(ids, p, ref, len(ids) - p, items, grow=True)
        # The guessed rows stay cached for the requests to come; this one is handed out.
        return self.cache.get_logp(ids, held=True)  # (None if a tiny budget evicted it at once)

    def _longer_tokens(self, ids: tuple) -> tuple[list[int], object]:
        """The tokens ``t`` among the SIBLING_TOP likeliest after ``ids[:-1]`` that spell
        ``ids[-1]``'s bytes and more (``ids`` ends a short token, " ", while a byte-level beam
        may be inside a longer one, " the"), likeliest first, and that distribution as a numpy
        row (``[], None`` when it is not cached)."""
        row = self.cache.get_logp(ids[:-1]) if len(ids) >= 2 else None
        if row is None:
            return [], None
        lp = _np_row(row)
        vocab, last = self.byte_vocab, self.byte_vocab[ids[-1]]
        return [t for t in _top(lp, SIBLING_TOP) if len(vocab[t]) > len(last) and vocab[t].startswith(last)], lp

    def _siblings(self, ids: tuple, k: int) -> list[int]:
        """Up to ``k`` tokens, likeliest first, whose contexts ``ids[:-1] + (t,)`` a byte-level
        beam may ask for next and that are not cached: the longer tokens (see
        :meth:`_longer_tokens`) and the tokens spelling their starts on the way (at " c", " ch"
        on the way to " cheese")."""
        longer, lp = self._longer_tokens(ids) if k >= 1 else ([], None)
        if not longer:
            return []
        n0, by_bytes, found = len(self.byte_vocab[ids[-1]]), self.by_bytes, set(longer)
        for t in longer:
            spelled = self.byte_vocab[t]
            found.update(u for n in range(n0 + 1, len(spelled)) if (u := by_bytes.get(spelled[:n])) is not None)
        out = [t for t in found if self.cache.get_logp(ids[:-1] + (t,)) is None]
        out.sort(key=lambda t: -lp[t])
        return out[:k]

    def _longer_sibling(self, ids: tuple) -> int | None:
        """The likeliest longer token (see :meth:`_longer_tokens`) whose context
        ``ids[:-1] + (t,)`` is cached (computed with ``ids``, see :meth:`_siblings`), else None."""
        return next((t for t in self._longer_tokens(ids)[0] if self.cache.get_logp(ids[:-1] + (t,)) is not None),
                    None)

    def _run_ahead(self, ids: tuple, ref, p: int) -> tuple[int, object]:
        """A context far longer than its cached past ``p`` (e.g. one whose past was evicted) runs
        its new tokens in passes that fit PASS_SHARE of the budget, all but the last here:
        returns the past ``(length, ref)`` left for the batched pass."""
        if not self.kv_reuse:
            return p, ref
        return self._run_in_chunks(ids, p, ref, len(ids), all_positions=False)

    def _run_in_chunks(self, ids: tuple, P: int, ref, reach: int, all_positions: bool,
                       most: int | None = None) -> tuple[int, object]:
        """Run ``ids[P:reach]`` on the past ``ref`` (``ids[:P]``) in passes of at most ``most``
        new tokens (default: all) that fit PASS_SHARE of the budget, all but the last: returns
        the deepest cached past ``(length, ref)`` left for the caller's own pass."""
        while reach - P > (step := self._pass_tokens(P, most or reach - P)):
            self._forward([(ids[:P + step], ref, P)], all_positions=all_positions)
            nxt, nref = self.cache.deepest_kv(ids, P + step)
            if nxt <= P:  # evicted at once (a tiny budget): the rest in one pass
                break
            P, ref = nxt, nref
        return P, ref

    def _memory_groups(self, rows):
        """``rows`` split into passes whose temporaries (see :meth:`_pass_bytes`: every row's past
        is left-padded to the longest, its new tokens right-padded) fit PASS_SHARE of the budget."""
        if not rows:
            return []
        cap = PASS_SHARE * self.cache.budget_bytes
        rows = sorted(rows, key=lambda r: r[2])
        groups, cur = [], []
        past = new = 0
        for r in rows:
            p, n = max(past, r[2]), max(new, len(r[0]) - r[2])
            if cur and self._pass_bytes(len(cur) + 1, p + n, n, len(cur) + 1) > cap:
                groups.append(cur)
                cur, p, n = [], r[2], len(r[0]) - r[2]
            cur.append(r)
            past, new = p, n
        groups.append(cur)
        return groups

    def _arena_for(self, ref, p: int, n: int, grow: bool):
        """Where a one-row pass of ``n`` tokens on the past ``ref`` (``p`` tokens) puts its keys
        and values: ``(arena, 0)`` to write them in place after the arena's tip that ``ref`` is;
        ``(None, capacity)`` for a new arena (``grow``: a lone request's pass, when the arena
        fits ARENA_BUDGET_SHARE of the budget); None for a block of its own."""
        if not self.kv_reuse:
            return None
        if ref is not None and ref.block.tip_room(ref, n):
            return ref.block, 0
        if not grow or ARENA_SPARE_MIN <= 0:
            return None
        cap = p + n + max(ARENA_SPARE_MIN, int((p + n) * ARENA_SPARE_SHARE))
        if self.max_positions:
            cap = min(cap, max(self.max_positions, p + n))
        if self._kv_per_token and cap * self._kv_per_token > ARENA_BUDGET_SHARE * self.cache.budget_bytes:
            return None
        return None, cap

    def _arena_block(self, layers, arena, filled: int) -> KVBlock:
        """The arena a pass wrote into (made from its layers' buffers if new), its tip moved to
        ``filled``."""
        block = arena[0]
        if block is None:
            block = KVBlock([lay.arena_kv[0] for lay in layers], [lay.arena_kv[1] for lay in layers])
            for lay in layers:
                lay.arena_kv = None
        block.filled = filled
        return block

    def _point_at_arena(self, nodes, block: KVBlock, new: bool) -> None:
        """Point ``nodes`` (a context's, from depth 1) at ``block``'s slots. A new arena also
        takes over the prefix the pass ran on (which it holds a copy of), so the segments or
        the arena that prefix came from are freed unless other contexts still hold them."""
        put = self.cache.repoint_kv if new else self.cache.put_kv
        put(nodes, lambda node: KVRef(block, 0, 0, node.depth))

    @torch.inference_mode()
    def _forward(self, rows, all_positions: bool, grow: bool = False, short_chains: bool = False):
        """One ragged forward. ``rows``: (ids, past ref or None, past length).

        Returns per row the (V,) log-probs after the whole context (nothing with
        ``all_positions``: then the log-probs after each new token are only cached).
        Caches log-probs and KV of every new prefix. One row extending an arena's tip
        writes into it; ``grow``: one row starts a new arena (see :meth:`_arena_for`).
        ``short_chains``: generation requests (see :func:`_chain_full`).
        """
        B = len(rows)
        P = max(p for _, _, p in rows)  # common past length (left-padded)
        ks = [len(ids) - p for ids, _, p in rows]
        Kn = max(ks)  # common new length (right-padded)
        input_ids = torch.zeros((B, Kn), dtype=torch.long)
        attn = torch.zeros((B, P + Kn), dtype=torch.long)
        pos = torch.zeros((B, Kn), dtype=torch.long)
        for b, (ids, _, p) in enumerate(rows):
            input_ids[b, : ks[b]] = torch.tensor(ids[p:])
            attn[b, P - p: P + ks[b]] = 1
            pos[b] = p + torch.arange(Kn)
        arena = self._arena_for(rows[0][1], P, Kn, grow) if B == 1 else None
        keep = [] if arena else [(b, P - p, P + ks[b]) for b, (_, ref, p) in enumerate(rows)
                                 if _chain_full(ref, short_chains)]
        self._reserve_pass(B, P + Kn, Kn, sum(ks) if all_positions else B, keep, arena)
        cache = self._make_cache(rows, P, keep, arena)
        dev = self.device
        # One row has no padding: the plain causal mask (none for one new token) is exact.
        hidden = self._body(input_ids.to(dev), attn.to(dev) if B > 1 else None, pos.to(dev), cache)  # (B, Kn, H)
        self.n_forward_tokens += sum(ks)
        if all_positions:
            sel = [hidden[b, : ks[b]] for b in range(B)]  # each (k_b, H)
        else:
            sel = [hidden[b, ks[b] - 1: ks[b]] for b in range(B)]  # each (1, H)
        logp_rows = self._logprob_rows(torch.cat(sel))
        # Cache: every new prefix points into this pass's KV; log-probs where computed.
        block = arena_block = None
        if arena:
            arena_block = self._arena_block(cache.layers, arena, P + Kn)
        elif self.kv_reuse:
            layers = cache.layers
            block = KVBlock([lay.new_keys for lay in layers], [lay.new_values for lay in layers])
        results = []
        for b, (ids, ref, p) in enumerate(rows):
            path = self.cache.walk(ids, create=True)
            new_nodes = path[p:]
            if arena_block is not None:
                self._point_at_arena(path if arena[0] is None else new_nodes, arena_block, arena[0] is None)
            elif block is not None:
                self._put_segment(new_nodes, block, b, 0, p, ref if p else None, layers)
            if all_positions:
                for j, node in enumerate(new_nodes):
                    self.cache.put_logp(ids[: p + j + 1], next(logp_rows), node=node)
            else:
                row = next(logp_rows)
                self.cache.put_logp(ids, row, node=path[-1], held=True)  # the requester keeps it
                results.append(row)
        self._end_pass(block, B * Kn)
        return results

    def _put_segment(self, nodes, block: KVBlock, row: int, start: int, base: int, prev, layers=None) -> None:
        """Point ``nodes`` (depths ``base + 1, ...``) at slots ``start, ...`` of ``row`` of ``block``,
        chained to ``prev``. A chain the pass kept whole (see :meth:`_make_cache`; ``layers``: the
        pass's cache layers) is stored as one segment instead."""
        whole = layers[0].kept.get(row) if layers else None
        if whole is not None:
            one = KVBlock([lay.kept[row][0] for lay in layers], [lay.kept[row][1] for lay in layers])
            self.cache.put_kv(nodes, lambda node: KVRef(one, 0, 0, node.depth))
        else:
            self.cache.put_kv(nodes, lambda node: KVRef(block, row, start, node.depth - base, prev))

    def _make_cache(self, rows, P: int, keep=(), arena=None):
        """A DynamicCache of :class:`_PassLayer` s for a pass on the pasts of ``rows`` (left-padded
        to ``P``). Each layer gathers its pasts and the new tokens into one buffer when the pass
        reaches it, and lets it go after: one layer's pasts are copied at a time, not every
        layer's. ``keep``: ``(row, lo, hi)``, slots of a row whose context is kept whole (a chain
        of MAX_SEGMENTS segments is stored as one block by the pass, see :meth:`_put_segment`).
        ``arena``: one row's pass writes into an arena (see :meth:`_arena_for`). The lean
        decoder's passes take a plain list of such layers (a :class:`LeanCache`)."""
        from transformers import DynamicCache

        if not self.kv_reuse:
            return DynamicCache(config=self.model.config)
        pasts = [(ref.segments(p) if p else [], p) for _, ref, p in rows]  # (block, row, start, n) pieces
        if self.lean is not None:
            return LeanCache([_PassLayer(i, pasts, P, keep, arena, ready=True) for i in range(len(self.lean.layers))])
        cache = DynamicCache(config=self.model.config)
        cache.layers = [_PassLayer(i, pasts, P, keep, arena) for i in range(len(cache.layers))]
        return cache

    def _pass_bytes(self, rows: int, kv_len: int, n_new: int, n_out: int, whole: int = 0) -> int:
        """Estimated temporary memory of a pass: one layer's padded pasts, the new keys/values of
        every layer, contexts kept whole (``whole`` tokens), activations of the new tokens, the
        attention mask, and log-probs (with their copies) of ``n_out`` positions; the attention
        scores and weights of one layer (every head), and the float mask."""
        hidden, heads, layers = self._dims
        kv = self._kv_per_token
        return (rows * kv_len * kv // layers + (rows * n_new + whole) * kv
                + rows * n_new * (16 * 4 * hidden + 4 * kv_len * (2 * heads + 1))
                + 2 * min(n_out, LOGP_CHUNK) * self.vocab_size * 4)

    def _pass_tokens(self, past: int, most: int) -> int:
        """How many new tokens (at most ``most``, at least 16) one pass on a past of ``past``
        tokens may run with its temporaries within PASS_SHARE of the budget."""
        cap = PASS_SHARE * self.cache.budget_bytes
        n = most
        while n > 16 and self._pass_bytes(1, past + n, n, n) > cap:
            n = max(16, n * 3 // 4)
        return n

    def _reserve_pass(self, rows: int, kv_len: int, n_new: int, n_out: int, keep=(), arena=None) -> None:
        """Make room in the budget for a pass's temporary tensors (see _pass_bytes; ``keep``: the
        slots kept whole, see _make_cache; ``arena``: a new arena's capacity, see _arena_for)."""
        whole = sum(hi - lo for _, lo, hi in keep) + (arena[1] if arena and arena[0] is None else 0)
        self.cache.reserve(self._base_reserve + self._pass_bytes(rows, kv_len, n_new, n_out, whole))
        self._maybe_trim()  # what the reservation evicted leaves the resident set before the pass
        self._pass_t0 = time.perf_counter()

    def _end_pass(self, block: KVBlock | None, n_tokens: int) -> None:
        if block is not None and not self._kv_per_token and n_tokens:
            self._kv_per_token = block.nbytes // n_tokens
        self.cache.reserve(self._base_reserve)
        self._pass_seconds += time.perf_counter() - self._pass_t0
        self._maybe_trim()

    def _maybe_trim(self) -> None:
        """Hand free heap pages back to the system when they are worth it: after evictions
        freed a good amount, or when the resident set has grown past what the budget accounts
        for (a pass's temporaries leave free but resident holes) by more than TRIM_SLACK_BYTES.
        Trimmed pages cost page faults when reused, hence not after every pass."""
        if _MALLOC_TRIM is None:
            return
        if self.cache.freed_bytes >= TRIM_AFTER_BYTES:
            self.cache.freed_bytes = 0
            _trim_heap()
            return
        if self._rss0 is None or self._trim_seconds > TRIM_TIME_SHARE * self._pass_seconds:
            return  # (memory held elsewhere that a trim cannot give back costs at most that share)
        rss = _rss_bytes()
        if rss is not None and rss - self._rss0 - self.cache.nbytes - self.cache.reserved > TRIM_SLACK_BYTES:
            t0 = time.perf_counter()
            _trim_heap()
            self._trim_seconds += time.perf_counter() - t0

    def _logprob_rows(self, hidden: torch.Tensor):
        """The (V,) log-prob rows of ``hidden`` (N, H), computed LOGP_CHUNK at a time, each its own
        copy (a view would keep the whole chunk alive in the cache)."""
        for c in range(0, hidden.shape[0], LOGP_CHUNK):
            lp = self._logprobs(hidden[c:c + LOGP_CHUNK])
            for row in lp:
                yield row.clone()
            del lp

    def _logprobs(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.model.get_output_embeddings()(hidden).float()  # (N, V)
        if self._softcap:
            logits = torch.tanh(logits / self._softcap) * self._softcap
        return torch.log_softmax(logits, dim=-1)

    @torch.inference_mode()
    def _prefetch(self, ids: tuple, items: list[tuple[int, tuple, tuple]], start: int = 0) -> None:
        """Distributions after every prefix of ``ids`` longer than ``start`` and along every item
        ``(i, chain, subs)``."""
        n = len(ids)
        path = self.cache.walk(ids)
        done = min(start, len(path))
        while done < len(path) and path[done].logp is not None and (path[done].kv is not None
                                                                     or not self.kv_reuse):
            done += 1
        if not self.kv_reuse:  # no pasts: every context runs whole
            while done < n:
                end = min(n, done + PREFETCH_CHUNK)
                self._forward([(ids[:end], None, 0)], all_positions=True)
                done = end
            for i, chain, subs in items:
                self._forward([(ids[:i] + chain, None, 0)], all_positions=True)
                for k, t in subs:
                    self._forward([(ids[:i] + chain[:k] + (t,), None, 0)], all_positions=False)
            return
        first = True
        while first or items:
            P, ref = self.cache.deepest_kv(ids, done)
            # How far the path must run in this pass: to its end while its rows are missing, else
            # as far as the alternatives branch off it (its past may have been evicted since).
            reach = n if done < n else max([P] + [i for i, _, _ in items])
            # A long stretch runs in chunks first, each within PASS_SHARE of the budget; the last
            # one joins the tree pass.
            P, ref = self._run_in_chunks(ids, P, ref, reach, all_positions=True, most=PREFETCH_CHUNK)
            tail = reach - P
            room = max(16, self._pass_tokens(P, tail + ALT_CHUNK) - tail)
            chunk, used = [], 0
            while items and (not chunk or used + len(items[0][1]) + len(items[0][2]) <= room):
                chunk.append(items.pop(0))
                used += len(chunk[-1][1]) + len(chunk[-1][2])
            if chunk:
                self._tree_pass(ids, P, ref, tail, chunk)
            elif tail:  # a plain path: a causal pass (no tree mask) is faster
                self._forward([(ids[:reach], ref, P)], all_positions=True)
            done, first = n, False
        logger.debug("prefetched %d tokens", n)

    @torch.inference_mode()
    def _tree_pass(self, ids: tuple, P: int, ref, tail: int, items: list[tuple[int, tuple, tuple]],
                   grow: bool = False) -> None:
        """One tree-masked pass on the cached past ``ids[:P]``: the path tokens ``ids[P:P + tail]``
        and, for each item ``(i, chain, subs)``, the chain at positions ``i, i + 1, ...``
        attending to ``ids[:i]`` (past or path tokens of this pass) and to itself, and each
        sub-branch ``(k, t)`` attending to ``ids[:i] + chain[:k]`` and itself. Caches
        log-probs and KV of every new prefix. The path goes into an arena as in :meth:`_forward`
        (the alternatives' slots after it are copied out)."""
        n_path = P + tail
        # Slots: (position of the first token, tokens, first slot, parent slot entry or -1, k)
        slots = [(P, ids[P:n_path], 0, -1, 0)]
        q = tail
        for i, chain, subs in items:
            if i > n_path:
                raise ValueError(f"alternative at {i} is past the computed path ({n_path} tokens)")
            m = len(slots)
            slots.append((i, chain, q, -1, 0))
            q += len(chain)
            for k, t in subs:
                slots.append((i + k, (t,), q, m, k))
                q += 1
        Q = q
        if Q == 0:
            return
        own_start = torch.empty(Q, dtype=torch.long)
        past_lim = torch.empty(Q, dtype=torch.long)
        path_lim = torch.zeros(Q, dtype=torch.long)
        par_lo = torch.zeros(Q, dtype=torch.long)
        par_hi = torch.zeros(Q, dtype=torch.long)
        pos = torch.empty(Q, dtype=torch.long)
        tokens = []
        for e, (i, chain, s, parent, k) in enumerate(slots):
            L = len(chain)
            root = i if parent < 0 else slots[parent][0]  # where the chain leaves the path
            own_start[s:s + L] = s
            past_lim[s:s + L] = min(root, P)
            if e:  # not the path: the path tokens of this pass before the branch point
                path_lim[s:s + L] = max(0, root - P)
            if parent >= 0:
                ps = slots[parent][2]
                par_lo[s:s + L], par_hi[s:s + L] = ps, ps + k
            pos[s:s + L] = i + torch.arange(L)
            tokens.extend(chain)
        qi = torch.arange(Q)[:, None]
        cols = torch.arange(Q)[None, :]
        new_ok = (((cols >= own_start[:, None]) & (cols <= qi)) | (cols < path_lim[:, None])
                  | ((cols >= par_lo[:, None]) & (cols < par_hi[:, None])))
        past_ok = torch.arange(P)[None, :] < past_lim[:, None]
        dtype = next(self.model.parameters()).dtype
        allowed = torch.cat([past_ok, new_ok], dim=1)
        mask = torch.zeros((1, 1, Q, P + Q), dtype=dtype).masked_fill_(~allowed[None, None], float("-inf"))
        arena = self._arena_for(ref, P, Q, grow)
        keep = [(0, 0, n_path)] if _chain_full(ref) and not arena else []
        self._reserve_pass(1, P + Q, Q, Q, keep, arena)
        cache = self._make_cache([(ids[:P], ref, P)], P, keep, arena)
        dev = self.device
        hidden = self._body(torch.tensor([tokens], device=dev), mask.to(dev), pos[None].to(dev), cache)
        self.n_forward_tokens += Q
        logp_rows = self._logprob_rows(hidden[0])  # Q rows, in slot order
        del hidden
        layers = cache.layers
        path_block, alt_block = _split_block(layers, tail, bool(arena))
        if arena:
            path_block = self._arena_block(layers, arena, n_path)

        def at(s: int) -> tuple[KVBlock, int]:  # where slot ``s`` of the pass is stored
            return (path_block, s) if s < tail else (alt_block, s - tail)

        def path_ref(depth: int) -> KVRef | None:  # the past of ids[:depth], depth <= n_path
            if arena:  # (a new arena holds a copy of the past too)
                return KVRef(path_block, 0, 0, depth) if depth else None
            if depth <= P:
                return ref.prefix(depth) if ref is not None else None
            return KVRef(path_block, 0, 0, depth - P, ref)

        prevs, ctxs = [], []
        for e, (i, chain, s, parent, k) in enumerate(slots):
            if parent >= 0:
                pi, _, ps = slots[parent][:3]
                ctx = ctxs[parent][:pi + k] + chain
                prev = prevs[parent]
                if k:
                    blk, start = at(ps)
                    prev = KVRef(blk, 0, start, k, prev)
            else:
                ctx = ids[:i] + chain
                prev = ref if e == 0 else path_ref(i)
            prevs.append(prev)
            ctxs.append(ctx)
            if not chain and not (e == 0 and arena and arena[0] is None):
                continue
            nodes = self.cache.walk(ctx, create=True)
            if e == 0 and arena:
                self._point_at_arena(nodes if arena[0] is None else nodes[i:], path_block, arena[0] is None)
            else:
                # Only the path's slots hold a whole past in the buffer (an item's ancestors are spread).
                blk, start = at(s)
                self._put_segment(nodes[i:], blk, 0, start, i, prev, layers if e == 0 else None)
            nodes = nodes[i:]
            for j, node in enumerate(nodes):
                self.cache.put_logp(ctx[: i + j + 1], next(logp_rows), node=node)
        if arena:
            self._end_pass(alt_block, Q - tail)
        else:
            self._end_pass(path_block or alt_block, tail if path_block is not None else Q)
        logger.debug("tree pass: %d path tokens and %d alternatives on a past of %d", tail, len(items), P)


AHEAD_SHORTER_P_LOG = math.log(AHEAD_SHORTER_P)


class _Stopped(Exception):
    """A look-ahead pass stopped because a request for another context came."""


class _Ahead:
    """A look-ahead pass: the contexts it guesses the caller goes on with (``paths``: asking for
    one starts the next guess), every context it computes, and the event that stops it."""

    __slots__ = ("abort", "hits", "paths", "targets")

    def __init__(self, paths: frozenset, targets: frozenset, abort: threading.Event):
        self.paths, self.targets, self.abort = paths, targets, abort
        self.hits: dict[tuple, torch.Tensor] = {}  # paths asked for this turn (group passes)


def _byte_mode(lp, top: list[int], vocab, eos_ids) -> int | None:
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


def _top(lp, k: int) -> list[int]:
    """The ``k`` largest entries' indices of the numpy row ``lp``, largest first."""
    k = min(k, len(lp))
    idx = np.argpartition(lp, len(lp) - k)[len(lp) - k:]
    return idx[np.argsort(-lp[idx], kind="stable")].tolist()


def _np_row(row: torch.Tensor):
    """A (V,) log-prob row as a float32 numpy array (a view when it already is one on the CPU)."""
    row = row.detach()
    if row.device.type != "cpu" or row.dtype != torch.float32:
        row = row.float().cpu()
    return row.numpy()


def lookup_draft(ids: tuple, k: int, window: int = DRAFT_SEARCH) -> tuple:
    """Up to ``k`` tokens guessed to follow ``ids``: the tokens after the most recent earlier
    occurrence (within the last ``window`` positions) of its last two tokens, preferring one
    where its last three match. ``()`` when they did not occur before."""
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
    return ids[best + 1: best + 1 + k] if best >= 0 else ()


def _split_block(layers, tail: int, arena: bool = False) -> tuple[KVBlock | None, KVBlock | None]:
    """The new keys/values of a tree pass as two blocks: the path's slots ``[0, tail)`` and the
    alternatives' (each a copy when both exist, else the pass's own tensors). The cache frees a
    block when no cached chain holds it: the path (which the beam follows) outlives most
    alternatives, which must not keep their memory with it, nor the reverse. ``arena``: the pass
    wrote into an arena, which keeps the path (None here); the alternatives are copied out."""
    n = layers[0].new_keys.shape[-2]
    if arena:
        if tail == n:
            return None, None
        return None, KVBlock([lay.new_keys[:, :, tail:].clone() for lay in layers],
                             [lay.new_values[:, :, tail:].clone() for lay in layers])
    if tail == n or tail == 0:
        block = KVBlock([lay.new_keys for lay in layers], [lay.new_values for lay in layers])
        return (block, None) if tail else (None, block)
    pk, pv, ak, av = [], [], [], []
    for lay in layers:  # one layer at a time: the pass's tensors go as their copies are made
        k, v = lay.new_keys, lay.new_values
        lay.new_keys = lay.new_values = None
        pk.append(k[:, :, :tail].clone())
        pv.append(v[:, :, :tail].clone())
        ak.append(k[:, :, tail:].clone())
        av.append(v[:, :, tail:].clone())
        del k, v
    return KVBlock(pk, pv), KVBlock(ak, av)


def _chain_full(ref, short: bool = False) -> bool:
    """Whether a context on the past ``ref`` is stored whole by its pass (see
    AsyncTransformer._put_segment): its chain has MAX_SEGMENTS segments or, ``short``, from
    MIN_SEGMENTS on a short past (more on a long one). Each pass gathers every segment of its
    rows' pasts (two copies per segment and layer), while storing a context whole copies its
    past once: the two balance near sqrt(past / 16) segments on a CPU (a copy of one token's
    keys and values for a layer costs ~1/30 of a copy call). Short chains are for generation
    (contexts growing a token at a time, several per pass); scoring keeps long chains, whose
    whole copies would crowd a small cache budget (measured: 8 KB at 256 MiB recomputed 2.6x
    the tokens and went over budget)."""
    if ref is None:
        return False
    limit = min(MAX_SEGMENTS, max(MIN_SEGMENTS, math.isqrt(ref.depth // 16))) if short else MAX_SEGMENTS
    return ref.nseg >= limit


def _kv_bytes_per_token(model) -> int:
    """Bytes of keys and values per token, from the model's config (0 if it does not say)."""
    cfg = getattr(model, "config", None)
    try:
        layers = int(cfg.num_hidden_layers)
        heads = int(getattr(cfg, "num_attention_heads", 0) or 0)
        kv_heads = int(getattr(cfg, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
        size = next(model.parameters()).element_size()
    except (AttributeError, TypeError, ValueError, ZeroDivisionError, StopIteration):
        return 0
    return 2 * layers * kv_heads * head_dim * size


def _glibc():
    """glibc's ``malloc_trim`` and ``mallopt`` (None, None elsewhere)."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if not name:
            return None, None
        lib = ctypes.CDLL(name)
        trim, opt = lib.malloc_trim, lib.mallopt
    except (OSError, AttributeError):
        return None, None
    trim.argtypes = [ctypes.c_size_t]
    opt.argtypes = [ctypes.c_int, ctypes.c_int]
    return trim, opt


# ``malloc_trim`` hands the free pages inside the heap back to the system: cached log-prob rows
# (196 KB each for a 49k vocabulary) are freed in LRU order between a pass's large temporary
# tensors, which leaves free holes that the resident set keeps counting.
_MALLOC_TRIM, _MALLOPT = _glibc()
M_MMAP_THRESHOLD = -3  # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD_BYTES = 256 << 10


@functools.cache
def _fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process (once; not when the
    user set ``MALLOC_MMAP_THRESHOLD_``). glibc raises the threshold by itself, up to 32 MB,
    every time a block it had mapped is freed; after the first large pass, every tensor below
    that size comes from the heap, and the long-lived rows allocated between a pass's
    temporaries pin free holes that the resident set keeps counting (measured: 8 KB scored
    under a 256 MiB budget peaked 240 MB over budget + model with the sliding threshold,
    13 MB under it with a fixed one). Tensors above the threshold are mapped and returned to
    the system when freed."""
    if _MALLOPT is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    ok = bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok


def _rss_bytes() -> int | None:
    """Resident set size of this process (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _trim_heap() -> None:
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


@functools.cache
def _pass_layer_class():
    from transformers.cache_utils import DynamicLayer

    class PassLayer(DynamicLayer):
        """Layer ``index``'s cache for one pass on the pasts ``(segments, length)`` of its rows
        (see :meth:`KVRef.segments`), left-padded to ``past``. ``update`` builds the layer's whole keys/values (pasts + new tokens)
        in one buffer, which the attention uses and then drops; ``new_keys``/``new_values``
        keep the new tokens alone (what the prefix cache stores) and ``kept[row]`` the slots
        ``[lo, hi)`` of the rows named in ``keep``. ``arena``: ``(block, 0)`` writes the one
        row's new tokens into that arena after its tip, ``(None, capacity)`` into a new arena
        buffer (``arena_kv``) after a copy of the past (see AsyncTransformer._arena_for)."""

        def __init__(self, index: int, pasts, past: int, keep=(), arena=None, ready=False):
            super().__init__()
            self.is_initialized = ready  # (True: no transformers bookkeeping on the first update)
            self.index, self.pasts, self.past, self.keep, self.arena = index, pasts, past, keep, arena
            self.new_keys = self.new_values = None
            self.arena_kv = None
            self.kept = {}

        def get_seq_length(self) -> int:
            return self.past + (0 if self.new_keys is None else self.new_keys.shape[-2])

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            self.new_keys, self.new_values = key_states, value_states
            P, i = self.past, self.index
            if self.arena is not None:
                return self._write_arena(key_states, value_states)
            if P == 0:
                K, V = key_states, value_states
            elif len(self.pasts) == 1:  # one row, no padding: one concatenation
                segs = self.pasts[0][0]
                K = torch.cat([_piece(b.keys[i], r, s, n) for b, r, s, n in segs] + [key_states], dim=2)
                V = torch.cat([_piece(b.values[i], r, s, n) for b, r, s, n in segs] + [value_states], dim=2)
            else:
                B, h, n, d = key_states.shape
                # Uninitialized: every slot is a past, left padding or a new token, written here.
                K = key_states.new_empty((B, h, P + n, d))
                V = value_states.new_empty((B, h, P + n, d))
                for b, (segs, p) in enumerate(self.pasts):
                    if p < P:
                        K[b, :, : P - p].zero_()
                        V[b, :, : P - p].zero_()
                    at = P - p
                    for blk, r, s, n in segs:
                        K[b, :, at:at + n] = _piece(blk.keys[i], r, s, n)[0]
                        V[b, :, at:at + n] = _piece(blk.values[i], r, s, n)[0]
                        at += n
                K[:, :, P:] = key_states
                V[:, :, P:] = value_states
            for row, lo, hi in self.keep:
                self.kept[row] = (K[row:row + 1, :, lo:hi].clone(), V[row:row + 1, :, lo:hi].clone())
            return K, V

        def _write_arena(self, key_states, value_states):
            P, i, n = self.past, self.index, key_states.shape[2]
            block, cap = self.arena
            if block is None:
                K = key_states.new_empty((1, key_states.shape[1], cap, key_states.shape[3]))
                V = value_states.new_empty(K.shape)
                at = 0
                for blk, r, s, m in (self.pasts[0][0] if P else ()):
                    K[:, :, at:at + m] = _piece(blk.keys[i], r, s, m)
                    V[:, :, at:at + m] = _piece(blk.values[i], r, s, m)
                    at += m
                self.arena_kv = (K, V)
            else:
                K, V = block.keys[i], block.values[i]
            self.new_keys, self.new_values = K.narrow(2, P, n), V.narrow(2, P, n)
            self.new_keys.copy_(key_states)
            self.new_values.copy_(value_states)
            return K.narrow(2, 0, P + n), V.narrow(2, 0, P + n)

    return PassLayer


def _piece(t: torch.Tensor, row: int, start: int, n: int) -> torch.Tensor:
    """Slots ``[start, start + n)`` of row ``row`` of a block's ``(B, heads, T, d)`` tensor."""
    if t.shape[0] != 1:
        t = t[row:row + 1]
    return t if start == 0 and n == t.shape[2] else t.narrow(2, start, n)


def _PassLayer(index: int, pasts, past: int, keep=(), arena=None, ready=False):  # a class made on first use
    return _pass_layer_class()(index, pasts, past, keep, arena, ready)  # (transformers imports late)


GROUPED_SDPA = "genlm_grouped_sdpa"


@functools.cache
def _register_grouped_sdpa() -> bool:
    """Register :func:`_grouped_sdpa` with transformers (once); False if this version cannot."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    except ImportError:
        return False
    AttentionInterface.register(GROUPED_SDPA, _grouped_sdpa)
    ALL_MASK_ATTENTION_FUNCTIONS.register(GROUPED_SDPA, sdpa_mask)
    return True


def _grouped_sdpa(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None, **kwargs):
    """transformers' SDPA attention, except that grouped-query heads attend to their shared
    key/value head directly under a mask: the queries of one group are stacked (``(B, kv_heads,
    groups * Q, d)``) instead of the keys and values being repeated per head, which would copy
    the whole past of every layer on every pass (SDPA's own ``enable_gqa`` is used by
    transformers only without a mask)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    g = getattr(module, "num_key_value_groups", 1)
    B, H, Q, d = query.shape
    plain = (g == 1 or attention_mask is None or dropout or kwargs.get("softcap") is not None
             or kwargs.get("position_bias") is not None or kwargs.get("cache") is not None
             or attention_mask.dim() != 4 or attention_mask.shape[1] != 1 or key.shape[1] * g != H)
    if plain:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    Hkv, L = key.shape[1], key.shape[2]
    mask = attention_mask[:, :, None].expand(-1, 1, g, Q, L).reshape(attention_mask.shape[0], 1, g * Q, L)
    out = torch.nn.functional.scaled_dot_product_attention(query.reshape(B, Hkv, g * Q, d), key, value,
                                                           attn_mask=mask, scale=scaling)
    return out.reshape(B, H, Q, d).transpose(1, 2).contiguous(), None


class _grouped_attention:
    """Within the block, ``model`` runs :func:`_grouped_sdpa` where it was set to run SDPA."""

    def __init__(self, model):
        self.cfg = getattr(model, "config", None)
        self.old = None

    def __enter__(self):
        cfg = self.cfg
        if (cfg is not None and getattr(cfg, "_attn_implementation_internal", None) == "sdpa"
                and _register_grouped_sdpa()):
            self.old = "sdpa"
            cfg._attn_implementation_internal = GROUPED_SDPA
        return self

    def __exit__(self, *exc):
        if self.old is not None:
            self.cfg._attn_implementation_internal = self.old
            self.old = None
        return False


def _plain_cache(hf_model) -> bool:
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        cache = DynamicCache(config=hf_model.config)
        return bool(cache.layers) and all(type(lay) is DynamicLayer for lay in cache.layers)
    except Exception:  # noqa: BLE001 - unknown architectures simply run without KV reuse
        return False


def _eos_ids(hf_model, hf_tokenizer) -> list[int]:
    ids = []
    for src in (getattr(hf_tokenizer, "eos_token_id", None),
                getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
                getattr(hf_model.config, "eos_token_id", None)):
        for t in (src if isinstance(src, (list, tuple)) else [src]):
            if t is not None and t not in ids:
                ids.append(int(t))
    return ids
