"""AsyncTransformer: any transformers causal LM as an AsyncLM, batched, with automatic KV reuse.

The public face of the engine in this package (see ``genlm_bytes/lm/hf/__init__.py`` for the
path of one request through it). A request for a cached context returns at once; otherwise it
joins the :class:`~genlm_bytes.batching.Batcher`'s queue, and the model's thread runs the
queued contexts through :class:`~genlm_bytes.lm.hf.scheduler.Scheduler`.

What is cached (under ``cache_budget_bytes``, LRU): the next-token log-probs of every context
computed, and the keys/values of their prefixes. A change to the model (hooks added or removed,
modules or parameters replaced, weights changed in place through torch ops) is detected before
the next pass and drops them; in-place changes through ``param.data`` are not: call
:meth:`AsyncTransformer.clear_cache` after those.

Sliding-window layers (Gemma 2/3, Mistral, ...) reuse KV like full-attention ones when the model
runs SDPA: every layer keeps its whole past and the window is masked (see ``attention.py``).

Not handled: other cache layers (recurrent states, chunked attention), and sliding windows under
another attention function (eager, flash). For those, KV reuse is switched off and every
request runs its whole context (results are still cached).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os

import torch

from genlm_bytes.batching import Batcher
from genlm_bytes.lm import openmp, qgemm
from genlm_bytes.lm.base import GUESS_AHEAD, AsyncLM, check_token_ids, parse_alternative
from genlm_bytes.lm.gemm import changed_weights, kernel_bytes, onednn_works, pack_bytes
from genlm_bytes.lm.hf.config import (
    DEFAULT_CACHE_BUDGET,
    DEFAULT_DRAFT_TOKENS,
    EngineConfig,
)
from genlm_bytes.lm.hf.faithful import ModelWatch
from genlm_bytes.lm.hf.kv import KVStore, plain_cache
from genlm_bytes.lm.hf.memory import HeapTrimmer, available_bytes
from genlm_bytes.lm.hf.passes import PassRunner
from genlm_bytes.lm.hf.scheduler import Scheduler
from genlm_bytes.lm.hf.speculation import Drafter, LookAhead, Spellings
from genlm_bytes.lm.hugepages import move_to_huge_pages
from genlm_bytes.lm.lean import lean_decoder, model_matrices, pack_model
from genlm_bytes.lm.prefix_cache import CachedRowsLM, PrefixCache

logger = logging.getLogger(__name__)


def _packing_fits(model) -> bool:
    """Whether oneDNN's packed copies of ``model``'s weights not packed yet fit a quarter of the
    memory available now (``MemAvailable``; where it cannot be read, they are made)."""
    need = pack_bytes(model_matrices(model))
    avail = available_bytes()
    if need and avail is not None and 4 * need > avail:
        logger.info("weights not packed for oneDNN: %d MB would take more than a quarter of the %d MB "
                    "available", need >> 20, avail >> 20)
        return False
    return True


class AsyncTransformer(CachedRowsLM, AsyncLM):
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
            this many guessed tokens and caches the distributions after them: longer siblings
            of a short last token (" the" after " "), then the tokens that followed the last
            earlier occurrence of its last two tokens ("prompt lookup"). 0: off. Results are
            exact either way (every distribution is the model's own).
        lookahead: after serving a lone request (sequential generation), the model's thread
            runs the context extended by its guessed next token (and the likely shorter tokens
            spelling its start) while the caller is still working through that token's bytes;
            asking for it starts the next such pass, asking for any other context stops it at
            its next layer (:meth:`stop_lookahead` too). A batch of at most ``ahead_group``
            generation requests gets one batched pass of each context's guess. Exact either
            way; False: off.
        lean: run the passes of a LLaMA-family model with :mod:`genlm_bytes.lm.lean` (the same
            decoder without transformers' per-module overhead), while it computes exactly what
            the model computes (see :mod:`genlm_bytes.lm.hf.faithful`). False: transformers'
            forward always.
        config: the engine's tuning knobs (:class:`~genlm_bytes.lm.hf.config.EngineConfig`).

    ``lm.onednn``: whether the lean passes and the output layer multiply through oneDNN
    (:mod:`genlm_bytes.lm.gemm`): a float32 model on the CPU, ``EngineConfig.onednn``, and
    its compiled kernels (charged to the budget) within a quarter of ``cache_budget_bytes``.
    ``lm.packed``: whether they multiply by oneDNN's packed copies of the weights
    (``EngineConfig.packed_weights``, where the copies fit a quarter of the memory available).
    ``lm.quantized``: whether the products run on the weights' 4- or 8-bit codes where the
    float32 weights are exactly such codes (``EngineConfig.quantized_products``;
    :mod:`genlm_bytes.lm.qgemm`: the same weights, bit for bit).
    """

    _trusted_output = True

    def __init__(self, hf_model, hf_tokenizer, *, batch_size: int = 32,
                 cache_budget_bytes: int = DEFAULT_CACHE_BUDGET, initial_context=None,
                 eos_token_ids=None, kv_reuse: bool = True, byte_vocab=None,
                 draft_tokens: int = DEFAULT_DRAFT_TOKENS, lookahead: bool = True, lean: bool = True,
                 config: EngineConfig | None = None):
        if isinstance(draft_tokens, bool) or not isinstance(draft_tokens, int) or draft_tokens < 0:
            raise ValueError(f"draft_tokens must be a non-negative int, got {draft_tokens!r}")
        for name, flag in (("lookahead", lookahead), ("lean", lean)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name} must be True or False, got {flag!r}")
        config = EngineConfig() if config is None else config
        if not isinstance(config, EngineConfig):
            raise TypeError(f"config must be an EngineConfig, got {type(config).__name__}")
        from genlm_bytes.lm.vocab import tokenizer_defaults

        defaults = tokenizer_defaults(
            hf_tokenizer, generation_eos=getattr(getattr(hf_model, "generation_config", None), "eos_token_id", None),
            config_eos=getattr(hf_model.config, "eos_token_id", None),
            n_logits=hf_model.get_output_embeddings().weight.shape[0],
            byte_vocab=byte_vocab, eos_token_ids=eos_token_ids, initial_context=initial_context)
        super().__init__(**defaults._asdict())
        self.model = hf_model.eval()
        self.tokenizer = hf_tokenizer
        self.config = config
        self.kv_reuse = bool(kv_reuse) and plain_cache(hf_model)
        self.draft_tokens, self.lookahead, self._use_lean = draft_tokens, lookahead, lean
        self.max_positions = getattr(hf_model.config, "max_position_embeddings", None)
        self.cache = PrefixCache(cache_budget_bytes)
        self._build_engine(batch_size)

    def _build_engine(self, batch_size: int) -> None:
        """The engine's parts, in the order a request meets them (see the package docstring)."""
        cfg, budget, model = self.config, self.cache.budget_bytes, self.model
        # The byte level's working set, charged to the budget: prepared distributions (a
        # probability row in byte order plus the log-prob row each keeps, 8 bytes per token)
        # and a speculation window's worth (1.5 rows per boundary) being built.
        by_memory = int(cfg.prepared_share * budget) // (8 * max(1, len(self.byte_vocab)))
        self.prepared_dists = max(32, min(cfg.prepared_dists, cfg.prepared_dists * budget // DEFAULT_CACHE_BUDGET,
                                          by_memory))
        self.speculation_window = max(16, min(cfg.speculation_window,
                                              cfg.speculation_window * budget // cfg.window_budget))
        # oneDNN's products, where its compiled kernels fit a quarter of the budget (charged to it).
        kernels = self._kernel_bytes()
        self.onednn = 0 < 4 * kernels <= budget
        reserve = ((self.prepared_dists + self.speculation_window * 3 // 2) * len(self.byte_vocab) * 8
                   + int(cfg.heap_share * budget) + (kernels if self.onednn else 0))
        # ... by a packed copy of the weights, where it fits a quarter of the memory available.
        self.packed = self.onednn and cfg.packed_weights and _packing_fits(model)
        # ... or by the weights' own 4- or 8-bit codes, where they are such codes.
        self.quantized = self.packed and cfg.quantized_products and qgemm.available()
        store = KVStore(self.cache, cfg, model, self.kv_reuse, self.vocab_size, reserve)
        watch = ModelWatch(model, lean=self.kv_reuse and self._use_lean,
                           make_lean=functools.partial(lean_decoder, onednn=self.onednn, packed=self.packed,
                                                     quantized=self.quantized))
        self.runner = PassRunner(model, store, watch, HeapTrimmer(self.cache, cfg), cfg, onednn=self.onednn,
                                 packed=self.packed)
        self.device = self.runner.device
        self.spellings = Spellings(self.byte_vocab, self.eos_token_ids)
        drafter = Drafter(self.runner, self.spellings, self.draft_tokens, self.max_positions)
        self.ahead = LookAhead(self.runner, self.spellings, self.lookahead, self.max_positions, None,
                               draft_tokens=self.draft_tokens)
        self.scheduler = Scheduler(self.runner, drafter, self.ahead)
        self.ahead.check_model = self.scheduler.check_model
        # One OpenMP pool at a time: the caller's is freed before work goes to the model's thread,
        # and CPU engines share that thread (lm/openmp.py).
        one_pool = cfg.one_openmp_pool and self.device.type == "cpu" and openmp.available()
        self.batcher = Batcher(self.scheduler.process, max_batch_size=batch_size, name="AsyncTransformer",
                               before_dispatch=openmp.release_thread_pool if one_pool else None,
                               executor=openmp.shared_executor() if one_pool else None)
        self.ahead.batcher = self.batcher
        # Flush denormals to zero in the model's worker thread (a per-thread CPU flag): forwards on a
        # cached past otherwise run into denormal floats and slow down several times on x86.
        self.batcher._executor.submit(torch.set_flush_denormal, True).result()

    def _kernel_bytes(self) -> int:
        """What oneDNN's compiled kernels for this model's products may keep (charged to the
        budget; :mod:`genlm_bytes.lm.gemm`): 0 unless its lean passes may use them (a model
        the lean decoder does not compute runs transformers' modules)."""
        p = next(self.model.parameters())
        if not (self.config.onednn and self.kv_reuse and self._use_lean and p.dtype == torch.float32
                and p.device.type == "cpu" and onednn_works() and lean_decoder(self.model) is not None):
            return 0
        return kernel_bytes(self.model.parameters())

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
        move_to_huge_pages(model)  # (CPU parameters only: see genlm_bytes.lm.hugepages)
        return cls(model, tok, **kwargs)

    # ---------------------------------------------------------------- state
    @property
    def lean(self):
        """The :class:`~genlm_bytes.lm.lean.LeanDecoder` the passes run now, or None."""
        return self.runner.watch.lean

    @property
    def n_forward_tokens(self) -> int:
        """Tokens run through the model so far (for tests and benchmarks)."""
        return self.runner.n_forward_tokens

    @property
    def by_bytes(self) -> dict[bytes, int]:
        """The token id of each spelling (built on first use)."""
        return self.spellings.by_bytes

    # ---------------------------------------------------------------- queries
    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(token_ids)
        # (a hook registered since the last pass: the next pass decides whether results cached
        # before it still hold)
        hit = None if self.runner.watch.hooks_changed() else self.cache.get_logp(key, held=True)
        if hit is not None:  # (held: the caller holds it now, the cache's copy goes first)
            if GUESS_AHEAD.get():
                self.ahead.on_hit(key, hit)  # a guessed context: guess the next one(s)
            return hit
        self.ahead.on_miss(key)
        self._check_length(len(key))
        return await self.batcher.submit(key, (key, GUESS_AHEAD.get()))

    @property
    def wants_hints(self) -> bool:
        """Hints are used by batches of at most ``ahead_group`` generation requests: not while
        more are in flight, nor after a larger batch (many states stepping together fill their
        passes with rows; their next batch is large again)."""
        cfg, b = self.config, self.batcher
        return (self.kv_reuse and cfg.hint_tokens > 0 and b.last_batch <= cfg.ahead_group
                and b.in_flight() < cfg.ahead_group)

    def hint_next(self, contexts) -> None:
        """Contexts likely asked for next (see :meth:`AsyncLM.hint_next`): the next batch of a
        few generation requests runs up to ``hint_tokens`` of them in its pass (those one token
        past a cached past), each computed as any request is. Malformed ones are ignored, and
        all of them without KV reuse (each would run its whole context)."""
        if not self.kv_reuse:
            return
        V, maxp, out = self.vocab_size, self.max_positions, []
        for c in contexts if isinstance(contexts, (list, tuple)) else ():
            try:
                c = tuple(int(t) for t in c)
            except (TypeError, ValueError):
                continue
            if c and all(0 <= t < V for t in c) and not (maxp and len(c) > maxp):
                out.append(c)
        self.scheduler.hints = tuple(out)

    def _cache_readable(self) -> bool:
        return not self.runner.watch.hooks_changed()  # a hook added since: recompute

    def clear_cache(self) -> None:
        """Drop every cached distribution and past (and stop a look-ahead pass). Weights changed
        through ``.data`` (unseen by torch's version counters) are packed again (see ``packed``)."""
        self.stop_lookahead()
        self.cache.clear()
        if self.packed and changed_weights(model_matrices(self.model)):
            self._locked(pack_model, self.model, self.quantized)

    def stop_lookahead(self) -> None:
        """Stop a look-ahead pass (see ``lookahead``) queued or running, if any: the model's
        thread is then free within one layer."""
        self.ahead.stop()

    async def prefetch(self, token_ids: list[int], alternatives=None, *, start: int = 0) -> None:
        """Compute and cache the distribution after every prefix of ``token_ids`` longer than
        ``start`` tokens (shorter ones are not recomputed if they were evicted).

        ``alternatives``: ``(i, t)`` pairs, or ``(i, (t1, t2, ...))`` chains: the contexts
        ``token_ids[:i] + [t1, ..., tk]`` (every k) will be needed too. The uncached end of
        the path and the alternatives run together in tree-masked passes (each alternative
        attends to its own prefix only); a long uncached path first runs in chunks.
        """
        job, cached = self._prefetch_job(token_ids, alternatives, start)
        if not cached or self.runner.watch.stale():
            await self._run_prefetch(self.scheduler.prefetch, *job)

    async def prefetch_many(self, requests) -> None:
        """:meth:`prefetch` of several paths, each ``(token_ids, alternatives, start)``: the short
        ones run together, their pasts end to end in one pass (``Scheduler.prefetch_many``),
        where a prefetch each would cost a pass each (the weights are read once per pass)."""
        jobs = []
        for req in requests:
            if not isinstance(req, (tuple, list)) or len(req) != 3:
                raise TypeError(f"a prefetch_many request is (token_ids, alternatives, start), got {req!r}")
            jobs.append(self._prefetch_job(*req))
        stale = self.runner.watch.stale()  # (then every job runs: the model's change drops the cache)
        todo = [job for job, cached in jobs if stale or not cached]
        if todo:
            await self._run_prefetch(self.scheduler.prefetch_many, todo)

    def _prefetch_job(self, token_ids, alternatives, start) -> tuple[tuple[tuple, list, int], bool]:
        """A prefetch's ``(ids, uncached items, start)``, checked, and whether all of it is cached."""
        ids = tuple(check_token_ids(token_ids, self.vocab_size))
        self._check_length(len(ids))
        if isinstance(start, bool) or not isinstance(start, int) or start < 0:
            raise ValueError(f"start must be a non-negative int, got {start!r}")
        items = self._uncached_alternatives(ids, alternatives)
        start = min(start, len(ids))
        path = self.cache.walk(ids)
        cached = len(path) == len(ids) and all(n.logp is not None for n in path[start:]) and not items
        return (ids, items, start), cached

    async def _run_prefetch(self, fn, *args) -> None:
        self.stop_lookahead()
        loop = asyncio.get_running_loop()
        self.batcher.dispatching()
        await loop.run_in_executor(self.batcher._executor, self._locked, fn, *args)

    def _uncached_alternatives(self, ids: tuple, alternatives) -> list[tuple[int, tuple, tuple]]:
        """The alternatives of :meth:`prefetch` as ``(i, chain, subs)`` items, checked, cut to the
        model's window, without the ones already cached."""
        items, get, maxp = {}, self.cache.get_logp, self.max_positions
        for alt in alternatives or ():
            i, chain, subs = parse_alternative(alt, len(ids), self.vocab_size)
            if maxp and i + len(chain) > maxp:  # positions 0..max-1
                chain = chain[: maxp - i]
                if not chain:
                    continue
            subs = tuple((k, t) for k, t in subs if k <= len(chain) and not (maxp and i + k + 1 > maxp))
            if ids[i:i + len(chain)] == chain:  # the path itself: its sub-branches branch off the path
                for k, t in subs:
                    if get(ids[:i + k] + (t,)) is None:
                        items[(i + k, (t,), ())] = None
                continue
            subs = tuple((k, t) for k, t in subs if get(ids[:i] + chain[:k] + (t,)) is None)
            if subs or get(ids[:i] + chain) is None:
                items[(i, chain, subs)] = None
        return list(items)

    def _locked(self, fn, *args):
        with self.batcher._lock:
            return fn(*args)

    def _check_length(self, n: int) -> None:
        if self.max_positions and n > self.max_positions:
            raise ValueError(f"a context of {n} tokens is longer than the model's window of "
                             f"{self.max_positions} tokens; use max_context_length to truncate")

