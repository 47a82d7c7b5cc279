"""Tests of genlm_bytes.sampling: the filters, the samplers and SamplingParams.

Layers: property tests of the filters against transformers' warpers (oracle
only); validation; sampler unit tests and fixed-seed frequency tests. Token-level
generation is tested in test_generation.py.
"""

import functools
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from genlm_bytes.generation import generate_sync
from genlm_bytes.sampling import (
    SamplingParams,
    apply_temperature,
    as_generator,
    greedy_sampling,
    min_p_filter,
    sample_symbol,
    temperature_sampling,
    top_k_filter,
    top_p_filter,
)
from genlm_bytes.symbols import EOS, EOT, N_SYMBOLS

warpers = pytest.importorskip("transformers.generation.logits_process")

INF = math.inf
PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --------------------------------------------------------------------------- helpers


@st.composite
def logit_rows(draw, max_rows=3, max_vocab=40, allow_neg_inf=True):
    """(B, V) float32/float64 logits with distinct finite values (ties make top-p order-dependent),
    some entries -inf, at least one finite entry per row."""
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B = draw(st.integers(1, max_rows))
    V = draw(st.integers(1, max_vocab))
    n = B * V
    rank = torch.tensor(draw(st.permutations(range(n))), dtype=torch.float64)  # distinct ranks
    jitter = torch.tensor(draw(st.lists(st.floats(0, 0.9), min_size=n, max_size=n)), dtype=torch.float64)
    step = 10 ** draw(st.floats(-2.5, 1.0))  # neighbours at least 0.1 * step apart
    x = ((rank + jitter) * step + draw(st.floats(-50, 50))).to(dtype).reshape(B, V)
    if allow_neg_inf and V > 1:
        hole = torch.tensor(draw(st.lists(st.booleans(), min_size=B * V, max_size=B * V))).reshape(B, V)
        hole[:, draw(st.integers(0, V - 1))] = False
        x = x.masked_fill(hole, -INF)
    return x


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


def hf_pipeline(temperature, top_k, top_p, min_p, min_keep=1):
    """The warpers transformers' generate builds for these settings, in its order."""
    procs = []
    if temperature != 1:
        procs.append(warpers.TemperatureLogitsWarper(float(temperature)))
    if top_k is not None:
        procs.append(warpers.TopKLogitsWarper(top_k, min_tokens_to_keep=min_keep))
    if top_p is not None and top_p < 1:
        procs.append(warpers.TopPLogitsWarper(top_p, min_tokens_to_keep=min_keep))
    if min_p is not None:
        procs.append(warpers.MinPLogitsWarper(min_p, min_tokens_to_keep=min_keep))
    return warpers.LogitsProcessorList(procs)



# --------------------------------------------------------------------------- filters vs transformers


@PROPERTY
@given(x=logit_rows(), t=st.floats(0.05, 5.0))
def test_temperature_matches_transformers(x, t):
    expect = warpers.TemperatureLogitsWarper(t)(None, x.clone())
    assert same(apply_temperature(x, t), expect)


@PROPERTY
@given(x=logit_rows(), k=st.integers(1, 50), keep=st.integers(1, 5),
       fill=st.sampled_from([-INF, -1e4]))
def test_top_k_matches_transformers(x, k, keep, fill):
    expect = warpers.TopKLogitsWarper(k, filter_value=fill, min_tokens_to_keep=keep)(None, x.clone())
    assert same(top_k_filter(x, k, filter_value=fill, min_tokens_to_keep=keep), expect)


@PROPERTY
@given(x=logit_rows(), p=st.one_of(st.floats(0.0, 1.0, exclude_min=True), st.just(1.0)),
       keep=st.integers(1, 5))
def test_top_p_matches_transformers(x, p, keep):
    expect = warpers.TopPLogitsWarper(p, min_tokens_to_keep=keep)(None, x.clone())
    assert same(top_p_filter(x, p, min_tokens_to_keep=keep), expect)


@PROPERTY
@given(x=logit_rows(allow_neg_inf=False), p=st.floats(0.0, 1.0, exclude_min=True), keep=st.integers(1, 5))
def test_top_p_filter_value_matches_transformers(x, p, keep):
    expect = warpers.TopPLogitsWarper(p, filter_value=-123.0, min_tokens_to_keep=keep)(None, x.clone())
    assert same(top_p_filter(x, p, filter_value=-123.0, min_tokens_to_keep=keep), expect)


@PROPERTY
@given(x=logit_rows(), p=st.floats(0.0, 1.0), keep=st.integers(1, 5))
def test_min_p_matches_transformers(x, p, keep):
    expect = warpers.MinPLogitsWarper(p, min_tokens_to_keep=keep)(None, x.clone())
    assert same(min_p_filter(x, p, min_tokens_to_keep=keep), expect)


@PROPERTY
@given(x=logit_rows(), t=st.floats(0.1, 3.0), k=st.none() | st.integers(1, 8),
       p=st.none() | st.floats(0.05, 1.0), mp=st.none() | st.floats(0.0, 0.5), keep=st.integers(1, 3))
def test_pipeline_matches_transformers_order(x, t, k, p, mp, keep):
    params = SamplingParams(temperature=t, top_k=k, top_p=p, min_p=mp, min_tokens_to_keep=keep)
    expect = hf_pipeline(t, k, p, mp, keep)(None, x.clone())
    assert same(params.apply(x), expect)


def test_pipeline_order_is_temperature_top_k_top_p_min_p():
    """Each filter sees the distribution left by the previous one, renormalized: the order matters."""
    x = torch.linspace(0, 0.9, 10, dtype=torch.float64).flip(0)[None]  # (1, 10) nearly flat
    for kw, swapped in [
        ({"top_k": 3, "top_p": 0.5}, [warpers.TopPLogitsWarper(0.5), warpers.TopKLogitsWarper(3)]),
        ({"top_p": 0.3, "min_p": 0.9}, [warpers.MinPLogitsWarper(0.9), warpers.TopPLogitsWarper(0.3)]),
        ({"temperature": 0.2, "top_p": 0.6}, [warpers.TopPLogitsWarper(0.6), warpers.TemperatureLogitsWarper(0.2)]),
    ]:
        ours = SamplingParams(**kw).apply(x)
        expect = hf_pipeline(kw.get("temperature", 1), kw.get("top_k"), kw.get("top_p"), kw.get("min_p"))(None, x)
        assert same(ours, expect)
        assert not torch.equal(ours.isfinite(), warpers.LogitsProcessorList(swapped)(None, x.clone()).isfinite())


@settings(max_examples=30, deadline=None)
@given(x=logit_rows(max_rows=6), k=st.integers(1, 8), p=st.floats(0.05, 1.0), mp=st.floats(0.0, 1.0))
def test_filters_work_on_any_leading_shape(x, k, p, mp):
    if x.shape[0] % 2:
        x = torch.cat([x, x.flip(0)])
    x3 = x.reshape(2, -1, x.shape[-1])  # (2, B/2, V)
    for ours, oracle in [
        (functools.partial(top_k_filter, top_k=k), warpers.TopKLogitsWarper(k)),
        (functools.partial(top_p_filter, top_p=p), warpers.TopPLogitsWarper(p)),
        (functools.partial(min_p_filter, min_p=mp), warpers.MinPLogitsWarper(mp)),
    ]:
        assert same(ours(x3), oracle(None, x.clone()).reshape(x3.shape))
        assert same(ours(x[0]), oracle(None, x[:1].clone())[0])  # (V,)


def test_filters_never_mutate_input():
    x = torch.randn(3, 17, generator=torch.Generator().manual_seed(0))
    before = x.clone()
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.8, min_p=0.1)
    for out in [apply_temperature(x, 0.5), top_k_filter(x, 3), top_p_filter(x, 0.5), min_p_filter(x, 0.3),
                params.apply(x), params.logprobs(x), SamplingParams.greedy().apply(x), SamplingParams().apply(x)]:
        assert out.data_ptr() != x.data_ptr()
    params.sample(x, rng=0)
    temperature_sampling(x, 0, 0.5)
    arr = x.numpy().copy()
    sample_symbol(arr[0], params, 0)
    assert torch.equal(x, before) and np.array_equal(arr, before.numpy())


def test_filters_on_byte_distribution():
    g = torch.Generator().manual_seed(1)
    logps = torch.log_softmax(torch.randn(N_SYMBOLS, generator=g, dtype=torch.float64), -1)
    logps[EOT] = -INF  # never possible for a beam
    logps[:40] = -INF
    out = SamplingParams(top_k=10, top_p=0.95).apply(logps)
    kept = torch.isfinite(out)
    assert 1 <= int(kept.sum()) <= 10 and not kept[EOT] and not kept[:40].any()
    assert torch.equal(out[kept], logps[kept])  # filters keep values, they only remove


def test_top_k_keeps_ties_and_top_p_orders_ties_by_index():
    assert top_k_filter(torch.tensor([1.0, 3.0, 2.0, 3.0]), 1).isfinite().tolist() == [False, True, False, True]
    # two equally likely tokens, top_p 0.5: exactly one is kept, the higher index
    assert top_p_filter(torch.tensor([0.0, 0.0]), 0.5).isfinite().tolist() == [False, True]


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize("kwargs, name", [
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"temperature": float("inf")}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_k": -3}, "top_k"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"top_p": float("nan")}, "top_p"),
    ({"min_p": -0.01}, "min_p"),
    ({"min_p": 1.5}, "min_p"),
    ({"min_tokens_to_keep": 0}, "min_tokens_to_keep"),
])
def test_bad_params_raise_value_error_naming_argument(kwargs, name, mock_lm):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**kwargs)
    if name != "min_tokens_to_keep":
        with pytest.raises(ValueError, match=name):
            generate_sync(mock_lm, [[0, 1]], 2, **kwargs)


def test_bad_filter_arguments():
    x = torch.zeros(5)
    for call, name in [(lambda: top_k_filter(x, 0), "top_k"), (lambda: top_p_filter(x, 0.0), "top_p"),
                       (lambda: top_p_filter(x, 2.0), "top_p"), (lambda: min_p_filter(x, -1.0), "min_p"),
                       (lambda: min_p_filter(x, 1.1), "min_p"), (lambda: apply_temperature(x, 0), "temperature"),
                       (lambda: temperature_sampling(x, 0, -1.0), "temperature"),
                       (lambda: top_k_filter(x, 2, min_tokens_to_keep=0), "min_tokens_to_keep")]:
        with pytest.raises(ValueError, match=name):
            call()
    with pytest.raises(TypeError, match="top_k"):
        SamplingParams(top_k=2.5)
    with pytest.raises(TypeError, match="do_sample"):
        SamplingParams(do_sample="yes")
    with pytest.raises(TypeError, match="floating"):
        top_k_filter(torch.arange(4), 2)
    with pytest.raises(ValueError, match="NaN"):
        greedy_sampling(torch.tensor([0.0, float("nan")]))
    with pytest.raises(ValueError, match="-inf"):
        temperature_sampling(torch.tensor([[0.0, 1.0], [-INF, -INF]]), 0)


def test_sampling_params_frozen_and_normalized():
    params = SamplingParams(temperature=1, top_k=np.int64(3))
    assert isinstance(params.temperature, float) and type(params.top_k) is int
    with pytest.raises(AttributeError):
        params.temperature = 2.0
    assert SamplingParams.greedy().is_greedy and SamplingParams(temperature=0).is_greedy
    assert not SamplingParams().is_greedy


def test_as_generator():
    g = np.random.default_rng(5)
    assert as_generator(g) is g
    assert as_generator(7).random() == np.random.default_rng(7).random()
    assert isinstance(as_generator(None), np.random.Generator)
    with pytest.raises(ValueError, match="rng"):
        as_generator(-1)
    for bad in [True, 1.5, np.random.RandomState(0), "seed"]:
        with pytest.raises(TypeError, match="rng"):
            as_generator(bad)



def test_sample_symbol_validation():
    params = SamplingParams()
    with pytest.raises(ValueError, match="logps"):
        sample_symbol(np.zeros((2, 3)), params, 0)
    with pytest.raises(ValueError, match="-inf"):
        sample_symbol(np.full(N_SYMBOLS, -np.inf), params, 0)
    with pytest.raises(ValueError, match="NaN"):
        sample_symbol(np.array([0.0, np.nan]), params, 0)
    with pytest.raises(TypeError, match="params"):
        sample_symbol(np.zeros(3), {"temperature": 1.0}, 0)


def test_sample_symbol_numpy_rows_draw_what_tensor_rows_draw():
    # A 1-D numpy row without filters takes a numpy path (a byte-level state's every step); it
    # must draw the same symbol as the tensor path for the same generator state, and check alike.
    rng = np.random.default_rng(7)
    for trial in range(400):
        x = rng.normal(size=N_SYMBOLS) * rng.uniform(0.1, 8.0)
        x[rng.random(N_SYMBOLS) < (0.3 if trial % 2 else 0.97)] = -np.inf  # (also rows of a few symbols)
        x[trial % N_SYMBOLS] = 0.0  # (at least one finite entry)
        if trial % 3 == 0:
            x = x.astype(np.float32)  # (a beam's rows are float64; other callers' may not be)
        for params in (SamplingParams(), SamplingParams(temperature=0.6), SamplingParams(temperature=1.7),
                       SamplingParams(do_sample=False)):
            got = sample_symbol(x, params, np.random.default_rng(trial))
            want = sample_symbol(torch.from_numpy(x), params, np.random.default_rng(trial))
            assert got == want
            assert np.isfinite(x[got])
    for bad, match in ((np.array([0.0, np.inf]), "inf"), (np.array([np.nan, 0.0]), "NaN"),
                       (np.array([np.inf, np.nan]), "NaN"), (np.array([-np.inf, np.nan]), "NaN"),
                       (np.full(3, -np.inf, dtype=np.float32), "-inf")):
        with pytest.raises(ValueError, match=match):
            sample_symbol(bad, SamplingParams(), 0)
        with pytest.raises(ValueError, match=match):
            sample_symbol(torch.from_numpy(bad), SamplingParams(), 0)


# --------------------------------------------------------------------------- samplers


def test_greedy_and_temperature_zero_are_argmax():
    x = torch.tensor([[[0.0, 2.0, 2.0, 1.0], [5.0, -INF, 0.0, 5.0]]])  # (1, 2, 4), ties
    expect = torch.tensor([[1, 0]])
    assert torch.equal(greedy_sampling(x), expect)
    assert torch.equal(temperature_sampling(x, None, temperature=0.0), expect)
    assert torch.equal(SamplingParams.greedy().sample(x), expect)
    assert torch.equal(SamplingParams(temperature=0, top_k=3).sample(x), expect)
    assert sample_symbol(x[0, 1].numpy(), SamplingParams(do_sample=False), None) == 0


def test_sampler_shapes_and_impossible_entries_never_drawn():
    x = torch.tensor([0.0, -INF, 1.0, -INF, -2.0]).expand(2, 3, 5)  # (2, 3, 5)
    draws = temperature_sampling(x.expand(2000, 2, 3, 5), 0, temperature=2.0)  # (2000, 2, 3)
    assert draws.shape == (2000, 2, 3) and draws.dtype == torch.int64
    assert set(draws.unique().tolist()) == {0, 2, 4}
    assert temperature_sampling(x[0, 0], 0).shape == ()


def test_seeded_samplers_are_reproducible():
    x = torch.randn(50, 30, generator=torch.Generator().manual_seed(3))
    params = SamplingParams(temperature=0.8, top_p=0.9)
    a, b = params.sample(x, rng=11), params.sample(x, rng=11)
    assert torch.equal(a, b) and not torch.equal(a, params.sample(x, rng=12))
    assert torch.equal(temperature_sampling(x, 4), temperature_sampling(x, 4))
    g1, g2 = np.random.default_rng(9), np.random.default_rng(9)
    first = params.sample(x, g1)
    assert torch.equal(first, params.sample(x, g2))
    assert not torch.equal(first, params.sample(x, g1))  # the Generator advanced


FREQ_LOGITS = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -INF], dtype=torch.float32)


@pytest.mark.parametrize("params", [
    SamplingParams(),
    SamplingParams(temperature=0.6),
    SamplingParams(temperature=1.8),
    SamplingParams(top_k=3),
    SamplingParams(top_p=0.7),
    SamplingParams(min_p=0.3),
    SamplingParams(temperature=1.4, top_k=5, top_p=0.8),
], ids=repr)
def test_frequencies_follow_filtered_distribution(params):
    """Chi-square goodness of fit of 40,000 fixed-seed draws to softmax(warpers(logits))."""
    n = 40_000
    expect_logits = hf_pipeline(params.temperature, params.top_k, params.top_p, params.min_p)(
        None, FREQ_LOGITS[None].clone())[0]
    p = torch.softmax(expect_logits.double(), -1).numpy()  # oracle probabilities
    draws = params.sample(FREQ_LOGITS.expand(n, -1), rng=20240601).numpy()  # (n,)
    counts = np.bincount(draws, minlength=len(p))
    support = p > 0
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    if support.sum() > 1:
        res = stats.chisquare(counts[support], n * p[support])
        assert res.pvalue > 1e-3, (counts, n * p)
    # temperature_sampling draws the same way as SamplingParams(temperature=t)
    if params == SamplingParams(temperature=params.temperature):
        assert np.array_equal(temperature_sampling(FREQ_LOGITS.expand(n, -1), 20240601,
                                                   params.temperature).numpy(), draws)


def test_sample_symbol_byte_distribution_frequencies():
    logps = np.full(N_SYMBOLS, -np.inf)
    logps[[ord("a"), ord("b"), ord("c"), EOS]] = np.log([0.5, 0.25, 0.15, 0.10])
    params = SamplingParams(top_k=3)  # removes EOS
    rng = np.random.default_rng(0)
    draws = np.array([sample_symbol(logps, params, rng) for _ in range(8000)])
    counts = np.array([(draws == s).sum() for s in (ord("a"), ord("b"), ord("c"))])
    assert len(draws) == counts.sum()
    assert stats.chisquare(counts, 8000 * np.array([0.5, 0.25, 0.15]) / 0.9).pvalue > 1e-3
    t = torch.from_numpy(logps).float()
    assert sample_symbol(t, params, 5) == sample_symbol(logps, params, 5)
    assert sample_symbol(logps, SamplingParams(temperature=0), None) == ord("a")
