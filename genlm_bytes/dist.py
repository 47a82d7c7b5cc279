"""LazyByteProbs and Chart: next-symbol distributions that are cheap to pass around and easy to read.

A distribution over the 258 symbols (bytes 0-255, EOT 256, EOS 257) is a
``(258,)`` float64 array of natural-log probabilities; -inf marks impossible
symbols. :class:`LazyByteProbs` computes it on first use; :class:`Chart` is a
small dict view for reading and printing.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS, check_symbol, symbol_name


class Chart(dict):
    """A dict from keys (symbols or readable names) to probabilities, printed best first.

    >>> Chart({b"a": 0.25, b"b": 0.75}).top(1)
    Chart({b'b': 0.75})
    """

    def top(self, k: int) -> Chart:
        """The ``k`` most probable entries."""
        if not isinstance(k, int) or k < 0:
            raise ValueError(f"k must be a non-negative int, got {k!r}")
        return Chart(sorted(self.items(), key=lambda kv: -kv[1])[:k])

    def argmax(self):
        return max(self, key=self.__getitem__)

    def normalize(self) -> Chart:
        z = sum(self.values())
        if z <= 0:
            raise ValueError("cannot normalize a chart with no positive mass")
        return Chart({k: v / z for k, v in self.items()})

    def __repr__(self) -> str:
        items = ", ".join(f"{k!r}: {v:.4g}" if not isinstance(k, str) else f"{k}: {v:.4g}"
                          for k, v in sorted(self.items(), key=lambda kv: -kv[1]))
        return f"Chart({{{items}}})"


class LazyByteProbs:
    """Log-probabilities of the next symbol, computed on first use.

    Args:
        ps_or_fn: a ``(258,)`` array of log-probs, or a function returning one.

    Attributes:
        ps: ``(258,)`` float64 log-probs (slots: bytes 0-255, EOT 256, EOS 257).
    """

    __slots__ = ("_fn", "_ps")

    def __init__(self, ps_or_fn: np.ndarray | Callable[[], np.ndarray]):
        if callable(ps_or_fn):
            self._ps, self._fn = None, ps_or_fn
        else:
            self._ps, self._fn = self._check(ps_or_fn), None

    @staticmethod
    def _check(ps) -> np.ndarray:
        ps = np.asarray(ps, dtype=np.float64)
        if ps.shape != (N_SYMBOLS,):
            raise ValueError(f"a byte distribution has {N_SYMBOLS} slots, got shape {ps.shape}")
        return ps

    @property
    def ps(self) -> np.ndarray:
        if self._ps is None:
            self._ps = self._check(self._fn())
            self._fn = None
        return self._ps

    def __getitem__(self, sym) -> float:
        """Log-probability of a symbol (an int 0..257, or a 1-byte bytes)."""
        return float(self.ps[check_symbol(sym, allow_eot=True)])

    def __len__(self) -> int:
        return N_SYMBOLS

    def probs(self) -> np.ndarray:
        """``(258,)`` probabilities."""
        return np.exp(self.ps)

    def materialize(self, top: int | None = None) -> Chart:
        """A :class:`Chart` from symbols (int) to probabilities, impossible symbols left out."""
        ps = self.ps
        idx = np.nonzero(np.isfinite(ps))[0]
        if top is not None:
            idx = idx[np.argsort(-ps[idx], kind="stable")[:top]]
        return Chart({int(i): math.exp(ps[i]) for i in idx})

    def pretty(self) -> Chart:
        """A :class:`Chart` keyed by readable names: ``b'd'``, ``EOS``, ``EOT``."""
        return Chart({_Name(symbol_name(k)): v for k, v in self.materialize().items()})

    def top(self, k: int) -> list[tuple[int, float]]:
        """The ``k`` most probable ``(symbol, probability)`` pairs."""
        return list(self.materialize(top=k).items())

    def argmax(self) -> int:
        return int(np.argmax(self.ps))

    def __repr__(self) -> str:
        return f"LazyByteProbs({self.pretty().top(5)!r})"


class _Name(str):
    """A symbol's readable name; its repr is the name itself (``b'd'``, not ``"b'd'"``)."""

    def __repr__(self) -> str:
        return str(self)


__all__ = ["EOS", "EOT", "Chart", "LazyByteProbs"]
