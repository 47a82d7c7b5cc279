"""A beam's next-symbol distribution agrees with its steps (any K, any threshold); healing limits."""

import math
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genlm_bytes import EOS, AsyncLM, BeamParams, ByteBeamState, MockLM
from genlm_bytes.byte_lm import heal as healing

ALPHABET = b"abc$"


@st.composite
def vocab_and_text(draw):
    """A small vocabulary over ``abc$`` (every single byte, a few longer tokens), an EOS token, a text."""
    singles = [bytes([c]) for c in ALPHABET]
    multi = draw(st.lists(st.binary(min_size=2, max_size=4).map(lambda b: bytes(ALPHABET[x % 4] for x in b)),
                          min_size=1, max_size=8, unique=True))
    text = bytes(ALPHABET[x % 4] for x in draw(st.binary(min_size=1, max_size=6)))
    return [b"<eos>"] + singles + multi, text, draw(st.integers(0, 10_000)), draw(st.integers(0, len(text)))


async def assert_distribution_is_the_step(beam, threshold):
    """Every symbol ``<<`` accepts has ``logp_next()[a] - ((beam << a).logZ - beam.logZ)`` equal to
    one constant (0 with no threshold: nothing is skipped); the others have -inf."""
    logp = (await beam.logp_next()).ps
    gaps = []
    for a in [*range(256), EOS]:
        nxt = await (beam << a)
        if len(nxt) == 0:
            assert logp[a] == -math.inf, f"symbol {a}: << rejects it, logp_next gives {logp[a]}"
        else:
            assert logp[a] > -math.inf, f"symbol {a}: << accepts it, logp_next gives -inf"
            gaps.append(logp[a] - (nxt.logZ - beam.logZ))
    assert gaps, "some symbol is possible"
    assert max(gaps) - min(gaps) < 1e-6
    if threshold == 0:
        assert max(map(abs, gaps)) < 1e-6
    else:
        assert min(gaps) > -1e-6  # the normalizer leaves out the skipped endings: logp_next >= step


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vocab_and_text(), st.integers(1, 4), st.sampled_from([0.0, 0.1]))
async def test_next_symbol_distribution_is_the_step_for_every_width(case, K, threshold):
    vocab, text, seed, split = case
    lm = MockLM(vocab, seed=seed, temperature=0.5, initial_context=[0], eos_token_ids=[0])
    beam = await ByteBeamState.initial(lm, BeamParams(K=K, prune_threshold=threshold, eos_tokens=(b"<eos>",),
                                                      heal=False))
    beam = await beam.prefill(text[:split])
    for b in text[split:] + b"\x00":
        if len(beam) == 0:
            break
        await assert_distribution_is_the_step(beam, threshold)
        beam = await (beam.prune() << b)


# --------------------------------------------------------------------------- healing


class Fixed(AsyncLM):
    """The same next-token distribution after every context: ``abcd`` 0.6, the others share 0.4."""

    def __init__(self, vocab):
        super().__init__(byte_vocab=vocab, initial_context=[0], eos_token_ids=[0])
        p = torch.full((len(vocab),), 0.4 / (len(vocab) - 1), dtype=torch.float64)
        p[vocab.index(b"abcd")] = 0.6
        self.logp = p.log().float()

    async def next_token_logprobs(self, token_ids):
        return self.logp


# K=1 follows "abcd" through "abc"; "e" then kills it. "ab" + "ce" fails (no token starts with
# "c"); "a" + "bc" + "e" works: the heal backs off 2 bytes and tries 2 splits.
HEAL_VOCAB = [b"<eos>", b"a", b"b", b"e", b"ab", b"bc", b"abcd"]


async def read(lm, params, text):
    beam = await ByteBeamState.initial(lm, params)
    for b in text:
        beam = await (beam.prune() << b)
    return beam


@pytest.mark.parametrize(("limits", "heals"), [
    ({}, True),
    ({"heal_max_backoff": 2, "heal_max_splits": 2}, True),
    ({"heal_max_backoff": 1}, False),
    ({"heal_max_splits": 1}, False),
    ({"heal_max_backoff": 0}, False),
])
async def test_heal_limits(limits, heals):
    lm = Fixed(HEAL_VOCAB)
    assert len(await read(lm, BeamParams(K=1, heal=False), b"abce")) == 0, "the case needs a heal"
    beam = await read(lm, BeamParams(K=1, **limits), b"abce")
    assert (len(beam) > 0) == heals
    if heals:
        cover = beam.states[0]
        assert [lm.byte_vocab[t] for t in cover.lm_state.context[1:]] == [b"a", b"bc"]
        assert cover.partial == b"e"
        assert beam.logZ == pytest.approx(math.log(0.4 / 6) * 3, abs=1e-5)


async def test_healing_stays_off_the_hot_path(monkeypatch, mock_lm):
    calls = []
    inner = healing.heal

    async def counting(*args):
        calls.append(args)
        return await inner(*args)

    monkeypatch.setattr(healing, "heal", counting)
    for K, threshold in ((1, 0.0), (3, 0.05)):
        beam = await ByteBeamState.initial(mock_lm, BeamParams(K=K, prune_threshold=threshold))
        beam = await beam.prefill(b"the apple of the day")
        await beam.greedy(b" and", 6)
        assert len(beam) > 0
    assert calls == [], "a step that leaves some cover must not heal"
    await read(Fixed(HEAL_VOCAB), BeamParams(K=1), b"abce")
    assert len(calls) == 1, "the counter sees a heal when one is needed"


def test_heal_limits_are_validated():
    for name in ("heal_max_backoff", "heal_max_splits"):
        assert getattr(BeamParams(K=1), name) is None
        assert getattr(BeamParams(K=1, **{name: 3}), name) == 3
        with pytest.raises(ValueError, match=name):
            BeamParams(K=1, **{name: -1})
        for bad in ("2", 1.5, True):
            with pytest.raises(TypeError, match=name):
                BeamParams(K=1, **{name: bad})


# --------------------------------------------------------------------------- embedded model


@pytest.mark.slow
async def test_k1_next_byte_distribution_on_the_embedded_model(embedded_lm):
    params = BeamParams(K=1, eos_tokens=tuple(embedded_lm.eos_token_ids))
    beam = await (await ByteBeamState.initial(embedded_lm, params)).prefill(b"The")
    logp = (await beam.logp_next()).ps
    assert logp[ord(" ")] == pytest.approx(-0.034, abs=0.003)
    assert logp[EOS] > -math.inf
    assert np.exp(logp).sum() == pytest.approx(1.0, abs=1e-6)
    for a in (ord(" "), ord("y"), ord("r"), EOS):
        nxt = await (beam << a)
        assert logp[a] == pytest.approx(nxt.logZ - beam.logZ, abs=1e-5)
    prompt = b"The capital of France is"
    beam = await ByteBeamState.initial(embedded_lm, params)
    out = await beam.greedy(prompt, 12)
    assert re.search(rb"[A-Za-z]{3,}", out[len(prompt):]), out
