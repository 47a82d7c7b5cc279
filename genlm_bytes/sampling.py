"""Sampling: temperature, greedy, top-k, top-p, min-p, and :class:`SamplingParams`.

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
seeded call gives the same tokens in every process.

Example:
    >>> SamplingParams(top_k=1).sample(torch.tensor([0.1, 2.0, 0.3]), rng=0).item()
    1

Not handled here: beam search, repetition penalties, stop strings, typical /
epsilon / eta sampling. Token-level generation from an AsyncLM
(:func:`~genlm_bytes.generation.generate_tokens`, :func:`~genlm_bytes.generation.generate`)
lives in :mod:`genlm_bytes.generation`; its names stay importable from here.
Byte-level beams call :func:`sample_symbol` on their 258-slot next-symbol distributions.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import numpy as np
import torch

#: What every ``rng`` argument accepts: None (fresh OS entropy), an int seed, or a Generator.
RngLike = None | int | np.random.Generator


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


def _check_distribution_rows(x, name: str):
    """No NaN, no +inf, and a finite entry in every row of ``x`` (a tensor or a numpy array).

    One reduction does the three checks: a row's max is NaN where the row holds one, +inf where
    it holds one and no NaN, -inf where every entry is. Returns the row maxima (None when ``x``
    is empty)."""
    if not math.prod(x.shape):
        return None
    if isinstance(x, np.ndarray):
        m, isnan = x.max(-1), np.isnan
    else:
        m, isnan = x.amax(-1), torch.isnan
    if isnan(m).any():
        raise ValueError(f"{name} contains NaN")
    if (m == math.inf).any():
        raise ValueError(f"{name} contains +inf")
    if (m == -math.inf).any():
        raise ValueError(f"{name} has a row where every entry is -inf: nothing can be sampled")
    return m


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
    return torch.from_numpy(_inverse_cdf(torch.softmax(x, dim=-1).numpy(), gen)).reshape(shape)


def _inverse_cdf(probs: np.ndarray, gen: np.random.Generator) -> np.ndarray:
    """One draw per row of the float64 probabilities ``probs (N, V)``, by inverse CDF with one
    ``gen.random()`` per row: int64 ``(N,)``; entries of probability 0 are never drawn."""
    cdf = np.cumsum(probs, axis=-1)  # (N, V) non-decreasing
    u = (1.0 - gen.random(probs.shape[0])) * cdf[:, -1]  # (N,) in (0, total]
    # The first j with cdf[j] >= u (so p[j] > 0): a binary search, each row being non-decreasing.
    return np.array([np.searchsorted(c, x, side="left") for c, x in zip(cdf, u)], dtype=np.int64)


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
    if (isinstance(logps, np.ndarray) and logps.ndim == 1 and logps.dtype.kind == "f" and logps.size
            and params.top_k is None and params.top_p is None and params.min_p is None):
        return _sample_plain(logps, params, rng)
    x = _as_logits(logps, "logps")
    if x.dim() != 1:
        raise ValueError(f"logps must be 1-D (V,), got shape {tuple(x.shape)}")
    return int(params.sample(x.to(torch.float64), rng))


def _sample_plain(logps: np.ndarray, params: SamplingParams, rng: RngLike) -> int:
    """:func:`sample_symbol` for a 1-D numpy row and no filters (a byte-level state's every step):
    the same checks and the same draw as :func:`_categorical` (one ``gen.random()``, inverse CDF
    in float64), in numpy, without a round of small torch calls per symbol."""
    x = logps.astype(np.float64)  # (V,) a copy
    m = float(_check_distribution_rows(x, "logps"))
    if params.is_greedy:
        return int(x.argmax())
    if params.temperature != 1:
        x /= params.temperature
        m = float(x.max())
    p = np.exp(x - m)
    return int(_inverse_cdf((p / p.sum())[None], as_generator(rng))[0])


# --------------------------------------------------------------------------- generation, re-exported

#: Names of :mod:`genlm_bytes.generation` that stay importable from this module (the README documents
#: ``genlm_bytes.sampling.generate_tokens``); loaded on first use, so the two modules import no circle.
_GENERATION = ("generate_tokens", "generate", "generate_tokens_sync", "generate_sync", "GenerateOutput",
               "TokenSampleFn")


def __getattr__(name: str):
    if name in _GENERATION:
        from genlm_bytes import generation

        return getattr(generation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

