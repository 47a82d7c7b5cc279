"""Tests of genlm_bytes.sampling.

Layers: property tests of the filters against transformers' warpers (oracle
only); sampler unit tests and fixed-seed frequency tests; generation on the
mock LM and on a scripted LM against brute-force sequential decoding; the
embedded model against ``model.generate`` (slow).
"""

import asyncio
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy import stats

from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.sampling import (
    SamplingParams,
    apply_temperature,
    as_generator,
    generate,
    generate_sync,
    generate_tokens,
    generate_tokens_sync,
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


class StepLM(AsyncLM):
    """Scripted LM over V tokens: after token t the next is (t + 1) % V with probability 0.9,
    the rest spread evenly. Token V - 1 is EOS. Records every batched call."""

    def __init__(self, V: int = 10):
        super().__init__(byte_vocab=[bytes([65 + i]) for i in range(V)], eos_token_ids=[V - 1])
        self.batch_calls: list[list[list[int]]] = []

    def logprobs(self, token_ids):
        V = self.vocab_size
        p = torch.full((V,), 0.1 / (V - 1), dtype=torch.float64)
        p[(token_ids[-1] + 1) % V] = 0.9
        return p.log().to(torch.float32)

    async def next_token_logprobs(self, token_ids):
        return self.logprobs(token_ids)

    async def batch_next_token_logprobs(self, contexts):
        self.batch_calls.append([list(c) for c in contexts])
        return await super().batch_next_token_logprobs(contexts)


def brute_greedy(lm, prompt, n_new, stop=()):
    """Sequential, uncached greedy decoding: the oracle for generate(do_sample=False)."""
    seq, out = list(prompt), []
    for _ in range(n_new):
        t = int(torch.argmax(lm.logprobs(seq)))
        seq.append(t)
        out.append(t)
        if t in stop:
            break
    return out


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


async def test_bad_prefix_mask_and_shapes(mock_lm):
    toks = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.ones(2, 2, dtype=torch.bool), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.ones(3, 3, dtype=torch.bool), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, [[0, 1], [0]], [[1, 1], [1]], max_length=5)  # ragged
    with pytest.raises(ValueError, match=r"prefix_mask\[1\] has gaps"):
        await generate_tokens(mock_lm, toks, torch.tensor([[1, 1, 1], [1, 0, 1]]), max_length=5)
    with pytest.raises(ValueError, match=r"prefix_mask\[0\] marks no token"):
        await generate_tokens(mock_lm, toks, torch.tensor([[0, 0, 0], [1, 1, 1]]), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.tensor([[2, 1, 1], [1, 1, 1]]), max_length=5)
    with pytest.raises(ValueError, match="attention_mask"):
        await generate(mock_lm, toks, 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_length"):
        await generate_tokens(mock_lm, toks, max_length=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        await generate(mock_lm, toks, -1)
    with pytest.raises(ValueError, match=r"prefix_tokens\[1\]"):
        await generate_tokens(mock_lm, [[0, 1], [0, 10_000]], max_length=5)
    with pytest.raises(ValueError, match="eod_token_id"):
        await generate_tokens(mock_lm, toks, max_length=5, eod_token_id=10_000)
    with pytest.raises(ValueError, match="eos_token_id"):
        await generate(mock_lm, toks, 2, eos_token_id=10_000)
    with pytest.raises(ValueError, match="token_sample_fn"):
        await generate_tokens(mock_lm, toks, max_length=5, token_sample_fn=lambda lp, rng: [1])
    with pytest.raises(TypeError, match="lm"):
        await generate(object(), toks, 2)


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


# --------------------------------------------------------------------------- generate_tokens


async def test_generate_tokens_greedy_matches_sequential_oracle(mock_lm):
    prefixes = [[0, 72, 105], [0], [0, 84, 104, 101, 32]]
    tokens, valid = await generate_tokens(mock_lm, prefixes, max_length=9, token_sample_fn=greedy_sampling)
    assert tokens.shape == valid.shape == (3, 9) and valid.all()
    for b, p in enumerate(prefixes):
        assert tokens[b].tolist() == p + brute_greedy(mock_lm, p, 9 - len(p))


async def test_generate_tokens_padding_forms_agree(mock_lm):
    ragged = [[0, 72, 105], [0, 5]]
    left = torch.tensor([[0, 72, 105], [-1, 0, 5]])  # padding values are never read
    right = torch.tensor([[0, 72, 105], [0, 5, 999_999]])
    kw = {"max_length": 7, "token_sample_fn": functools.partial(temperature_sampling, temperature=0.9)}
    a = await generate_tokens(mock_lm, ragged, rng=3, **kw)
    b = await generate_tokens(mock_lm, left, left >= 0, rng=3, **kw)
    c = await generate_tokens(mock_lm, right, torch.tensor([[1, 1, 1], [1, 1, 0]]), rng=3, **kw)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])
    # one prompt as a 1-D array; a Generator seeded like the int seed
    d = await generate_tokens(mock_lm, np.array(ragged[1]), rng=np.random.default_rng(3), **kw)
    e = await generate_tokens(mock_lm, [ragged[1]], rng=3, **kw)
    assert torch.equal(d[0], e[0]) and d[0].shape == (1, 7)


async def test_generate_tokens_stops_at_eod_and_marks_invalid():
    lm = StepLM(V=10)
    eod = 7
    prefixes = [[5], [1, 2], [8]]  # greedy: 5->6->7 | 2->3->...->7 | 8->9->0->...->7
    tokens, valid = await generate_tokens(lm, prefixes, max_length=12, eod_token_id=eod,
                                          token_sample_fn=greedy_sampling)
    assert tokens[0].tolist() == [5, 6, 7] + [eod] * 9
    assert valid[0].tolist() == [True] * 3 + [False] * 9
    assert tokens[1].tolist() == [1, 2, 3, 4, 5, 6, 7] + [eod] * 5
    assert valid[1].sum() == 7
    assert tokens[2].tolist() == [8, 9, 0, 1, 2, 3, 4, 5, 6, 7] + [eod] * 2
    assert valid[2].sum() == 10
    # one batched call per step, with every live sequence's full context, and no call after all stopped
    assert len(lm.batch_calls) == 9
    assert lm.batch_calls[0] == [[5], [1, 2], [8]]
    assert lm.batch_calls[2] == [[1, 2, 3, 4], [8, 9, 0]]
    assert all(len(c) == 1 for c in lm.batch_calls[5:])


async def test_generate_tokens_without_eod_runs_to_max_length():
    lm = StepLM(V=10)
    tokens, valid = await generate_tokens(lm, [[5], [6, 7, 8]], max_length=6, token_sample_fn=greedy_sampling)
    assert valid.all()
    assert tokens.tolist() == [[5, 6, 7, 8, 9, 0], [6, 7, 8, 9, 0, 1]]
    assert len(lm.batch_calls) == 5  # a full-length prefix takes no step


async def test_generate_tokens_seeded_and_params_as_sample_fn(mock_lm):
    prefixes = [[0, 1, 2], [0]]
    fn = SamplingParams(temperature=0.8, top_k=20).sample
    a = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=42)
    b = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=42)
    c = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=43)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # each generated token is among the 20 most likely after its context
    for b_, p in enumerate(prefixes):
        row = a[0][b_].tolist()
        for i in range(len(p), 8):
            top = torch.topk(mock_lm.logprobs(row[:i]), 20).indices.tolist()
            assert row[i] in top


def test_generate_tokens_sync(mock_lm):
    tokens, _valid = generate_tokens_sync(mock_lm, [[0, 3]], max_length=4, token_sample_fn=greedy_sampling)
    assert tokens[0].tolist() == [0, 3] + brute_greedy(mock_lm, [0, 3], 2)


# --------------------------------------------------------------------------- generate


async def test_generate_greedy_matches_sequential_oracle_left_padded(mock_lm):
    prompts = [[0, 72, 105, 33], [0, 5], [0, 84, 104]]
    seqs = await generate(mock_lm, prompts, 6, do_sample=False)
    assert seqs.shape == (3, 4 + 6)
    pad = mock_lm.eos_token_ids[0]
    for b, p in enumerate(prompts):
        expect = [pad] * (4 - len(p)) + p + brute_greedy(mock_lm, p, 6, stop=mock_lm.eos_token_ids)
        assert seqs[b].tolist() == expect


async def test_generate_input_forms_agree(mock_lm):
    ragged = [[0, 72, 105, 33], [0, 5]]
    left = torch.tensor([[0, 72, 105, 33], [2, 2, 0, 5]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.95, "return_dict": True}
    a = await generate(mock_lm, ragged, rng=1, **kw)
    b = await generate(mock_lm, left, attention_mask=mask, rng=1, **kw)
    c = await generate(mock_lm, left.numpy(), attention_mask=mask.numpy(), rng=np.random.default_rng(1), **kw)
    for other in (b, c):
        assert all(torch.equal(a[k], other[k]) for k in a)
    assert a["attention_mask"].tolist() == [[1] * 9, [0, 0] + [1] * 7]
    # one prompt as a flat list (B = 1); greedy so the batch does not change the random stream
    single = await generate(mock_lm, ragged[0], 5, do_sample=False)
    batch = await generate(mock_lm, ragged, 5, do_sample=False)
    assert torch.equal(single[0], batch[0])


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.5, "top_k": 10},
    {"temperature": 1.3, "top_p": 0.8, "min_p": 0.05},
    {"do_sample": False},
], ids=repr)
async def test_generate_scores_and_logprobs_equal_recomputed(mock_lm, kw):
    prompts = [[0, 72, 105], [0]]
    out = await generate(mock_lm, prompts, 6, rng=7, return_dict=True, **kw)
    params = SamplingParams(**{k: v for k, v in kw.items()})
    P = 3
    assert out["scores"].shape == out["logprobs"].shape == (2, out["sequences"].shape[1] - P)
    for b, p in enumerate(prompts):
        n_new = int(out["attention_mask"][b, P:].sum())
        gen = out["sequences"][b, P:P + n_new].tolist()
        for t, tok in enumerate(gen):
            raw = mock_lm.logprobs(p + gen[:t])  # (V,) recomputed, uncached
            assert out["logprobs"][b, t].item() == raw[tok].item()
            assert out["scores"][b, t].item() == params.logprobs(raw)[tok].item()
            assert math.isfinite(out["scores"][b, t].item())
        assert (out["scores"][b, n_new:] == 0).all() and (out["logprobs"][b, n_new:] == 0).all()
    if params.is_greedy:
        assert (out["scores"] == 0).all()
    if kw.get("temperature", 1) != 1:
        assert not torch.equal(out["scores"], out["logprobs"])


async def test_generate_stops_at_eos_and_pads():
    lm = StepLM(V=10)  # EOS = 9
    out = await generate(lm, [[6], [2, 3], [7, 8]], 5, do_sample=False, return_dict=True, pad_token_id=0)
    # greedy: 6->7->8->9 stop | 3->4->5->6->7->8 (5 new) | 8->9 stop
    assert out["sequences"].tolist() == [[0, 6, 7, 8, 9, 0, 0], [2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert len(lm.batch_calls) == 5
    # custom eos ids, and [] never stops
    seqs = await generate(lm, [[6]], 5, do_sample=False, eos_token_id=8, pad_token_id=0)
    assert seqs.tolist() == [[6, 7, 8]]
    seqs = await generate(lm, [[6]], 5, do_sample=False, eos_token_id=[])
    assert seqs.tolist() == [[6, 7, 8, 9, 0, 1]]


async def test_generate_max_new_tokens_zero_and_empty_batch(mock_lm):
    assert (await generate(mock_lm, [[0, 1], [0]], 0)).tolist() == [[0, 1], [0, 0]]
    out = await generate(mock_lm, [], 3, return_dict=True)
    assert out["sequences"].shape == (0, 0) and out["scores"].shape == (0, 0)


async def test_generate_seeded_reproducible(mock_lm):
    kw = {"max_new_tokens": 8, "temperature": 1.2, "top_k": 50, "return_dict": True}
    a = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=99, **kw)
    b = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=99, **kw)
    c = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=100, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sequences"], c["sequences"])


def test_generate_reproducible_across_processes(mock_lm):
    code = ("from genlm_bytes import MockLM; from genlm_bytes.sampling import generate_sync; "
            "print(generate_sync(MockLM(seed=0), [[0, 1], [0]], 8, temperature=0.9, top_p=0.9, rng=2024).tolist())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    here = generate_sync(mock_lm, [[0, 1], [0]], 8, temperature=0.9, top_p=0.9, rng=2024).tolist()
    assert res.stdout.strip() == str(here)


async def test_sync_wrappers_refuse_running_loop(mock_lm):
    with pytest.raises(RuntimeError, match="await"):
        generate_sync(mock_lm, [[0]], 1)
    with pytest.raises(RuntimeError, match="await"):
        generate_tokens_sync(mock_lm, [[0]], max_length=2)


async def test_concurrent_generate_calls_share_lm(mock_lm):
    a, b = await asyncio.gather(generate(mock_lm, [[0, 1]], 4, rng=1), generate(mock_lm, [[0, 2]], 4, rng=2))
    assert torch.equal(a, await generate(mock_lm, [[0, 1]], 4, rng=1))
    assert torch.equal(b, await generate(mock_lm, [[0, 2]], 4, rng=2))


# --------------------------------------------------------------------------- embedded model


PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fib(n):",
           "1, 2, 3,"]


@pytest.mark.slow
def test_greedy_matches_hf_generate(embedded_lm):
    """generate(do_sample=False) == model.generate(do_sample=False) on a left-padded ragged batch."""
    model, tok = embedded_lm.model, embedded_lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old_side
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # really different lengths
    eos = list(embedded_lm.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    with torch.no_grad():
        expect = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ours = generate_sync(embedded_lm, enc["input_ids"], 10, do_sample=False,
                         attention_mask=enc["attention_mask"], eos_token_id=eos, pad_token_id=pad)
    assert ours.tolist() == expect.tolist()
    # the same prompts given as ragged lists, without a mask
    ragged = [tok(p)["input_ids"] for p in PROMPTS]
    assert torch.equal(generate_sync(embedded_lm, ragged, 10, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad), ours)
