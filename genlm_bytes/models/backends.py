"""AsyncLM backends for the built-in models: a prefix cache of model states, batched misses.

- :class:`AsyncLlama` serves a :class:`~genlm_bytes.models.llama.LlamaTransformer`; its
  per-context state is a :class:`~genlm_bytes.models.llama.KVCache` (grows with the context).
- :class:`AsyncMLSTM` serves an :class:`~genlm_bytes.models.mlstm.MLSTMLM`; its per-context
  state is an :class:`~genlm_bytes.models.mlstm.MLSTMState` (fixed size, whatever the context).

Both keep a :class:`StatePrefixCache`: a token trie from context to (state, next-token
log-probs). A request for a context looks up its longest cached prefix with a state
and runs only the remaining tokens, so extending a context by k tokens runs k tokens.
Forking is free: sibling contexts (a beam extending one parent by several tokens)
share the parent's state object, and every state is immutable.

Requests that miss the cache go through a :class:`~genlm_bytes.batching.Batcher`:
concurrent misses are computed in one call (padded for the transformer, stacked
states for one-token extensions of the mLSTM).

With ``max_cache_entries=0`` nothing is cached: every call runs its whole context
(the reference that the cached path is tested against).

Why not :class:`genlm_bytes.lm.hf.prefix_cache.PrefixCache`: its past is a ``KVRef`` into a
transformers KV block; here a state is any immutable object (a ``KVCache`` or an
``MLSTMState``), so the trie below stores it as is.

Not handled: a memory budget in bytes (the cache is bounded by its number of entries);
sharing KV storage between contexts: extending a transformer context copies its KV cache
(O(context) memory traffic per step, where ``AsyncTransformer`` appends into shared blocks);
devices other than the model's.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any

import torch

from genlm_bytes.batching import Batcher
from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.models.llama import LlamaTransformer
from genlm_bytes.models.mlstm import MLSTMLM, MLSTMState

logger = logging.getLogger(__name__)


class _Node:
    __slots__ = ("children", "logprobs", "parent", "state", "token")

    def __init__(self, parent, token):
        self.parent, self.token = parent, token
        self.children: dict[int, _Node] = {}
        self.state = None
        self.logprobs = None


class StatePrefixCache:
    """Entries (model state or None, next-token log-probs) per token context, in a trie.

    Holds at most ``max_entries`` entries; the least recently used is dropped first.
    Thread-safe (the batcher's worker writes while the event loop reads).

    >>> c = StatePrefixCache(2)
    >>> c.put((1, 2), torch.zeros(3), state="s12")
    >>> c.longest_state((1, 2, 5, 6))
    (2, 's12')
    """

    def __init__(self, max_entries: int):
        if isinstance(max_entries, bool) or not isinstance(max_entries, int) or max_entries < 1:
            raise ValueError(f"max_entries must be a positive int, got {max_entries!r}")
        self.max_entries = max_entries
        self._root = _Node(None, None)
        self._lru: OrderedDict[_Node, None] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._lru)

    def logprobs(self, ids: Sequence[int]) -> torch.Tensor | None:
        """The cached log-probs after exactly ``ids``, or None."""
        with self._lock:
            node = self._root
            for t in ids:
                node = node.children.get(t)
                if node is None:
                    return None
            if node.logprobs is None:
                return None
            self._lru.move_to_end(node)
            return node.logprobs

    def longest_state(self, ids: Sequence[int]) -> tuple[int, Any]:
        """``(n, state)`` for the longest prefix ``ids[:n]`` with a cached state; ``(0, None)`` if none."""
        with self._lock:
            node, best, best_n = self._root, None, 0
            for n, t in enumerate(ids, 1):
                node = node.children.get(t)
                if node is None:
                    break
                if node.state is not None:
                    best, best_n = node, n
            if best is None:
                return 0, None
            self._lru.move_to_end(best)
            return best_n, best.state

    def put(self, ids: Sequence[int], logprobs: torch.Tensor, state: Any = None) -> None:
        """Cache the log-probs after ``ids`` and, if given, the model state (a kept state stays)."""
        with self._lock:
            node = self._root
            for t in ids:
                child = node.children.get(t)
                if child is None:
                    child = node.children[t] = _Node(node, t)
                node = child
            node.logprobs = logprobs
            if state is not None:
                node.state = state
            self._lru[node] = None
            self._lru.move_to_end(node)
            while len(self._lru) > self.max_entries:
                old, _ = self._lru.popitem(last=False)
                old.state = old.logprobs = None
                while old.parent is not None and old.logprobs is None and not old.children:
                    del old.parent.children[old.token]
                    old = old.parent

    def clear(self) -> None:
        with self._lock:
            self._root = _Node(None, None)
            self._lru.clear()


class _CachedModelLM(AsyncLM):
    """Shared machinery: prefix cache, batcher, log-softmax. Subclasses implement ``_extend``."""

    _trusted_output = True
    _model_type: type = object

    def __init__(self, model, byte_vocab, *, initial_context=None, eos_token_ids=(),
                 max_cache_entries: int = 512, max_batch_size: int = 16, tokenizer=None):
        if not isinstance(model, self._model_type):
            raise TypeError(f"model must be a {self._model_type.__name__}, got {type(model).__name__}")
        n_out = model.config.vocab_size
        if isinstance(byte_vocab, Sequence) and not isinstance(byte_vocab, (str, bytes)):
            if len(byte_vocab) > n_out:
                raise ValueError(f"byte_vocab has {len(byte_vocab)} tokens but the model only {n_out} "
                                 f"(config.vocab_size)")
            byte_vocab = list(byte_vocab) + [b""] * (n_out - len(byte_vocab))  # ids beyond the tokenizer
        super().__init__(byte_vocab=byte_vocab, initial_context=initial_context, eos_token_ids=eos_token_ids)
        if isinstance(max_cache_entries, bool) or not isinstance(max_cache_entries, int) or max_cache_entries < 0:
            raise ValueError(f"max_cache_entries must be an int >= 0, got {max_cache_entries!r}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cache = StatePrefixCache(max_cache_entries) if max_cache_entries > 0 else None
        self._batcher = Batcher(self._process, max_batch_size=max_batch_size, name=type(self).__name__)
        self.n_tokens_run = 0  # tokens fed through the model: for tests and benchmarks

    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        key = tuple(token_ids)
        if self.cache is not None:
            hit = self.cache.logprobs(key)
            if hit is not None:
                return hit
        return await self._batcher.submit(key, key)

    def has_logprobs(self, token_ids) -> bool:
        """Whether the distribution after ``token_ids`` is cached."""
        return self.cache is not None and self.cache.logprobs(tuple(token_ids)) is not None

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """The tokenizer's encoding of ``data``, or None when the backend was built without one."""
        if self.tokenizer is None:
            return None
        from genlm_bytes.lm.vocab import encode_bytes

        return encode_bytes(self.tokenizer, self.byte_vocab, data)

    async def prefetch(self, token_ids: list[int], alternatives=None, *, start: int = 0) -> None:
        """Run ``token_ids`` once (every prefix's log-probs get cached), then the alternatives."""
        from genlm_bytes.lm.base import alternative_contexts

        contexts = alternative_contexts(token_ids, alternatives, self.vocab_size)
        await self.next_token_logprobs(token_ids)
        if contexts:
            await asyncio.gather(*(self.next_token_logprobs(c) for c in contexts))

    def clear_cache(self) -> None:
        if self.cache is not None:
            self.cache.clear()

    @staticmethod
    def _logprobs(logits: torch.Tensor) -> torch.Tensor:
        """Logits ``(k, V)`` -> normalized log-probs ``(k, V)`` (float32 or float64)."""
        if logits.dtype not in (torch.float32, torch.float64):
            logits = logits.float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def _process(self, contexts: list[tuple[int, ...]]) -> list[torch.Tensor]:
        results: list[torch.Tensor | None] = [None] * len(contexts)
        rows, where = [], []
        for j, ctx in enumerate(contexts):
            n, state = 0, None
            if self.cache is not None:
                hit = self.cache.logprobs(ctx)
                if hit is not None:  # filled by an earlier batch since the request was made
                    results[j] = hit
                    continue
                n, state = self.cache.longest_state(ctx[:-1])  # keep >= 1 token to run for the logits
            rows.append((state, list(ctx[n:])))
            where.append((j, n))
        if rows:
            self.n_tokens_run += sum(len(s) for _, s in rows)
            for (j, n), (logits, states) in zip(where, self._extend(rows)):
                logprobs = self._logprobs(logits)  # (k, V)
                ctx = contexts[j]
                results[j] = logprobs[-1]
                if self.cache is not None:
                    for i in range(len(logprobs)):
                        self.cache.put(ctx[: n + i + 1], logprobs[i], states.get(i + 1))
        return results

    def _extend(self, rows: list[tuple[Any, list[int]]]) -> list[tuple[torch.Tensor, dict[int, Any]]]:
        """For each ``(state or None, tokens)``: logits ``(len(tokens), V)`` and the states to keep,
        keyed by how many of the tokens they include."""
        raise NotImplementedError


class AsyncLlama(_CachedModelLM):
    """A :class:`~genlm_bytes.models.llama.LlamaTransformer` as an :class:`~genlm_bytes.lm.base.AsyncLM`.

    Args:
        model: the transformer (put in eval mode).
        byte_vocab: ``byte_vocab[t]`` is the bytes of token t; at most ``model.config.vocab_size``
            tokens (model ids beyond it spell ``b""``, as in ``AsyncTransformer``).
        initial_context: token ids every byte-level state starts from (default: the first EOS).
        eos_token_ids: end-of-sequence token ids.
        max_cache_entries: contexts kept (each with its KV cache; a context's prefixes share
            storage); 0 disables caching.
        max_batch_size: most requests computed in one padded forward.
        tokenizer: optional transformers tokenizer; gives :meth:`encode_bytes` (the beam's
            one-pass prefill of a known text).
    """

    _model_type = LlamaTransformer

    @classmethod
    def from_hf(cls, hf_model, hf_tokenizer, **kwargs) -> AsyncLlama:
        """Copy a transformers LLaMA into a :class:`LlamaTransformer` and serve it.

        The byte vocabulary, EOS ids and initial context (BOS, else the first EOS) come from
        the tokenizer and the model, as for ``AsyncTransformer``; ``kwargs`` override them.
        """
        from genlm_bytes.lm.hf.backend import _eos_ids
        from genlm_bytes.lm.vocab import byte_vocab_from_tokenizer

        kwargs.setdefault("eos_token_ids", _eos_ids(hf_model, hf_tokenizer))
        if kwargs.get("initial_context") is None:
            bos = hf_tokenizer.bos_token_id
            kwargs["initial_context"] = [bos] if bos is not None else list(kwargs["eos_token_ids"][:1])
        return cls(LlamaTransformer.from_hf(hf_model), byte_vocab_from_tokenizer(hf_tokenizer),
                   tokenizer=hf_tokenizer, **kwargs)

    def _extend(self, rows):
        logits, caches = self.model.forward_ragged([toks for _, toks in rows], [c for c, _ in rows])
        out = []
        for (past, toks), lg, cache in zip(rows, logits, caches):
            P = 0 if past is None else past.length
            # every prefix's KV is a view of the new cache: keep them all, it costs no memory
            states = {i: cache.prefix(P + i) for i in range(1, len(toks) + 1)} if self.cache is not None else {}
            out.append((lg, states))
        return out


class AsyncMLSTM(_CachedModelLM):
    """An :class:`~genlm_bytes.models.mlstm.MLSTMLM` as an :class:`~genlm_bytes.lm.base.AsyncLM`.

    The state kept per context is the fixed-size recurrent state (C, n, m) of every block.
    One-token extensions of different contexts are batched by stacking their states;
    longer ones run the chunked parallel form and keep a state every ``checkpoint_every``
    tokens (and at the end), so a later extension from inside them reruns at most that many.

    Args:
        model: the mLSTM LM (put in eval mode).
        byte_vocab, initial_context, eos_token_ids, max_cache_entries, max_batch_size, tokenizer:
            as in :class:`AsyncLlama`.
        checkpoint_every: keep a state every this many tokens of a long extension.
    """

    _model_type = MLSTMLM

    def __init__(self, model, byte_vocab, *, checkpoint_every: int = 16, **kwargs):
        if isinstance(checkpoint_every, bool) or not isinstance(checkpoint_every, int) or checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be a positive int, got {checkpoint_every!r}")
        super().__init__(model, byte_vocab, **kwargs)
        self.checkpoint_every = checkpoint_every

    def _extend(self, rows):
        out: list[Any] = [None] * len(rows)
        singles = [r for r, (_, toks) in enumerate(rows) if len(toks) == 1]
        if singles:
            states = MLSTMState.stack([self.model.initial_state(1) if rows[r][0] is None else rows[r][0]
                                       for r in singles])
            ids = torch.tensor([rows[r][1] for r in singles], device=self.model.embed.weight.device)  # (B, 1)
            logits, new = self.model.forward_cached(ids, states)  # (B, 1, V)
            for b, r in enumerate(singles):
                own = MLSTMState(tuple(tuple(t.clone() for t in layer) for layer in new.select(b).layers))
                out[r] = (logits[b], {1: own})
        for r, (state, toks) in enumerate(rows):
            if out[r] is not None:
                continue
            step = self.checkpoint_every if self.cache is not None else len(toks)
            pieces, kept = [], {}
            for a in range(0, len(toks), step):
                ids = torch.tensor([toks[a : a + step]], device=self.model.embed.weight.device)  # (1, s)
                logits, state = self.model.forward_cached(ids, state)  # (1, s, V)
                pieces.append(logits[0])
                kept[min(a + step, len(toks))] = state
            out[r] = (torch.cat(pieces), kept)
        return out
