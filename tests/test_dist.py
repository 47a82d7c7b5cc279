"""Tests of genlm_bytes.dist: Chart and LazyByteProbs conveniences, logsumexp.

Layers: Chart operations against plain-Python oracles (edge cases: empty charts,
ties, -inf values, name keys); LazyByteProbs in both spaces with EOS / EOT keys and
impossible symbols; logsumexp against a float64 brute force (hypothesis); one
distribution from a real beam on the mock LM.
"""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.dist import Chart, LazyByteProbs, logsumexp
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS

INF = math.inf


def dist_of(**p_by_symbol) -> LazyByteProbs:
    """A LazyByteProbs from probabilities given by name: ``a=0.5`` (the byte), ``EOS=0.1``, ``EOT=0.2``."""
    ps = np.full(N_SYMBOLS, -INF)
    for name, p in p_by_symbol.items():
        sym = {"EOS": EOS, "EOT": EOT, "space": ord(" ")}.get(name, ord(name) if len(name) == 1 else None)
        ps[sym] = math.log(p)
    return LazyByteProbs(ps)


# --------------------------------------------------------------------------- Chart


def test_chart_sorting():
    c = Chart({"b": 0.2, "a": 0.5, "c": 0.2, "d": -INF})
    assert list(c.sort_descending()) == ["a", "b", "c", "d"]  # ties keep the chart's order; -inf last
    assert list(c.sort()) == ["a", "b", "c", "d"]
    assert list(c.sort(reverse=True)) == ["d", "c", "b", "a"]
    assert list(Chart({1: 0.1, 10: 0.3, 2: 0.6}).sort(key=lambda k: -k)) == [10, 2, 1]
    assert list(c.top(2)) == ["a", "b"] and list(c.top(10)) == ["a", "b", "c", "d"] and c.top(0) == {}
    assert dict(c) == {"b": 0.2, "a": 0.5, "c": 0.2, "d": -INF}  # unchanged
    assert type(c.sort_descending()) is Chart and Chart().sort_descending() == {}
    for bad in (-1, 1.5, True, None):
        with pytest.raises(ValueError, match="k must be an int"):
            c.top(bad)


def test_chart_argmax_argmin_max_min_sum():
    c = Chart({"x": 0.25, "y": 0.5, "z": 0.25, "w": 0.0})
    assert c.argmax() == "y" and c.max() == 0.5
    assert c.argmin() == "w" and c.min() == 0.0
    assert Chart({"p": 0.3, "q": 0.3}).argmax() == "p" and Chart({"p": 0.3, "q": 0.3}).argmin() == "p"
    assert c.sum() == pytest.approx(1.0) and isinstance(c.sum(), float)
    logs = Chart({"a": -1.0, "b": -INF})
    assert logs.argmin() == "b" and logs.min() == -INF and logs.max() == -1.0 and logs.sum() == -INF
    empty = Chart()
    assert empty.sum() == 0.0
    for method in ("argmax", "argmin", "max", "min"):
        with pytest.raises(ValueError, match=f"{method} of an empty chart"):
            getattr(empty, method)()


def test_chart_filter_map_to_dict():
    c = Chart({"apple": 0.5, "avocado": 0.25, "banana": 0.25})
    kept = c.filter(lambda k: k.startswith("a"))
    assert kept == {"apple": 0.5, "avocado": 0.25} and type(kept) is Chart
    assert c.filter(lambda k: False) == {}  # an empty result is an empty chart
    logs = c.map_values(math.log)
    assert logs["apple"] == math.log(0.5) and type(logs) is Chart
    assert Chart({"z": -INF}).map_values(math.exp) == {"z": 0.0}
    assert c.map_keys(str.upper) == {"APPLE": 0.5, "AVOCADO": 0.25, "BANANA": 0.25}
    with pytest.raises(ValueError, match="'a'"):
        c.map_keys(lambda k: k[0])  # apple and avocado collide
    d = c.to_dict()
    assert type(d) is dict and d == c and d is not c
    d["apple"] = 0.0
    assert c["apple"] == 0.5


def test_chart_normalize():
    c = Chart({"a": 1.0, "b": 3.0, "c": 0.0})
    n = c.normalize()
    assert n == {"a": 0.25, "b": 0.75, "c": 0.0} and c["b"] == 3.0
    assert n.sum() == pytest.approx(1.0)
    for zero in (Chart({"a": 0.0, "b": 0.0}), Chart()):
        with pytest.raises(ValueError, match="no positive mass"):
            zero.normalize()
    for bad in (Chart({"a": -0.5, "b": 1.0}), Chart({"a": -INF, "b": -1.0}), Chart({"a": math.nan})):
        with pytest.raises(ValueError, match="map_values"):
            bad.normalize()  # log-probabilities (or garbage) are refused with the way out
    logs = Chart({"a": math.log(0.1), "b": math.log(0.3)})
    assert logs.map_values(math.exp).normalize()["b"] == pytest.approx(0.75)


def test_chart_format_table_and_repr():
    c = Chart({"b'a'": 0.125, "EOS": 0.75, "b' '": 0.125})
    lines = c.format_table().splitlines()
    assert lines[0].split() == ["key", "value"]
    assert [ln[:4].rstrip() for ln in lines[1:]] == ["EOS", "b'a'", "b' '"]  # best first, ties in order
    assert lines[1].split()[-1] == "0.75"
    assert len({len(ln) for ln in lines}) == 1  # aligned columns
    assert c.format_table(top=1, headings=("symbol", "p")).splitlines() == ["symbol     p", "EOS     0.75"]
    assert c.format_table(digits=2).splitlines()[2].endswith("0.12")
    assert Chart().format_table().split() == ["key", "value"]
    with pytest.raises(ValueError, match="top"):
        c.format_table(top=-2)
    assert repr(Chart({b"a": 0.25, b"b": 0.75})) == "Chart({b'b': 0.75, b'a': 0.25})"
    assert repr(Chart({"x": -INF})) == "Chart({x: -inf})"


# --------------------------------------------------------------------------- LazyByteProbs


def test_lazy_probs_or_logprobs_on_request():
    d = dist_of(a=0.5, b=0.2, EOT=0.2, EOS=0.1)
    probs, logs = d.materialize(), d.materialize(log=True)
    assert set(probs) == set(logs) == {ord("a"), ord("b"), EOT, EOS}  # impossible symbols left out
    for s in probs:
        assert probs[s] == pytest.approx(math.exp(d.ps[s])) and logs[s] == d.ps[s]
    assert list(d.materialize(top=2, log=True)) == [ord("a"), ord("b")]  # ties: lower symbol first
    assert d.top(1, log=True) == [(ord("a"), math.log(0.5))]
    assert d.top(1) == [(ord("a"), pytest.approx(0.5))]
    assert d.to_dict() == pytest.approx({ord("a"): 0.5, ord("b"): 0.2, EOT: 0.2, EOS: 0.1})
    assert d.to_dict(log=True) == {s: float(d.ps[s]) for s in (ord("a"), ord("b"), EOT, EOS)}
    assert type(d.to_dict()) is dict
    pretty = d.pretty(log=True)
    assert pretty["EOS"] == math.log(0.1) and pretty["EOT"] == math.log(0.2) and pretty[b"a"] == math.log(0.5)
    assert d.pretty().to_dict() == pytest.approx({b"a": 0.5, b"b": 0.2, "EOT": 0.2, "EOS": 0.1})
    assert repr(d.pretty()) == "Chart({b'a': 0.5, b'b': 0.2, EOT: 0.2, EOS: 0.1})"
    assert repr(dist_of(**{"\n": 1.0}).pretty()) == "Chart({b'\\n': 1})"
    np.testing.assert_allclose(d.probs(), np.exp(d.ps))


def test_lazy_sort_filter_map():
    d = dist_of(a=0.1, space=0.6, EOS=0.3)
    assert list(d.sort_descending()) == [ord(" "), EOS, ord("a")]
    assert list(d.sort_descending(log=True).values()) == sorted(d.materialize(log=True).values(), reverse=True)
    bytes_only = d.filter(lambda s: s < 256)
    assert set(bytes_only) == {ord(" "), ord("a")} and bytes_only.sum() == pytest.approx(0.7)
    assert d.filter(lambda s: s == EOT) == {}  # EOT is impossible here: not in any chart
    assert d.filter(lambda s: s < 256).normalize()[ord(" ")] == pytest.approx(6 / 7)
    assert d.map_values(lambda lp: -lp, log=True)[EOS] == pytest.approx(-math.log(0.3))  # surprisal
    assert d.map_values(lambda p: 2 * p)[ord("a")] == pytest.approx(0.2)


def test_lazy_argmax_argmin_max_min_sum():
    d = dist_of(a=0.25, b=0.7, EOS=0.05)
    assert d.argmax() == ord("b") and d.max() == pytest.approx(0.7) and d.max(log=True) == math.log(0.7)
    assert d.argmin() == EOS and d.min() == pytest.approx(0.05)  # -inf slots are not candidates
    assert d.min(log=True) == math.log(0.05)
    assert d.sum() == pytest.approx(1.0) and d.sum(log=True) == pytest.approx(0.0, abs=1e-12)
    tie = dist_of(x=0.5, c=0.5)
    assert tie.argmax() == ord("c") and tie.argmin() == ord("c")  # ties: the lowest symbol
    unnormalized = LazyByteProbs(np.where(np.arange(N_SYMBOLS) < 4, 0.0, -INF))  # four slots of p=1
    assert unnormalized.sum() == pytest.approx(4.0) and unnormalized.sum(log=True) == pytest.approx(math.log(4))
    dead = LazyByteProbs(np.full(N_SYMBOLS, -INF))
    assert dead.sum() == 0.0 and dead.sum(log=True) == -INF
    assert dead.materialize() == {} and dead.to_dict() == {} and dead.sort_descending() == {}
    for method in ("argmax", "argmin", "max", "min"):
        with pytest.raises(ValueError, match="no symbol has positive probability"):
            getattr(dead, method)()


def test_lazy_format_table():
    d = dist_of(space=0.5, EOT=0.25, EOS=0.125, a=0.125)
    lines = d.format_table().splitlines()
    assert lines[0].split() == ["symbol", "p", "log", "p"]
    assert [ln.split()[0] for ln in lines[1:]] == ["b'", "EOT", "b'a'", "EOS"]  # b' ' is split by spaces
    assert lines[1].startswith("b' '") and lines[1].split()[-2:] == ["0.5", f"{math.log(0.5):.4g}"]
    assert len(d.format_table(top=2).splitlines()) == 3
    assert LazyByteProbs(np.full(N_SYMBOLS, -INF)).format_table().split() == ["symbol", "p", "log", "p"]
    with pytest.raises(ValueError, match="top"):
        d.format_table(top=-1)
    with pytest.raises(ValueError, match="k must be"):
        d.top(-1)


def test_lazy_computes_once_across_conveniences():
    calls = []

    def compute():
        calls.append(1)
        return dist_of(a=0.9, EOS=0.1).ps

    d = LazyByteProbs(compute)
    assert not calls
    d.sum(), d.argmin(), d.format_table(), d.to_dict(log=True), d.filter(bool), d.max()
    assert len(calls) == 1


# --------------------------------------------------------------------------- logsumexp


@settings(max_examples=80, deadline=None)
@given(st.lists(st.one_of(st.floats(-50, 50), st.just(-INF)), max_size=12), st.floats(-700, 700))
def test_logsumexp_matches_brute_force(xs, shift):
    x = np.array(xs, dtype=np.float64)
    with np.errstate(divide="ignore"):
        expect = float(np.log(np.sum(np.exp(x)))) if len(x) else -INF  # values small enough for exp
    got = logsumexp(x + shift)  # shifted far: no overflow or underflow
    if expect == -INF:
        assert got == -INF
    else:
        assert got == pytest.approx(expect + shift, rel=1e-12, abs=1e-9)
    assert logsumexp(list(x)) == pytest.approx(logsumexp(x), rel=1e-15, abs=0)  # lists and arrays agree


def test_logsumexp_edges():
    assert logsumexp([]) == -INF and logsumexp(np.array([-INF, -INF])) == -INF
    assert logsumexp([1.0, INF]) == INF
    assert math.isnan(logsumexp([0.0, math.nan]))
    assert logsumexp(iter([0.0, 0.0])) == pytest.approx(math.log(2))
    assert logsumexp(np.zeros((2, 3))) == pytest.approx(math.log(6))  # every entry counts


# --------------------------------------------------------------------------- a real distribution


async def test_beam_distribution_conveniences(mock_lm):
    beam = await ByteBeamState.initial(mock_lm, BeamParams(K=5, eos_tokens=(b"<eos>",)))
    logp = await (await beam.prefill(b"the apple")).logp_next()
    assert logp.sum() == pytest.approx(1.0, abs=1e-9) and logp.sum(log=True) == pytest.approx(0.0, abs=1e-9)
    probs = logp.to_dict()
    assert EOT not in probs  # a whole beam never ends a token without saying what comes next
    best = logp.sort_descending()
    assert next(iter(best)) == logp.argmax() and best[logp.argmax()] == pytest.approx(logp.max())
    assert list(best)[-1] == logp.argmin()
    assert sum(logp.filter(lambda s: s < 256).values()) + probs.get(EOS, 0.0) == pytest.approx(1.0, abs=1e-9)
