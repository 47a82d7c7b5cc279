"""Several prefetches in one pass (``AsyncLM.prefetch_many``, ``PassRunner.tree_many``) and the
prefill planner's walk ahead when the beam stalls for a pass (``PrefillPlanner.stall_walk``)."""

from __future__ import annotations

import pytest
from test_backend import (  # noqa: F401 - _one_thread is an autouse fixture, hf64 a fixture
    TEXT,
    _one_thread,
    assert_cache_consistent,
    assert_close_to_uncached,
    hf64,
    transformer,
)

from genlm_bytes import BeamParams, ByteBeamState, MockLM
from genlm_bytes.byte_lm.speculate import PrefillPlanner
from genlm_bytes.lm.hf import EngineConfig


def _count(monkeypatch, obj, name: str) -> list:
    calls = []
    inner = getattr(obj, name)

    def counted(*args, **kwargs):
        calls.append(args)
        return inner(*args, **kwargs)

    monkeypatch.setattr(obj, name, counted)
    return calls


async def test_prefetches_on_different_pasts_run_as_one_pass_and_are_exact(embedded_lm, embedded_hf, hf64,  # noqa: F811
                                                                          monkeypatch):
    """Three paths on three cached pasts of different lengths (one with alternatives, one with a
    chain and its sub-branch, one whose path is done and only branches): one pass, no token twice,
    every new prefix close to a plain forward, and their pasts extend by one token afterwards."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    for n in (4, 11, len(ids) - 3):
        await lm.prefetch(ids[:n])
    many = _count(monkeypatch, lm.runner, "tree_many")
    before = lm.n_forward_tokens
    a = ids[:4] + [300, 301, 302]  # 3 new path tokens on a past of 4
    b = ids[:11] + [400]  # 1 new token, with a chain (2 tokens) and a sub-branch
    c = ids[:len(ids) - 3]  # the path is cached: only its branches run
    await lm.prefetch_many([
        (a, [(5, 777), (7, 778)], 3),
        (b, [(12, (401, 402), [(1, 403)])], 10),
        (c, [(len(c), 55), (len(c) - 1, 56)], len(c) - 1),
    ])
    assert len(many) == 1, "the three prefetches ran as one pass"
    assert lm.n_forward_tokens - before == (3 + 2) + (1 + 2 + 1) + 2, "each new prefix once"
    contexts = [a[:n] for n in (5, 6, 7)] + [a[:5] + [777], a + [778], b, b + [401], b + [401, 402], b + [401, 403],
                                              c + [55], c[:-1] + [56]]
    forwards = lm.n_forward_tokens
    for ctx in contexts:
        assert lm.has_logprobs(ctx), ctx
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == forwards, "read from the cache"
    for ctx in (a + [11], b + [401, 402, 12], c + [55, 13]):  # their keys and values were stored
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == forwards + 3, "each extension runs one token on the stored past"
    assert_cache_consistent(lm.cache)


async def test_prefetch_many_leaves_long_or_whole_jobs_to_their_own_passes(embedded_lm, embedded_hf, hf64,  # noqa: F811
                                                                          monkeypatch):
    """A job longer than ``alt_chunk`` slots runs alone (in chunks, as ``prefetch`` does); the
    short ones still share a pass; cached work is skipped; the results are the same."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(alt_chunk=6, prefetch_chunk=6))
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    await lm.prefetch(ids[:5])
    many = _count(monkeypatch, lm.runner, "tree_many")
    jobs = [(ids[:5] + [600, 601], [], 4), (ids[:3] + [610], [(4, 611)], 2), (ids, [], 4),
            (ids[:5], [], 4)]  # (the last is cached)
    await lm.prefetch_many(jobs)
    assert len(many) == 1 and len(many[0][0]) == 2
    for ctx in (ids[:5] + [600, 601], ids[:3] + [610, 611], ids, ids[:17]):
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert_cache_consistent(lm.cache)


async def test_prefetch_many_bad_input(embedded_lm):
    lm = transformer(embedded_lm)
    with pytest.raises(TypeError, match="prefetch_many request"):
        await lm.prefetch_many([[0, 1]])
    with pytest.raises(TypeError, match="prefetch_many request"):
        await lm.prefetch_many([5])
    with pytest.raises(TypeError, match="token_ids"):
        await lm.prefetch_many([(0, None, 0)])
    with pytest.raises(ValueError, match="start"):
        await lm.prefetch_many([([0, 1, 2], None, -1)])
    with pytest.raises((ValueError, TypeError)):
        await lm.prefetch_many([([0, lm.vocab_size], None, 0)])
    await lm.prefetch_many([])  # nothing to do


async def test_the_default_prefetch_many_prefetches_each_and_checks_its_input():
    lm = MockLM(seed=0)
    seen = []

    async def prefetch(token_ids, alternatives=None, *, start=0):
        seen.append((list(token_ids), alternatives, start))

    lm.prefetch = prefetch
    await lm.prefetch_many([([1, 2], None, 0), ([3], [(0, 4)], 1)])
    assert seen == [([1, 2], None, 0), ([3], [(0, 4)], 1)]
    with pytest.raises(TypeError, match="prefetch_many request"):
        await lm.prefetch_many([([1, 2], None)])


MULTI = ("Le marché ouvre à sept heures, et les premiers clients arrivent avant le pain chaud.\n"
         "    fn push(&mut self, item: T) {\n        self.items.push_back(item);\n    }\n").encode()


@pytest.mark.parametrize("text", [MULTI, TEXT.encode()])
async def test_the_stall_walk_changes_which_passes_run_not_the_result(embedded_lm, monkeypatch, text):
    """Prefill with and without the walk ahead at stalls: the same covers and log Z (the walk only
    decides what is computed together), and on a text whose covers part from the encoding, no
    more passes."""
    params = BeamParams(K=5, prune_threshold=0.05)
    out = {}
    for walk in (0, 8):
        monkeypatch.setattr(PrefillPlanner, "STALL_WALK", walk)
        lm = transformer(embedded_lm)
        passes = _count(monkeypatch, lm.runner, "_run")
        beam = await ByteBeamState.initial(lm, params)
        beam = await beam.prefill(text)
        out[walk] = (beam.logZ, sorted((s.lm_state.context, round(s.weight, 4)) for s in beam.states), len(passes))
    assert out[0][0] == pytest.approx(out[8][0], abs=1e-4)
    assert [c for c, _ in out[0][1]] == [c for c, _ in out[8][1]]
    if text is MULTI:
        assert out[8][2] <= out[0][2], (out[0][2], out[8][2])


@pytest.mark.parametrize("budget", [1_500_000, 24_000_000])
async def test_prefetch_many_under_a_small_budget_evicts_and_stays_exact(embedded_lm, embedded_hf,
                                                                        hf64, budget, monkeypatch):  # noqa: F811
    """A budget of a few log-prob rows (about 7, and 120; float64 KV: 92 KB a token), full: the
    jobs run together where their pass fits the budget's pass share, else alone; passes evict as
    they go, the bookkeeping holds, and what is read afterwards (cached or computed again) is exact."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, cache_budget_bytes=budget)
    many = _count(monkeypatch, lm.runner, "tree_many")
    ids = [0] + tok.encode(TEXT)
    await lm.prefetch(ids[:6])
    await lm.prefetch(ids[:9])
    await lm.prefetch([0] + tok.encode(" ".join([TEXT] * 4))[:96])  # (fills the larger budget)
    evicted = lm.cache.n_evicted
    await lm.prefetch_many([(ids[:6] + [500, 501], [(6, 502)], 5), (ids[:9] + [510], [(9, 511)], 8),
                            (ids[:3] + [520], [], 2)])
    assert lm.cache.nbytes <= budget
    assert_cache_consistent(lm.cache)
    assert len(many) == (budget > 10_000_000), "together where the shared pass fits the pass share"
    assert lm.cache.n_evicted > evicted, "the pass evicted to make room"
    for ctx in (ids[:6] + [500, 501], ids[:6] + [502], ids[:9] + [510], ids[:9] + [511], ids[:3] + [520]):
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
        assert lm.cache.nbytes <= budget
    assert_cache_consistent(lm.cache)


async def test_prefetch_together_off_runs_a_pass_each_with_the_same_rows(embedded_lm, embedded_hf, monkeypatch):
    """``EngineConfig(prefetch_together=False)``: no shared pass, the same rows to float rounding."""
    tok = embedded_hf[1]
    ids = [0] + tok.encode(TEXT)
    jobs = [(ids[:5] + [700, 701], [(5, 702)], 4), (ids[:9] + [710], [(9, 711)], 8)]
    rows = []
    for together in (True, False):
        lm = transformer(embedded_lm, config=EngineConfig(prefetch_together=together))
        await lm.prefetch(ids[:9])
        many = _count(monkeypatch, lm.runner, "tree_many")
        await lm.prefetch_many(jobs)
        assert len(many) == together
        rows.append([await lm.next_token_logprobs(c) for c in (ids[:5] + [700, 701], ids[:5] + [702],
                                                                 ids[:9] + [710], ids[:9] + [711])])
    for a, b in zip(*rows):
        assert (a - b).abs().max().item() < 2e-4
    with pytest.raises(TypeError, match="prefetch_together"):
        EngineConfig(prefetch_together=1)
