"""The byte level does not depend on the backend: any AsyncLM serving the same distributions
gives the same beams (logZ, greedy bytes, samples), and prefill never falls below the canonical
encoding's log-probability, whether the backend prefetches or not."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_bytes import AsyncLM, BeamParams, ByteBeamState, MockLM
from genlm_bytes.lm.base import ByteVocabulary, alternative_contexts


class Wrapper(AsyncLM):
    """A plain AsyncLM around another model: the same vocabulary, only ``next_token_logprobs``."""

    def __init__(self, inner):
        super().__init__(byte_vocab=inner.byte_vocab, initial_context=inner.initial_context,
                         eos_token_ids=inner.eos_token_ids)
        self.inner = inner

    async def next_token_logprobs(self, token_ids):
        return await self.inner.next_token_logprobs(token_ids)


class PrefetchingMock(MockLM):
    """A MockLM that caches rows, computes ahead on ``prefetch`` and encodes text by longest match
    (its "tokenizer"): a beam plans its prefill passes on it as on AsyncTransformer."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.rows: dict[tuple, torch.Tensor] = {}
        self.n_prefetched = 0

    async def next_token_logprobs(self, token_ids):
        key = tuple(token_ids)
        if key not in self.rows:
            self.rows[key] = self.logprobs(token_ids)
        return self.rows[key]

    def has_logprobs(self, token_ids) -> bool:
        return tuple(token_ids) in self.rows

    async def prefetch(self, token_ids, alternatives=None, *, start=0):
        contexts = [token_ids[:i] for i in range(max(start, 0) + 1, len(token_ids) + 1)]
        contexts += alternative_contexts(token_ids, alternatives, self.vocab_size)
        for c in contexts:
            self.n_prefetched += 1
            await self.next_token_logprobs(c)

    def encode_bytes(self, data):
        by_bytes = {b: t for t, b in reversed(list(enumerate(self.byte_vocab))) if b}
        out, i = [], 0
        while i < len(data):
            n = max((n for n in range(1, len(data) - i + 1) if data[i: i + n] in by_bytes), default=0)
            if not n:
                return None
            out.append(by_bytes[data[i: i + n]])
            i += n
        return out


def covers(beam):
    return sorted((s.lm_state.context, s.node, s.weight) for s in beam.states)


def path_logprob(lm, ids) -> float:
    ctx = list(lm.initial_context)
    total = 0.0
    for t in ids:
        total += float(lm.logprobs(ctx)[t])
        ctx.append(t)
    return total


MOCK_TEXTS = [b"the apple of the day", b"and then the cat sat on it", b"a$b caf\xc3\xa9 \x80 ok"]


@pytest.mark.parametrize(("K", "threshold"), [(1, 0.0), (3, 0.05), (5, 0.1), (8, 0.0)])
async def test_planning_backend_and_plain_wrapper_keep_the_same_covers(K, threshold):
    direct = PrefetchingMock(seed=3)
    wrapped = Wrapper(PrefetchingMock(seed=3))
    assert direct.supports_prefetch and not wrapped.supports_prefetch
    params = BeamParams(K=K, prune_threshold=threshold, eos_tokens=(b"<eos>",))
    for text in MOCK_TEXTS:
        a = await (await ByteBeamState.initial(direct, params)).prefill(text)
        b = await (await ByteBeamState.initial(wrapped, params)).prefill(text)
        assert covers(a) == covers(b) and a.logZ == b.logZ
        assert a.logZ >= path_logprob(direct, direct.encode_bytes(text) or []) - 1e-6 or \
            direct.encode_bytes(text) is None
        assert (await a.logp_next()).ps.tolist() == (await b.logp_next()).ps.tolist()
    assert direct.n_prefetched > 0, "the planner should have computed ahead on the prefetching backend"
    assert await (await ByteBeamState.initial(direct, params)).greedy(b"the ", 12) == \
        await (await ByteBeamState.initial(wrapped, params)).greedy(b"the ", 12)
    assert await (await ByteBeamState.initial(direct, params)).sample(b"the ", 12, rng=5) == \
        await (await ByteBeamState.initial(wrapped, params)).sample(b"the ", 12, rng=5)


async def test_a_backend_may_declare_it_does_not_prefetch():
    class Quiet(PrefetchingMock):
        supports_prefetch = False

    lm = Quiet(seed=3)
    ref = await (await ByteBeamState.initial(PrefetchingMock(seed=3), BeamParams(K=3))).prefill(MOCK_TEXTS[0])
    beam = await (await ByteBeamState.initial(lm, BeamParams(K=3))).prefill(MOCK_TEXTS[0])
    assert lm.n_prefetched == 0 and covers(beam) == covers(ref)


async def test_without_a_tokenizer_the_anchor_is_the_fewest_token_path():
    lm = MockLM(seed=1)  # no tokenizer: the anchor is the fewest-token path
    assert lm.encode_bytes(b"the apple") is None
    path = lm.byte_vocab.encode(b"the apple")
    assert b"".join(lm.byte_vocab[t] for t in path) == b"the apple" and len(path) < len(b"the apple")
    for text in MOCK_TEXTS:
        ids = lm.byte_vocab.encode(text)
        beam = await (await ByteBeamState.initial(lm, BeamParams(K=1))).prefill(text)
        assert beam.logZ == pytest.approx(path_logprob(lm, ids), abs=1e-5)  # K=1 keeps the anchor alone
        wide = await (await ByteBeamState.initial(lm, BeamParams(K=4, prune_threshold=0.1))).prefill(text)
        assert wide.logZ >= path_logprob(lm, ids) - 1e-6


def test_the_vocabulary_carries_its_encoder():
    inner = PrefetchingMock(seed=0)
    wrapped = Wrapper(inner)
    assert wrapped.byte_vocab == inner.byte_vocab and isinstance(wrapped.byte_vocab, ByteVocabulary)
    text = b"the apple of the day"
    assert wrapped.encode_bytes(text) == inner.encode_bytes(text) == wrapped.byte_vocab.encode(text)
    assert Wrapper(MockLM(seed=0)).encode_bytes(text) is None  # no tokenizer anywhere: unknown
    plain = MockLM(list(inner.byte_vocab), seed=0)  # a plain list: no encoder travels with it
    assert plain.byte_vocab.encode(text) == plain.byte_vocab.fewest_tokens(text)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.binary(min_size=1, max_size=3).map(lambda b: bytes(97 + x % 3 for x in b)), min_size=1,
                max_size=10), st.binary(max_size=7).map(lambda b: bytes(97 + x % 3 for x in b)))
def test_fewest_tokens_against_brute_force(vocab, data):
    best = {0: ()}  # breadth-first over prefixes of data: fewest tokens to each
    frontier = [0]
    while frontier:
        nxt = []
        for i in frontier:
            for t, b in enumerate(vocab):
                if data.startswith(b, i) and i + len(b) not in best:
                    best[i + len(b)] = best[i] + (t,)
                    nxt.append(i + len(b))
        frontier = nxt
    got = ByteVocabulary(vocab).fewest_tokens(data)
    if len(data) not in best:
        assert got is None
    else:
        assert b"".join(vocab[t] for t in got) == data and len(got) == len(best[len(data)])
        assert got == ByteVocabulary(vocab).fewest_tokens(data)  # deterministic


# --------------------------------------------------------------------------- embedded model

PROMPTS = [b"Tonight", b"Phase 2:", b"Warning:", "Ce soir, à Paris".encode(), b"for i in range(10):"]
# Short slices of ../shared/bench/prose.txt and mixed.txt (copied: that folder may be absent).
TEXTS = [
    b"In 1905, Albert Einstein published four papers.",
    b"def fibonacci(n):\n    a, b = 0, 1\n",
    "| café crème  |  12 |\nNotes: 東京の倉庫 Привет! 🙂".encode(),
]
PROMPT_CONFIGS = [(K, thr) for K in (1, 3, 5) for thr in (0.0, 0.05, 0.1)]
TEXT_CONFIGS = [(1, 0.1), (3, 0.0), (5, 0.05)]


@pytest.fixture(scope="module")
def wrapped(embedded_lm):
    """A plain wrapper around the embedded model's backend: the same distributions (rows the
    backend computed in its prefill passes are served to the wrapper one by one)."""
    return Wrapper(embedded_lm)


async def canonical_logprob(lm, text: bytes) -> float:
    """log P(the tokenizer's encoding of ``text``) from one plain forward of the HF model."""
    ids = list(lm.initial_context) + lm.encode_bytes(text)
    with torch.inference_mode():
        logits = lm.model(torch.tensor([ids])).logits[0, :-1].float()
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(ids[1:])[:, None]).sum().item()


async def compare(direct, wrapped, text, configs):
    floor = await canonical_logprob(direct, text)
    for K, thr in configs:
        params = BeamParams(K=K, prune_threshold=thr)
        a = await (await ByteBeamState.initial(direct, params)).prefill(text)
        b = await (await ByteBeamState.initial(wrapped, params)).prefill(text)
        assert [(s.lm_state.context, s.node) for s in a.states] == [(s.lm_state.context, s.node) for s in b.states]
        assert b.logZ == pytest.approx(a.logZ, abs=1e-5, rel=1e-6), (text, K, thr)
        assert b.logZ >= floor - 1e-4 and a.logZ >= floor - 1e-4, (text, K, thr, floor)


@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
async def test_wrapper_and_backend_agree_on_prompts(embedded_lm, wrapped, prompt):
    await compare(embedded_lm, wrapped, prompt, PROMPT_CONFIGS)


@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
async def test_wrapper_and_backend_agree_on_texts(embedded_lm, wrapped, text):
    await compare(embedded_lm, wrapped, text, TEXT_CONFIGS)


@pytest.mark.slow
async def test_wrapper_and_backend_generate_the_same_bytes(embedded_lm, wrapped):
    params = BeamParams(K=5, prune_threshold=0.05)
    outs = [await (await ByteBeamState.initial(lm, params)).greedy(b"The capital of France is", 12)
            for lm in (embedded_lm, wrapped)]
    assert outs[0] == outs[1] and b"Paris" in outs[0]
    params = BeamParams(K=3, prune_threshold=0.05)
    outs = [await (await ByteBeamState.initial(lm, params)).sample(b"Once upon a time", 12, rng=0)
            for lm in (embedded_lm, wrapped)]
    assert outs[0] == outs[1]
    assert math.isfinite((await (await ByteBeamState.initial(wrapped, params)).prefill(outs[1])).logZ)
