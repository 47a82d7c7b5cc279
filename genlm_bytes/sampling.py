"""Sampling: temperature, greedy, top-k, top-p, min-p, and batched generation from an AsyncLM.

Every transform works on a float tensor of shape ``(..., V)`` holding logits or
log-probabilities (the two give the same distributions: every transform here
is invariant to adding a constant to a row), returns a new tensor of the same
shape and dtype, and never changes its input. Removed entries get
``filter_value`` (default ``-inf``). When sampling, they are applied in the
order temperature -> top-k -> top-p -> min-p, with the semantics of
transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper``,
``TopPLogitsWarper`` and ``MinPLogitsWarper``.

Randomness is always passed in as ``rng`` (``None``, an int seed or a
``np.random.Generator``; see :func:`as_generator`). Draws are made with numpy
by inverse CDF on float64 probabilities, one uniform per sampled row, so a
seeded call gives the same tokens in every process. In generation the rows of
a step are the live sequences in batch order, so a sequence's draws depend on
the batch it is in (as with ``model.generate``).

Example:
    >>> from genlm_bytes import MockLM
    >>> seqs = generate_sync(MockLM(), [[0, 72, 105], [0, 72]], max_new_tokens=4, top_p=0.9, rng=0)
    >>> seqs.shape[0], seqs.shape[1] <= 3 + 4
    (2, True)

Not handled here: beam search, repetition penalties, stop strings, typical /
epsilon / eta sampling. Byte-level beams call :func:`sample_symbol` on their
258-slot next-symbol distributions.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import numbers
from collections.abc import Callable, Sequence
from typing import TypedDict

import numpy as np
import torch

from genlm_bytes.lm.base import AsyncLM, _no_running_loop, check_token_ids

logger = logging.getLogger(__name__)

#: What every ``rng`` argument accepts: None (fresh OS entropy), an int seed, or a Generator.
RngLike = None | int | np.random.Generator
#: ``fn(logprobs (A, V), rng) -> tokens (A,)``: how :func:`generate_tokens` picks each token.
TokenSampleFn = Callable[[torch.Tensor, np.random.Generator], torch.Tensor]


# --------------------------------------------------------------------------- validation


def as_generator(rng: RngLike) -> np.random.Generator:
    """Turn an ``rng`` argument into a ``np.random.Generator``.

    ``None`` gives a fresh generator seeded from OS entropy (not reproducible),
    an int ``s >= 0`` gives ``np.random.default_rng(s)``, and a Generator is
    returned as is (so successive calls advance it). The global NumPy RNG is
    never used.

    >>> int(as_generator(3).integers(1000)) == int(as_generator(3).integers(1000))
    True
    """
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool):
        if rng < 0:
            raise ValueError(f"rng={rng} is a negative seed; pass an int >= 0")
        return np.random.default_rng(int(rng))
    raise TypeError(f"rng must be None, an int seed or a np.random.Generator, got {type(rng).__name__} "
                    f"(np.random.RandomState and the global numpy RNG are not supported)")


def _check_real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {value!r}")
    return float(value)


def _check_temperature(temperature, *, allow_zero: bool) -> float:
    t = _check_real("temperature", temperature)
    if not (math.isfinite(t) and (t >= 0 if allow_zero else t > 0)):
        hint = ("; temperature=0 means greedy (argmax): use greedy_sampling or do_sample=False"
                if t == 0 else "")
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"temperature must be a finite number {bound}, got {temperature!r}{hint}")
    return t


def _check_top_k(top_k) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral):
        raise TypeError(f"top_k must be an int >= 1 (or None to disable), got {top_k!r}")
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None to disable top-k), got {top_k}")
    return int(top_k)


def _check_top_p(top_p) -> float:
    p = _check_real("top_p", top_p)
    if not 0 < p <= 1:
        raise ValueError(f"top_p must be in (0, 1] (1 or None disables top-p), got {top_p!r}")
    return p


def _check_min_p(min_p) -> float:
    p = _check_real("min_p", min_p)
    if not 0 <= p <= 1:
        raise ValueError(f"min_p must be in [0, 1] (0 or None disables min-p), got {min_p!r}")
    return p


def _check_min_tokens(min_tokens_to_keep) -> int:
    if isinstance(min_tokens_to_keep, bool) or not isinstance(min_tokens_to_keep, numbers.Integral) \
            or min_tokens_to_keep < 1:
        raise ValueError(f"min_tokens_to_keep must be an int >= 1, got {min_tokens_to_keep!r}")
    return int(min_tokens_to_keep)


def _as_logits(logits, name: str = "logits") -> torch.Tensor:
    """A floating tensor ``(..., V)`` with ``V >= 1`` (numpy arrays are converted, never copied back)."""
    if isinstance(logits, np.ndarray):
        logits = torch.from_numpy(logits)
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or np.ndarray of shape (..., V), "
                        f"got {type(logits).__name__}")
    if not logits.dtype.is_floating_point:
        raise TypeError(f"{name} must have a floating dtype, got {logits.dtype}")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have shape (..., V) with V >= 1, got {tuple(logits.shape)}")
    return logits.detach()


def _check_distribution_rows(x: torch.Tensor, name: str) -> None:
    if torch.isnan(x).any():
        raise ValueError(f"{name} contains NaN")
    if (x == math.inf).any():
        raise ValueError(f"{name} contains +inf")
    if x.numel() and not (x > -math.inf).any(dim=-1).all():
        raise ValueError(f"{name} has a row where every entry is -inf: nothing can be sampled")


# --------------------------------------------------------------------------- transforms


def apply_temperature(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Divide logits by ``temperature > 0``: below 1 sharpens, above 1 flattens.

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        temperature: finite, ``> 0`` (for argmax use :func:`greedy_sampling`).

    Returns:
        float ``(..., V)`` logits (not normalized).
    """
    x = _as_logits(logits)
    t = _check_temperature(temperature, allow_zero=False)
    return x / t


def top_k_filter(logits: torch.Tensor, top_k: int, *, filter_value: float = -math.inf,
                 min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Keep the ``max(top_k, min_tokens_to_keep)`` largest entries of each row.

    Entries tied with the k-th largest are all kept, so a row can keep more than k.

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        top_k: ``>= 1``; values above ``V`` keep everything.
        filter_value: what removed entries become.
        min_tokens_to_keep: ``>= 1``.

    Returns:
        float ``(..., V)``, removed entries set to ``filter_value``.

    >>> top_k_filter(torch.tensor([1.0, 3.0, 2.0, 3.0]), 2).tolist()
    [-inf, 3.0, -inf, 3.0]
    """
    x = _as_logits(logits)
    k = min(max(_check_top_k(top_k), _check_min_tokens(min_tokens_to_keep)), x.shape[-1])
    kth = torch.topk(x, k, dim=-1).values[..., -1:]  # (..., 1) the k-th largest entry
    return x.masked_fill(x < kth, _check_real("filter_value", filter_value))


def top_p_filter(logits: torch.Tensor, top_p: float, *, filter_value: float = -math.inf,
                 min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Nucleus filter: keep the most likely entries whose probabilities sum to ``top_p``.

    An entry is removed when its probability plus that of all less likely
    entries is at most ``1 - top_p``; the ``min_tokens_to_keep`` most likely
    entries are always kept. Equal entries at the boundary are ordered by
    index (the lower index counts as less likely).

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        top_p: in ``(0, 1]``.
        filter_value: what removed entries become.
        min_tokens_to_keep: ``>= 1``.

    Returns:
        float ``(..., V)``, removed entries set to ``filter_value``.

    >>> top_p_filter(torch.tensor([0.5, 0.3, 0.2]).log(), 0.7).isfinite().tolist()  # 0.5 + 0.3 >= 0.7
    [True, True, False]
    """
    x = _as_logits(logits)
    p = _check_top_p(top_p)
    keep = _check_min_tokens(min_tokens_to_keep)
    fill = _check_real("filter_value", filter_value)
    x_up, order = torch.sort(x, dim=-1, stable=True)  # (..., V) ascending, order[j] = index of rank j
    mass_up = torch.softmax(x_up, dim=-1).cumsum(dim=-1)  # (..., V) mass of rank j and all below it
    drop_up = mass_up <= 1 - p  # (..., V) bool, in ascending rank order
    drop_up[..., -keep:] = False  # the `keep` most likely always stay
    drop = torch.zeros_like(drop_up).scatter(-1, order, drop_up)  # (..., V) back to vocabulary order
    return x.masked_fill(drop, fill)


def min_p_filter(logits: torch.Tensor, min_p: float, *, filter_value: float = -math.inf,
                 min_tokens_to_keep: int = 1) -> torch.Tensor:
    """Remove entries whose probability is below ``min_p`` times the row's largest probability.

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        min_p: in ``[0, 1]``.
        filter_value: what removed entries become.
        min_tokens_to_keep: ``>= 1``; the most likely entries always stay.

    Returns:
        float ``(..., V)``, removed entries set to ``filter_value``.

    >>> min_p_filter(torch.tensor([0.6, 0.3, 0.1]).log(), 0.4).isfinite().tolist()  # 0.1 < 0.4 * 0.6
    [True, True, False]
    """
    x = _as_logits(logits)
    mp = _check_min_p(min_p)
    k = min(_check_min_tokens(min_tokens_to_keep), x.shape[-1])
    fill = _check_real("filter_value", filter_value)
    p = torch.softmax(x, dim=-1)  # (..., V) probabilities
    drop = p < mp * p.amax(dim=-1, keepdim=True)  # (..., V) bool
    top = torch.topk(p, k, dim=-1).indices  # (..., k) always kept
    drop = drop.scatter(-1, top, False)
    return x.masked_fill(drop, fill)


# --------------------------------------------------------------------------- samplers


def _argmax(x: torch.Tensor) -> torch.Tensor:
    """Index of the largest entry ``(...)`` int64; ties go to the lowest index."""
    return torch.argmax(x, dim=-1)


def _categorical(logits: torch.Tensor, gen: np.random.Generator) -> torch.Tensor:
    """Draw one index per row of ``logits (..., V)`` from softmax(logits), by inverse CDF in float64.

    Uses exactly one ``gen.random()`` draw per row; entries of probability 0 are never drawn.
    """
    shape, V = logits.shape[:-1], logits.shape[-1]
    x = logits.to(torch.float64).reshape(-1, V)  # (N, V)
    cdf = np.cumsum(torch.softmax(x, dim=-1).numpy(), axis=-1)  # (N, V) float64, non-decreasing
    u = (1.0 - gen.random(x.shape[0])) * cdf[:, -1]  # (N,) in (0, total]
    idx = (cdf < u[:, None]).sum(axis=-1)  # (N,) first j with cdf[j] >= u, so p[j] > 0
    return torch.from_numpy(idx.astype(np.int64)).reshape(shape)


def greedy_sampling(logits: torch.Tensor, rng: RngLike = None) -> torch.Tensor:
    """Argmax of each row (ties: the lowest index).

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        rng: unused; accepted so this can be a ``token_sample_fn``.

    Returns:
        int64 ``(...)`` token ids.
    """
    x = _as_logits(logits)
    _check_distribution_rows(x, "logits")
    return _argmax(x)


def temperature_sampling(logits: torch.Tensor, rng: RngLike, temperature: float = 1.0) -> torch.Tensor:
    """Sample each row from ``softmax(logits / temperature)``; temperature 0 is argmax.

    Args:
        logits: float ``(..., V)``, logits or log-probs.
        rng: ``None``, an int seed or a ``np.random.Generator`` (see :func:`as_generator`).
        temperature: finite, ``>= 0``.

    Returns:
        int64 ``(...)`` token ids.
    """
    x = _as_logits(logits)
    t = _check_temperature(temperature, allow_zero=True)
    _check_distribution_rows(x, "logits")
    if t == 0:
        return _argmax(x)
    return _categorical(x / t if t != 1 else x, as_generator(rng))


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick the next token (or byte) from a distribution; validated when built.

    Attributes:
        temperature: ``>= 0``; 0 means argmax.
        top_k: keep the k most likely (None: off).
        top_p: nucleus mass in ``(0, 1]`` (None or 1: off).
        min_p: in ``[0, 1]``, relative to the most likely (None: off).
        do_sample: False means argmax whatever the other fields say.
        min_tokens_to_keep: every filter keeps at least this many entries.

    Example:
        >>> SamplingParams(temperature=0.5, top_k=2).apply(torch.tensor([0.0, 1.0, 2.0])).tolist()
        [-inf, 2.0, 4.0]
    """

    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    min_p: float | None = None
    do_sample: bool = True
    min_tokens_to_keep: int = 1

    def __post_init__(self):
        def set_(name, value):  # frozen: normalize the fields once, here
            object.__setattr__(self, name, value)

        set_("temperature", _check_temperature(self.temperature, allow_zero=True))
        if self.top_k is not None:
            set_("top_k", _check_top_k(self.top_k))
        if self.top_p is not None:
            set_("top_p", _check_top_p(self.top_p))
        if self.min_p is not None:
            set_("min_p", _check_min_p(self.min_p))
        if not isinstance(self.do_sample, (bool, np.bool_)):
            raise TypeError(f"do_sample must be a bool, got {self.do_sample!r}")
        set_("do_sample", bool(self.do_sample))
        set_("min_tokens_to_keep", _check_min_tokens(self.min_tokens_to_keep))

    @classmethod
    def greedy(cls) -> SamplingParams:
        """Parameters for argmax decoding (``do_sample=False``)."""
        return cls(do_sample=False)

    @classmethod
    def resolve(cls, params, **sampling_kwargs) -> SamplingParams:
        """``params`` (a SamplingParams) or one built from keywords; both at once is a TypeError."""
        if params is None:
            return cls(**sampling_kwargs)
        if sampling_kwargs:
            raise TypeError("pass either params= or sampling keywords, not both")
        if not isinstance(params, cls):
            raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
        return params

    @property
    def is_greedy(self) -> bool:
        """True when the choice is the argmax (``do_sample=False`` or ``temperature == 0``)."""
        return not self.do_sample or self.temperature == 0

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """The logits of the distribution actually sampled from.

        Temperature, then top-k, top-p and min-p; for greedy parameters, a point
        mass on the argmax (0 there, -inf elsewhere).

        Args:
            logits: float ``(..., V)``, logits or log-probs (numpy arrays are accepted).

        Returns:
            float ``(..., V)`` unnormalized logits; removed entries are ``-inf``.
        """
        x = x0 = _as_logits(logits)
        if self.is_greedy:
            point = torch.full_like(x, -math.inf)  # (..., V)
            return point.scatter(-1, _argmax(x).unsqueeze(-1), 0.0)
        if self.temperature != 1:
            x = apply_temperature(x, self.temperature)
        keep = self.min_tokens_to_keep
        if self.top_k is not None:
            x = top_k_filter(x, self.top_k, min_tokens_to_keep=keep)
        if self.top_p is not None and self.top_p < 1:
            x = top_p_filter(x, self.top_p, min_tokens_to_keep=keep)
        if self.min_p is not None:
            x = min_p_filter(x, self.min_p, min_tokens_to_keep=keep)
        return x if x is not x0 else x0.clone()  # never hand back (a view of) the input

    def logprobs(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalized log-probabilities ``(..., V)`` of the distribution actually sampled from."""
        return torch.log_softmax(self.apply(logits), dim=-1)

    def sample(self, logits: torch.Tensor, rng: RngLike = None) -> torch.Tensor:
        """Draw one index per row; usable as a ``token_sample_fn``.

        Args:
            logits: float ``(..., V)``, logits or log-probs.
            rng: ``None``, an int seed or a ``np.random.Generator``; greedy parameters use none.

        Returns:
            int64 ``(...)`` indices.
        """
        x = _as_logits(logits)
        _check_distribution_rows(x, "logits")
        if self.is_greedy:
            return _argmax(x)
        return _categorical(self.apply(x), as_generator(rng))


def sample_symbol(logps, params: SamplingParams, rng: RngLike) -> int:
    """Pick one index of a single distribution after ``params``' filters.

    Meant for byte-level states: ``logps`` can be the 258 next-symbol slots
    (bytes, EOT, EOS) with ``-inf`` for impossible ones. Filters run in float64.

    Args:
        logps: 1-D float ``(V,)`` numpy array or torch tensor of log-probabilities
            (need not be normalized); at least one entry must be finite.
        params: the sampling parameters.
        rng: ``None``, an int seed or a ``np.random.Generator``.

    Returns:
        The chosen index, a Python int (the argmax for greedy parameters).
    """
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params must be a SamplingParams, got {type(params).__name__}")
    x = _as_logits(logps, "logps")
    if x.dim() != 1:
        raise ValueError(f"logps must be 1-D (V,), got shape {tuple(x.shape)}")
    return int(params.sample(x.to(torch.float64), rng))


# --------------------------------------------------------------------------- generation


def _prefixes(tokens, mask, vocab_size: int, tokens_name: str, mask_name: str) -> list[list[int]]:
    """The real tokens of each row: a list of ``B`` non-empty lists of ints."""
    if isinstance(tokens, (torch.Tensor, np.ndarray)):
        arr = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else tokens
        if arr.ndim == 1:
            arr = arr[None, :]
        if arr.ndim != 2:
            raise ValueError(f"{tokens_name} must have shape (B, L) or (L,), got {tuple(arr.shape)}")
        rows = [list(r) for r in arr]
    elif isinstance(tokens, Sequence) and not isinstance(tokens, (str, bytes, bytearray)):
        rows = [r.tolist() if isinstance(r, (np.ndarray, torch.Tensor))
                else list(r) if isinstance(r, Sequence) and not isinstance(r, (str, bytes)) else r
                for r in tokens]
        if rows and all(isinstance(r, numbers.Integral) and not isinstance(r, bool) for r in rows):
            rows = [rows]  # one prompt given as a flat list of ids
        elif not all(isinstance(r, list) for r in rows):
            raise TypeError(f"{tokens_name} must be a (B, L) tensor/array, a list of token-id lists, "
                            f"or one list of token ids")
    else:
        raise TypeError(f"{tokens_name} must be a (B, L) tensor/array or a list of token-id lists, "
                        f"got {type(tokens).__name__}")
    if mask is not None:
        try:
            m = mask.detach().cpu().numpy() if isinstance(mask, torch.Tensor) else np.asarray(mask)
        except ValueError:
            raise ValueError(f"{mask_name} must be a rectangular (B, L) array of 0/1 or booleans") from None
        lengths = {len(r) for r in rows}
        shape = (len(rows), lengths.pop()) if len(lengths) == 1 else None
        if m.ndim == 1 and len(rows) == 1:
            m = m[None, :]
        if shape is None or m.shape != shape:
            given = (len(rows), "ragged") if shape is None else shape
            raise ValueError(f"{mask_name} has shape {tuple(m.shape)} but {tokens_name} has shape "
                             f"{given}; they must match")
        if m.dtype != np.bool_:
            if not np.isin(m, (0, 1)).all():
                raise ValueError(f"{mask_name} must hold only 0/1 or booleans")
            m = m.astype(bool)
        out = []
        for b, (row, mrow) in enumerate(zip(rows, m)):
            where = np.flatnonzero(mrow)
            if where.size == 0:
                raise ValueError(f"{mask_name}[{b}] marks no token: every sequence needs at least one "
                                 f"real token (e.g. the model's initial_context)")
            if where[-1] - where[0] + 1 != where.size:
                raise ValueError(f"{mask_name}[{b}] has gaps: the real tokens of a row must be one "
                                 f"contiguous run (left or right padding)")
            out.append(row[where[0]:where[-1] + 1])
        rows = out
    result = []
    for b, row in enumerate(rows):
        try:
            result.append(check_token_ids(row, vocab_size))
        except (TypeError, ValueError) as e:
            raise type(e)(f"{tokens_name}[{b}]: {e}") from None
    return result


def _check_lm(lm) -> None:
    if not isinstance(lm, AsyncLM):
        raise TypeError(f"lm must be an AsyncLM, got {type(lm).__name__}")


async def _decode(lm: AsyncLM, prefixes: list[list[int]], budgets: list[int], stop_ids: frozenset[int],
                  choose) -> list[list[tuple]]:
    """Extend every prefix until it emits a stop id or has used its budget of new tokens.

    All live sequences are stepped together: one ``lm.batch_next_token_logprobs``
    call per step (the backend batches them and reuses each sequence's KV cache).
    ``choose(logps (A, V)) -> list of A tuples (token, *extras)``.

    Returns:
        for each sequence, the list of ``(token, *extras)`` it generated.
    """
    seqs = [list(p) for p in prefixes]
    out: list[list[tuple]] = [[] for _ in prefixes]
    live = [i for i, n in enumerate(budgets) if n > 0]
    steps = 0
    while live:
        logps = await lm.batch_next_token_logprobs([list(seqs[i]) for i in live])  # (A, V)
        if tuple(logps.shape) != (len(live), lm.vocab_size):
            raise RuntimeError(f"{type(lm).__name__}.batch_next_token_logprobs returned shape "
                               f"{tuple(logps.shape)}, expected ({len(live)}, {lm.vocab_size})")
        picks = choose(logps)
        still = []
        for i, pick in zip(live, picks):
            seqs[i].append(pick[0])
            out[i].append(pick)
            if pick[0] not in stop_ids and len(out[i]) < budgets[i]:
                still.append(i)
        live = still
        steps += 1
    logger.debug("decoded %d sequences in %d steps", len(prefixes), steps)
    return out


def _check_max(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
        raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    return int(value)


async def generate_tokens(lm: AsyncLM, prefix_tokens, prefix_mask=None, max_length: int = 2048,
                          eod_token_id: int = -1, token_sample_fn: TokenSampleFn = temperature_sampling,
                          rng: RngLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Continue a batch of prefixes of different lengths up to ``max_length`` tokens each.

    Args:
        lm: the model.
        prefix_tokens: int ``(B, L)`` tensor/array, or a list of ``B`` token-id lists
            (ragged allowed when ``prefix_mask`` is None), or one list of ids (``B = 1``).
        prefix_mask: bool or 0/1 ``(B, L)``, True on real prefix tokens; the real tokens
            of a row must be one contiguous run (left or right padding both work).
            None: every token is real.
        max_length: total length (prefix + generated) of every output row; must be at
            least the longest prefix.
        eod_token_id: when ``>= 0``, a sequence stops after producing it, and generation
            stops as soon as every sequence has. ``-1``: always run to ``max_length``.
        token_sample_fn: ``fn(logprobs (A, V) float, rng: np.random.Generator) -> (A,)``
            token ids, e.g. :func:`temperature_sampling`, :func:`greedy_sampling`,
            ``functools.partial(temperature_sampling, temperature=0.7)`` or
            ``SamplingParams(...).sample``. The rows are normalized log-probs.
        rng: ``None``, an int seed or a ``np.random.Generator``.

    Returns:
        ``(tokens, valid)``: ``tokens`` int64 ``(B, max_length)``, each row left-aligned:
        its real prefix tokens, then the generated ones; ``valid`` bool
        ``(B, max_length)``, True on the prefix and on generated tokens up to and
        including the first EOD. Invalid slots hold ``eod_token_id`` (0 when it is -1).
    """
    _check_lm(lm)
    max_length = _check_max("max_length", max_length)
    if isinstance(eod_token_id, bool) or not isinstance(eod_token_id, numbers.Integral) \
            or not -1 <= eod_token_id < lm.vocab_size:
        raise ValueError(f"eod_token_id must be -1 (off) or a token id below {lm.vocab_size}, "
                         f"got {eod_token_id!r}")
    if not callable(token_sample_fn):
        raise TypeError(f"token_sample_fn must be callable, got {type(token_sample_fn).__name__}")
    prefixes = _prefixes(prefix_tokens, prefix_mask, lm.vocab_size, "prefix_tokens", "prefix_mask")
    longest = max((len(p) for p in prefixes), default=0)
    if longest > max_length:
        raise ValueError(f"max_length={max_length} is shorter than the longest prefix ({longest} tokens)")
    gen = as_generator(rng)

    def choose(logps: torch.Tensor) -> list[tuple[int]]:
        toks = torch.as_tensor(token_sample_fn(logps, gen)).reshape(-1).tolist()  # (A,)
        if len(toks) != logps.shape[0] or not all(isinstance(t, int) and 0 <= t < lm.vocab_size
                                                  for t in toks):
            raise ValueError(f"token_sample_fn returned {toks!r} for {logps.shape[0]} rows; expected "
                             f"{logps.shape[0]} token ids in 0..{lm.vocab_size - 1}")
        return [(t,) for t in toks]

    stop = frozenset([eod_token_id]) if eod_token_id >= 0 else frozenset()
    new = await _decode(lm, prefixes, [max_length - len(p) for p in prefixes], stop, choose)
    B = len(prefixes)
    tokens = torch.full((B, max_length), max(eod_token_id, 0), dtype=torch.long)  # (B, max_length)
    valid = torch.zeros((B, max_length), dtype=torch.bool)  # (B, max_length)
    for b, (p, g) in enumerate(zip(prefixes, new)):
        row = p + [t for t, in g]
        tokens[b, :len(row)] = torch.tensor(row, dtype=torch.long)
        valid[b, :len(row)] = True
    return tokens, valid


class GenerateOutput(TypedDict):
    """What :func:`generate` returns with ``return_dict=True``.

    Attributes:
        sequences: int64 ``(B, P + T)``: the layout of ``model.generate`` on left-padded
            input. ``P`` is the longest prompt, ``T`` the most tokens any row generated;
            each prompt is right-aligned in the first ``P`` columns (left padding), the
            generated tokens follow, and a row that stopped early is padded.
        attention_mask: int64 ``(B, P + T)``, 1 on prompt and generated tokens, 0 on padding.
        scores: float64 ``(B, T)``, log-probability of each generated token under the
            distribution it was drawn from (after temperature and filters; 0 for greedy).
        logprobs: float64 ``(B, T)``, the model's own log-probability of each generated
            token (temperature 1, no filters).
        Both are 0 after a row has stopped, so a row's sum is its total.
    """

    sequences: torch.Tensor
    attention_mask: torch.Tensor
    scores: torch.Tensor
    logprobs: torch.Tensor


async def generate(lm: AsyncLM, input_ids, max_new_tokens: int, do_sample: bool = True,
                   temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, rng: RngLike = None, return_dict: bool = False, *,
                   attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
                   pad_token_id: int | None = None) -> torch.Tensor | GenerateOutput:
    """Sample (or greedily decode) continuations of a batch of prompts, like ``model.generate``.

    Args:
        lm: the model.
        input_ids: int ``(B, L)`` tensor/array (with ``attention_mask`` for padded rows),
            a list of ``B`` token-id lists of any lengths, or one list of ids (``B = 1``).
        max_new_tokens: ``>= 0``, the most tokens added to each prompt.
        do_sample: False: argmax at every step.
        temperature, top_k, top_p, min_p: as in :class:`SamplingParams`.
        rng: ``None``, an int seed or a ``np.random.Generator``.
        return_dict: return a :class:`GenerateOutput` instead of the sequences alone.
        attention_mask: 0/1 ``(B, L)``, 1 on real prompt tokens (one contiguous run per row).
        eos_token_id: id(s) that end a sequence; default ``lm.eos_token_ids``; ``[]`` never stops.
        pad_token_id: filler for padding; default the first eos id, else 0.

    Returns:
        ``sequences`` int64 ``(B, P + T)`` laid out as ``model.generate`` lays out a
        left-padded batch (see :class:`GenerateOutput`), or the full dict.
    """
    _check_lm(lm)
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            do_sample=do_sample)
    max_new_tokens = _check_max("max_new_tokens", max_new_tokens)
    if eos_token_id is None:
        stop_ids = list(lm.eos_token_ids)
    else:
        one = isinstance(eos_token_id, numbers.Integral) and not isinstance(eos_token_id, bool)
        try:
            stop_ids = check_token_ids([eos_token_id] if one else eos_token_id, lm.vocab_size,
                                       allow_empty=True)
        except (TypeError, ValueError) as e:
            raise type(e)(f"eos_token_id={eos_token_id!r}: {e}") from None
    if pad_token_id is None:
        pad_token_id = stop_ids[0] if stop_ids else 0
    elif isinstance(pad_token_id, bool) or not isinstance(pad_token_id, numbers.Integral):
        raise TypeError(f"pad_token_id must be an int, got {pad_token_id!r}")
    prompts = _prefixes(input_ids, attention_mask, lm.vocab_size, "input_ids", "attention_mask")
    gen = None if params.is_greedy else as_generator(rng)

    def choose(logps: torch.Tensor) -> list[tuple[int, float, float]]:
        lp_sample = params.logprobs(logps)  # (A, V) the distribution sampled from
        toks = _argmax(lp_sample) if gen is None else _categorical(lp_sample, gen)  # (A,)
        idx = toks.unsqueeze(-1)  # (A, 1)
        scores = lp_sample.gather(-1, idx).squeeze(-1).tolist()  # (A,)
        raw = logps.gather(-1, idx).squeeze(-1).tolist()  # (A,)
        return list(zip(toks.tolist(), scores, raw))

    new = await _decode(lm, prompts, [max_new_tokens] * len(prompts), frozenset(stop_ids), choose)
    B = len(prompts)
    P = max((len(p) for p in prompts), default=0)
    T = max((len(g) for g in new), default=0)
    sequences = torch.full((B, P + T), pad_token_id, dtype=torch.long)  # (B, P + T)
    mask = torch.zeros((B, P + T), dtype=torch.long)  # (B, P + T)
    scores = torch.zeros((B, T), dtype=torch.float64)  # (B, T)
    logprobs = torch.zeros((B, T), dtype=torch.float64)  # (B, T)
    for b, (p, g) in enumerate(zip(prompts, new)):
        sequences[b, P - len(p):P] = torch.tensor(p, dtype=torch.long)
        mask[b, P - len(p):P + len(g)] = 1
        if g:
            toks, sc, raw = zip(*g)
            sequences[b, P:P + len(g)] = torch.tensor(toks, dtype=torch.long)
            scores[b, :len(g)] = torch.tensor(sc, dtype=torch.float64)
            logprobs[b, :len(g)] = torch.tensor(raw, dtype=torch.float64)
    if not return_dict:
        return sequences
    return GenerateOutput(sequences=sequences, attention_mask=mask, scores=scores, logprobs=logprobs)


def generate_tokens_sync(lm: AsyncLM, prefix_tokens, prefix_mask=None, max_length: int = 2048,
                         eod_token_id: int = -1, token_sample_fn: TokenSampleFn = temperature_sampling,
                         rng: RngLike = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`generate_tokens` for code with no running event loop."""
    _no_running_loop("generate_tokens_sync", "generate_tokens")
    return asyncio.run(generate_tokens(lm, prefix_tokens, prefix_mask, max_length, eod_token_id,
                                       token_sample_fn, rng))


def generate_sync(lm: AsyncLM, input_ids, max_new_tokens: int, do_sample: bool = True,
                  temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  min_p: float | None = None, rng: RngLike = None, return_dict: bool = False, *,
                  attention_mask=None, eos_token_id: int | Sequence[int] | None = None,
                  pad_token_id: int | None = None) -> torch.Tensor | GenerateOutput:
    """:func:`generate` for code with no running event loop."""
    _no_running_loop("generate_sync", "generate")
    return asyncio.run(generate(lm, input_ids, max_new_tokens, do_sample, temperature, top_k, top_p,
                                min_p, rng, return_dict, attention_mask=attention_mask,
                                eos_token_id=eos_token_id, pad_token_id=pad_token_id))
