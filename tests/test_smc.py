"""SMC over constrained byte states: exactness against brute force, frequencies, concurrency, bad input."""

import asyncio
import itertools
import math

import numpy as np
import pytest
import regex

from genlm_bytes import EOS, BeamParams, ByteBeamState, MockLM
from genlm_bytes.constraints import (
    ConstrainedState,
    ConstraintError,
    Predicate,
    Regex,
    StringSet,
)
from genlm_bytes.smc import SMCResult, effective_sample_size, smc, systematic_resample

TINY_VOCAB = [b"<eos>", b"a", b"b", b"c", b"ab", b"ba", b"abc", b"cc"]
ALPHABET = b"abc"
PATTERN = r"(ab|c)+"
MAX_BYTES = 5


async def exact_beam(seed=3, eos=True, lm_cls=MockLM):
    """A beam that is exact: no pruning, K far above the number of covers."""
    lm = lm_cls(TINY_VOCAB, seed=seed, eos_token_ids=[0] if eos else [])
    return await ByteBeamState.initial(lm, BeamParams(K=10_000, eos_tokens=(b"<eos>",) if eos else ()))


async def brute_force(beam, accept, max_bytes, eos=True) -> dict[bytes, float]:
    """γ(x) for every text x of at most ``max_bytes`` bytes over ``ALPHABET`` that ``accept`` accepts.

    With EOS: P(x · EOS) by the chain rule of the exact beam. Without: P(x), for the texts where
    generation finishes (``accept`` says so).
    """
    out = {}
    for n in range(max_bytes + 1):
        for w in itertools.product(ALPHABET, repeat=n):
            x = bytes(w)
            if not accept(x):
                continue
            state, logp = beam, 0.0
            for b in x:
                logp += (await state.logp_next())[b]
                state = await (state << b)
            if eos:
                logp += (await state.logp_next())[EOS]
            out[x] = math.exp(logp)
    return out


def fullmatch(pattern):
    return lambda x: regex.fullmatch(pattern, x.decode()) is not None


# --------------------------------------------------------------------------- exactness


async def test_log_ml_converges_to_the_exact_probability():
    """Tolerance: at N=1,000 each run's estimate of Z is within 15% of the exact Z (the relative
    standard deviation measured over 20 seeds is about 5%), and the mean error falls with N."""
    beam = await exact_beam()
    exact = await brute_force(beam, fullmatch(PATTERN), MAX_BYTES)
    Z = sum(exact.values())
    assert 0.05 < Z < 0.2  # a real conditioning problem: most texts fail the constraint
    errors = {}
    for n in (10, 100, 1000):
        runs = [await smc(beam, Regex(PATTERN), n, MAX_BYTES, rng=seed) for seed in range(6)]
        errors[n] = [abs(math.exp(r.log_ml) / Z - 1) for r in runs]
    assert max(errors[1000]) < 0.15, errors[1000]
    assert np.mean(errors[1000]) < np.mean(errors[100]) < np.mean(errors[10]), errors


async def test_resampling_keeps_the_estimate_unbiased():
    beam = await exact_beam()
    Z = sum((await brute_force(beam, fullmatch(PATTERN), MAX_BYTES)).values())
    ests = []
    for seed in range(4):
        r = await smc(beam, Regex(PATTERN), 1000, MAX_BYTES, rng=seed, ess_threshold=1.0)
        assert r.n_resamples >= 1
        ests.append(math.exp(r.log_ml))
    assert np.mean(ests) == pytest.approx(Z, rel=0.1)


async def test_string_set_and_predicate_probabilities():
    beam = await exact_beam(seed=5)
    words = [b"ab", b"cab", b"bb", b"c"]
    Z = sum((await brute_force(beam, lambda x: x in words, 3)).values())
    r = await smc(beam, StringSet(words), 1000, 3, rng=0)
    assert math.exp(r.log_ml) == pytest.approx(Z, rel=0.15)
    even = Predicate(lambda t: t.count(b"a") <= 1, complete=lambda t: len(t) % 2 == 0 and len(t) > 0)
    Z2 = sum((await brute_force(beam, lambda x: x.count(b"a") <= 1 and len(x) % 2 == 0 and x, 4)).values())
    r2 = await smc(beam, even, 1000, 4, rng=0)
    assert math.exp(r2.log_ml) == pytest.approx(Z2, rel=0.15)


async def test_without_eos_the_target_is_the_prefix_probability_of_finished_texts():
    beam = await exact_beam(eos=False)
    words = [b"ab", b"abc", b"cc", b"b"]
    c = StringSet(words)
    # finished: accepted and either closed (no longer word) or at the byte limit
    finished = {b"abc", b"cc", b"b"}
    Z = sum((await brute_force(beam, lambda x: x in finished, 3, eos=False)).values())
    r = await smc(beam, c, 1000, 3, rng=1)
    assert all(p.finished for p in r.particles if p.log_weight > -math.inf)
    assert math.exp(r.log_ml) == pytest.approx(Z, rel=0.15)
    # with max_bytes=2, "ab" is finished at the limit too
    Z2 = sum((await brute_force(beam, lambda x: x in {b"ab", b"cc", b"b"}, 2, eos=False)).values())
    r2 = await smc(beam, c, 1000, 2, rng=1)
    assert any(p.text == b"ab" and p.finished for p in r2.particles)
    assert math.exp(r2.log_ml) == pytest.approx(Z2, rel=0.15)


async def test_large_n_draws_from_the_exact_conditional_distribution():
    beam = await exact_beam()
    exact = await brute_force(beam, fullmatch(PATTERN), MAX_BYTES)
    Z = sum(exact.values())
    target = {x: p / Z for x, p in exact.items()}

    def tv(p, q):
        return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))

    r = await smc(beam, Regex(PATTERN), 20_000, MAX_BYTES, rng=0)
    assert tv(dict(r.posterior()), target) < 0.03
    # frequencies of texts drawn from the result
    gen = np.random.default_rng(0)
    draws = [r.sample(gen) for _ in range(4000)]
    freq = {x: draws.count(x) / len(draws) for x in set(draws)}
    assert tv(freq, target) < 0.05
    # the proposal alone (unweighted particles) is far from the target: the weights do the work
    unweighted = {}
    for p in r.particles:
        unweighted[p.text] = unweighted.get(p.text, 0.0) + 1 / len(r.particles)
    assert tv(unweighted, target) > 0.1


# --------------------------------------------------------------------------- mechanics


async def test_result_fields_and_reproducibility():
    beam = await exact_beam()
    r1 = await smc(beam, Regex(PATTERN), 64, MAX_BYTES, rng=7)
    r2 = await smc(beam, Regex(PATTERN), 64, MAX_BYTES, rng=7)
    assert isinstance(r1, SMCResult) and len(r1.particles) == 64 and r1.weights.shape == (64,)
    assert r1.weights.sum() == pytest.approx(1.0) and r1.log_ml == r2.log_ml and r1.texts == r2.texts
    assert sum(r1.posterior().values()) == pytest.approx(1.0)
    for p, w in zip(r1.particles, r1.weights):
        if w > 0:
            assert p.finished and regex.fullmatch(PATTERN, p.text.decode()) and len(p.text) <= MAX_BYTES
    assert r1.best() in r1.posterior() and r1.sample(0) in r1.posterior()
    assert len(r1.ess) >= 1 and all(0 <= e <= 64 + 1e-9 for e in r1.ess)
    one = await smc(beam, Regex(PATTERN), 1, MAX_BYTES, rng=0)
    assert one.weights.tolist() == [1.0]


def test_ess_and_systematic_resampling():
    assert effective_sample_size(np.zeros(4)) == pytest.approx(4.0)
    assert effective_sample_size(np.array([0.0, -np.inf, -np.inf])) == pytest.approx(1.0)
    assert effective_sample_size(np.full(3, -np.inf)) == 0.0
    idx = systematic_resample(np.array([0.5, 0.25, 0.25, 0.0]), np.random.default_rng(0))
    assert sorted(idx.tolist()) == [0, 0, 1, 2]


class SlowMockLM(MockLM):
    """MockLM whose calls take a moment, recording how many are in flight at once."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.in_flight = self.max_in_flight = 0

    async def next_token_logprobs(self, token_ids):
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        await asyncio.sleep(0.001)
        self.in_flight -= 1
        return self.logprobs(token_ids)


async def test_particles_step_concurrently():
    beam = await exact_beam(lm_cls=SlowMockLM)
    lm = beam.lm
    await smc(beam, Regex("[abc]{4}"), 32, 4, rng=0)
    assert lm.max_in_flight >= 8  # the particles' LM calls overlap (a batching backend merges them)


async def test_dead_ends_get_zero_weight():
    beam = await exact_beam()
    # "a" is allowed but leads nowhere; the other branch survives
    dead_a = Predicate(lambda t: t in (b"", b"a", b"c", b"cc"), complete=lambda t: t in (b"c", b"cc"))
    r = await smc(beam, dead_a, 2000, 3, rng=0)
    assert all(p.text in (b"c", b"cc") for p, w in zip(r.particles, r.weights) if w > 0)
    Z = sum((await brute_force(beam, lambda x: x in (b"c", b"cc"), 3)).values())
    assert math.exp(r.log_ml) == pytest.approx(Z, rel=0.15)


async def test_bad_input():
    beam = await exact_beam()
    c = Regex(PATTERN)
    for n in (0, -3):
        with pytest.raises(ValueError, match="n_particles must be an int >= 1"):
            await smc(beam, c, n, 5)
    for n in (2.5, "4", True):
        with pytest.raises(ValueError, match="n_particles"):
            await smc(beam, c, n, 5)
    with pytest.raises(ValueError, match="max_bytes"):
        await smc(beam, c, 4, -1)
    with pytest.raises(ValueError, match="ess_threshold"):
        await smc(beam, c, 4, 5, ess_threshold=1.5)
    with pytest.raises(TypeError, match="Constraint"):
        await smc(beam, PATTERN, 4, 5)
    with pytest.raises(TypeError, match="separately"):
        await smc(ConstrainedState(beam, c), c, 4, 5)
    with pytest.raises(ConstraintError, match="dead end"):
        await smc(beam, Regex("[a&&b]"), 8, 5, rng=0)  # an empty class: no text matches
    with pytest.raises(ConstraintError, match="dead end"):
        await smc(beam, Regex("z+"), 8, 5, rng=0)  # the model never writes "z"
    with pytest.raises(ConstraintError, match="byte limit"):
        await smc(beam, Regex("(abc){3}"), 8, 5, rng=0)  # needs 9 bytes


# --------------------------------------------------------------------------- embedded model


@pytest.mark.slow
async def test_embedded_smc_phone_number(embedded_lm):
    eos = tuple(embedded_lm.byte_vocab[t] for t in embedded_lm.eos_token_ids)
    beam = await (await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05, eos_tokens=eos))
                  ).prefill(b"Call me at ")
    r = await smc(beam, Regex(r"[0-9]{3}-[0-9]{4}"), 4, 10, rng=0)
    assert math.isfinite(r.log_ml) and r.log_ml < 0
    for p, w in zip(r.particles, r.weights):
        if w > 0:
            assert regex.fullmatch(r"[0-9]{3}-[0-9]{4}", p.text.decode())
