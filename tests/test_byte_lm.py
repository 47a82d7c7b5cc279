"""The byte-level LM: exactness against brute force, invariants, EOS, healing, bad input."""

import asyncio
import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genlm_bytes import (
    EOS,
    EOT,
    BeamParams,
    ByteBeamState,
    LazyTrieState,
    MockLM,
    StatefulTokenizedLM,
)
from genlm_bytes.byte_lm.trie_state import log_total

# --------------------------------------------------------------------------- brute force


class BruteForce:
    """Exact byte-level probabilities by enumerating every token sequence (small vocabularies only)."""

    def __init__(self, lm: MockLM, eos_ids=()):
        self.lm = lm
        self.vocab = lm.byte_vocab
        self.eos = set(eos_ids)
        self._memo = {}

    def p(self, ctx):
        key = tuple(ctx)
        if key not in self._memo:
            self._memo[key] = self.lm.logprobs(list(ctx)).double().exp().numpy()
        return self._memo[key]

    def prefix(self, ctx, rest: bytes, gen: bool) -> float:
        """P(next bytes start with ``rest``); in generation mode EOS tokens spell nothing."""
        if not rest:
            return 1.0
        p = self.p(ctx)
        total = 0.0
        for t, b in enumerate(self.vocab):
            if not b or (gen and t in self.eos):
                continue
            if b.startswith(rest):
                total += p[t]
            elif rest.startswith(b):
                total += p[t] * self.prefix(ctx + (t,), rest[len(b):], gen)
        return total

    def then_eos(self, ctx, rest: bytes) -> float:
        """P(the next bytes are exactly ``rest`` and then EOS)."""
        p = self.p(ctx)
        if not rest:
            return float(sum(p[t] for t in self.eos))
        total = 0.0
        for t, b in enumerate(self.vocab):
            if b and t not in self.eos and rest.startswith(b):
                total += p[t] * self.then_eos(ctx + (t,), rest[len(b):])
        return total

    def next_byte(self, ctx, x: bytes) -> np.ndarray:
        """(258,) probabilities of the next symbol after ``x`` (generation mode)."""
        z = self.prefix(ctx, x, True)
        out = np.zeros(258)
        for a in range(256):
            out[a] = self.prefix(ctx, x + bytes([a]), True) / z
        out[EOS] = self.then_eos(ctx, x) / z
        return out


ALPHABET = b"abc$"


@st.composite
def vocab_and_text(draw):
    """A small vocabulary over ``abc$`` (all single bytes + multi-byte tokens + maybe duplicates),
    an EOS token, and a short text."""
    singles = [bytes([c]) for c in ALPHABET]
    multi = draw(st.lists(st.binary(min_size=2, max_size=4).map(lambda b: bytes(ALPHABET[x % 4] for x in b)),
                          min_size=1, max_size=8, unique=True))
    dups = draw(st.lists(st.sampled_from(singles + multi), max_size=2))
    vocab = [b"<eos>"] + singles + multi + dups
    text = bytes(ALPHABET[x % 4] for x in draw(st.binary(min_size=1, max_size=5)))
    seed = draw(st.integers(0, 10_000))
    return vocab, text, seed


EXACT = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@EXACT
@given(vocab_and_text())
async def test_beam_matches_brute_force(case):
    vocab, text, seed = case
    lm = MockLM(vocab, seed=seed, initial_context=[0], eos_token_ids=[0])
    bf = BruteForce(lm, eos_ids=[0])
    params = BeamParams(K=10_000, prune_threshold=0.0, eos_tokens=(b"<eos>",))
    beam = await ByteBeamState.initial(lm, params)

    # Prefill (EOS tokens are text): log P(text).
    filled = await beam.prefill(text)
    assert filled.logZ == pytest.approx(math.log(bf.prefix((0,), text, False)), abs=1e-6)

    # Generation mode, byte by byte: the chain rule, and every next-symbol distribution.
    state, total = beam, 0.0
    for i, b in enumerate(text):
        logp = await state.logp_next()
        expected = bf.next_byte((0,), text[:i])
        np.testing.assert_allclose(np.exp(logp.ps), expected, atol=1e-6)
        total += logp[b]
        state = await (state << b)
    assert state.logZ == pytest.approx(math.log(bf.prefix((0,), text, True)), abs=1e-6)
    assert total == pytest.approx(state.logZ, abs=1e-6)
    logp = await state.logp_next()
    np.testing.assert_allclose(np.exp(logp.ps), bf.next_byte((0,), text), atol=1e-6)
    ended = await (state << EOS)
    assert ended.logZ == pytest.approx(math.log(bf.then_eos((0,), text)), abs=1e-6)
    assert ended.terminated


async def test_distributions_sum_to_one_and_states_do_not_change(mock_lm):
    beam = await ByteBeamState.initial(mock_lm, BeamParams(K=5, prune_threshold=0.01, eos_tokens=(b"<eos>",)))
    beam = await beam.prefill(b"the apple")
    for b in b" of the day":
        logp = await beam.logp_next()
        assert np.exp(logp.ps).sum() == pytest.approx(1.0, abs=1e-6)
        assert logp.ps[EOT] == -np.inf
        before = [(s.weight, s.node, s.lm_state.context) for s in beam.states]
        logz = beam.logZ
        nxt = await (beam.prune() << b)
        assert [(s.weight, s.node, s.lm_state.context) for s in beam.states] == before
        assert beam.logZ == logz
        beam = nxt
    cover = beam.states[0]
    logp = await cover.logp_next()
    assert np.exp(logp.ps).sum() == pytest.approx(1.0, abs=1e-6)


async def test_tokenized_state_is_immutable_and_truncates(mock_lm):
    s = StatefulTokenizedLM.initial(mock_lm, max_context_length=3)
    t = s << 5
    u = t << 6 << 7 << 8
    assert s.context == (0,) and t.context == (0, 5)
    assert u.context == (6, 7, 8)
    lp = await u.logp_next()
    torch.testing.assert_close(lp, mock_lm.logprobs([6, 7, 8]))
    with pytest.raises(ValueError, match="out of range"):
        s << 10_000
    with pytest.raises(TypeError):
        s << "a"
    with pytest.raises(ValueError, match="max_context_length"):
        StatefulTokenizedLM.initial(mock_lm, max_context_length=0)


async def test_impossible_byte_gives_no_state():
    lm = MockLM([b"<eos>", b"a", b"b", b"ab"], seed=1)
    cover = await LazyTrieState.initial(lm)
    assert await (cover << ord("z")) is None
    beam = await ByteBeamState.initial(lm, BeamParams(K=3))
    empty = await (beam << ord("z"))
    assert len(empty) == 0 and empty.logZ == -math.inf
    with pytest.raises(ValueError, match="empty beam"):
        await empty.logp_next()


async def test_single_cover_symbols():
    lm = MockLM([b"<eos>", b"a", b"ab", b"b"], seed=2)
    cover = await LazyTrieState.initial(lm)
    a = await (cover << ord("a"))
    logp = await a.logp_next()
    p = lm.logprobs([0]).double().exp()
    # inside "a": continue with b (token "ab") or end the token "a"
    assert math.exp(logp[ord("b")]) == pytest.approx(float(p[2] / (p[1] + p[2])), abs=1e-6)
    assert math.exp(logp[EOT]) == pytest.approx(float(p[1] / (p[1] + p[2])), abs=1e-6)
    ended = await (a << EOT)
    assert ended.lm_state.context == (0, 1) and ended.node == 0


async def test_eos_ends_and_prefill_reads_eos_as_text():
    vocab = [b"<eos>", b"a", b"b", b"<", b"e", b"o", b"s", b">"]
    lm = MockLM(vocab, seed=4)
    params = BeamParams(K=50, eos_tokens=(b"<eos>",))
    beam = await ByteBeamState.initial(lm, params)
    as_text = await beam.prefill(b"a<eos>b")
    assert len(as_text) > 0 and as_text.logZ > -math.inf
    # In generation the EOS token is not text: "<eos>" is spelled only by the single-byte tokens.
    logp = await (await beam.prefill(b"a")).logp_next()
    assert logp[EOS] > -math.inf
    ended = await ((await beam.prefill(b"a")) << EOS)
    assert ended.terminated
    assert len(await (ended << ord("a"))) == 0
    with pytest.raises(ValueError, match="ended"):
        await ended.logp_next()


async def test_healing_recovers_when_every_cover_dies():
    # K=1 commits to the likely long token "abc"; the text goes on "abd", which only "ab"+"d" spells.
    vocab = [b"<eos>", b"a", b"b", b"c", b"d", b"ab", b"abc", b"abcx"]
    lm = MockLM(vocab, seed=0, temperature=0.3)
    healed = await ByteBeamState.initial(lm, BeamParams(K=1, heal=True))
    plain = await ByteBeamState.initial(lm, BeamParams(K=1, heal=False))
    for b in b"abd":
        healed = await (healed.prune() << b)
        plain = await (plain.prune() << b)
    assert len(healed) > 0
    assert healed.logZ > -math.inf
    assert b"".join(lm.byte_vocab[t] for t in healed.states[0].lm_state.context[1:]) + healed.states[0].partial \
        == b"abd"


async def test_concurrent_beams_equal_sequential(mock_lm):
    params = BeamParams(K=4, prune_threshold=0.01, eos_tokens=(b"<eos>",))
    texts = [bytes(f"the {i} apple and {i * 7} day", "ascii") for i in range(32)]

    async def run(text):
        beam = await ByteBeamState.initial(mock_lm, params)
        beam = await beam.prefill(text[:5])
        for b in text[5:]:
            beam = await (beam.prune() << b)
        return beam.logZ, (await beam.logp_next()).ps

    sequential = [await run(t) for t in texts]
    concurrent = await asyncio.gather(*(run(t) for t in texts))
    for (z1, p1), (z2, p2) in zip(sequential, concurrent):
        assert z1 == z2
        np.testing.assert_array_equal(p1, p2)


async def test_sample_is_reproducible_and_greedy_deterministic(mock_lm):
    beam = await ByteBeamState.initial(mock_lm, BeamParams(K=3, prune_threshold=0.05, eos_tokens=(b"<eos>",)))
    a = await beam.sample(b"the ", 20, rng=7)
    b = await beam.sample(b"the ", 20, rng=7)
    assert a == b and a.startswith(b"the ")
    g1 = await beam.greedy(b"the ", 10)
    g2 = await beam.greedy(b"the ", 10)
    assert g1 == g2
    t = await beam.sample(b"the ", 10, temperature=0.5, top_k=3, rng=np.random.default_rng(1))
    assert t.startswith(b"the ")


async def test_bad_input(mock_lm):
    with pytest.raises(ValueError, match="K"):
        BeamParams(K=0)
    with pytest.raises(ValueError, match="prune_threshold"):
        BeamParams(K=2, prune_threshold=-0.1)
    with pytest.raises(TypeError, match="eos_tokens"):
        BeamParams(K=2, eos_tokens=b"<eos>")
    with pytest.raises(ValueError, match="not in the model's vocabulary"):
        await ByteBeamState.initial(mock_lm, BeamParams(K=2, eos_tokens=(b"<nope>",)))
    beam = await ByteBeamState.initial(mock_lm, BeamParams(K=2))
    with pytest.raises(ValueError, match="outside"):
        await (beam << 300)
    with pytest.raises(ValueError, match="outside"):
        await (beam << -1)
    with pytest.raises(ValueError, match="EOT"):
        await (beam << EOT)
    with pytest.raises(TypeError, match="bytes"):
        await beam.prefill("text")
    with pytest.raises(TypeError):
        await beam.greedy(123, 3)
    with pytest.raises(ValueError, match="steps"):
        await beam.greedy(b"a", -1)
    with pytest.raises(TypeError, match="AsyncLM"):
        await ByteBeamState.initial("model", BeamParams(K=2))
    await beam.cleanup()
    with pytest.raises(ValueError, match="empty"):
        await beam.logp_next()


async def test_async_context_manager(mock_lm):
    async with await ByteBeamState.initial(mock_lm, BeamParams(K=2)) as beam:
        beam2 = await beam.prefill(b"ab")
        assert len(beam2) > 0
    assert len(beam) == 0


async def test_user_model_subclass_runs_a_beam():
    from genlm_bytes import AsyncLM

    class Uniform(AsyncLM):
        def __init__(self):
            super().__init__(byte_vocab=[b"<s>", b"a", b"b", b"ab"], initial_context=[0], eos_token_ids=[0])

        async def next_token_logprobs(self, token_ids):
            return torch.full((4,), -math.log(4))

    beam = await ByteBeamState.initial(Uniform(), BeamParams(K=10))
    beam = await beam.prefill(b"ab")
    # covers: [a][b] = 1/16 and [ab...] = 1/4 ("ab" as one token)
    assert beam.logZ == pytest.approx(math.log(1 / 16 + 1 / 4), abs=1e-6)  # float32 log-probs


class _EncodingMock(MockLM):
    """A MockLM whose "tokenizer" splits a text as given (for prefill's pinned canonical cover)."""

    def __init__(self, vocab, split, **kw):
        super().__init__(vocab, **kw)
        self.split = split

    def encode_bytes(self, data):
        ids = [self.byte_vocab.index(piece) for piece in self.split]
        return ids if b"".join(self.split) == data else None


@pytest.mark.parametrize("seed", range(12))
async def test_prefill_keeps_the_cover_that_follows_the_encoding(seed):
    """A cover that runs past the end of the canonical token (into the longer token "abc") no
    longer follows the encoding "ab" + "cd"; the pinned slot must stay with the one that does,
    so that logZ >= log P(encoding) holds even with K=1."""
    vocab = [b"<eos>", b"a", b"b", b"c", b"d", b"ab", b"abc", b"cd"]
    lm = _EncodingMock(vocab, [b"ab", b"cd"], seed=seed, initial_context=[0], eos_token_ids=[0])
    beam = await ByteBeamState.initial(lm, BeamParams(K=1))
    beam = await beam.prefill(b"abcd")
    canonical = float(lm.logprobs([0])[5]) + float(lm.logprobs([0, 5])[7])
    assert beam.logZ >= canonical - 1e-6


# --------------------------------------------------------------------------- embedded model


BENCH = __import__("pathlib").Path(__file__).resolve().parents[2] / "shared" / "bench"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["prose.txt", "mixed.txt"])
async def test_never_loses_the_canonical_path(embedded_lm, name):
    path = BENCH / name
    if not path.exists():
        pytest.skip(f"{path} not found")
    text = path.read_bytes()
    lm = embedded_lm
    enc = lm.encode_bytes(text)
    assert enc is not None
    ctx = list(lm.initial_context) + enc
    await lm.prefetch(ctx)  # one pass; the rows below are cache hits
    rows = await asyncio.gather(*(lm.next_token_logprobs(ctx[:i]) for i in range(1, len(ctx))))
    canonical = sum(float(rows[i - 1][ctx[i]]) for i in range(1, len(ctx)))
    beam = await ByteBeamState.initial(lm, BeamParams(K=5, prune_threshold=0.05))
    beam = await beam.prefill(text)
    assert beam.logZ >= canonical - 1e-4
    logp = await beam.logp_next()
    assert np.exp(logp.ps).sum() == pytest.approx(1.0, abs=1e-6)


@pytest.mark.slow
async def test_the_initial_distribution_runs_with_the_first_text_and_changes_nothing(embedded_lm):
    """The distribution after the initial context is computed in the first pass of the text a
    beam prefills first (given as ``text_hint`` or not): one pass fewer than computing it alone
    first, the same numbers. A beam used first without a prefill computes it then."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm.beam import eos_token_ids
    from genlm_bytes.byte_lm.trie_state import LazyTrieState, shared_space

    def space_of(lm):
        return shared_space(lm, eos_token_ids(lm, params.eos_tokens))

    text = b"An apple a day keeps the doctor away."
    params = BeamParams(K=5, prune_threshold=0.05)
    results = {}
    for how in ("eager", "lazy", "hint"):
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], draft_tokens=0,
                              lookahead=False)
        passes = []
        for name in ("forward", "tree_pass"):  # (the engine's passes: lm.runner)
            inner = getattr(lm.runner, name)
            setattr(lm.runner, name, lambda *a, _inner=inner, _passes=passes, **k: (_passes.append(1), _inner(*a, **k))[1])
        if how == "eager":
            beam = ByteBeamState([await LazyTrieState.initial(lm, space_of(lm))], params)
        else:
            beam = await ByteBeamState.initial(lm, params, text_hint=text if how == "hint" else None)
        if how == "lazy":
            assert not passes and beam.states[0].is_pending and beam.logZ == 0.0
        beam = await beam.prefill(text)
        results[how] = (beam.logZ, len(passes), lm.n_forward_tokens, (await beam.logp_next()).ps)
    z0, p0, t0, n0 = results["eager"]
    for how in ("lazy", "hint"):
        z, p, t, n = results[how]
        assert z == pytest.approx(z0, abs=1e-4)
        np.testing.assert_allclose(n, n0, atol=1e-4)
        assert p == p0 - 1 and t == t0, f"{how}: the initial context should run in the first pass of the text"
    # First use without a prefill: a step, or the next-byte distribution.
    lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
    eager = ByteBeamState([await LazyTrieState.initial(lm, space_of(lm))], params)
    lazy = await ByteBeamState.initial(lm, params)
    np.testing.assert_allclose((await lazy.logp_next()).ps, (await eager.logp_next()).ps, atol=1e-6)
    assert not lazy.states[0].is_pending and lazy.logZ == pytest.approx(eager.logZ, abs=1e-6)
    lazy2 = await ByteBeamState.initial(lm, params)
    assert (await (lazy2 << ord("A"))).logZ == pytest.approx((await (eager << ord("A"))).logZ, abs=1e-6)
    with pytest.raises(ValueError):
        await ByteBeamState.initial(lm, params, initial_context=[10 ** 9])
    with pytest.raises(TypeError):
        await ByteBeamState.initial(embedded_lm, params, text_hint=12)


@pytest.mark.slow
async def test_prefill_fast_path_matches_plain_steps(embedded_lm):
    """prefill (one pass + speculation) and byte-by-byte stepping agree within 1e-4."""
    from genlm_bytes import AsyncTransformer

    text = b"An apple a day keeps the doctor away. Stock markets signalled caution."
    params = BeamParams(K=5, prune_threshold=0.05)
    fast = await (await ByteBeamState.initial(embedded_lm, params)).prefill(text)
    # A separate backend on the same weights with no prefetch at all: plain batched steps.
    plain_lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
    plain_lm.prefetch = lambda *a, **k: asyncio.sleep(0)
    plain_lm.has_logprobs = None
    del plain_lm.has_logprobs
    slow = await ByteBeamState.initial(plain_lm, params)
    slow = await slow.prefill(text)
    assert fast.logZ == pytest.approx(slow.logZ, abs=1e-4)
    np.testing.assert_allclose(np.exp((await fast.logp_next()).ps), np.exp((await slow.logp_next()).ps),
                               atol=1e-4)


@pytest.mark.slow
async def test_greedy_paris_and_seeded_sampling(embedded_lm):
    beam = await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05))
    out = await beam.greedy(b"The capital of France is", steps=20)
    assert b"Paris" in out
    s1 = await beam.sample(b"Once upon a time", steps=15, rng=0)
    s2 = await beam.sample(b"Once upon a time", steps=15, rng=0)
    assert s1 == s2


@pytest.mark.slow
async def test_next_byte_after_prompt_ending_mid_word(embedded_lm):
    # After <|im_start|> this model completes the proverb (after <|endoftext|> it prefers " clock").
    beam = await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05), initial_context=[1])
    beam = await beam.prefill(b"An apple a day keeps the ")
    logp = await beam.logp_next()
    assert logp.argmax() == ord("d")
    # The prompt ends with a space: the byte distribution is the token distribution after "...the"
    # restricted to tokens starting with " ", regrouped by their second byte.
    lm = embedded_lm
    lp = await lm.next_token_logprobs([1] + lm.encode_bytes(b"An apple a day keeps the"))
    p = lp.double().exp()
    space = [t for t, b in enumerate(lm.byte_vocab) if b.startswith(b" ") and len(b) > 1]
    p_d = sum(float(p[t]) for t in space if lm.byte_vocab[t][1:2] == b"d") / sum(float(p[t]) for t in space)
    assert math.exp(logp[ord("d")]) == pytest.approx(p_d, abs=0.02)
    beam = await (beam.prune() << ord("d"))
    beam = await beam.prefill(b"oct")
    assert (await beam.logp_next()).argmax() == ord("o")


@pytest.mark.slow
async def test_prefill_in_small_speculation_windows_matches_one_window(embedded_lm):
    """A backend under a small budget speculates fewer boundaries per pass (its
    ``speculation_window``); the prefill then runs in more, smaller passes with the same result."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm.speculate import WINDOW, speculation_window

    text = (b"The river was high that spring, and the ferry ran only in the mornings. We waited on the "
            b"bank with the bicycles, counting barges, while a heron stood in the shallows and ignored us. "
            b"By noon the wind had turned, the water had calmed, and the ferryman waved us aboard.")
    params = BeamParams(K=5, prune_threshold=0.05)
    assert speculation_window(embedded_lm) == WINDOW
    small = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0],
                             cache_budget_bytes=64 << 20)
    assert speculation_window(small) == small.speculation_window == 16
    assert AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0],
                            cache_budget_bytes=256 << 20).speculation_window == 64
    assert speculation_window(MockLM([b"<eos>", b"a"], seed=0)) == WINDOW
    passes = []
    inner = small.runner.tree_pass
    small.runner.tree_pass = lambda *a, **kw: (passes.append(a[3]), inner(*a, **kw))[1]
    windowed = await (await ByteBeamState.initial(small, params)).prefill(text)
    whole = await (await ByteBeamState.initial(embedded_lm, params)).prefill(text)
    assert len(embedded_lm.encode_bytes(text)) > 3 * 16 and len(passes) >= 3
    assert passes[0] <= 16, "the text's first window runs 16 path tokens"
    assert windowed.logZ == pytest.approx(whole.logZ, abs=1e-4)
    np.testing.assert_allclose(np.exp((await windowed.logp_next()).ps), np.exp((await whole.logp_next()).ps),
                               atol=1e-4)


@pytest.mark.slow
async def test_greedy_with_drafts_equals_greedy_without_and_needs_fewer_calls(embedded_lm):
    """Prompt-lookup drafts and look-ahead passes change how many passes a generation takes,
    not what it generates."""
    from genlm_bytes import AsyncTransformer

    params = BeamParams(K=5, prune_threshold=0.05)
    prompt = b"The capital of France is Paris. The capital of Italy is Rome. The capital of France is"
    runs = []
    for draft, ahead in ((0, False), (2, False), (1, True)):
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], draft_tokens=draft,
                              lookahead=ahead)
        beam = await ByteBeamState.initial(lm, params)
        out = await beam.greedy(prompt, 40)
        runs.append((out, lm.batcher.n_batches, lm.n_forward_tokens))
        lm.stop_lookahead()
    (plain, calls0, _), (drafted, calls2, _), (ahead_out, calls_ahead, _) = runs
    assert drafted == plain and ahead_out == plain
    assert calls_ahead < calls0, "look-ahead passes should serve some requests before they are made"
    assert calls2 < calls0, f"drafts saved no pass ({calls2} vs {calls0} calls)"


@pytest.mark.slow
async def test_prefill_computes_the_likeliest_tokens_after_the_text_in_its_last_pass(embedded_lm, monkeypatch):
    """A prefill's last window also computes the ``GUESS_AFTER`` likeliest tokens after the
    text's encoding, in a pass that runs anyway: a generation from the end of the prompt finds
    its first token's distribution cached; no pass more, the same beam."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    params = BeamParams(K=5, prune_threshold=0.05)
    text = b"The old harbor had been quiet for years, but that spring the boats came back and"
    results = {}
    for guess in (0, 2):
        monkeypatch.setattr(PrefillPlanner, "GUESS_AFTER", guess)
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], lookahead=False)
        beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        enc = [0] + lm.encode_bytes(text)
        row = await lm.peek_next_token_logprobs(enc)
        top = torch.topk(row, 2).indices.tolist()
        cached = [lm.has_logprobs(enc + [t]) for t in top]
        results[guess] = (sum(lm.runner.passes.values()), beam.logZ, cached, (await beam.logp_next()).ps,
                          lm.n_forward_tokens)
    (p0, z0, c0, n0, t0), (p2, z2, c2, n2, t2) = results[0], results[2]
    assert c2 == [True, True] and c0 == [False, False]
    assert p2 == p0, "no pass more"
    assert z2 == pytest.approx(z0, abs=1e-4)
    np.testing.assert_allclose(n2, n0, atol=1e-4)
    assert t2 == t0 + 2, "two tokens more, in a pass that ran anyway"


@pytest.mark.slow
@pytest.mark.parametrize("text", [b'{"name": "Ada", "langs": ["en", ', b"while read line; do\n"])
async def test_prefill_guesses_the_longer_token_a_text_ending_in_a_short_one_goes_on_with(embedded_lm, text):
    """A text whose encoding ends with a short token (" ", "\\n") goes on, under a byte-level
    beam, inside a longer token spelling it (' "', "\\n  ") more often than after it: the
    prefill's last pass ranks those contexts (the text's encoding but its last token, then the
    longer token) with the tokens after the whole encoding, so greedy's first bytes ask for
    nothing uncached; and no pass more than a prefill guessing nothing."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    params = BeamParams(K=5, prune_threshold=0.05)
    runs = {}
    for guess in (0, PrefillPlanner.GUESS_AFTER):
        PrefillPlanner.GUESS_AFTER, saved = guess, PrefillPlanner.GUESS_AFTER
        try:
            lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], lookahead=False)
            beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        finally:
            PrefillPlanner.GUESS_AFTER = saved
        passes = sum(lm.runner.passes.values())
        enc = [0] + lm.encode_bytes(text)
        asked, inner = [], lm.next_token_logprobs

        async def recorded(ids, *a, _inner=inner, _lm=lm, _asked=asked, **k):
            _asked.append((tuple(ids), _lm.has_logprobs(list(ids))))
            return await _inner(ids, *a, **k)

        lm.next_token_logprobs = recorded
        out = await beam.greedy(b"", 3)
        runs[guess] = (passes, beam.logZ, out, asked, enc)
    (p0, z0, out0, _, enc), (p2, z2, out2, asked, _) = runs[0], runs[PrefillPlanner.GUESS_AFTER]
    vocab, last = embedded_lm.byte_vocab, embedded_lm.byte_vocab[enc[-1]]
    assert out2 == out0 and z2 == pytest.approx(z0, abs=1e-4) and p2 == p0
    assert asked and all(cached for _, cached in asked), [c for c, cached in asked if not cached]
    longer = [c for c, _ in asked if c[:-1] == tuple(enc[:-1]) and len(vocab[c[-1]]) > len(last)
              and vocab[c[-1]].startswith(last)]
    assert longer, "greedy went on inside a longer token spelling the text's last one"


@pytest.mark.slow
async def test_prefill_skips_extensions_the_cached_ones_rule_out(embedded_lm, monkeypatch):
    """``beam._tighten``: where every heavy cover ends a token at the same byte, the
    extensions already cached bound the next total; extensions below it are not computed (nor
    looked ahead for). The beam is the same after every prune and at the end (its last byte is
    not narrowed): the same logZ and next-byte distribution, fewer LM tokens; each candidate it
    drops would have been pruned."""
    from genlm_bytes import AsyncTransformer

    params = BeamParams(K=5, prune_threshold=0.05)
    text = b"Als wir am Bahnhof ankamen, war der letzte Zug schon"
    from genlm_bytes.byte_lm import beam as beam_mod

    narrowed = beam_mod._tighten
    dropped = []

    async def spy(beam, cands, sym, ws):
        out = await narrowed(beam, cands, sym, ws)
        dropped.extend((beam, sym, ws, c) for c in cands if c not in out)
        return out

    async def passthrough(beam, cands, sym, ws):
        return cands

    results = {}
    for name, fn in (("off", passthrough), ("on", spy)):
        monkeypatch.setattr(beam_mod, "_tighten", fn)
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], lookahead=False)
        beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        results[name] = (beam.logZ, (await beam.logp_next()).ps, lm.n_forward_tokens)
    (z0, n0, t0), (z1, n1, t1) = results["off"], results["on"]
    assert z1 == pytest.approx(z0, abs=1e-4)
    np.testing.assert_allclose(np.exp(n1), np.exp(n0), atol=1e-5)
    assert dropped and t1 < t0, "some extensions were not computed"
    for beam, sym, ws, (i, t, _) in dropped[:20]:  # each would have been pruned after its byte
        sure = ws + [c.weight for e in beam._ext.values() if (c := e.consume(sym)) is not None]  # next covers
        c = (await beam.states[i].extend(t)).consume(sym)
        assert c is None or c.weight < log_total(sure) + math.log(params.prune_threshold) \
            or sum(w > c.weight for w in sure) >= params.K


@pytest.mark.slow
async def test_a_look_ahead_near_the_end_of_the_text_reaches_it(embedded_lm, monkeypatch):
    """``PrefillPlanner.encode_ahead``: a look-ahead of n tokens reaches the end of the text when
    what would be left after it is at most ``TO_END`` times as long (up to ``(1 + TO_END) * n``
    tokens), else stops at n tokens."""
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    data = b"The old harbor had been quiet for years, but that spring the boats came back."
    beam = await ByteBeamState.initial(embedded_lm, BeamParams(K=5, prune_threshold=0.05))
    await beam._ready()
    planner = PrefillPlanner(beam, data)
    whole = embedded_lm.encode_bytes(data[40:])
    assert 4 < len(whole) <= 12 and len(data) - 40 > 32  # (past a first window of 8 bytes a token)
    monkeypatch.setattr(PrefillPlanner, "TO_END", 2)
    assert planner.encode_ahead(40, 4) == whole
    monkeypatch.setattr(PrefillPlanner, "TO_END", 0)
    assert planner.encode_ahead(40, 4) == whole[:4]
    long = data * 8
    planner = PrefillPlanner(beam, long)
    monkeypatch.setattr(PrefillPlanner, "TO_END", 2)
    assert len(planner.encode_ahead(0, 4)) == 4, "far from the end: n tokens"


@pytest.mark.slow
async def test_greedy_hints_serve_next_steps_and_change_nothing(embedded_lm, monkeypatch):
    """A generating beam that waits on a pass hints the contexts its covers will likely end
    tokens at next (``AsyncLM.hint_next``): only uncached ones one token past a cover's context,
    none it is asking for. The backend runs some with the pass: fewer batches for the same
    bytes and the same next-byte distribution; a beam under ``known_text`` (prefill) hints nothing."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm import beam as beam_mod

    params = BeamParams(K=5, prune_threshold=0.05)
    prompt = "Le matin, la petite ville se réveille lentement et les boulangers".encode()
    runs = []
    for hinting in (False, True):
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0], lookahead=False)
        given, inner = [], lm.hint_next

        def record(contexts, lm=lm, given=given, inner=inner):
            for c in contexts:
                assert not lm.has_logprobs(list(c)), "a cached context was hinted"
            given.append([tuple(c) for c in contexts])
            inner(contexts)

        lm.hint_next = record
        if not hinting:
            monkeypatch.setattr(beam_mod, "_hint_next", lambda *a: None)
        beam = await (await ByteBeamState.initial(lm, params)).prefill(prompt)
        assert not given, "prefill hints nothing"
        state, out = await beam.generate_bytes(24, greedy=True)
        runs.append((out, lm.batcher.n_batches, (await state.logp_next()).ps, given))
        monkeypatch.undo()
    (plain, calls0, lp0, _), (hinted, calls1, lp1, given) = runs
    assert hinted == plain
    assert np.allclose(np.exp(lp0), np.exp(lp1), atol=1e-5)
    assert given and all(0 < len(g) <= beam_mod.HINT_CONTEXTS for g in given)
    assert calls1 < calls0, f"hints served no step ({calls1} vs {calls0} batches)"


@pytest.mark.slow
async def test_new_paths_exact_branches_join_the_next_pass(embedded_lm):
    """A look-ahead path the prefill planner starts for a surviving branch lists its exact
    branches (a token or two each) and computes them with its next pass instead of in a pass of
    their own: fewer passes, the same covers."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm import speculate

    text = ("Die Kinder spielten gestern Nachmittag im Garten, während die Großeltern Kaffee tranken "
            "und über die Ernte sprachen. Übermorgen beginnt das Schuljahr.").encode()
    params = BeamParams(K=5, prune_threshold=0.05)
    real = speculate.PrefillPlanner.add_path
    deferred = []

    async def each_alone(self, ctx, enc, base, defer=False):  # the planner as it was: a pass per new path
        return await real(self, ctx, enc, base, False)

    async def watched(self, ctx, enc, base, defer=False):
        await real(self, ctx, enc, base, defer)
        deferred.extend(self.pending)

    results = []
    for add_path in (each_alone, watched):
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
        passes = []
        for name in ("tree_pass", "forward"):
            inner = getattr(lm.runner, name)
            setattr(lm.runner, name, lambda *a, _inner=inner, _log=passes, **kw: (_log.append(1), _inner(*a, **kw))[1])
        speculate.PrefillPlanner.add_path = add_path
        try:
            beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        finally:
            speculate.PrefillPlanner.add_path = real
        results.append((beam, len(passes), lm))
    (old, n_old, _), (new, n_new, lm) = results
    assert deferred, "the text should make the planner start look-ahead paths with branches"
    assert n_new < n_old, f"deferring the branches saved no pass ({n_new} vs {n_old})"
    assert sorted((s.lm_state.context, s.node) for s in new.states) == \
        sorted((s.lm_state.context, s.node) for s in old.states)
    assert new.logZ == pytest.approx(old.logZ, abs=1e-4)
    np.testing.assert_allclose(np.exp((await new.logp_next()).ps), np.exp((await old.logp_next()).ps), atol=1e-4)
    assert any(lm.has_logprobs(list(q)) for q in deferred), "pending branches should be computed by a later pass"


@pytest.mark.slow
async def test_walking_the_beam_over_a_window_computes_branches_next_tokens_in_one_pass(embedded_lm):
    """Once a window's one-token branches are computed, the prefill planner walks a copy of the
    beam over the window on cached distributions and computes every branch's next token the copy
    found missing in one pass, instead of one small pass each when the beam gets there: fewer
    passes, the same covers and numbers."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm import speculate

    text = b'class Stack:\n    """A last-in, first-out container."""\n\n    def __init__(self):\n'
    params = BeamParams(K=5, prune_threshold=0.05)
    real_walk = speculate.PrefillPlanner.walk_window
    walked = []

    async def watched(self, spec, end):
        before = self.lm.n_forward_tokens
        await real_walk(self, spec, end)
        walked.append(self.lm.n_forward_tokens - before)

    results = []
    for walk in (False, True):
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
        passes, asked = [], []
        for name in ("tree_pass", "forward"):
            inner = getattr(lm.runner, name)
            setattr(lm.runner, name, lambda *a, _inner=inner, _log=passes, **kw: (_log.append(1), _inner(*a, **kw))[1])
        ask = lm.next_token_logprobs
        lm.next_token_logprobs = lambda ids, _ask=ask, _log=asked: (_log.append(tuple(ids)), _ask(ids))[1]
        saved = speculate.PrefillPlanner.WALK_AHEAD
        speculate.PrefillPlanner.WALK_AHEAD = walk
        speculate.PrefillPlanner.walk_window = watched
        try:
            beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        finally:
            speculate.PrefillPlanner.WALK_AHEAD = saved
            speculate.PrefillPlanner.walk_window = real_walk
        results.append((beam, len(passes), lm, asked))
    (old, n_old, _, asked_old), (new, n_new, lm, asked_new) = results
    assert len(walked) == 1 and walked[0] > 0, "the walk should have found branches' next tokens to compute"
    assert n_new < n_old, f"the walk saved no pass ({n_new} vs {n_old})"
    assert set(asked_new) == set(asked_old), "the beam itself must ask for the same contexts"
    assert sorted((s.lm_state.context, s.node) for s in new.states) == \
        sorted((s.lm_state.context, s.node) for s in old.states)
    assert new.logZ == pytest.approx(old.logZ, abs=1e-4)
    np.testing.assert_allclose(np.exp((await new.logp_next()).ps), np.exp((await old.logp_next()).ps), atol=1e-4)

    # Under a budget that shrinks the speculation window there is no walk (what it computed
    # ahead would be evicted before the beam reads it).
    small = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0],
                             cache_budget_bytes=256 << 20)
    speculate.PrefillPlanner.walk_window = watched
    try:
        await (await ByteBeamState.initial(small, params)).prefill(text)
    finally:
        speculate.PrefillPlanner.walk_window = real_walk
    assert len(walked) == 1, "a backend with a shrunk speculation window should not walk"


@pytest.mark.slow
async def test_walk_ahead_lists_only_uncached_one_token_extensions_and_leaves_the_beam_alone(embedded_lm):
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
    text = b"Die Kinder spielten gestern im Garten, und die Ernte war gut."
    params = BeamParams(K=5, prune_threshold=0.05)
    beam = await ByteBeamState.initial(lm, params, text_hint=text)  # the first window's path is cached
    canon = tuple(lm.encode_bytes(text))
    (s,) = beam.states  # as a prefill starts: the cover in text mode, following the encoding
    start = ByteBeamState([LazyTrieState(s.lm_state, 0, s.ctx_weight, s.dist, text=True, canon=0)], params,
                          canon=canon)
    planner = PrefillPlanner(start, text)
    n_forward = lm.n_forward_tokens
    missing, end_beam = await planner.walk_ahead(start, 0, len(text))
    assert lm.n_forward_tokens == n_forward, "a walk computes nothing"
    assert not start._ext, "a walk leaves the beam's own extensions alone"
    assert missing, "with only the path cached, the walk should miss the branches off it"
    for ctx in missing:
        assert not lm.has_logprobs(list(ctx))
        assert lm.has_logprobs(list(ctx[:-1])), "each missing context extends a cached one by one token"
    assert end_beam.states, "the copy reads on past the misses"


def test_first_look_aheads_are_given_while_enough_new_branches_go_on_along_them():
    """``FirstAheads``: every new branch gets a first look-ahead until ``MIN`` have an outcome;
    then only while at least ``least`` of the last ``WINDOW`` went on along the encoding. A branch
    is counted once, an unknown one not at all, and the branches waiting are bounded."""
    from genlm_bytes.byte_lm.lineage import FirstAheads

    fa = FirstAheads(0.25)
    assert fa.worth()
    branches = [fa.start(7) for _ in range(fa.MIN)]
    assert fa.token(branches[0]) == 7 and fa.token(10_000) == -1
    for b in branches[:-1]:
        fa.resolve(b, False)
    assert fa.worth(), "fewer than MIN outcomes: still given"
    fa.resolve(branches[-1], False)
    fa.resolve(branches[-1], True)  # (already counted: ignored)
    fa.resolve(12_345, True)  # (unknown: ignored)
    assert len(fa.outcomes) == fa.MIN and not fa.worth()
    for _ in range(fa.MIN // 2):  # hits come back: a quarter and more of the window
        fa.resolve(fa.start(3), True)
    assert fa.worth()
    for _ in range(fa.WINDOW):  # only the last WINDOW count
        fa.resolve(fa.start(3), False)
    assert not fa.worth()
    for _ in range(3 * fa.PENDING):
        fa.start(1)
    assert len(fa.tokens) == fa.PENDING
    assert FirstAheads(0.0).worth() and all(FirstAheads(0.0).worth() for _ in range(3))


@pytest.mark.slow
async def test_a_prefill_without_first_look_aheads_gives_the_same_beam_for_fewer_tokens(embedded_lm, monkeypatch):
    """Where most new branches die within a token (here German, Russian and Spanish on SmolLM2:
    8 of 10), the planner stops giving them first look-aheads (the contexts alone run with the
    stall's pass). The beam asks for the same contexts and ends the same; fewer LM tokens are
    computed."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm import lineage, speculate

    text = ("Die Kinder spielten gestern Nachmittag im Garten, während die Großeltern Kaffee tranken. "
            "Поезд отправился поздно вечером, и к утру за окнами уже тянулась степь. "
            "El mercado abre temprano y los vendedores colocan las frutas con cuidado.").encode()
    params = BeamParams(K=5, prune_threshold=0.05)
    worth = lineage.FirstAheads.worth
    monkeypatch.setattr(lineage.FirstAheads, "MIN", 4)  # (a short text)
    results = []
    for least in (0.0, 0.5):  # never off; off while fewer than half go on
        monkeypatch.setattr(speculate.PrefillPlanner, "FIRST_HIT_MIN", least)
        seen = []
        monkeypatch.setattr(lineage.FirstAheads, "worth",
                            lambda self, _seen=seen: _seen.append(worth(self)) or _seen[-1])
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
        asked, ask = [], lm.next_token_logprobs
        lm.next_token_logprobs = lambda ids, _ask=ask, _log=asked: (_log.append(tuple(ids)), _ask(ids))[1]
        beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        results.append((beam, lm.n_forward_tokens, set(asked), seen))
    (on, tok_on, asked_on, seen_on), (off, tok_off, asked_off, seen_off) = results
    assert all(seen_on) and not all(seen_off), "least=0.5 should turn first look-aheads off here"
    assert asked_off == asked_on, "the beam itself must ask for the same contexts"
    assert sorted((s.lm_state.context, s.node) for s in off.states) == \
        sorted((s.lm_state.context, s.node) for s in on.states)
    assert off.logZ == pytest.approx(on.logZ, rel=1e-6)  # (float32 rows of other pass shapes)
    assert tok_off < tok_on, f"no first look-aheads should compute fewer tokens ({tok_off} vs {tok_on})"


@pytest.mark.slow
async def test_only_the_cover_going_on_along_the_text_continues_its_lineage_s_look_ahead(embedded_lm, monkeypatch):
    """Two covers of one lineage reach its look-ahead's end together (hex ids: "c0fa" or "c0"
    + "fa"): only the one whose token is the text's encoding from there goes on doubling the
    look-ahead; the other is a new branch. The beam asks for the same contexts and ends the
    same; fewer LM tokens are computed (SmolLM2: 546 -> 496)."""
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.byte_lm import speculate

    text = (b'[\n {\n  "id": "cd18fc9f-b649-4384-932a-f3bda6fe8102",\n  "sha256": '
            b'"c0fa7a26774e22af3993a69e2ca7956518f22441",\n  "n": 20518\n },\n {\n  "id": '
            b'"c876d8ef-b2a3-fa67-0837-b5ad13471203",\n  "sha256": "63c2b310653f610d382729bd51e13c68bf56155a",\n'
            b'  "n": 79399\n }\n]\n')
    params = BeamParams(K=5, prune_threshold=0.05)
    results = []
    for encoded in (False, True):
        monkeypatch.setattr(speculate.PrefillPlanner, "GOING_ON_ENCODED", encoded)
        lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
        asked, ask = [], lm.next_token_logprobs
        lm.next_token_logprobs = lambda ids, _ask=ask, _log=asked: (_log.append(tuple(ids)), _ask(ids))[1]
        beam = await (await ByteBeamState.initial(lm, params)).prefill(text)
        results.append((beam, lm.n_forward_tokens, set(asked)))
    (every, tok_every, asked_every), (enc, tok_enc, asked_enc) = results
    assert asked_enc == asked_every, "the beam itself must ask for the same contexts"
    assert sorted((s.lm_state.context, s.node) for s in enc.states) == \
        sorted((s.lm_state.context, s.node) for s in every.states)
    assert enc.logZ == pytest.approx(every.logZ, rel=1e-6)  # (float32 rows of other pass shapes)
    assert tok_enc < tok_every, f"look-aheads along the text only should compute fewer tokens ({tok_enc} vs {tok_every})"


def test_a_token_starts_the_encoding_where_the_tokenizer_splits_the_text_from_its_start(embedded_lm):
    """``speculate.starts_encoding``: the token ending before a position is the first token of
    the text's encoding from the token's start (" owners", not " owner" + "s")."""
    from genlm_bytes.byte_lm.speculate import starts_encoding

    lm = embedded_lm
    trie = None  # (only read for a window the tokenizer cannot encode; these are valid text)
    data = b"The owners visited their daughter in Lisbon."
    (owners,), (owner,), (the,) = (lm.tokenizer.encode(w) for w in (" owners", " owner", "The"))
    end = data.index(b" visited")
    assert starts_encoding(lm, trie, data, end, owners, 2)
    assert not starts_encoding(lm, trie, data, end - 1, owner, 2)
    assert starts_encoding(lm, trie, data, 3, the, 0)
