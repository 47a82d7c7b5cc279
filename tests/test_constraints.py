"""Constraints (Regex, StringSet, Predicate, AllOf) and constrained sampling on byte states."""

import itertools
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import regex
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from genlm_bytes import EOS, BeamParams, ByteBeamState, MockLM
from genlm_bytes.constraints import (
    AllOf,
    ConstrainedState,
    ConstraintError,
    Predicate,
    Regex,
    StringSet,
)

TINY_VOCAB = [b"<eos>", b"a", b"b", b"c", b"ab", b"ba", b"abc", b"cc"]


async def exact_beam(vocab=TINY_VOCAB, seed=3, eos=True):
    lm = MockLM(vocab, seed=seed, eos_token_ids=[0] if eos else [])
    return await ByteBeamState.initial(lm, BeamParams(K=10_000, eos_tokens=(b"<eos>",) if eos else ()))


def allowed(mask) -> set:
    return {int(i) for i in np.nonzero(mask)[0]}


# --------------------------------------------------------------------------- Regex


def test_regex_phone_mask():
    c = Regex(r"[0-9]{3}-[0-9]{4}")
    assert allowed(c.mask(b"")) == set(b"0123456789")
    assert allowed(c.mask(b"555")) == {ord("-")}
    assert allowed(c.mask(b"555-123")) == set(b"0123456789")
    assert allowed(c.mask(b"555-1234")) == {EOS}
    assert allowed(c.mask(b"55x")) == set()  # a dead prefix allows nothing
    assert c.accepts(b"555-1234") and not c.accepts(b"555-123") and not c.accepts(b"5551234")


# Patterns whose matches over "abc" are all at most 4 characters long, so the oracle is finite.
# (Backreferences are not regular: `(a|b)\1?c?` and `(a)b\1?` are written out.)
BOUNDED = [r"(ab|c){1,2}", r"a[bc]?b", r"c*?a{0,2}b?", r"(a|ab)(c|bc)?", r"abc|ab|b", r"[^a]{2}",
           r"(a|aa|b|bb)c?", r"aba?"]


@settings(max_examples=60, deadline=None)
@given(st.sampled_from(BOUNDED), st.text(alphabet="abc", max_size=3))
def test_regex_mask_matches_enumeration(pattern, prefix):
    compiled = regex.compile(pattern)
    matches = {"".join(w) for n in range(5) for w in itertools.product("abc", repeat=n)
               if compiled.fullmatch("".join(w))}
    m = Regex(pattern).mask(prefix.encode())
    for ch in "abc":
        assert m[ord(ch)] == any(w.startswith(prefix + ch) for w in matches), (pattern, prefix, ch)
    assert m[EOS] == (prefix in matches)


def test_regex_utf8_characters():
    c = Regex(r"caf[ée]s?")
    assert allowed(c.mask(b"caf")) == {ord("e"), 0xC3}
    assert allowed(c.mask(b"caf\xc3")) == {0xA9}  # only é completes
    assert not c.is_complete(b"caf\xc3")  # no EOS inside a character
    assert allowed(c.mask("café".encode())) == {ord("s"), EOS}
    han = Regex("中文")
    assert allowed(han.mask(b"")) == {0xE4}
    assert allowed(han.mask(b"\xe4")) == {0xB8}
    assert allowed(han.mask(b"\xe4\xb8")) == {0xAD}
    esc = Regex(r"\u00e9|\N{GREEK SMALL LETTER ALPHA}")
    assert allowed(esc.mask(b"")) == {0xC3, 0xCE}


def test_regex_never_allows_invalid_utf8():
    c = Regex(r"(?s).*")
    root = c.mask(b"")
    assert not root[0x80:0xC2].any() and not root[0xF5:256].any()
    assert allowed(c.mask(b"\xed")) == set(range(0x80, 0xA0))  # no surrogates
    assert allowed(c.mask(b"\xf4")) == set(range(0x80, 0x90))  # nothing above U+10FFFF
    assert not c.mask(b"\xff").any()  # a prefix that is not UTF-8 allows nothing
    assert allowed(c.mask("né".encode()[:-1])) == set(range(0x80, 0xC0))  # inside a character: no EOS
    assert c.is_complete(b"a\xc3\xa9") and not c.mask(b"\xed\xa0").any()  # a surrogate half is dead
    assert not c.allows(b"\xe0", 0x80) and c.allows(b"\xf0", 0x9F)  # no overlong forms; 4-byte ones fine


@settings(max_examples=30, deadline=None)
@given(st.sampled_from([r"[^\"]{0,6}", r"(?s).{0,4}", r"[à-ÿ]+x", r"\w{1,3}", r"[α-ω ]{2,5}"]),
       st.randoms(use_true_random=False))
def test_regex_random_walk_has_no_dead_ends_and_ends_on_matches(pattern, rnd):
    c = Regex(pattern)
    text = b""
    for _ in range(14):
        m = c.mask(text)
        assert m.any(), (pattern, text)  # every allowed byte had a witness completion
        if m[EOS]:
            assert regex.fullmatch(pattern, text.decode("utf-8"))
        sym = rnd.choice(sorted(allowed(m)))
        if sym == EOS:
            break
        text += bytes([sym])


def test_regex_bytes_pattern_is_exact_over_raw_bytes():
    c = Regex(rb"\xff[\x00-\x10]+")
    assert allowed(c.mask(b"")) == {0xFF}
    assert allowed(c.mask(b"\xff")) == set(range(0x11))
    assert allowed(c.mask(b"\xff\x05")) == set(range(0x11)) | {EOS}


def test_regex_bad_input():
    with pytest.raises(ValueError, match=r"invalid regular expression '\[a-'"):
        Regex("[a-")
    with pytest.raises(ValueError, match="invalid regular expression"):
        Regex("a{2,1}")
    with pytest.raises(TypeError, match="pattern must be"):
        Regex(42)
    with pytest.raises(TypeError, match="bytes, not str"):
        Regex("a").mask("a")
    with pytest.raises(ValueError, match="flags"):
        Regex(regex.compile("a"), flags=regex.I)


def test_masks_are_cached_and_read_only():
    c = Regex(r"[ab]+")
    m1, m2 = c.mask(b"a"), c.mask(b"a")
    assert m1 is m2 and m1.shape == (258,) and m1.dtype == bool
    with pytest.raises(ValueError):
        m1[0] = True
    assert not m1[256]  # EOT never allowed


# --------------------------------------------------------------------------- StringSet, Predicate, AllOf


def test_string_set():
    c = StringSet(["yes", "no", b"not sure", "né"])
    assert allowed(c.mask(b"")) == set(b"yn")
    assert allowed(c.mask(b"no")) == {ord("t"), EOS} and allowed(c.mask(b"not")) == {ord(" ")}
    assert allowed(c.mask(b"n")) == {ord("o"), 0xC3}
    assert allowed(c.mask(b"maybe")) == set()
    assert c.accepts(b"not sure") and not c.accepts(b"not")
    assert StringSet([""]).is_complete(b"")
    with pytest.raises(ValueError, match="at least one"):
        StringSet([])
    with pytest.raises(TypeError, match="not one string"):
        StringSet("yes")
    with pytest.raises(TypeError, match="bytes or str"):
        StringSet(["a", 3])


def test_predicate_and_intersection():
    digits = Predicate(lambda t: t.isdigit() or t == b"", complete=lambda t: len(t) >= 2)
    assert allowed(digits.mask(b"")) == set(b"0123456789")
    assert allowed(digits.mask(b"12")) == set(b"0123456789") | {EOS}
    short = Predicate(lambda t: len(t) <= 3)
    both = digits & short
    assert isinstance(both, AllOf) and len((both & Regex("[0-5]*")).parts) == 3
    assert allowed(both.mask(b"123")) == {EOS}
    assert allowed((both & Regex("[0-5]*")).mask(b"1")) == set(b"012345")
    alpha = Predicate(lambda t: True, alphabet=b"ab")
    assert allowed(alpha.mask(b"")) == set(b"ab") | {EOS}
    with pytest.raises(TypeError, match="prefix_ok"):
        Predicate("not callable")
    with pytest.raises(ValueError, match="alphabet"):
        Predicate(lambda t: True, alphabet=[300])
    with pytest.raises(TypeError, match="AllOf takes"):
        AllOf([digits, "x"])


# --------------------------------------------------------------------------- ConstrainedState


async def test_masked_distribution_is_renormalized_and_state_immutable():
    beam = await exact_beam()
    cs = ConstrainedState(beam, Regex(r"(ab|c)+"))
    p = (await beam.logp_next()).probs()
    q = (await cs.logp_next()).probs()
    m = cs.mask()
    assert q.sum() == pytest.approx(1.0) and (q[~m] == 0).all()
    np.testing.assert_allclose(q[m], p[m] / p[m].sum())
    _, log_kept = await cs.masked_logp_next()
    assert log_kept == pytest.approx(math.log(p[m].sum()))
    nxt = await (cs << ord("a"))
    assert cs.text == b"" and nxt.text == b"a" and allowed(nxt.mask()) == {ord("b")}
    with pytest.raises(ConstraintError, match="does not allow b'a'"):
        await (nxt << ord("a"))
    ended = await ((await (nxt << ord("b"))) << EOS)
    assert ended.ended and ended.finished and ended.text == b"ab"


async def test_constrained_greedy_and_sample_satisfy_the_constraint():
    beam = await ByteBeamState.initial(MockLM(seed=0), BeamParams(K=5, prune_threshold=0.01,
                                                                  eos_tokens=(b"<eos>",)))
    cs = ConstrainedState(beam, Regex(r"[0-9]{3}-[0-9]{4}"))
    assert cs.has_eos
    for seed in range(4):
        out = await cs.sample(b"", 20, rng=seed)
        assert regex.fullmatch(r"[0-9]{3}-[0-9]{4}", out.decode())
    assert await cs.sample(b"", 20, rng=1) == await cs.sample(b"", 20, rng=1)
    g = await cs.greedy(b"12", 20)
    assert g.startswith(b"12") and regex.fullmatch(r"[0-9]{3}-[0-9]{4}", g.decode())
    # greedy takes the argmax of the masked distribution at each step
    first = (await cs.logp_next()).argmax()
    assert (await cs.greedy(b"", 1)) == bytes([first])
    streamed = []
    state, out = await cs.generate(20, rng=0, stream=streamed.append, temperature=0.5, top_k=3)
    assert state.ended and bytes(streamed) == out and cs.constraint.accepts(out)
    cut, part = await cs.generate(3, rng=0)
    assert len(part) == 3 and not cut.finished  # the step limit


async def test_no_eos_model_ends_when_the_constraint_is_complete_and_closed():
    beam = await exact_beam(eos=False)
    cs = ConstrainedState(beam, StringSet(["ab", "abc", "cc"]))
    assert not cs.has_eos
    for seed in range(5):
        state, out = await cs.generate(50, rng=seed)
        assert state.finished and out in (b"abc", b"cc")  # "ab" can still grow, so it never ends
    state, out = await ConstrainedState(beam, Regex("[abc]+")).generate(6, rng=0)
    assert len(out) == 6 and not state.finished  # never closed: the step limit ends it


async def test_errors_instead_of_loops(mock_lm):
    beam = await ByteBeamState.initial(mock_lm, BeamParams(K=3, eos_tokens=(b"<eos>",)))
    for impossible in (Regex("[a&&b]"), Predicate(lambda t: False)):  # an empty class: no text matches
        with pytest.raises(ConstraintError, match="cannot be satisfied by any text"):
            await ConstrainedState(beam, impossible).sample(b"", 10, rng=0)
    dead_after_a = Predicate(lambda t: t in (b"", b"a"), complete=lambda t: False)  # "a" leads nowhere
    with pytest.raises(ConstraintError, match="no continuation can satisfy it"):
        await ConstrainedState(beam, dead_after_a).sample(b"", 10, rng=0)
    with pytest.raises(ConstraintError, match="does not allow"):
        await ConstrainedState(beam, Regex("[0-9]+")).sample(b"x", 10, rng=0)
    tiny = await exact_beam()  # the tiny vocabulary has no "z"
    with pytest.raises(ConstraintError, match="probability 0 to every symbol the constraint allows"):
        await ConstrainedState(tiny, Regex("z+")).sample(b"", 5, rng=0)
    with pytest.raises(ValueError, match="steps"):
        await ConstrainedState(beam, Regex("a")).sample(b"", -1)
    with pytest.raises(TypeError, match="Constraint"):
        ConstrainedState(beam, "[0-9]+")
    with pytest.raises(TypeError, match="StatefulByteLM"):
        ConstrainedState(mock_lm, Regex("a"))


async def test_local_sampler_frequencies_match_its_exact_distribution():
    beam = await exact_beam()
    c = StringSet(["a", "ab", "abc", "c", "cab", "ba", "bb"])
    cs = ConstrainedState(beam, c)
    exact = {}

    async def walk(state, x, logq):
        q = (await state.logp_next()).ps
        if q[EOS] > -math.inf:
            exact[x] = math.exp(logq + q[EOS])
        for a in np.nonzero(np.isfinite(q[:256]))[0]:
            await walk(await (state << int(a)), x + bytes([int(a)]), logq + q[a])

    await walk(cs, b"", 0.0)
    assert sum(exact.values()) == pytest.approx(1.0)
    n = 300
    draws = [await cs.sample(b"", 10, rng=s) for s in range(n)]
    keys = sorted(exact)
    observed = [sum(d == k for d in draws) for k in keys]
    assert sum(observed) == n
    p = stats.chisquare(observed, [exact[k] * n for k in keys]).pvalue
    assert p > 1e-3, (dict(zip(keys, observed)), exact)


# --------------------------------------------------------------------------- embedded model


@pytest.fixture(scope="module")
def eos_params(embedded_lm):
    return BeamParams(K=5, prune_threshold=0.05,
                      eos_tokens=tuple(embedded_lm.byte_vocab[t] for t in embedded_lm.eos_token_ids))


@pytest.mark.slow
async def test_embedded_phone_number(embedded_lm, eos_params):
    beam = await (await ByteBeamState.initial(embedded_lm, eos_params)).prefill(b"Call me at ")
    cs = ConstrainedState(beam, Regex(r"[0-9]{3}-[0-9]{4}"))
    out = await cs.sample(b"", 20, rng=0)
    assert regex.fullmatch(r"[0-9]{3}-[0-9]{4}", out.decode()), out


@pytest.mark.slow
async def test_embedded_json(embedded_lm, eos_params):
    beam = await (await ByteBeamState.initial(embedded_lm, eos_params)).prefill(
        b"A JSON record of a person: ")
    pattern = r'\{"name": "[A-Za-z ]+"\}'
    state, out = await ConstrainedState(beam, Regex(pattern)).generate(40, greedy=True)
    assert state.finished, out
    assert regex.fullmatch(pattern, out.decode()) and isinstance(json.loads(out)["name"], str)


# --------------------------------------------------------------------------- CLI


def start(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONIOENCODING="utf-8")
    return subprocess.Popen([sys.executable, "-m", "genlm_bytes", "generate", *args], env=env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def finish(proc, timeout=240):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out.decode("utf-8"), err.decode("utf-8", "backslashreplace")


CLI_BAD_INPUT = {
    ("Hi", "--regex", "[a-"): "--regex: invalid regular expression '[a-'",
    ("Hi", "--regex", "a", "--smc", "0"): "argument --smc: must be an integer >= 1, got 0",
    ("Hi", "--smc", "3"): "--smc needs --regex",
    ("Hi", "--regex", "a", "--smc", "2", "--temperature", "0.5"): "--smc cannot be combined with --temperature",
}


def test_cli_bad_input_fails_before_the_model_loads(monkeypatch, capsys):
    import genlm_bytes.cli.main as cli_main
    import genlm_bytes.cli.session as cli_session

    def no_load(args, model=None):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(cli_session, "load_lm", no_load)
    for args, message in CLI_BAD_INPUT.items():
        assert cli_main.main(["generate", *args]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    # the same, as a user runs it (two of them: each subprocess imports torch)
    procs = {args: start(*args, "--model", "/nonexistent-model-folder") for args in list(CLI_BAD_INPUT)[:2]}
    for args, proc in procs.items():
        code, out, err = finish(proc, timeout=120)
        assert code == 2 and CLI_BAD_INPUT[args] in err and out == "", (args, err)
        assert "Traceback" not in err and "nonexistent" not in err  # rejected before loading


@pytest.mark.slow
def test_cli_regex_and_smc_on_the_embedded_model(embedded_lm, monkeypatch, capsys):
    import genlm_bytes.cli.main as cli_main
    import genlm_bytes.cli.session as cli_session

    # One run as a user makes it (loads its own model) while the others run in-process.
    phone = start("Call me at ", "--regex", "[0-9]{3}-[0-9]{4}", "--smc", "2", "--seed", "0", "--max-bytes", "12")
    monkeypatch.setattr(cli_session, "load_lm", lambda args, model=None: embedded_lm)
    pattern = r'\{"name": "[A-Za-z ]+"\}'
    assert cli_main.main(["generate", "A JSON record of a person: ", "--regex", pattern, "--greedy",
                          "--max-bytes", "40"]) == 0
    out, err = capsys.readouterr()
    assert regex.fullmatch(pattern, out) and json.loads(out)["name"], (out, err)
    assert "stopped by EOS" in err
    assert cli_main.main(["generate", "Hi", "--regex", "[a&&b]"]) == 1
    err = capsys.readouterr().err
    assert "cannot be satisfied by any text" in err and "Traceback" not in err, err
    code, out, err = finish(phone)
    assert code == 0 and regex.fullmatch(r"[0-9]{3}-[0-9]{4}", out), (out, err)
    assert "stopped by EOS; 2 particles" in err and "log P(match)" in err


async def test_a_byte_the_pruned_beam_lost_is_found_by_stepping():
    # K=1: after "bc" the one cover sits where the next "b" has probability 0; stepping heals it.
    lm = MockLM([b"<eos>", b"a", b"b", b"c", b"ab", b"ba", b"abc", b"cc", b"bca", b"cab"], seed=0,
                eos_token_ids=[0])
    beam = await ByteBeamState.initial(lm, BeamParams(K=1, eos_tokens=(b"<eos>",)))
    for b in b"bc":
        beam = (await (beam.prune() << b)).prune()
    assert (await beam.logp_next())[ord("b")] == -math.inf
    healed = await (beam << ord("b"))
    cs = ConstrainedState(beam, StringSet(["b", "bc"]))
    logp, log_kept = await cs.masked_logp_next()
    assert logp[ord("b")] == log_kept and log_kept == pytest.approx(healed.logZ - beam.logZ) and log_kept > -math.inf
    assert (await cs.logp_next()).probs()[ord("b")] == pytest.approx(1.0)
    nxt = await (cs << ord("b"))
    assert nxt.text == b"b" and nxt.state.logZ == pytest.approx(healed.logZ)
