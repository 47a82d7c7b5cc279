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
import weakref
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


class ByteVocabulary(list):
    """The byte strings of a vocabulary's tokens (``vocab[t]``: what token ``t`` spells), and how
    text is encoded into them.

    :meth:`encode` gives the one token path a beam anchors a prefill on: the tokenizer's own
    encoding when the vocabulary knows its encoder, else (no encoder, or text the tokenizer
    cannot encode exactly, such as invalid UTF-8) the path with the fewest tokens. It depends on
    the vocabulary alone, so every backend serving the same vocabulary anchors on the same path.

    Args:
        spellings: the byte strings, in token-id order.
        encoder: ``encoder(data) -> list[int] | None``, the tokenizer's encoding (None: unknown).

    Example:
        >>> ByteVocabulary([b"a", b"b", b"ab", b"abb"]).encode(b"abab")
        [2, 2]
    """

    __slots__ = ("_index", "encoder")

    def __init__(self, spellings=(), encoder=None):
        super().__init__(spellings)
        self.encoder = encoder
        self._index = None

    def encode(self, data: bytes) -> list[int] | None:
        """A token path spelling ``data`` (see the class), or None when no path spells it."""
        data = bytes(data)
        if self.encoder is not None:
            ids = self.encoder(data)
            if ids is not None and all(0 <= t < len(self) for t in ids) \
                    and b"".join(self[t] for t in ids) == data:
                return list(ids)
        return self.fewest_tokens(data)

    def __reduce__(self):
        # A backend's own encoder (held weakly) does not travel; a plain function does.
        enc = None if isinstance(self.encoder, _EncoderOf) else self.encoder
        return (ByteVocabulary, (list(self), enc))

    def fewest_tokens(self, data: bytes) -> list[int] | None:
        """The path spelling ``data`` with the fewest tokens (None if none does). Ties go to the
        longest first token, then the next, and so on; a spelling shared by several ids, to the
        smallest id. Dynamic programming from the end: ``O(len(data) × distinct token lengths)``.

        Example:
            >>> ByteVocabulary([b"a", b"b", b"ab", b"ba"]).fewest_tokens(b"aba")
            [2, 0]
        """
        if self._index is None:
            by_bytes: dict[bytes, int] = {}
            for t, b in enumerate(self):
                if b and b not in by_bytes:
                    by_bytes[b] = t
            self._index = (by_bytes, sorted({len(b) for b in by_bytes}, reverse=True))
        by_bytes, lengths = self._index
        n = len(data)
        n_tokens = [0] + [n + 1] * n  # n_tokens[k]: fewest tokens spelling the last k bytes
        first: list[int | None] = [None] * (n + 1)  # the first token of that path
        for k in range(1, n + 1):
            i = n - k
            for length in lengths:  # longest first: strict improvement keeps the longest on ties
                if length <= k and n_tokens[k - length] + 1 < n_tokens[k]:
                    t = by_bytes.get(data[i: i + length])
                    if t is not None:
                        n_tokens[k], first[k] = n_tokens[k - length] + 1, t
        if n_tokens[n] > n:
            return None
        out, k = [], n
        while k:
            out.append(first[k])
            k -= len(self[first[k]])
        return out


class _EncoderOf:
    """A backend's ``encode_bytes`` as its vocabulary's encoder. Holds the backend weakly (no
    reference cycle: a backend's memory is freed when its last user drops it)."""

    __slots__ = ("_lm",)

    def __init__(self, lm):
        self._lm = weakref.ref(lm)

    def __call__(self, data: bytes) -> list[int] | None:
        lm = self._lm()
        return None if lm is None else lm.encode_bytes(data)


class AsyncLM(abc.ABC):
    """A token-level language model queried asynchronously.

    Attributes:
        byte_vocab: ``byte_vocab[t]`` is the byte string token ``t`` spells (a
            :class:`ByteVocabulary`, which also carries the tokenizer's encoder).
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
        # The tokenizer's encoder travels with the vocabulary: a backend's own ``encode_bytes``,
        # else the one of the vocabulary it was handed (a wrapper passing its inner model's
        # ``byte_vocab`` keeps that model's encoding, hence the same canonical covers).
        self._inherited_encoder = getattr(byte_vocab, "encoder", None)
        encoder = _EncoderOf(self) if type(self).encode_bytes is not AsyncLM.encode_bytes else self._inherited_encoder
        self.byte_vocab: ByteVocabulary = ByteVocabulary(vocab, encoder)
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

    async def prefetch_many(self, requests) -> None:
        """:meth:`prefetch` of several paths, each ``(token_ids, alternatives, start)``. A backend
        that can run them together (``AsyncTransformer``: in one pass, their pasts end to end,
        where they fit) does; the default prefetches them one after another."""
        for req in requests:
            if not isinstance(req, (tuple, list)) or len(req) != 3:
                raise TypeError(f"a prefetch_many request is (token_ids, alternatives, start), got {req!r}")
            token_ids, alternatives, start = req
            await self.prefetch(token_ids, alternatives, start=start)

    @property
    def wants_hints(self) -> bool:
        """Whether :meth:`hint_next` would be used now (a caller may skip finding hints)."""
        return False

    def hint_next(self, contexts) -> None:
        """Contexts (token-id tuples) the caller is likely to ask for soon, likeliest first,
        given just before requests that miss the cache (a beam generating: the covers' next
        token endings along its guess of the next bytes). A backend may compute some of them
        in the pass those requests start; it returns nothing and never raises for a bad hint.
        The default does nothing."""
        return

    async def peek_next_token_logprobs(self, token_ids: list[int]) -> torch.Tensor:
        """:meth:`next_token_logprobs` for a caller that reads ahead of the one who will use
        them (e.g. to plan prefetches): a backend with a cache keeps such a row for that later
        read, where a row handed out by ``next_token_logprobs`` is the first its cache drops."""
        return await self.next_token_logprobs(token_ids)

    def encode_bytes(self, data: bytes) -> list[int] | None:
        """The tokenizer's own encoding of ``data`` (no special tokens), or None if unknown.

        The default is the encoder of the ``byte_vocab`` this model was built with (see
        :class:`ByteVocabulary`): None for a plain list of byte strings."""
        enc = getattr(self, "_inherited_encoder", None)
        return None if enc is None else enc(data)

    @property
    def supports_prefetch(self) -> bool:
        """Whether :meth:`prefetch` computes distributions ahead and ``has_logprobs(token_ids)``
        says which are cached: the beam then plans a prefill's passes with it. Planning changes
        how passes are grouped, never which covers a beam keeps. Derived from the methods a
        backend implements; a backend may also declare it (``supports_prefetch = True``)."""
        return type(self).prefetch is not AsyncLM.prefetch and callable(getattr(self, "has_logprobs", None))

    def clear_cache(self) -> None:
        """Drop cached results (the default model has none)."""

    @property
    def trie(self):
        """The :class:`~genlm_bytes.trie.TokenByteTrie` of this vocabulary, built once."""
        if self._trie is None:
            from genlm_bytes.trie import TokenByteTrie

            self._trie = TokenByteTrie(self.byte_vocab)
        return self._trie


def vocabulary_of(lm: AsyncLM) -> ByteVocabulary:
    """``lm.byte_vocab`` as a :class:`ByteVocabulary` (a backend that replaced it by a plain list
    after construction gets one built once, with its ``encode_bytes`` as the encoder)."""
    vocab = lm.byte_vocab
    if isinstance(vocab, ByteVocabulary):
        return vocab
    return kept_on_model(lm, "_genlm_vocabulary", vocab, lambda: ByteVocabulary(vocab, _EncoderOf(lm)))


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
