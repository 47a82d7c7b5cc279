"""TokenByteTrie: structure, sparse node masses against brute force, batching, dist helpers."""

import asyncio
import math
import re

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from genlm_bytes import AsyncTokenByteTrie, Chart, LazyByteProbs, TokenByteTrie
from genlm_bytes.symbols import EOS, symbol_name


def brute_masses(trie, vocab, p, eos):
    """Mass of each node = sum of p over non-EOS tokens whose bytes start with the node's path."""
    out = np.zeros(trie.n_nodes + 1)
    for n in range(trie.n_nodes):
        path = trie.path(n)
        out[n] = sum(p[t] for t, b in enumerate(vocab) if b and b.startswith(path) and t not in eos)
    out[trie.eos_node] = sum(p[t] for t in eos)
    return out


def brute_max(trie, vocab, p, eos):
    out = np.zeros(trie.n_nodes + 1)
    for n in range(trie.n_nodes):
        path = trie.path(n)
        vals = [p[t] for t, b in enumerate(vocab) if b and b.startswith(path) and t not in eos]
        out[n] = max(vals, default=0.0)
    out[trie.eos_node] = max((p[t] for t in eos), default=0.0)
    return out


vocabs = st.lists(st.binary(min_size=0, max_size=4).map(lambda b: bytes(97 + x % 3 for x in b)),
                  min_size=1, max_size=25)


@settings(max_examples=60, deadline=None)
@given(vocabs, st.integers(0, 2**31 - 1), st.booleans())
def test_weight_sum_and_max_match_brute_force(vocab, seed, with_eos):
    vocab = vocab + [b"<e>"] if with_eos else vocab
    eos_tokens = (b"<e>",) if with_eos else ()
    trie = TokenByteTrie(vocab, eos_tokens=eos_tokens)
    eos = set(trie.eos_ids.tolist())
    rng = np.random.default_rng(seed)
    P = rng.dirichlet(np.ones(len(vocab)), size=3)
    sums = trie.batch_weight_sum(torch.from_numpy(P)).numpy()
    maxes = trie.batch_weight_max(torch.from_numpy(P)).numpy()
    for b in range(3):
        np.testing.assert_allclose(sums[b], brute_masses(trie, vocab, P[b], eos), atol=1e-12)
        np.testing.assert_allclose(maxes[b], brute_max(trie, vocab, P[b], eos), atol=1e-12)
    np.testing.assert_allclose(trie.weight_sum(P[0]).numpy(), sums[0], atol=1e-12)
    # Structure: every non-empty token ends at the node of its bytes; ranges nest.
    for t, b in enumerate(vocab):
        if b:
            node = trie.walk(b)
            assert node >= 0 and t in trie.end_tokens(node).tolist()
            assert trie.path(node) == b
    for n in range(1, trie.n_nodes):
        par = trie.parent[n]
        assert trie.lo[par] <= trie.lo[n] < trie.hi[n] <= trie.hi[par]


def test_duplicates_and_empty_tokens():
    vocab = [b"a", b"", b"a", b"ab"]
    trie = TokenByteTrie(vocab)
    assert sorted(trie.end_tokens(trie.walk(b"a")).tolist()) == [0, 2]
    assert 1 not in trie.order.tolist()  # the empty token is in no node
    p = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=torch.float64)
    assert trie.weight_sum(p)[0].item() == pytest.approx(0.5)
    assert trie.child(0, ord("z")) == -1 and trie.walk(b"abc") == -1


def test_bad_input():
    with pytest.raises(TypeError, match="byte string"):
        TokenByteTrie(["a", "b"])
    with pytest.raises(ValueError, match="not in the vocabulary"):
        TokenByteTrie([b"a"], eos_tokens=(b"</s>",))
    with pytest.raises(TypeError):
        TokenByteTrie([b"a"], eos_tokens=b"a")
    trie = TokenByteTrie([b"a", b"b"])
    with pytest.raises(ValueError, match="last dimension"):
        trie.weight_sum(torch.ones(3))


async def test_async_trie_batches_concurrent_requests():
    vocab = [bytes([97 + i % 5]) * (1 + i % 3) for i in range(15)]
    vocab = list(dict.fromkeys(vocab))
    atrie = AsyncTokenByteTrie.from_vocab(vocab)
    rng = np.random.default_rng(0)
    P = torch.from_numpy(rng.dirichlet(np.ones(len(vocab)), size=20))
    outs = await asyncio.gather(*(atrie.weight_sum(p) for p in P))
    expected = atrie.trie.batch_weight_sum(P)
    torch.testing.assert_close(torch.stack(outs), expected)
    assert atrie._sum.n_batches < 20
    mx = await atrie.weight_max(P[0])
    torch.testing.assert_close(mx, atrie.trie.weight_max(P[0]))


def test_lazy_byte_probs_and_chart():
    ps = np.full(258, -np.inf)
    ps[ord("d")] = np.log(0.6)
    ps[ord("\n")] = np.log(0.3)
    ps[EOS] = np.log(0.1)
    calls = []

    def compute():
        calls.append(1)
        return ps

    lazy = LazyByteProbs(compute)
    assert not calls
    assert lazy[b"d"] == pytest.approx(np.log(0.6))
    assert lazy[EOS] == pytest.approx(np.log(0.1))
    assert len(calls) == 1
    assert lazy.top(2) == [(ord("d"), pytest.approx(0.6)), (ord("\n"), pytest.approx(0.3))]
    assert repr(lazy.pretty().top(1)) == "Chart({b'd': 0.6})"
    assert set(lazy.materialize()) == {ord("d"), ord("\n"), EOS}
    assert lazy.argmax() == ord("d")
    assert symbol_name(EOS) == "EOS" and symbol_name(10) == "b'\\n'"
    assert Chart({"a": 1.0, "b": 3.0}).normalize()["b"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="258"):
        LazyByteProbs(np.zeros(10))
    with pytest.raises(ValueError, match="outside"):
        lazy[999]


@pytest.mark.parametrize("prepared", ["lazy", "one", "batch"])
def test_context_dist_masses_match_brute_force(prepared):
    """ContextDist range sums (lazy direct sums, block sums, children in one pass) against
    float64 sums token by token, in text and generation mode, with an EOS token carrying almost
    all the mass (removing it must not cancel the precision of what is left)."""
    from genlm_bytes.byte_lm.trie_state import BLOCK, TrieSpace

    rng = np.random.default_rng(0)
    vocab = sorted({bytes(rng.integers(97, 105, size=rng.integers(1, 7))) for _ in range(6000)})
    vocab += [b"<e>", b"<f>", b"a<e>"]
    eos = {len(vocab) - 3, len(vocab) - 2}
    trie = TokenByteTrie(vocab)
    space = TrieSpace(trie, eos_ids=eos)
    assert len(vocab) > 8 * BLOCK
    logits = rng.normal(size=(2, len(vocab))) * 3
    logits[1, len(vocab) - 3] = 40.0  # EOS: all but ~1e-15 of the mass
    lps = [torch.log_softmax(torch.tensor(x, dtype=torch.float32), 0) for x in logits]
    if prepared == "batch":
        dists = space.dists_for(lps)
    else:
        dists = [space.dist_for(lp) for lp in lps]
        if prepared == "one":
            for d in dists:
                d.prepare()
    for d, lp in zip(dists, lps):
        p = np.exp(lp.numpy().astype(np.float64))
        p_gen = p.copy()
        p_gen[sorted(eos)] = 0.0
        nodes = [0, *range(1, 8), *rng.choice(np.arange(8, trie.n_nodes), 400, replace=False).tolist()]
        for node in nodes:
            lo, hi = int(trie.lo[node]), int(trie.hi[node])
            toks = trie.order[lo:hi]
            for text in (True, False):
                want = math.fsum((p if text else p_gen)[toks])
                got = d.mass(lo, hi, text)
                assert got == pytest.approx(want, rel=1e-5, abs=1e-300), (node, text)
            k0, k1 = trie.kid_start[node], trie.kid_start[node + 1]
            if k1 > k0:
                kids = trie.kids[k0:k1]
                for text in (True, False):
                    got = d.masses(trie.lo[kids], trie.hi[kids], text)
                    want = [d.mass(int(a), int(b), text) for a, b in zip(trie.lo[kids], trie.hi[kids])]
                    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_a_large_vocabularys_distributions_are_prepared_on_threads_alike(monkeypatch):
    """``TrieSpace.dists_for`` prepares a large vocabulary's distributions on a few threads: the
    same probabilities and block sums, bit for bit, as one at a time; repeated rows once."""
    import threading

    from genlm_bytes.byte_lm import trie_state
    from genlm_bytes.byte_lm.trie_state import TrieSpace

    rng = np.random.default_rng(1)
    vocab = sorted({bytes(rng.integers(97, 105, size=rng.integers(1, 7))) for _ in range(3000)})
    trie = TokenByteTrie(vocab)
    lps = [torch.log_softmax(torch.tensor(rng.normal(size=len(vocab)) * 3, dtype=torch.float32), 0)
           for _ in range(6)]
    threads = set()
    prepare = trie_state.ContextDist.prepare

    def spy(self):
        threads.add(threading.current_thread().name)
        prepare(self)

    monkeypatch.setattr(trie_state.ContextDist, "prepare", spy)
    serial = TrieSpace(trie).dists_for(lps)
    assert all(name == threading.current_thread().name for name in threads)
    monkeypatch.setattr(trie_state, "POOL_VOCAB", 1)
    pooled = TrieSpace(trie).dists_for(lps + lps[:2])
    assert any(name.startswith("genlm-prepare") for name in threads)
    assert pooled[6] is pooled[0] and len(pooled) == 8
    for a, b in zip(serial, pooled):
        assert np.array_equal(a._p, b._p) and np.array_equal(a._bs, b._bs)


CUDA_COUNT = torch.cuda.device_count() if torch.cuda.is_available() else 0


@pytest.mark.parametrize("device", [
    "gpu", "CUDA", "", "cuda:-1", "cuda:x", "meta", "xla",  # not a device name, or not one the trie runs on
    f"cuda:{CUDA_COUNT + 8}", torch.device("cuda", CUDA_COUNT + 8),  # a CUDA device this machine lacks
    *(["cuda", torch.device("cuda")] if CUDA_COUNT == 0 else []),
    0, 1.5, ["cpu"], b"cpu", True,  # not a string or torch.device
])
def test_invalid_device_raises_value_error_naming_it(device):
    with pytest.raises(ValueError, match=re.escape(f"device={device!r}")):
        TokenByteTrie([b"a", b"b"], device=device)
    with pytest.raises(ValueError, match="device="):
        AsyncTokenByteTrie.from_vocab([b"a", b"b"], device=device)


def test_valid_devices_and_async_trie_type_check():
    for device in (None, "cpu", torch.device("cpu"), "cpu:0"):
        trie = TokenByteTrie([b"a", b"ab"], device=device)
        assert trie.device.type == "cpu"
        torch.testing.assert_close(trie.weight_sum(torch.tensor([0.25, 0.75])),
                                   torch.tensor([1.0, 1.0, 0.75, 0.0], dtype=torch.float64))
    with pytest.raises(TypeError, match="TokenByteTrie"):
        AsyncTokenByteTrie([b"a", b"b"])


@pytest.mark.skipif(CUDA_COUNT == 0, reason="needs a CUDA device")
def test_cuda_trie_matches_cpu():
    vocab = [b"a", b"ab", b"b", b"ba"]
    p = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    cpu, gpu = TokenByteTrie(vocab), TokenByteTrie(vocab, device="cuda")
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.weight_sum(p).cpu(), cpu.weight_sum(p))
    torch.testing.assert_close(gpu.weight_max(p).cpu(), cpu.weight_max(p))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_prepared_probabilities_are_the_lazy_ones_bit_for_bit(dtype):
    """``ContextDist.prepare`` (a float32 row copied, then gathered into byte order) stores the
    very floats the unprepared path computes, with zeros past the last sorted token, whatever
    thread prepares it; a vocabulary with empty tokens (not in the trie) sorts fewer tokens
    than it has."""
    import concurrent.futures

    from genlm_bytes.byte_lm.trie_state import BLOCK, TrieSpace

    rng = np.random.default_rng(3)
    vocab = sorted({bytes(rng.integers(97, 103, size=rng.integers(1, 6))) for _ in range(3000)}) + [b"", b""]
    space = TrieSpace(TokenByteTrie(vocab))
    assert space.n_sorted == len(vocab) - 2 and space.n_sorted % BLOCK
    rows = [torch.log_softmax(torch.tensor(rng.normal(size=len(vocab)) * 4, dtype=dtype), 0) for _ in range(4)]
    lazy = [space.dist_for(lp)._p32(slice(0, space.n_sorted)).copy() for lp in rows]
    dists = [space.dist_for(lp) for lp in rows]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # (each thread its own scratch rows)
        list(pool.map(lambda d: d.prepare(), dists[:2]))
    for d in dists[2:]:
        d.prepare()
    for d, want in zip(dists, lazy):
        assert d._p.dtype == np.float32 and len(d._p) == space.n_blocks * BLOCK
        assert np.array_equal(d._p[: space.n_sorted], want)
        assert not d._p[space.n_sorted:].any()
        assert np.array_equal(d._bs, d._p.reshape(-1, BLOCK).sum(axis=1, dtype=np.float64))
    # (The gather skips numpy's bounds check: a row too short for the vocabulary is refused first.)
    short = space.dist_for(rows[0][: space.min_row - 1].clone())
    with pytest.raises(ValueError, match="distribution of"):
        short.prepare()
