"""AsyncLM: the interface every token-level language model implements.

A user model subclasses :class:`AsyncLM`, calls ``super().__init__(byte_vocab=...,
initial_context=..., eos_token_ids=...)`` and implements only
``async def next_token_logprobs(self, token_ids) -> torch.Tensor`` returning
normalized log-probabilities of shape ``(V,)`` (a plain ``def`` is accepted
too, but it blocks the event loop while it runs).

The base class wraps that method (in ``__init_subclass__``) so every model,
ours and the user's, gets the same input checks (empty context, ids out of
range, non-integer ids) and output checks (shape, NaN, a row with no finite
entry), and provides the batched and synchronous forms.

Not handled here: batching across coroutines and caching. Backends that want
them (``AsyncTransformer``) use :mod:`genlm_bytes.batching`.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import contextvars
import functools
import inspect
import numbers
from collections.abc import Sequence

import numpy as np
import torch


def check_token_ids(token_ids, vocab_size: int, *, allow_empty: bool = False) -> list[int]:
    """Validate a token context and return it as a list of Python ints.

    Raises:
        TypeError: ``token_ids`` is not a sequence of integers.
        ValueError: it is empty, or an id is outside ``0..vocab_size-1``.
    """
    if isinstance(token_ids, torch.Tensor):
        if token_ids.dim() != 1 or token_ids.dtype.is_floating_point or token_ids.dtype == torch.bool:
            raise TypeError(f"token_ids must be a 1-D integer sequence, got a tensor of shape "
                            f"{tuple(token_ids.shape)} and dtype {token_ids.dtype}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, np.ndarray):
        if token_ids.ndim != 1 or token_ids.dtype.kind not in "iu":
            raise TypeError(f"token_ids must be a 1-D integer sequence, got an array of shape "
                            f"{token_ids.shape} and dtype {token_ids.dtype}")
        token_ids = token_ids.tolist()
    elif isinstance(token_ids, (str, bytes, bytearray)) or not isinstance(token_ids, Sequence):
        raise TypeError(f"token_ids must be a list of ints, got {type(token_ids).__name__}")
    ids = list(token_ids)
    if not ids and not allow_empty:
        raise ValueError("token_ids is empty: a context needs at least one token "
                         "(use the model's initial_context, e.g. a BOS token)")
    for i, t in enumerate(ids):
        if type(t) is not int:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise TypeError(f"token_ids[{i}] = {t!r} is not an integer token id")
            ids[i] = t = int(t)
        if t < 0 or t >= vocab_size:
            raise ValueError(f"token_ids[{i}] = {t} is out of range for a vocabulary of {vocab_size} tokens")
    return ids


# False while the caller reads a known text (prefill): a backend then does not guess what follows
# a context (see AsyncTransformer's draft_tokens): the reader knows it and asks for it in bulk.
GUESS_AHEAD: contextvars.ContextVar[bool] = contextvars.ContextVar("genlm_bytes_guess_ahead", default=True)


@contextlib.contextmanager
def known_text():
    """Within the block (and the tasks it starts), LM requests are for a known text: no drafts."""
    token = GUESS_AHEAD.set(False)
    try:
        yield
    finally:
        GUESS_AHEAD.reset(token)


def kept_on_model(lm, attr: str, source, build):
    """``build()``, computed once per model and kept on it as ``attr`` while ``source`` (what it
    is derived from, compared by identity) stays the same; rebuilt on every call for a model
    class with ``__slots__``."""
    cached = getattr(lm, attr, None)
    if cached is not None and cached[0] is source:
        return cached[1]
    value = build()
    try:
        setattr(lm, attr, (source, value))
    except AttributeError:
        pass
    return value


def _check_logprobs(out, token_ids: list[int], vocab_size: int, cls_name: str) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        out = torch.as_tensor(np.asarray(out))
    if out.shape != (vocab_size,):
        raise ValueError(f"{cls_name}.next_token_logprobs returned shape {tuple(out.shape)}, "
                         f"expected ({vocab_size},)")
    if torch.isnan(out).any():
        raise ValueError(f"{cls_name}.next_token_logprobs returned NaN for context "
                         f"{_short(token_ids)}")
    if torch.isposinf(out).any():
        raise ValueError(f"{cls_name}.next_token_logprobs returned +inf for context {_short(token_ids)}; "
                         f"it must return normalized log-probabilities (e.g. torch.log_softmax(logits, -1))")
    if not torch.isfinite(out).any():
        raise ValueError(f"{cls_name}.next_token_logprobs returned no finite log-probability "
                         f"(every token -inf) for context {_short(token_ids)}")
    return out


def _short(ids: list[int], n: int = 12) -> str:
    if len(ids) <= n:
        return str(ids)
    return f"[{', '.join(map(str, ids[:4]))}, ... ({len(ids)} tokens) ..., {', '.join(map(str, ids[-4:]))}]"


class AsyncLM(abc.ABC):
    """A token-level language model queried asynchronously.

    Attributes:
        byte_vocab: ``byte_vocab[t]`` is the byte string token ``t`` spells.
        vocab_size: ``len(byte_vocab)``; the length of every log-prob vector.
        initial_context: token ids every byte-level state starts from (e.g. a BOS token).
        eos_token_ids: ids of the model's end-of-sequence tokens.
    """

    #: Backends whose outputs are produced by our own code skip the per-call output check.
    _trusted_output = False

    def __init__(self, *, byte_vocab, initial_context=None, eos_token_ids=()):
        if isinstance(byte_vocab, (str, bytes)) or not isinstance(byte_vocab, Sequence):
            raise TypeError(f"byte_vocab must be a list of byte strings, got {type(byte_vocab).__name__}")
        vocab = []
        for i, b in enumerate(byte_vocab):
            if isinstance(b, bytearray):
                b = bytes(b)
            if not isinstance(b, bytes):
                raise TypeError(f"byte_vocab[{i}] = {b!r} is not a byte string")
            vocab.append(b)
        if not vocab:
            raise ValueError("byte_vocab is empty")
        self.byte_vocab: list[bytes] = vocab
        self.vocab_size: int = len(vocab)
        self.eos_token_ids: list[int] = check_token_ids(list(eos_token_ids), self.vocab_size, allow_empty=True)
        if initial_context is None:
            initial_context = self.eos_token_ids[:1]
        self.initial_context: list[int] = check_token_ids(list(initial_context), self.vocab_size,
                                                          allow_empty=True)
        self._trie = None

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        impl = cls.__dict__.get("next_token_logprobs")
        if impl is None or getattr(impl, "_checked", False):
            return

        @functools.wraps(impl)
        async def next_token_logprobs(self, token_ids):
            ids = check_token_ids(token_ids, self.vocab_size)
            out = impl(self, ids)
            if inspect.isawaitable(out):
                out = await out
            if self._trusted_output:
                return out
            return _check_logprobs(out, ids, self.vocab_size, type(self).__name__)

        next_token_logprobs._checked = True
        cls.next_token_logprobs = next_token_logprobs

    @abc.abstractmethod
    async def next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """Log-probabilities ``(V,)`` of the next token given ``token_ids``."""

    async def batch_next_token_logprobs(self, contexts: Sequence[Sequence[int]]) -> torch.Tensor:
        """Log-probabilities ``(B, V)`` for several contexts, computed concurrently."""
        if isinstance(contexts, (str, bytes)) or not isinstance(contexts, Sequence):
            raise TypeError(f"contexts must be a list of token-id lists, got {type(contexts).__name__}")
        if not contexts:
            return torch.empty((0, self.vocab_size))
        for i, c in enumerate(contexts):  # all checked before any work starts
            try:
                check_token_ids(c, self.vocab_size)
            except (TypeError, ValueError) as e:
                raise type(e)(f"contexts[{i}]: {e}") from None
        rows = await asyncio.gather(*(self.next_token_logprobs(c) for c in contexts))
        return torch.stack(rows)

    def next_token_logprobs_sync(self, token_ids: list[int]) -> torch.Tensor:
        """Synchronous :meth:`next_token_logprobs`; call it where no event loop runs."""
        _no_running_loop("next_token_logprobs_sync", "next_token_logprobs")
        return asyncio.run(self.next_token_logprobs(token_ids))

    def batch_next_token_logprobs_sync(self, contexts) -> torch.Tensor:
        """Synchronous :meth:`batch_next_token_logprobs`."""
        _no_running_loop("batch_next_token_logprobs_sync", "batch_next_token_logprobs")
        return asyncio.run(self.batch_next_token_logprobs(contexts))

    async def prefetch(self, token_ids: list[int], alternatives=None, *, start: int = 0) -> None:
        """Hint that the distributions after the prefixes of ``token_ids`` longer than ``start``
        will be needed.

        Backends that can compute them in one pass (``AsyncTransformer``) do so and
        cache them; the default does nothing. ``alternatives`` optionally lists
        ``(i, t)`` pairs: the context ``token_ids[:i] + [t]`` will probably be needed too;
        ``(i, (t1, ..., tk))`` chains: each ``token_ids[:i] + [t1, ..., tj]``; and
        ``(i, chain, subs)`` with ``(k, t)`` pairs in ``subs``: also ``token_ids[:i] + chain[:k] + [t]``
        (see :func:`alternative_contexts`).
        """
        return

    async def peek_next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """:meth:`next_token_logprobs` for a caller that reads ahead of the one who will use
        them (e.g. to plan prefetches): a backend with a cache keeps such a row for that later
        read, where a row handed out by ``next_token_logprobs`` is the first its cache drops."""
        return await self.next_token_logprobs(token_ids)

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """The tokenizer's own encoding of ``data`` (no special tokens), or None if unknown."""
        return None

    def clear_cache(self) -> None:
        """Drop cached results (the default model has none)."""

    @property
    def trie(self):
        """The :class:`~genlm_bytes.trie.TokenByteTrie` of this vocabulary, built once."""
        if self._trie is None:
            from genlm_bytes.trie import TokenByteTrie

            self._trie = TokenByteTrie(self.byte_vocab)
        return self._trie


def _no_running_loop(name: str, async_name: str) -> None:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return
    raise RuntimeError(f"{name}() was called inside a running event loop; use `await lm.{async_name}(...)` there")


def parse_alternative(alt, n_ids: int, vocab_size: int) -> tuple[int, tuple, tuple]:
    """An alternative of :meth:`AsyncLM.prefetch` on a context of ``n_ids`` tokens, as
    ``(i, chain, subs)``: ``(i, t)``, ``(i, chain)`` or ``(i, chain, subs)``; ``subs``: ``(k, t)``
    pairs, the context ``ids[:i] + chain[:k] + (t,)`` (pairs repeating the chain are dropped)."""

    def tok(t) -> int:
        if isinstance(t, bool) or not hasattr(t, "__index__") or not 0 <= t.__index__() < vocab_size:
            raise ValueError(f"alternative {alt!r}: {t!r} is not a token id below {vocab_size}")
        return t.__index__()

    if not isinstance(alt, (tuple, list)) or len(alt) not in (2, 3):
        raise ValueError(f"an alternative is (i, token), (i, chain) or (i, chain, subs); got {alt!r}")
    i, chain = alt[0], alt[1]
    chain = (tok(chain),) if hasattr(chain, "__index__") else tuple(tok(t) for t in chain)
    if isinstance(i, bool) or not hasattr(i, "__index__") or not 0 < i.__index__() <= n_ids or not chain:
        raise ValueError(f"alternative {alt!r} does not fit a context of {n_ids} tokens")
    subs = []
    for sub in (alt[2] if len(alt) == 3 else ()):
        k, t = sub
        if isinstance(k, bool) or not hasattr(k, "__index__") or not 0 <= k <= len(chain):
            raise ValueError(f"alternative {alt!r}: branch {sub!r} is outside its chain")
        if k == len(chain) or chain[k] != tok(t):
            subs.append((k.__index__(), tok(t)))
    return i.__index__(), chain, tuple(subs)


def alternative_contexts(token_ids, alternatives, vocab_size: int) -> list[list[int]]:
    """Every context the ``alternatives`` of :meth:`AsyncLM.prefetch` name, for backends that
    compute them one by one."""
    ids = list(token_ids)
    out = []
    for alt in alternatives or ():
        i, chain, subs = parse_alternative(alt, len(ids), vocab_size)
        out.extend(ids[:i] + list(chain[:j]) for j in range(1, len(chain) + 1))
        out.extend(ids[:i] + list(chain[:k]) + [t] for k, t in subs)
    return out
