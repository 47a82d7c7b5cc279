"""LazyByteProbs and Chart: next-symbol distributions that are cheap to pass around and easy to read.

A distribution over the 258 symbols (bytes 0-255, EOT 256, EOS 257) is a
``(258,)`` float64 array of natural-log probabilities; -inf marks impossible
symbols. :class:`LazyByteProbs` computes it on first use; :class:`Chart` is a
small dict view for reading, sorting and printing.

Probabilities or log-probabilities: one switch. Every :class:`LazyByteProbs`
method that hands out values takes ``log=False`` (probabilities, the default)
or ``log=True`` (natural-log probabilities); the raw arrays are ``.ps``
(log-probabilities) and ``.probs()`` (probabilities). A :class:`Chart` holds
whatever numbers it was built from; only :meth:`Chart.normalize` needs them to
be probabilities.

Example:
    >>> ps = np.full(N_SYMBOLS, -np.inf); ps[ord("a")], ps[EOS] = np.log(0.75), np.log(0.25)
    >>> LazyByteProbs(ps).pretty()
    Chart({b'a': 0.75, EOS: 0.25})
    >>> LazyByteProbs(ps).to_dict(log=True) == {ord("a"): np.log(0.75), EOS: np.log(0.25)}
    True

Not handled: a Chart has no default for missing keys (a KeyError, as for any
dict; use ``chart.get(key, 0.0)``) and no arithmetic between charts; charts
leave impossible symbols out (the full 258 slots are ``LazyByteProbs.ps``).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Hashable, Iterable

import numpy as np

from genlm_bytes.symbols import EOS, EOT, N_BYTES, N_SYMBOLS, check_symbol, symbol_name


def logsumexp(x: Iterable[float] | np.ndarray) -> float:
    """``log Σ exp(x)`` over every entry of ``x`` (log-space values), in float64.

    Empty input, or input that is all -inf, gives -inf (no warning); +inf gives +inf.

    >>> math.isclose(logsumexp([math.log(0.25), math.log(0.5), -math.inf]), math.log(0.75))
    True
    """
    x = np.asarray(x if isinstance(x, np.ndarray) else list(x), dtype=np.float64).reshape(-1)  # (n,)
    top = float(x.max(initial=-math.inf))
    if top in (-math.inf, math.inf):
        return top
    return top + math.log(float(np.sum(np.exp(x - top))))


def _check_top(k, name: str = "k") -> int:
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
        raise ValueError(f"{name} must be an int >= 0, got {k!r}")
    return int(k)


def _key_text(key) -> str:
    return key if isinstance(key, str) else repr(key)


class Chart(dict):
    """A dict from keys (symbols, bytes or names) to numbers, printed best first (str keys unquoted).

    The values are probabilities when the chart comes from :meth:`LazyByteProbs.materialize`
    (log-probabilities with ``log=True``); every method here returns a new Chart (or a number)
    and leaves this one as it is. Ties keep the chart's own order.

    >>> Chart({b"a": 0.25, b"b": 0.75}).top(1)
    Chart({b'b': 0.75})
    >>> Chart({"x": 0.2, "y": 0.5, "z": 0.3}).filter(lambda k: k != "y").normalize()
    Chart({z: 0.6, x: 0.4})
    """

    def top(self, k: int) -> Chart:
        """The ``k`` largest entries, largest first."""
        return Chart(list(self.sort_descending().items())[:_check_top(k)])

    def sort_descending(self) -> Chart:
        """The same entries, ordered from the largest value to the smallest."""
        return Chart(sorted(self.items(), key=lambda kv: -kv[1]))

    def sort(self, key: Callable | None = None, reverse: bool = False) -> Chart:
        """The same entries ordered by key (as :func:`sorted` orders the keys, with ``key``/``reverse``)."""
        return Chart((k, self[k]) for k in sorted(self, key=key, reverse=reverse))

    def _nonempty(self, what: str) -> None:
        if not self:
            raise ValueError(f"{what} of an empty chart: it has no entries")

    def argmax(self):
        """The key of the largest value (the first such key on ties); ValueError on an empty chart."""
        self._nonempty("argmax")
        return max(self, key=self.__getitem__)

    def argmin(self):
        """The key of the smallest value (the first such key on ties); ValueError on an empty chart."""
        self._nonempty("argmin")
        return min(self, key=self.__getitem__)

    def max(self) -> float:
        """The largest value; ValueError on an empty chart."""
        self._nonempty("max")
        return max(self.values())

    def min(self) -> float:
        """The smallest value; ValueError on an empty chart."""
        self._nonempty("min")
        return min(self.values())

    def sum(self) -> float:
        """The sum of the values (0.0 for an empty chart; for log-probabilities use :func:`logsumexp`)."""
        return float(sum(self.values()))

    def filter(self, keep: Callable[[Hashable], bool]) -> Chart:
        """The entries whose key satisfies ``keep(key)`` (the values are not renormalized)."""
        return Chart((k, v) for k, v in self.items() if keep(k))

    def map_values(self, f: Callable[[float], float]) -> Chart:
        """``f`` applied to every value, e.g. ``chart.map_values(math.log)``."""
        return Chart((k, f(v)) for k, v in self.items())

    def map_keys(self, f: Callable[[Hashable], Hashable]) -> Chart:
        """``f`` applied to every key; ValueError when two keys map to the same one."""
        out = Chart()
        for k, v in self.items():
            new = f(k)
            if new in out:
                raise ValueError(f"map_keys maps two keys to {new!r} (one of them {k!r}); keys must stay distinct")
            out[new] = v
        return out

    def to_dict(self) -> dict:
        """A plain ``dict`` copy."""
        return dict(self)

    def normalize(self) -> Chart:
        """The values divided by their sum, so they sum to 1.

        Raises:
            ValueError: a value is negative or NaN (log-probabilities: ``map_values(math.exp)``
                first), or no value is positive (e.g. every entry 0): there is nothing to normalize.
        """
        for k, v in self.items():
            if not v >= 0:
                raise ValueError(f"normalize needs probabilities (values >= 0), got {v!r} at {k!r}; "
                                 f"for log-probabilities use .map_values(math.exp).normalize()")
        z = self.sum()
        if z <= 0:
            raise ValueError("cannot normalize a chart with no positive mass (empty, or every value 0)")
        return Chart({k: v / z for k, v in self.items()})

    def format_table(self, top: int | None = None, *, digits: int = 4,
                     headings: tuple[str, str] = ("key", "value")) -> str:
        """A plain-text table, largest value first (``print`` it in a notebook or a terminal).

        >>> print(Chart({"EOS": 0.25, "b'a'": 0.75}).format_table())
        key   value
        b'a'   0.75
        EOS    0.25
        """
        items = self.sort_descending() if top is None else self.top(_check_top(top, "top"))
        rows = [(_key_text(k), f"{v:.{digits}g}") for k, v in items.items()]
        return _table([tuple(headings)] + rows)

    def __repr__(self) -> str:
        items = ", ".join(f"{_key_text(k)}: {v:.4g}" for k, v in self.sort_descending().items())
        return f"Chart({{{items}}})"


def _table(rows: list[tuple[str, ...]]) -> str:
    """Rows of cells as aligned text: the first column left-aligned, the others right-aligned."""
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) if c == 0 else cell.rjust(w)
                       for c, (cell, w) in enumerate(zip(r, widths))).rstrip() for r in rows]
    return "\n".join(lines)


class LazyByteProbs:
    """Log-probabilities of the next symbol, computed on first use.

    Args:
        ps_or_fn: a ``(258,)`` array of natural-log probabilities, or a function returning one.

    Attributes:
        ps: ``(258,)`` float64 log-probs (slots: bytes 0-255, EOT 256, EOS 257).

    The charts this hands out are keyed by symbol (an int: bytes 0-255, ``EOT``, ``EOS``;
    ``b'd'`` / ``"EOT"`` / ``"EOS"`` from :meth:`pretty`) and leave impossible symbols out. Methods that hand
    out values take ``log=True`` for log-probabilities instead of probabilities.
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

    def materialize(self, top: int | None = None, *, log: bool = False) -> Chart:
        """A :class:`Chart` from symbols (int) to probabilities (log-probabilities with ``log=True``),
        impossible symbols left out; with ``top``, only the ``top`` most probable, best first."""
        ps = self.ps
        idx = np.nonzero(ps > -np.inf)[0]
        if top is not None:
            idx = idx[np.argsort(-ps[idx], kind="stable")[:_check_top(top, "top")]]
        return Chart({int(i): float(ps[i]) if log else math.exp(ps[i]) for i in idx})

    def pretty(self, *, log: bool = False) -> Chart:
        """A :class:`Chart` keyed readably: a 1-byte ``bytes`` for a byte (``b'd'``), ``"EOT"``, ``"EOS"``."""
        return self.materialize(log=log).map_keys(lambda k: bytes([k]) if k < N_BYTES else symbol_name(k))

    def top(self, k: int, *, log: bool = False) -> list[tuple[int, float]]:
        """The ``k`` most probable ``(symbol, probability)`` pairs, best first."""
        return list(self.materialize(top=_check_top(k), log=log).items())

    def sort_descending(self, *, log: bool = False) -> Chart:
        """The possible symbols, most probable first."""
        return self.materialize(log=log).sort_descending()

    def filter(self, keep: Callable[[int], bool], *, log: bool = False) -> Chart:
        """The possible symbols ``s`` with ``keep(s)`` (not renormalized), e.g. ``keep=lambda s: s < 128``."""
        return self.materialize(log=log).filter(keep)

    def map_values(self, f: Callable[[float], float], *, log: bool = False) -> Chart:
        """``f`` applied to the value of every possible symbol."""
        return self.materialize(log=log).map_values(f)

    def to_dict(self, *, log: bool = False) -> dict[int, float]:
        """A plain ``{symbol: probability}`` dict of the possible symbols."""
        return self.materialize(log=log).to_dict()

    def _possible(self, what: str) -> np.ndarray:
        ps = self.ps
        if not (ps > -np.inf).any():
            raise ValueError(f"{what}: no symbol has positive probability (every slot is -inf)")
        return ps

    def argmax(self) -> int:
        """The most probable symbol (the lowest on ties); ValueError when none is possible."""
        return int(np.argmax(self._possible("argmax")))

    def argmin(self) -> int:
        """The least probable *possible* symbol (the lowest on ties); ValueError when none is possible."""
        ps = self._possible("argmin")
        return int(np.argmin(np.where(ps > -np.inf, ps, np.inf)))

    def max(self, *, log: bool = False) -> float:
        """The largest probability; ValueError when no symbol is possible."""
        return self._value(self.argmax(), log)

    def min(self, *, log: bool = False) -> float:
        """The smallest probability of a possible symbol; ValueError when no symbol is possible."""
        return self._value(self.argmin(), log)

    def _value(self, sym: int, log: bool) -> float:
        lp = float(self.ps[sym])
        return lp if log else math.exp(lp)

    def sum(self, *, log: bool = False) -> float:
        """The total probability (1 for a normalized distribution, 0 when nothing is possible);
        with ``log=True`` its log (``logsumexp(ps)``, -inf when nothing is possible)."""
        lz = logsumexp(self.ps)
        return lz if log else math.exp(lz)

    def format_table(self, top: int | None = None, *, digits: int = 4) -> str:
        """A plain-text table of the possible symbols, best first: readable name, probability, log-probability.

        >>> ps = np.full(N_SYMBOLS, -np.inf); ps[ord(" ")], ps[EOS] = np.log(0.75), np.log(0.25)
        >>> print(LazyByteProbs(ps).format_table())
        symbol     p    log p
        b' '    0.75  -0.2877
        EOS     0.25   -1.386
        """
        rows = [(symbol_name(s), f"{math.exp(lp):.{digits}g}", f"{lp:.{digits}g}")
                for s, lp in self.materialize(top=N_SYMBOLS if top is None else top, log=True).items()]
        return _table([("symbol", "p", "log p")] + rows)

    def __repr__(self) -> str:
        return f"LazyByteProbs({self.pretty().top(5)!r})"


__all__ = ["EOS", "EOT", "Chart", "LazyByteProbs", "logsumexp"]
