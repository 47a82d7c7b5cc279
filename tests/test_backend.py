"""The LM backend layer: batched, cached and KV-reused results equal a plain forward; bad input;
a failing forward; the cache's memory budget; what a user-written AsyncLM gets for free.

Oracle for the embedded model: ``log_softmax(hf_model(torch.tensor([ids])).logits[0, -1])``, one
uncached forward per context, compared within 1e-4. The exactness tests run on a float64 copy of
the embedded model: there a correct batched/cached path agrees with the plain forward to ~1e-6
(the log-softmax is float32 either way), so 1e-4 has a wide margin, while a wrong mask, position
or past is off by far more. In float32, legitimate paths differ from a plain forward by up to
~1.1e-4 (measured: a one-token context computed inside a longer pass), so the float32 checks
use 2e-4.
"""

from __future__ import annotations

import asyncio
import copy
import math
import random
import re
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from genlm_bytes import AsyncLM, BeamParams, ByteBeamState, MockLM
from genlm_bytes.batching import Batcher
from genlm_bytes.lm.hf import EngineConfig
from genlm_bytes.lm.prefix_cache import _KV, _LOGP, KVBlock, KVRef, PrefixCache

TOL = 1e-4  # float64 model vs its plain forward
TOL32 = 2e-4  # float32 model vs its plain forward
TEXT = "The quick brown fox jumps over the lazy dog. In 1905, Albert Einstein published four papers."


# --------------------------------------------------------------------------- helpers


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """(see conftest)"""



@torch.inference_mode()
def uncached(hf_model, ids) -> torch.Tensor:
    """Log-probs ``(V,)`` after ``ids`` from one plain forward pass (no cache, no batching)."""
    return torch.log_softmax(hf_model(torch.tensor([list(ids)])).logits[0, -1].float(), dim=-1)


def assert_close_to_uncached(hf_model, ids, logp: torch.Tensor, tol: float = TOL) -> None:
    diff = (logp - uncached(hf_model, ids)).abs().max().item()
    assert diff <= tol, f"context of {len(ids)} tokens differs from a plain forward by {diff:.2e}"


def transformer(embedded_lm, hf_model=None, **kwargs):
    """A fresh AsyncTransformer on the embedded model's weights, or on ``hf_model`` (a copy of them),
    with its own cache, batcher and counters; without look-ahead passes unless asked (they run in
    the background, and the tests here count the passes and tokens their requests cause)."""
    from genlm_bytes.lm.hf import AsyncTransformer

    kwargs.setdefault("lookahead", False)
    return AsyncTransformer(embedded_lm.model if hf_model is None else hf_model, embedded_lm.tokenizer,
                            byte_vocab=embedded_lm.byte_vocab, initial_context=embedded_lm.initial_context,
                            eos_token_ids=embedded_lm.eos_token_ids, **kwargs)


@pytest.fixture(scope="module")
def hf64(embedded_hf):
    """A float64 copy of the embedded model (about 1 GB, this module only)."""
    return copy.deepcopy(embedded_hf[0]).to(torch.float64).eval()


def _attached(cache: PrefixCache, node) -> bool:
    key = cache._key_of(node)
    path = cache.walk(key)
    return len(path) == len(key) and (not key or path[-1] is node)


def assert_cache_consistent(cache: PrefixCache) -> None:
    """Bookkeeping of a PrefixCache: every payload reachable, charged once, and within budget."""
    with cache.lock:
        assert cache.nbytes <= cache.budget_bytes, (cache.nbytes, cache.budget_bytes)
        blocks: dict[int, tuple[KVBlock, int]] = {}
        logp_bytes = 0
        for node, slot in cache._lru:
            assert _attached(cache, node), f"a cached payload at {cache._key_of(node)} is unreachable"
            if slot == _LOGP:
                assert node.logp is not None, "an LRU slot of log-probs the node does not hold"
                logp_bytes += node.logp.numel() * node.logp.element_size()
                assert cache._by_key.get(cache._key_of(node)) is node
            else:
                assert slot == _KV and node.kv is not None, "an LRU slot of a past the node does not hold"
                assert node.kv.depth == node.depth, "a node's past is not as long as its prefix"
                ref = node.kv
                while ref is not None:  # every segment of the chain lies inside its block
                    assert ref.start + ref.length <= ref.block.keys[0].shape[2], "KV ref past its block's end"
                    assert ref.block.filled is None or ref.start + ref.length <= ref.block.filled, \
                        "KV ref into an arena's unwritten slots"
                    assert ref.prev is None or ref.prev.depth == ref.depth - ref.length
                    blk, n = blocks.get(id(ref.block), (ref.block, 0))
                    blocks[id(ref.block)] = (blk, n + 1)
                    ref = ref.prev
        for blk, n in blocks.values():
            assert blk.refs == n, "a block's reference count disagrees with the chains holding it"
        assert cache.nbytes == logp_bytes + sum(b.nbytes for b, _ in blocks.values())
        for key, node in cache._by_key.items():
            assert node.logp is not None and (node, _LOGP) in cache._lru and cache._key_of(node) == key
        # Nothing outside the LRU holds a payload.
        stack = [cache.root]
        while stack:
            node = stack.pop()
            if node is not cache.root:
                assert node.logp is None or (node, _LOGP) in cache._lru
                assert node.kv is None or (node, _KV) in cache._lru
            stack.extend(node.children.values())


# --------------------------------------------------------------------------- exactness (embedded)


@pytest.mark.slow
async def test_single_requests_and_kv_reuse_match_uncached_forward(embedded_lm, embedded_hf, hf64):
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT)
    for n in (1, 2, 9, len(ids) - 3):  # each extends the cached past of the one before
        before = lm.n_forward_tokens
        logp = await lm.next_token_logprobs(ids[:n])
        assert_close_to_uncached(hf_model, ids[:n], logp)
        assert logp.shape == (lm.vocab_size,) and logp.dtype == torch.float32
    assert lm.n_forward_tokens - before == (len(ids) - 3) - 9, "only the new tokens should run"
    # Every cached prefix was kept: asking again runs nothing and gives the same tensor.
    again = await lm.next_token_logprobs(ids[:9])
    assert again is lm.cache.get_logp(tuple(ids[:9]))
    assert lm.n_forward_tokens - before == (len(ids) - 3) - 9


@pytest.mark.slow
async def test_ragged_batch_of_different_pasts_and_duplicates_matches_uncached(embedded_lm, embedded_hf, hf64):
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    other = tok.encode("Stock markets rose on Tuesday.")  # shares no first token with ids
    assert len(ids) - 30 > 12 and other[0] != ids[0]
    for n in (3, 12, len(ids) - 30):  # cached pasts of very different lengths
        await lm.next_token_logprobs(ids[:n])
    batches, forwards = lm.batcher.n_batches, lm.n_forward_tokens
    contexts = [
        ids[:3] + [tok.encode(" cat")[0]],  # past 3, one new token
        ids[:12] + other,  # past 12, several new tokens
        ids,  # past len-30, 30 new tokens
        other,  # no cached past at all
        [5],  # a single token
        ids[:12] + other,  # duplicate of the second
        ids,  # duplicate of the third
    ]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
    assert lm.batcher.n_batches - batches == 1, "one ragged forward for the whole batch"
    assert lm.n_forward_tokens - forwards == 1 + len(other) + 30 + len(other) + 1
    for ctx, row in zip(contexts, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    assert torch.equal(rows[1], rows[5]) and torch.equal(rows[2], rows[6])
    batched = await lm.batch_next_token_logprobs(contexts)  # all cached now: same values, (B, V)
    assert batched.shape == (len(contexts), lm.vocab_size)
    assert torch.equal(batched, torch.stack(rows))
    # A second ragged batch extends rows of the first, whose pasts now sit left-padded (at an
    # offset) in that pass's keys/values; two new contexts extend one another.
    forwards = lm.n_forward_tokens
    second = [contexts[0] + [11], contexts[3] + [12], [5, 13], contexts[1] + [14], contexts[1] + [14, 15]]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in second))
    assert lm.n_forward_tokens - forwards == 1 + 1 + 1 + 1 + 2
    for ctx, row in zip(second, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_ragged_tree_pass_of_rows_with_their_own_branches_matches_uncached(embedded_lm, embedded_hf, hf64):
    """``PassRunner.tree_rows``: rows on pasts of different lengths (one with none), each a path with
    branches off its own past and path tokens and a chain with a sub-branch, in one pass; every
    context is exact, its KV can be extended, and the row of each path is held for its requester."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT)
    other = tok.encode("Stock markets rose on Tuesday.")
    await lm.next_token_logprobs(ids[:4])
    await lm.next_token_logprobs(ids[:15])
    cache, runner = lm.cache, lm.runner
    P4, ref4 = cache.deepest_kv(tuple(ids[:5]), 4)
    P15, ref15 = cache.deepest_kv(tuple(ids[:17]), 15)
    assert (P4, P15) == (4, 15)
    rows = [
        (tuple(ids[:5]), ref4, 4, [(4, (501,), ()), (4, (502,), ())]),  # siblings of the new token
        (tuple(ids[:17]), ref15, 15, [(16, (503, 504), ((1, 505),)), (12, (506,), ()), (17, (507,), ())]),
        (tuple(other[:3]), None, 0, []),  # no past, no branches
    ]
    before = lm.n_forward_tokens
    out = runner.tree_rows(rows)
    assert lm.n_forward_tokens - before == 3 + (2 + 2 + 1 + 1 + 1) + 3
    for (ids_b, *_), row in zip(rows, out):
        assert row is not None and row is cache.get_logp(ids_b)
        assert_close_to_uncached(hf_model, ids_b, row)
    branched = [ids[:4] + [501], ids[:4] + [502], ids[:16] + [503], ids[:16] + [503, 504], ids[:16] + [503, 505],
                ids[:12] + [506], ids[:17] + [507], ids[:16], other[:2]]
    for ctx in branched:
        assert_close_to_uncached(hf_model, ctx, cache.get_logp(tuple(ctx)))
    assert_cache_consistent(cache)
    n = lm.n_forward_tokens
    for ctx in (ids[:4] + [502, 9], ids[:16] + [503, 505, 9], ids[:17] + [8], other[:3] + [7], ids[:12] + [506, 6]):
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == n + 5, "each extension runs its one new token on the stored pasts"
    assert_cache_consistent(cache)


@pytest.mark.slow
async def test_hinted_contexts_run_with_the_next_generation_pass(embedded_lm, embedded_hf, hf64):
    """``hint_next``: the next batch of generation requests also runs the hinted contexts one
    token past a cached past, up to ``hint_tokens``, in the same pass (a hint sharing a request's
    past branches off its row; another gets a row of its own); each is exact and stays cached.
    Hints whose past is not cached, malformed hints and hints before a known text's requests
    are not run."""
    from genlm_bytes.lm.base import known_text

    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, draft_tokens=0, config=EngineConfig(hint_tokens=2))
    a, b = [0] + tok.encode("The cat sat on"), [0] + tok.encode("Stock markets rose")
    await asyncio.gather(lm.next_token_logprobs(a), lm.next_token_logprobs(b))
    batches, tokens = lm.batcher.n_batches, lm.n_forward_tokens
    sib, other, deep, third = a + [264], b + [389], b + [389, 11], a + [11]
    lm.hint_next([sib, other, deep, third, "not a context", [-1, 2], [lm.vocab_size]])
    row = await lm.next_token_logprobs(a + [262])
    assert lm.batcher.n_batches == batches + 1
    assert lm.n_forward_tokens == tokens + 3, "the request and the first two usable hints, in one pass"
    assert_close_to_uncached(hf_model, a + [262], row)
    for ctx in (sib, other):
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert not lm.has_logprobs(deep) and not lm.has_logprobs(third), "past the budget, or no cached past"
    assert lm.n_forward_tokens == tokens + 3 and lm.batcher.n_batches == batches + 1
    # hints are used once: the next pass runs its own request only (not ``deep``, whose past is
    # cached now)
    await lm.next_token_logprobs(a + [11, 12])
    assert lm.n_forward_tokens == tokens + 3 + 2 and not lm.has_logprobs(deep)
    # a known text's requests take no hints
    lm.hint_next([b + [12]])
    with known_text():
        await lm.next_token_logprobs(b + [13])
    assert not lm.has_logprobs(b + [12])
    extended = await lm.next_token_logprobs(other + [5])  # a hint's KV is cached: one new token
    assert_close_to_uncached(hf_model, other + [5], extended)
    assert lm.n_forward_tokens == tokens + 3 + 2 + 1 + 1
    assert_cache_consistent(lm.cache)


async def test_hints_are_wanted_only_while_few_requests_are_in_flight(embedded_lm):
    """``wants_hints``: a backend that runs hints says so while at most a few requests are in
    flight and its last batch was small (many states stepping together fill their passes with
    rows); never with ``hint_tokens=0``; the default AsyncLM never."""
    lm = transformer(embedded_lm)
    assert lm.wants_hints and lm.batcher.in_flight() == 0
    tasks = [asyncio.create_task(lm.next_token_logprobs([0, 100 + i])) for i in range(6)]
    await asyncio.sleep(0)  # (each task has queued its request)
    assert lm.batcher.in_flight() == 6 and not lm.wants_hints
    await asyncio.gather(*tasks)
    assert lm.batcher.last_batch == 6 and not lm.wants_hints, "after a large batch, the next is large too"
    await lm.next_token_logprobs([0, 99])
    assert lm.batcher.last_batch == 1 and lm.wants_hints
    assert not transformer(embedded_lm, config=EngineConfig(hint_tokens=0)).wants_hints
    assert not MockLM([b"a", b"b"]).wants_hints
    whole = transformer(embedded_lm, kv_reuse=False)  # (every context would run whole: no hints)
    whole.hint_next([[0, 5], [0, 6]])
    assert not whole.wants_hints and whole.scheduler.hints == ()
    assert_close_to_uncached(embedded_lm.model, [0, 7], await whole.next_token_logprobs([0, 7]))


@pytest.mark.parametrize("layers_per_group", [1, 7, 64])
async def test_a_batched_pass_gathers_pasts_by_groups_of_layers(embedded_lm, embedded_hf, hf64, monkeypatch,
                                                                layers_per_group):
    """A batched pass copies its rows' pasts (chains of segments, left-padded) several layers at a
    time into one buffer: one layer per group, groups that do not divide the layer count (7 of
    30: the last holds 2), or every layer at once. Every row stays exact."""
    from genlm_bytes.lm.hf import pass_cache

    hf_model, tok = hf64, embedded_hf[1]
    ids = [0] + tok.encode(TEXT)
    n_layers = hf_model.config.num_hidden_layers
    # Pasts of 3 and 9 tokens (two segments each: 3 + 6 for the second), and 9 + 1 + 2.
    contexts = [ids[:3] + [11], ids[:9] + [12], ids[:9] + [13, 14], ids[:3] + [15, 16, 17]]
    B, P, Kn = len(contexts), 9, 3
    cfg = hf_model.config
    per_layer = B * (P + Kn) * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 8
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(gather_chunk_bytes=layers_per_group * per_layer))
    groups = []
    inner = pass_cache._Gather._gather_group

    def recorded(self, key_states, value_states):
        out = inner(self, key_states, value_states)
        groups.append(out[:2])
        return out

    monkeypatch.setattr(pass_cache._Gather, "_gather_group", recorded)
    for n in (3, 9):
        await lm.next_token_logprobs(ids[:n])
    assert not groups, "one-row passes gather as before"
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
    size = min(layers_per_group, n_layers)
    assert groups == [(a, min(size, n_layers - a)) for a in range(0, n_layers, size)]
    for ctx, row in zip(contexts, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    # The batch's own block is stacked: extending its rows in a second batch is exact too.
    second = [c + [21] for c in contexts]
    for ctx, row in zip(second, await asyncio.gather(*(lm.next_token_logprobs(c) for c in second))):
        assert_close_to_uncached(hf_model, ctx, row)
    assert_cache_consistent(lm.cache)


async def test_padding_of_a_ragged_batch_is_zeroed_whatever_the_buffer_held(embedded_lm, embedded_hf, hf64,
                                                                          monkeypatch):
    """The rows of a batch are left-padded to the longest past in one buffer the layers share,
    and each layer writes only after a row's padding: the padding must be zeroed by the pass
    itself (a masked slot holding NaN would still poison its row: 0 * NaN is NaN)."""
    from genlm_bytes.lm.hf import pass_cache

    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    inner = pass_cache._Gather._buffers

    def poisoned(self, key_states, P):  # fresh buffers full of NaN, as reused memory may be
        fresh = "gather" not in self.workspace or self.workspace["gather"][0].shape[2] != P + key_states.shape[2]
        K, V = inner(self, key_states, P)
        if fresh:
            K.fill_(float("nan"))
            V.fill_(float("nan"))
        return K, V

    monkeypatch.setattr(pass_cache._Gather, "_buffers", poisoned)
    group = pass_cache._Gather._group_buffers

    def poisoned_group(self, key_states, value_states, T):  # the same for a batched pass's groups of layers
        K, V = group(self, key_states, value_states, T)
        K.fill_(float("nan"))
        V.fill_(float("nan"))
        calls.append(K.shape[0])
        return K, V

    calls = []
    monkeypatch.setattr(pass_cache._Gather, "_group_buffers", poisoned_group)
    ids = [0] + tok.encode(TEXT)
    for n in (4, 15):
        await lm.next_token_logprobs(ids[:n])
    contexts = [ids[:4] + [11], ids[:15] + [12], ids[:15] + [13, 14]]  # pasts of 4 and 15 tokens
    batches = lm.batcher.n_batches
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
    assert lm.batcher.n_batches - batches == 1
    assert calls, "the batched pass gathered its pasts by groups of layers"
    for ctx, row in zip(contexts, rows):
        assert torch.isfinite(row).all()
        assert_close_to_uncached(hf_model, ctx, row)


@pytest.mark.slow
async def test_duplicate_concurrent_requests_run_once(embedded_lm, embedded_hf, hf64):
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ctx = [0] + tok.encode("An apple a day")
    rows = await asyncio.gather(*(lm.next_token_logprobs(ctx) for _ in range(6)))
    assert lm.n_forward_tokens == len(ctx) and lm.batcher.n_requests == 1
    assert all(r is rows[0] for r in rows)
    assert_close_to_uncached(hf_model, ctx, rows[0])


@pytest.mark.slow
async def test_prefetch_with_tree_masked_alternatives_matches_uncached(embedded_lm, embedded_hf, hf64,
                                                                     monkeypatch):
    hf_model, tok = hf64, embedded_hf[1]
    # Small chunks so that the prefix pass runs in several chunks and the alternatives in several
    # tree-masked passes.
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(prefetch_chunk=7, alt_chunk=3))
    ids = [0] + tok.encode(TEXT)[:20]
    n = len(ids)
    alts = [(1, 504), (4, 1000), (4, 1001), (9, 42), (n, 7), (n, 8), (n - 1, 300), (4, 1000),
            (5, ids[5])]  # a duplicate, and one equal to the text's own next token
    await lm.prefetch(ids, alternatives=alts)
    forwards = lm.n_forward_tokens
    branching = {(i, t) for i, t in alts if i == n or ids[i] != t}
    assert forwards == n + len(branching), "each prefix and each distinct alternative runs once"
    assert all(lm.has_logprobs(ids[:i]) for i in range(1, n + 1))
    for i in (1, 7, 8, 14, n):  # around the chunk boundaries
        assert_close_to_uncached(hf_model, ids[:i], await lm.next_token_logprobs(ids[:i]))
    for i, t in set(alts):
        ctx = ids[:i] + [t]
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == forwards, "prefetched distributions come from the cache"
    # The whole text's KV sits in one block: extending it runs one token.
    ext = await lm.next_token_logprobs(ids + [11])
    assert lm.n_forward_tokens == forwards + 1
    assert_close_to_uncached(hf_model, ids + [11], ext)
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_prefetch_chains_branching_inside_the_new_part_of_the_path(embedded_lm, embedded_hf, hf64):
    """One tree pass: the uncached end of a path plus chains that branch off the cached past and
    off the path tokens of the same pass; every prefix is exact and its KV can be extended."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT)[:19]
    await lm.prefetch(ids[:5])
    before = lm.n_forward_tokens
    subs = [(0, 2000), (2, 2001), (3, 2002), (1, 1001)]  # the last one is the chain itself
    chains = [(3, (501, 502)), (12, (1000, 1001, 1002), subs), (len(ids), (77,)), (7, ids[7]),
              (4, tuple(ids[4:9]), [(2, 3000)])]  # a chain along the path: its branch joins the path's
    await lm.prefetch(ids, alternatives=chains)
    assert lm.n_forward_tokens - before == (len(ids) - 5) + 2 + 3 + 3 + 1 + 1, "one tree pass, nothing twice"
    for ctx in (ids[:12] + [2000], ids[:12] + [1000, 1001, 2001], ids[:12] + [1000, 1001, 1002, 2002],
                ids[:6] + [3000]):
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    for i, chain, *_ in chains[:3]:
        for k in range(1, len(chain) + 1):
            ctx = ids[:i] + list(chain[:k])
            assert lm.has_logprobs(ctx)
            assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    for i in (6, 13, len(ids)):
        assert_close_to_uncached(hf_model, ids[:i], await lm.next_token_logprobs(ids[:i]))
    n = lm.n_forward_tokens
    for ctx in (ids[:12] + [1000, 1001, 1002, 5], ids[:3] + [501, 502, 9], ids + [77, 8],
                ids[:12] + [1000, 1001, 2001, 6]):
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == n + 4, "a chain's KV is cached: extending it runs one token"
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_16_concurrent_requests_batch_into_few_forwards_and_beat_sequential(embedded_lm, embedded_hf):
    hf_model, _ = embedded_hf
    rng = random.Random(0)
    ratios = []
    for attempt in range(3):  # timing on a busy machine: a few tries, any clear win counts
        contexts = [[0] + [rng.randrange(1000, 20000) for _ in range(3)] for _ in range(16)]
        seq_lm, conc_lm = transformer(embedded_lm), transformer(embedded_lm)
        await seq_lm.next_token_logprobs([5])  # warm both up the same way
        await conc_lm.next_token_logprobs([5])
        t0 = time.perf_counter()
        sequential = [await seq_lm.next_token_logprobs(c) for c in contexts]
        t_seq = time.perf_counter() - t0
        batches = conc_lm.batcher.n_batches
        t0 = time.perf_counter()
        concurrent = await asyncio.gather(*(conc_lm.next_token_logprobs(c) for c in contexts))
        t_conc = time.perf_counter() - t0
        assert conc_lm.batcher.n_batches - batches <= 2, "16 concurrent requests should share forwards"
        for a, b in zip(sequential, concurrent):
            assert (a - b).abs().max().item() <= TOL32
        ratios.append(t_conc / t_seq)
        if t_conc < 0.7 * t_seq:
            break
    assert min(ratios) < 0.7, f"concurrent/sequential wall time {ratios}: batching brought no clear gain"
    assert_close_to_uncached(hf_model, contexts[0], concurrent[0], TOL32)


@pytest.mark.slow
async def test_float32_model_ragged_batch_and_alternatives_match_uncached(embedded_lm, embedded_hf):
    """The shipped float32 model, within float32 noise."""
    hf_model, tok = embedded_hf
    lm = transformer(embedded_lm)
    ids = [0] + tok.encode(TEXT)
    await lm.prefetch(ids[:12], alternatives=[(3, 1000), (12, 2000)])
    contexts = [ids[:3] + [1000], ids[:12] + [2000], ids[:12] + [5, 6], ids, [7, 8, 9], ids[:2]]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
    for ctx, row in zip(contexts, rows):
        assert_close_to_uncached(hf_model, ctx, row, TOL32)


# --------------------------------------------------------------------------- bad input


class UserLM(AsyncLM):
    """A user-written model: implements only ``next_token_logprobs`` (MockLM's distributions)."""

    def __init__(self, poison: dict | None = None):
        self.mock = MockLM(seed=3)
        super().__init__(byte_vocab=self.mock.byte_vocab, eos_token_ids=[0])
        self.poison = poison or {}  # context tuple -> the row to return instead

    async def next_token_logprobs(self, token_ids):
        row = self.poison.get(tuple(token_ids))
        return row.clone() if row is not None else self.mock.logprobs(token_ids)


BAD_CONTEXTS = [
    ([], ValueError, "empty"),
    ([0, -1], ValueError, r"token_ids\[1\] = -1 is out of range"),
    ([0, 10**9], ValueError, "out of range"),
    ([0, 1.5], TypeError, r"token_ids\[1\] = 1.5 is not an integer"),
    ([0, "a"], TypeError, "not an integer"),
    ([0, None], TypeError, "not an integer"),
    ([True], TypeError, "not an integer"),
    ("abc", TypeError, "list of ints"),
    (b"\x00\x01", TypeError, "list of ints"),
    (7, TypeError, "list of ints"),
    (torch.tensor([0.0, 1.0]), TypeError, "dtype"),
    (torch.tensor([[0, 1]]), TypeError, "shape"),
    (np.array([0.5]), TypeError, "dtype"),
]


async def _assert_rejects(lm, ctx, exc, match):
    with pytest.raises(exc, match=match):
        await lm.next_token_logprobs(ctx)
    with pytest.raises(exc, match=match):
        await lm.peek_next_token_logprobs(ctx)
    with pytest.raises(exc, match=r"contexts\[1\]: .*" + match):  # checked before any work starts
        await lm.batch_next_token_logprobs([[0], ctx])


@pytest.mark.parametrize("ctx,exc,match", BAD_CONTEXTS)
async def test_bad_contexts_rejected_by_mock_and_user_models(ctx, exc, match):
    for lm in (MockLM(), UserLM()):
        await _assert_rejects(lm, ctx, exc, match)


@pytest.mark.slow
async def test_bad_contexts_rejected_by_transformer(embedded_lm):
    lm = transformer(embedded_lm)
    for ctx, exc, match in BAD_CONTEXTS:
        await _assert_rejects(lm, ctx, exc, match)
    with pytest.raises(ValueError, match="out of range"):
        await lm.prefetch([0, lm.vocab_size])
    with pytest.raises(ValueError, match="empty"):
        await lm.prefetch([])
    with pytest.raises(ValueError, match="alternative"):
        await lm.prefetch([0, 5], alternatives=[(3, 1)])
    for alt in [(1, (5, lm.vocab_size)), (1, ()), (1, (5,), [(2, 7)]), (1, 5, [(0, "x")]), (1,), "ab"]:
        with pytest.raises(ValueError, match="alternative"):
            await lm.prefetch([0, 5], alternatives=[alt])
    for start in (-1, "0", True):
        with pytest.raises(ValueError, match="start"):
            await lm.prefetch([0, 5], start=start)
    with pytest.raises(ValueError, match="window"):
        await lm.next_token_logprobs([0] * (lm.max_positions + 1))
    assert lm.n_forward_tokens == 0 and lm.batcher.n_batches == 0, "nothing bad reached the model"
    # Numpy and torch integer ids are fine.
    a = await lm.next_token_logprobs(np.array([0, 504]))
    b = await lm.next_token_logprobs(torch.tensor([0, 504]))
    c = await lm.next_token_logprobs([np.int64(0), 504])
    assert torch.equal(a, b) and torch.equal(a, c) and lm.batcher.n_batches == 1


def test_bad_input_through_the_sync_wrappers():
    lm = UserLM()
    with pytest.raises(ValueError, match="empty"):
        lm.next_token_logprobs_sync([])
    with pytest.raises(TypeError, match="not an integer"):
        lm.batch_next_token_logprobs_sync([[0], [0, 2.0]])


# --------------------------------------------------------------------------- a failing forward


class ModelError(RuntimeError):
    pass


class FlakyBatchedLM(AsyncLM):
    """A user model behind a Batcher whose ``process`` raises while ``fail`` is set."""

    def __init__(self):
        self.mock = MockLM(seed=1)
        super().__init__(byte_vocab=self.mock.byte_vocab, eos_token_ids=[0])
        self.fail = False
        self.batcher = Batcher(self._process, max_batch_size=16, name="flaky")

    def _process(self, requests):
        if self.fail:
            raise ModelError("the model fell over")
        return [self.mock.logprobs(list(r)) for r in requests]

    async def next_token_logprobs(self, token_ids):
        key = tuple(token_ids)
        return await self.batcher.submit(key, key)


async def test_failing_batcher_process_reaches_every_caller_then_recovers():
    lm = FlakyBatchedLM()
    contexts = [[0, i] for i in range(8)] + [[0, 3]]  # one duplicate
    lm.fail = True
    results = await asyncio.wait_for(
        asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts), return_exceptions=True), 10)
    assert all(isinstance(r, ModelError) for r in results), results
    lm.fail = False
    rows = await asyncio.wait_for(lm.batch_next_token_logprobs(contexts), 10)
    assert torch.equal(rows[3], lm.mock.logprobs([0, 3]))
    assert torch.equal(await lm.next_token_logprobs([0, 99]), lm.mock.logprobs([0, 99]))


@pytest.mark.slow
async def test_transformer_forward_that_raises_once_fails_its_callers_only(embedded_lm, embedded_hf, hf64):
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode("Once upon a time")
    await lm.next_token_logprobs(ids)
    real_forward = lm.runner.forward
    calls = []

    def broken_forward(rows, all_positions, **kw):
        calls.append(len(rows))
        if len(calls) == 1:
            raise ModelError("CUDA out of memory (simulated)")
        return real_forward(rows, all_positions, **kw)

    lm.runner.forward = broken_forward
    contexts = [ids + [t] for t in (11, 12, 13)] + [[0, 7, 8]]
    results = await asyncio.wait_for(
        asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts), return_exceptions=True), 60)
    assert calls == [4]
    assert all(isinstance(r, ModelError) for r in results), results
    assert not any(lm.has_logprobs(c) for c in contexts), "a failed pass caches nothing"
    assert_cache_consistent(lm.cache)
    rows = await asyncio.wait_for(asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts)), 60)
    for ctx, row in zip(contexts, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    assert_cache_consistent(lm.cache)


# --------------------------------------------------------------------------- memory budget


@st.composite
def cache_workloads(draw):
    budget = draw(st.integers(0, 160))
    ops = draw(st.lists(st.tuples(st.sampled_from(["forward", "held", "get", "take", "repoint"]),
                                  st.lists(st.integers(0, 2), min_size=1, max_size=6)),
                        min_size=1, max_size=40))
    return budget, ops


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(cache_workloads())
def test_prefix_cache_bookkeeping_under_any_budget(workload):
    """Random forwards (as AsyncTransformer inserts them) on a tiny cache: a KV slot is 8 bytes
    per token, a log-prob vector 16 bytes. After every step the budget holds, every payload is
    reachable from the root and charged exactly once, and a hit returns the latest value."""
    budget, ops = workload
    cache = PrefixCache(budget)
    latest: dict[tuple, torch.Tensor] = {}
    for n, (op, ids) in enumerate(ops):
        key = tuple(ids)
        if op in ("forward", "held"):
            # As AsyncTransformer stores a pass: its new tokens only, chained to the past it ran on.
            past, ref = cache.deepest_kv(key, len(key) - 1)
            n_new = len(key) - past
            block = KVBlock([torch.zeros(1, 1, n_new, 1)], [torch.zeros(1, 1, n_new, 1)])
            path = cache.walk(key, create=True)
            cache.put_kv(path[past:], lambda node, block=block, ref=ref, past=past:
                         KVRef(block, 0, 0, node.depth - past, ref))
            latest[key] = torch.full((4,), float(n))
            cache.put_logp(key, latest[key], node=path[-1], held=op == "held")
        elif op in ("get", "take"):
            hit = cache.get_logp(key, held=op == "take")
            assert hit is None or hit is latest[key]
        else:  # point a whole path at one new block, as a chunked prefetch does
            path = cache.walk(key)
            block = KVBlock([torch.zeros(1, 1, len(key), 1)], [torch.zeros(1, 1, len(key), 1)])
            cache.repoint_kv(path, lambda node, block=block: KVRef(block, 0, 0, node.depth))
        assert_cache_consistent(cache)


def test_rows_handed_to_readers_are_evicted_before_rows_not_read_yet():
    """Log-probs computed ahead (a look-ahead pass) outlive those already taken by a reader,
    even when taken later; a KV past is not moved by a read of its node's log-probs."""
    row = 16  # bytes of a (4,) float32 row
    cache = PrefixCache(budget_bytes=6 * row)
    for i in range(6):  # a look-ahead: the rows after (0,), (0, 1), ... in order
        cache.put_logp(tuple(range(i + 1)), torch.full((4,), float(i)))
    for i in (3, 4):  # the reader consumes two of them, the most recent ones
        assert cache.get_logp(tuple(range(i + 1)), held=True)[0] == i
    cache.put_logp((9,), torch.zeros(4))  # a new row: one must go
    cache.put_logp((8,), torch.zeros(4))  # and another
    assert cache.get_logp((0, 1, 2, 3)) is None and cache.get_logp((0, 1, 2, 3, 4)) is None, \
        "the rows taken should be evicted first"
    assert all(cache.get_logp(tuple(range(i + 1))) is not None for i in (0, 1, 2, 5))
    cache.put_logp((7,), torch.zeros(4), held=True)  # handed straight to its requester
    assert cache.get_logp((7,)) is None and cache.get_logp((0,)) is not None
    assert_cache_consistent(cache)
    # A past and the log-probs of one node are separate slots.
    cache = PrefixCache(budget_bytes=3 * row + 16)
    key = (1, 2)
    path = cache.walk(key, create=True)
    block = KVBlock([torch.zeros(1, 1, 2, 1)], [torch.zeros(1, 1, 2, 1)])  # 16 bytes
    cache.put_kv(path, lambda node: KVRef(block, 0, 0, node.depth))
    cache.put_logp(key, torch.zeros(4), node=path[-1])
    cache.get_logp(key, held=True)
    cache.put_logp((5,), torch.zeros(4))
    cache.put_logp((6,), torch.zeros(4))
    cache.put_logp((7,), torch.zeros(4))
    assert cache.get_logp(key) is None and cache.deepest_kv(key, 2) == (2, path[-1].kv)
    assert_cache_consistent(cache)


def test_eviction_keeps_live_prefixes_reusable():
    """A pass larger than the whole budget is evicted at once; a later eviction of its leftovers
    must not unlink the live prefix that shares its first tokens (KV reuse would silently stop)."""
    cache = PrefixCache(budget_bytes=60)  # 8 bytes per KV token, 16 per log-prob vector

    def forward(ids, tag):
        past, _ = cache.deepest_kv(ids, len(ids) - 1)
        block = KVBlock([torch.zeros(1, 1, len(ids), 1)], [torch.zeros(1, 1, len(ids), 1)])
        path = cache.walk(ids, create=True)
        cache.put_kv(path[past:], lambda node: KVRef(block, 0, 0, node.depth))
        cache.put_logp(ids, torch.full((4,), tag), node=path[-1])
        return past

    forward((1, 2, 3, 4, 5, 6, 7, 8), 0.0)  # 64 bytes of KV > 60: evicted at once
    forward((1, 2), 1.0)
    forward((1, 2, 3), 2.0)  # evicts what the first pass left
    assert forward((1, 2, 3, 4), 3.0) == 3, "the past of (1, 2, 3) is cached and must be reused"
    assert_cache_consistent(cache)


@pytest.mark.slow
async def test_small_cache_budget_evicts_and_stays_exact(embedded_lm, embedded_hf, hf64):
    hf_model, tok = hf64, embedded_hf[1]
    budget = 1_000_000  # about 5 log-prob vectors (196 KB each) or 10 tokens of float64 KV (92 KB each)
    lm = transformer(embedded_lm, hf_model, cache_budget_bytes=budget)
    ids = [0] + tok.encode(TEXT)
    requests = [[ids[:4]], [ids[:5]], [ids[:7]], [ids[:6] + [9], ids[:20], [0, 77]], [ids[:21]],
                [ids[:8]], [ids[:22], ids[:9]]]
    for batch in requests:
        rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in batch))
        assert lm.cache.nbytes <= budget
        assert_cache_consistent(lm.cache)
        for ctx, row in zip(batch, rows):
            assert_close_to_uncached(hf_model, ctx, row)
    assert lm.cache.n_evicted > 0
    await lm.prefetch(ids[:12], alternatives=[(3, 55), (12, 66)])
    assert lm.cache.nbytes <= budget
    assert_cache_consistent(lm.cache)
    assert_close_to_uncached(hf_model, ids[:3] + [55], await lm.next_token_logprobs(ids[:3] + [55]))
    lm.clear_cache()
    assert lm.cache.nbytes == 0 and not lm.has_logprobs(ids[:4])


def held_bytes(cache: PrefixCache) -> int:
    """Memory the cache's payloads actually keep alive (distinct tensor storages)."""
    storages = {}
    with cache.lock:
        for node, slot in cache._lru:
            tensors = [node.logp] if slot == _LOGP else []
            for block in (node.kv.blocks() if slot == _KV else ()):
                tensors += block.keys + block.values
            for t in tensors:
                s = t.untyped_storage()
                storages[s.data_ptr()] = s.nbytes()
    return sum(storages.values())


@pytest.mark.slow
async def test_budget_bounds_the_memory_actually_held(embedded_lm, embedded_hf):
    _, tok = embedded_hf
    budget = 2_000_000
    lm = transformer(embedded_lm, cache_budget_bytes=budget)
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    await lm.prefetch(ids)  # one pass: (len(ids), V) log-probs, 8 MB
    await asyncio.gather(*(lm.next_token_logprobs(ids[:5] + [t]) for t in range(100, 116)))
    assert lm.cache.nbytes <= budget
    assert held_bytes(lm.cache) <= budget, f"{held_bytes(lm.cache)} bytes held for a budget of {budget}"


# --------------------------------------------------------------------------- a user-written AsyncLM


def test_user_subclass_gets_the_whole_interface():
    lm = UserLM()
    assert lm.byte_vocab == lm.mock.byte_vocab and lm.vocab_size == len(lm.mock.byte_vocab)
    assert lm.eos_token_ids == [0] and lm.initial_context == [0]  # defaults to the first EOS
    one = lm.next_token_logprobs_sync([0, 5])
    assert torch.equal(one, lm.mock.logprobs([0, 5]))
    rows = lm.batch_next_token_logprobs_sync([[0, 5], [0, 6], [0, 5]])
    assert rows.shape == (3, lm.vocab_size) and torch.equal(rows[0], one) and torch.equal(rows[2], one)
    assert lm.batch_next_token_logprobs_sync([]).shape == (0, lm.vocab_size)
    lm.clear_cache()  # a no-op that exists
    assert asyncio.run(lm.prefetch([0, 1, 2])) is None
    assert lm.encode_bytes(b"abc") is None
    assert lm.trie is lm.trie  # built once


async def test_user_subclass_works_under_a_beam_and_with_a_plain_def():
    class SyncUserLM(AsyncLM):
        def __init__(self):
            self.mock = MockLM(seed=3)
            super().__init__(byte_vocab=self.mock.byte_vocab, eos_token_ids=[0])

        def next_token_logprobs(self, token_ids):  # not async: still accepted
            return self.mock.logprobs(token_ids)

    params = BeamParams(K=4, prune_threshold=0.01)
    results = []
    for lm in (UserLM(), SyncUserLM(), MockLM(seed=3)):
        beam = await ByteBeamState.initial(lm, params)
        beam = await beam.prefill(b"the apple")
        results.append((beam.logZ, (await beam.logp_next()).ps))
    for z, ps in results[1:]:
        assert z == results[0][0]
        np.testing.assert_array_equal(ps, results[0][1])


@pytest.mark.parametrize("row,match", [
    (torch.full((295,), math.nan), "NaN"),
    (torch.cat([torch.full((294,), -6.0), torch.tensor([math.nan])]), "NaN"),
    (torch.full((295,), -math.inf), "no finite"),
    (torch.cat([torch.full((294,), -6.0), torch.tensor([math.inf])]), r"\+inf"),
    (torch.zeros(3), "shape"),
])
async def test_user_model_bad_output_names_the_context(row, match):
    ctx = (0, 40, 41, 42)
    lm = UserLM(poison={ctx: row})
    assert lm.vocab_size == 295
    with pytest.raises(ValueError, match=match) as info:
        await lm.next_token_logprobs(list(ctx))
    assert "UserLM" in str(info.value)
    if match != "shape":
        assert "[0, 40, 41, 42]" in str(info.value)
    # Through a beam, the same error surfaces (not a silent NaN distribution).
    beam = await ByteBeamState.initial(lm, BeamParams(K=8))
    with pytest.raises(ValueError, match=match):
        await beam.prefill(b"\x27\x28\x29\x2a")  # token ids 40..42 are bytes 39..41


@pytest.mark.parametrize("mask_kind", ["float", "bool", "batch"])
def test_grouped_attention_equals_repeated_heads(mask_kind):
    """_grouped_sdpa (query groups stacked on their shared key/value head) equals transformers'
    SDPA attention (keys and values repeated per head) under tree-shaped and ragged masks."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    from genlm_bytes.lm.hf.attention import grouped_sdpa as _grouped_sdpa

    gen = torch.Generator().manual_seed(0)
    B, H, Hkv, Q, L, d = 2, 6, 2, 5, 11, 8
    module = torch.nn.Module()
    module.num_key_value_groups, module.is_causal, module.training = H // Hkv, True, False
    q, k, v = (torch.randn(B, h, n, d, generator=gen) for h, n in ((H, Q), (Hkv, L), (Hkv, L)))
    allowed = torch.rand(B if mask_kind == "batch" else 1, 1, Q, L, generator=gen) < 0.6
    allowed[..., 0] = True  # every query sees something
    mask = allowed if mask_kind == "bool" else torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))
    got, _ = _grouped_sdpa(module, q, k, v, mask, scaling=d ** -0.5)
    want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=d ** -0.5)
    assert got.shape == want.shape == (B, Q, H, d)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


async def test_passes_use_grouped_attention_and_restore_the_model(embedded_lm, monkeypatch):
    """A tree-masked pass of the embedded model (9 query heads on 3 key/value heads) runs the
    grouped attention, without repeating the past per head; the model's own setting is unchanged."""
    import genlm_bytes.lm.hf.attention as tmod

    lm = transformer(embedded_lm, lean=False)  # (the lean decoder has its own grouped attention)
    seen = []
    inner = tmod.grouped_sdpa

    def spy(module, query, key, *args, **kwargs):
        seen.append((query.shape[1], key.shape[1], module.config._attn_implementation))
        return inner(module, query, key, *args, **kwargs)

    monkeypatch.setattr(tmod, "grouped_sdpa", spy)
    tmod.register_grouped_sdpa.cache_clear()
    try:
        ids = [0] + embedded_lm.tokenizer.encode(TEXT)[:12]
        await lm.prefetch(ids, alternatives=[(5, 1000), (9, 42)])
    finally:
        from transformers import AttentionInterface

        AttentionInterface.register(tmod.GROUPED_SDPA, inner)  # the real function again
    assert seen and all(s == (9, 3, tmod.GROUPED_SDPA) for s in seen)
    assert embedded_lm.model.config._attn_implementation == "sdpa"


@pytest.mark.slow
async def test_long_chains_are_stored_whole_and_stay_exact(embedded_lm, embedded_hf, hf64, monkeypatch):
    """A past chained from MAX_SEGMENTS segments is stored as one block by the next pass (alone or
    as one row of a ragged batch), copied from the layer's buffer while the pass runs."""
    # (arena_spare_min=0: lone requests would write one arena instead)
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(max_segments=3, arena_spare_min=0))
    ids = [0] + tok.encode(TEXT)
    for n in range(2, 8):  # one token per pass: each adds a segment to the chain
        assert_close_to_uncached(hf_model, ids[:n], await lm.next_token_logprobs(ids[:n]))
    nodes = lm.cache.walk(ids[:7])
    assert max(node.kv.nseg for node in nodes) <= 3
    assert nodes[4].kv.nseg == 1 and nodes[4].kv.depth == 5, "the 4th pass should store its context whole"
    # A ragged batch: one row on a 3-segment past (kept whole), one on a short past (left-padded).
    batch = [ids[:8], [0, 77, 78]]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in batch))
    for ctx, row in zip(batch, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    node = lm.cache.walk(ids[:8])[-1]
    assert node.kv.nseg == 1 and node.kv.depth == 8
    before = lm.n_forward_tokens
    assert_close_to_uncached(hf_model, ids[:9], await lm.next_token_logprobs(ids[:9]))
    assert lm.n_forward_tokens - before == 1, "the whole past should be reused"
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_generation_batches_store_short_chains(embedded_lm, embedded_hf, hf64, monkeypatch):
    """Contexts generated a token at a time, several per pass, are stored whole once their chain
    has MIN_SEGMENTS segments (on a short past), so no pass gathers long chains; the requests of
    a known text (scoring) keep chains up to MAX_SEGMENTS."""
    from genlm_bytes.lm.base import known_text

    config = EngineConfig(min_segments=3)
    hf_model, tok = hf64, embedded_hf[1]
    a = [0] + tok.encode(TEXT)
    b = [0] + list(range(77, 90))

    async def step_together(lm):
        for n in range(3, 11):
            rows = await asyncio.gather(lm.next_token_logprobs(a[:n]), lm.next_token_logprobs(b[:n]))
        for ctx, row in zip((a[:10], b[:10]), rows):
            assert_close_to_uncached(hf_model, ctx, row)
        assert_cache_consistent(lm.cache)
        return max(node.kv.nseg for node in lm.cache.walk(a[:10]) + lm.cache.walk(b[:10]))

    assert await step_together(transformer(embedded_lm, hf_model, config=config)) <= 3
    with known_text():
        assert await step_together(transformer(embedded_lm, hf_model, config=config)) == 8


@pytest.mark.slow
async def test_passes_split_to_fit_the_budget_stay_exact(embedded_lm, embedded_hf, hf64, monkeypatch):
    """When one pass's temporaries would exceed PASS_SHARE of the budget, a prefetch runs the path
    and its alternatives in smaller passes, with the same results."""
    hf_model, tok = hf64, embedded_hf[1]
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    assert transformer(embedded_lm, hf_model).runner.store.pass_tokens(0, len(ids)) == len(ids)
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(pass_share=1e-6))  # every pass at 16 tokens
    assert lm.runner.store.pass_tokens(0, len(ids)) == 16
    passes = []
    forward, tree = lm.runner.forward, lm.runner.tree_pass
    monkeypatch.setattr(lm.runner, "forward", lambda rows, all_positions, **kw: passes.append("F") or forward(
        rows, all_positions, **kw))
    monkeypatch.setattr(lm.runner, "tree_pass", lambda *a, **kw: passes.append("T") or tree(*a, **kw))
    alts = [(k, 1000 + k) for k in range(3, len(ids), 2)]
    await lm.prefetch(ids, alternatives=alts)
    n_alt_passes = -(-len(alts) // 16)
    assert len(passes) >= (len(ids) - 16) // 16 + n_alt_passes
    assert lm.n_forward_tokens == len(ids) + len(alts), "each token should run once"
    for n in (3, 17, 33, len(ids)):
        assert_close_to_uncached(hf_model, ids[:n], lm.cache.get_logp(tuple(ids[:n])))
    for k, t in alts[::7]:
        assert_close_to_uncached(hf_model, ids[:k] + [t], lm.cache.get_logp(tuple(ids[:k]) + (t,)))
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_rows_read_ahead_outlive_rows_handed_out(embedded_lm, embedded_hf):
    """``next_token_logprobs`` hands a row out (the cache's copy goes first under pressure);
    ``peek_next_token_logprobs`` (a look-ahead) keeps it for the reader to come."""
    from genlm_bytes.lm.prefix_cache import _LOGP

    lm = transformer(embedded_lm)
    ids = [0] + embedded_hf[1].encode(TEXT)
    await lm.prefetch(ids[:12])
    nodes = lm.cache.walk(ids[:12])
    taken = await lm.next_token_logprobs(ids[:5])
    peeked = await lm.peek_next_token_logprobs(ids[:6])
    order = list(lm.cache._lru)
    assert order[0] == (nodes[4], _LOGP) and taken is nodes[4].logp
    assert order[-1] == (nodes[5], _LOGP) and peeked is nodes[5].logp
    fresh = await lm.next_token_logprobs(ids[:3] + [55])  # computed for its requester: goes first too
    assert next(iter(lm.cache._lru))[0].logp is fresh


@pytest.mark.slow
async def test_beams_of_one_model_share_prepared_distributions(embedded_lm, embedded_hf):
    """Beams of one model share one TrieSpace per EOS setting, whose prepared distributions are
    bounded by the model's share of its cache budget (fewer below the default budget)."""
    from genlm_bytes.byte_lm.trie_state import shared_space

    params = BeamParams(K=5, prune_threshold=0.05)
    a = await ByteBeamState.initial(embedded_lm, params)
    b = await ByteBeamState.initial(embedded_lm, params)
    assert a.states[0].space is b.states[0].space
    assert a.states[0].space.max_dists == embedded_lm.prepared_dists
    other = shared_space(embedded_lm, [7])
    assert other is not a.states[0].space and list(other.eos_ids) == [7]
    small = transformer(embedded_lm, cache_budget_bytes=256 << 20)
    assert small.prepared_dists < embedded_lm.prepared_dists
    assert shared_space(small).max_dists == small.prepared_dists
    # ... and within EngineConfig.prepared_share of the budget (8 bytes a token each): a large
    # vocabulary's rows would otherwise crowd out the cache (the reserve shrinks with them).
    V, budget = len(embedded_lm.byte_vocab), embedded_lm.cache.budget_bytes
    assert embedded_lm.prepared_dists == 256 and 256 * 8 * V <= budget // 8  # (SmolLM2: the cap does not bind)
    capped = transformer(embedded_lm, config=EngineConfig(prepared_share=0.05))
    assert capped.prepared_dists == int(0.05 * budget) // (8 * V) < 256
    assert capped.runner.store.base_reserve < embedded_lm.runner.store.base_reserve
    assert transformer(embedded_lm, config=EngineConfig(prepared_share=0.0)).prepared_dists == 32  # (the floor)


@pytest.mark.slow
def test_batched_requests_on_long_pasts_are_grouped_within_the_pass_share(embedded_lm):
    """A batch of requests on long pasts runs in groups whose temporaries fit PASS_SHARE of the
    budget (every row is left-padded to the longest past of its group)."""
    lm = transformer(embedded_lm, cache_budget_bytes=64 << 20)
    cap = lm.config.pass_share * lm.cache.budget_bytes
    rows = [(tuple(range(p + 1)), None, p) for p in (10, 900, 20, 1500, 1400, 30, 1200, 5)]
    groups = lm.runner.store.memory_groups(rows)
    assert sorted(r[2] for g in groups for r in g) == sorted(r[2] for r in rows)
    assert len(groups) > 1
    for g in groups:
        P = max(r[2] for r in g)
        assert len(g) == 1 or lm.runner.store.pass_bytes(len(g), P + 1, 1, len(g)) <= cap
    assert lm.runner.store.memory_groups(rows[:1]) == [rows[:1]]


@pytest.mark.slow
async def test_a_request_far_past_its_cached_past_runs_in_passes_that_fit(embedded_lm, embedded_hf, hf64,
                                                                          monkeypatch):
    """A context with many uncached tokens (say, its past was evicted) runs them in passes within
    PASS_SHARE of the budget, each token once, with the result of a plain forward."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(pass_share=1e-6))  # 16 tokens per pass
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    news = []
    forward = lm.runner.forward
    monkeypatch.setattr(lm.runner, "forward", lambda rows, all_positions, **kw: news.append(
        [len(i) - p for i, _, p in rows]) or forward(rows, all_positions, **kw))
    other = ids[:5] + [77]
    rows = await asyncio.gather(lm.next_token_logprobs(ids), lm.next_token_logprobs(other))
    assert_close_to_uncached(hf_model, ids, rows[0])
    assert_close_to_uncached(hf_model, other, rows[1])
    assert max(max(n) for n in news) <= 16 and len(news) >= len(ids) // 16
    assert lm.n_forward_tokens == len(ids) + 1, "each token should run once"


@pytest.mark.slow
async def test_tree_pass_stores_path_and_alternatives_apart(embedded_lm, embedded_hf, hf64):
    """A tree pass keeps the keys/values of its path and of its alternatives in separate blocks,
    each owning only its own memory: the path the beam follows does not keep alternatives the
    cache dropped alive, nor the reverse. Extending either stays exact."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model)
    ids = [0] + tok.encode(TEXT)[:16]
    await lm.prefetch(ids[:5])
    await lm.prefetch(ids, alternatives=[(3, 501), (9, 502), (len(ids), 503)])
    path = lm.cache.walk(ids)[-1].kv
    off_past = lm.cache.walk(ids[:3] + [501])[-1].kv
    off_path = lm.cache.walk(ids[:9] + [502])[-1].kv
    assert path.block is not off_past.block and off_past.block is off_path.block
    assert off_path.prev.block is path.block, "a branch off this pass's path tokens chains to the path's block"
    per_token = lm.runner.store.kv_per_token
    assert path.block.nbytes == (len(ids) - 5) * per_token
    assert off_past.block.nbytes == 3 * per_token
    for block in (path.block, off_past.block):
        assert block.stack is not None, "the store keeps every layer of a block in one tensor"
        for t in block.stack:
            assert t.untyped_storage().nbytes() == t.numel() * t.element_size(), "a block holds another's memory"
        for t in block.keys + block.values:
            assert any(t.untyped_storage().data_ptr() == s.untyped_storage().data_ptr() for s in block.stack)
    n = lm.n_forward_tokens
    for ctx in (ids[:3] + [501, 7], ids[:9] + [502, 8], ids + [503, 9], ids + [10]):
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.n_forward_tokens == n + 4
    assert_cache_consistent(lm.cache)


def test_mmap_threshold_fixed_once_unless_the_user_set_it(monkeypatch):
    import genlm_bytes.lm.hf.memory as tr

    if tr._MALLOPT is None:
        pytest.skip("not glibc")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert tr.fix_mmap_threshold.__wrapped__() is False
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    assert tr.fix_mmap_threshold.__wrapped__() is True


def test_mmap_and_trim_thresholds_set_unless_the_user_set_them(monkeypatch):
    import genlm_bytes.lm.hf.memory as tr

    calls = []
    monkeypatch.setattr(tr, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)
    assert tr.fix_mmap_threshold.__wrapped__() is True
    assert calls == [(tr.M_MMAP_THRESHOLD, tr.MMAP_THRESHOLD_BYTES), (tr.M_TRIM_THRESHOLD, tr.TRIM_THRESHOLD_BYTES)]
    assert tr.MMAP_THRESHOLD_BYTES >= 64 * 49152 * 4, "a chunk of 64 rows of logits comes from the heap"
    calls.clear()
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "131072")
    assert tr.fix_mmap_threshold.__wrapped__() is True
    assert calls == [(tr.M_MMAP_THRESHOLD, tr.MMAP_THRESHOLD_BYTES)]


def test_heap_trimmer_keeps_a_pass_temporaries_for_the_next_pass(monkeypatch):
    """The free heap a pass leaves (its temporaries) is not trimmed as it ends; the next pass
    reuses it. It is trimmed as a pass starts whose reservation is smaller than it, and after
    evictions."""
    import genlm_bytes.lm.hf.memory as tr
    from genlm_bytes.lm.hf.config import EngineConfig

    MB = 1 << 20
    rss, trims = [1000 * MB], []
    monkeypatch.setattr(tr, "_MALLOC_TRIM", lambda pad: trims.append(rss[0]) or 1)
    monkeypatch.setattr(tr, "rss_bytes", lambda: rss[0])

    class Cache:
        nbytes, reserved, freed_bytes, budget_bytes = 0, 10 * MB, 0, 1024 * MB

    cache = Cache()
    trimmer = tr.HeapTrimmer(cache, EngineConfig())
    cache.reserved = 110 * MB  # a pass reserves 100 MB of temporaries
    trimmer.pass_started()
    rss[0] += 90 * MB  # ... which stay in the heap, free, when it ends
    cache.reserved = 10 * MB
    trimmer.pass_ended()
    assert trims == [], "a pass's temporaries are kept for the next one"
    cache.reserved = 110 * MB
    trimmer.pass_started()
    trimmer.pass_ended()
    assert trims == [], "a pass as large reuses them"
    cache.reserved = 50 * MB  # a smaller pass: the heap beyond its reservation goes back
    trimmer.pass_started()
    assert trims == [rss[0]]
    cache.reserved, cache.freed_bytes = 10 * MB, EngineConfig().trim_after_bytes
    trimmer.pass_ended()
    assert len(trims) == 2 and cache.freed_bytes == 0, "evictions are trimmed as a pass ends"


async def test_output_layer_writes_one_reused_buffer_and_gives_the_same_rows(embedded_lm, embedded_hf):
    """With F.linear's products (``onednn=False``), a float32 model's lean passes write the
    output layer's logits into one buffer, grown to the most rows asked for and reused by every
    pass (a large vocabulary's chunk is not mapped and faulted in afresh each time),
    log-softmaxed in place: the rows are bit for bit those of the output layer's own module and
    a separate log-softmax. Every pass reserves the buffer's bytes (not twice a chunk's, as a
    pass without it)."""
    lm = transformer(embedded_lm, config=EngineConfig(onednn=False))
    await lm.next_token_logprobs([0, 1, 2])  # (the lean decoder checked and in use)
    runner, store = lm.runner, lm.runner.store
    assert runner.watch.mode == "lean"
    hidden = torch.randn(70, embedded_hf[0].config.hidden_size, generator=torch.Generator().manual_seed(0))
    assert not runner.out.buffered(runner.out.logits, hidden), "not where autograd records"
    for n in (7, 70, 3):  # (7: padded to 16 rows; 70: two chunks of at most 64)
        states = hidden[:n]
        with torch.inference_mode():  # (as in a pass)
            assert runner.out.buffered(runner.out.logits, states)
            got = list(runner.out.rows(states, runner.out.logits))
            want = list(runner.out.rows(states, lambda h: runner.out.logits(h)))  # (another head: not buffered)
        assert len(got) == len(want) == n
        assert all(torch.equal(a, b) for a, b in zip(got, want))
        assert all(a.untyped_storage().data_ptr() != runner.out.buffer.untyped_storage().data_ptr() for a in got)
    assert runner.out.buffer.shape[0] == min(lm.config.logp_chunk, 70)
    assert store.logits_reserved == runner.out.buffer.numel() * 4
    ptr = runner.out.buffer.data_ptr()
    await lm.prefetch([0] + embedded_hf[1].encode(TEXT)[:40])
    assert runner.out.buffer.data_ptr() == ptr, "passes reuse the buffer"
    assert store.logits_buffered
    row_bytes = len(lm.byte_vocab) * 4
    assert store.pass_bytes(1, 10, 1, 1) - store.pass_bytes(1, 10, 1, 0) == 0, "one row fits the buffer"
    store.logits_buffered = False
    assert store.pass_bytes(1, 10, 1, 1) - store.pass_bytes(1, 10, 1, 0) == 2 * row_bytes
    with torch.inference_mode():
        assert not runner.out.buffered(lambda h: h, hidden), "the model's own forward's logits are not the buffer's"


async def test_output_layer_with_onednn_products_log_softmaxes_chunks_below_the_mmap_threshold(
        embedded_lm, embedded_hf):
    """With oneDNN's products (the default where torch has them), the output layer's chunks are
    as many rows as stay below glibc's mmap threshold (their pages come back from the heap),
    computed fresh and log-softmaxed in place: no buffer is kept or reserved, a kept row costs
    one row's bytes (not two), and the rows are the module's (oneDNN rounds differently from
    MKL in the last bits only)."""
    from genlm_bytes.lm.gemm import ROW_BUCKETS, onednn_works
    from genlm_bytes.lm.hf.memory import MMAP_THRESHOLD_BYTES

    if not onednn_works():
        pytest.skip("torch has no working oneDNN linear op here")
    lm = transformer(embedded_lm, config=EngineConfig(logp_chunk=512))
    await lm.next_token_logprobs([0, 1, 2])
    runner, store = lm.runner, lm.runner.store
    row_bytes = len(lm.byte_vocab) * 4
    assert runner.watch.mode == "lean" and runner.out.onednn and runner.watch.lean.linear is not F.linear
    assert runner.out.chunk == store.logits_chunk < 512
    assert runner.out.chunk in ROW_BUCKETS, "the rows oneDNN's product runs with"
    bigger = ROW_BUCKETS[ROW_BUCKETS.index(runner.out.chunk) + 1]
    assert runner.out.chunk * row_bytes <= MMAP_THRESHOLD_BYTES - (1 << 20) < bigger * row_bytes
    hidden = torch.randn(200, embedded_hf[0].config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        got = list(runner.out.rows(hidden, runner.out.logits))
        want = list(runner.out.rows(hidden, lambda h: runner.out.logits(h)))  # (the module's product)
    assert len(got) == len(want) == 200
    assert max(float((a - b).abs().max()) for a, b in zip(got, want)) < 1e-4
    assert all(torch.allclose(a.exp().sum(), torch.tensor(1.0), atol=1e-4) for a in got[:3])
    assert runner.out.buffer is None and store.logits_reserved == 0
    await lm.prefetch([0] + embedded_hf[1].encode(TEXT)[:40])
    assert store.logits_buffered and runner.out.buffer is None
    assert store.pass_bytes(1, 10, 1, 1) - store.pass_bytes(1, 10, 1, 0) == row_bytes
    assert store.pass_bytes(1, 10, 1, 300) - store.pass_bytes(1, 10, 1, 0) == runner.out.chunk * row_bytes


async def test_onednn_products_only_where_their_kernels_fit_a_quarter_of_the_budget(embedded_lm):
    """The kernels oneDNN compiles are charged to the cache budget; below four times their
    bound the engine multiplies with F.linear (the lean decoder and the output layer alike),
    with the same log-probs up to rounding."""
    from genlm_bytes.lm.gemm import kernel_bytes, onednn_works

    if not onednn_works():
        pytest.skip("torch has no working oneDNN linear op here")
    kernels = kernel_bytes(embedded_lm.model.parameters())
    on = transformer(embedded_lm, cache_budget_bytes=4 * kernels)
    off = transformer(embedded_lm, cache_budget_bytes=4 * kernels - 1)
    off_by_config = transformer(embedded_lm, config=EngineConfig(onednn=False))
    assert on.onednn and not off.onednn and not off_by_config.onednn
    base = transformer(embedded_lm, cache_budget_bytes=4 * kernels, config=EngineConfig(onednn=False))
    assert on.cache.reserved == min(2 * kernels, base.cache.reserved + kernels) > base.cache.reserved
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)[:12]
    rows = [await lm.next_token_logprobs(ids) for lm in (on, off, off_by_config)]
    assert on.runner.watch.lean.linear is not F.linear and on.runner.out.onednn
    for lm in (off, off_by_config):
        assert lm.runner.watch.lean.linear is F.linear and not lm.runner.out.onednn
    torch.testing.assert_close(rows[0], rows[1], atol=1e-4, rtol=0)
    torch.testing.assert_close(rows[1], rows[2], atol=0, rtol=0)


def test_lookup_draft_follows_the_last_earlier_occurrence():
    from genlm_bytes.lm.hf.speculation import lookup_draft

    assert lookup_draft((1, 2, 3, 1, 2), 2) == (3, 1)
    assert lookup_draft((1, 2, 3, 1, 2), 1) == (3,)
    # the most recent bigram, unless an earlier one also matches the last three tokens
    assert lookup_draft((8, 1, 2, 5, 7, 1, 2, 6, 4, 1, 2), 2) == (6, 4)
    assert lookup_draft((9, 1, 2, 5, 7, 1, 2, 6, 9, 1, 2), 2) == (5, 7)
    assert lookup_draft((1, 2, 3, 4), 2) == ()
    assert lookup_draft((1, 2), 2) == ()
    assert lookup_draft((1, 2, 3, 1, 2), 0) == ()
    assert lookup_draft((5, 5, 5), 3) == (5,), "a run of one token drafts what follows inside the run"
    assert lookup_draft((1, 2, 3) + (0,) * 50 + (1, 2), 2, window=20) == (), "searched back `window` positions"
    # A copy under way (the occurrence's earlier tokens match too) drafts as many tokens as match.
    copy = (7, 8, 9, 1, 2, 3, 4, 5, 6, 0, 7, 8, 9, 1, 2)
    assert lookup_draft(copy, 2) == (3, 4)
    assert lookup_draft(copy, 2, most=4) == (3, 4, 5, 6), "5 tokens match: up to `most`"
    assert lookup_draft(copy, 2, most=8) == (3, 4, 5, 6, 0), "5 tokens match: 5 drafted"
    assert lookup_draft((3, 1, 2, 9, 1, 2), 1, most=8) == (9, 1), "2 tokens match: 2 drafted"
    assert lookup_draft(copy, 2, most=1) == (3, 4), "never fewer than k"


@pytest.mark.slow
async def test_prompt_lookup_drafts_are_exact_and_save_passes(embedded_lm, embedded_hf, hf64):
    """A lone request whose last two tokens occurred before also runs the tokens that followed
    them then; their distributions are the model's own, and a request for them needs no pass."""
    hf_model, tok = hf64, embedded_hf[1]
    ids = [0] + tok.encode("The cat sat on the mat. The cat sat on the")
    mat = ids[ids.index(ids[-1]) + 1:ids.index(ids[-1]) + 3]  # the two tokens after the first " the"
    # (Plain drafts of draft_tokens; a copy under way drafts longer: test_lookup_draft_follows_...)
    lm = transformer(embedded_lm, hf_model, draft_tokens=2, config=EngineConfig(draft_most=0))
    await lm.next_token_logprobs(ids[:-1])  # a long uncached context: no draft
    assert lm.n_forward_tokens == len(ids) - 1
    assert_close_to_uncached(hf_model, ids, await lm.next_token_logprobs(ids))
    assert lm.n_forward_tokens == len(ids) + 2 and lm.batcher.n_batches == 2
    batches = lm.batcher.n_batches
    for k in (1, 2):
        ctx = ids + mat[:k]
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.batcher.n_batches == batches, "drafted distributions come from the cache"
    # Concurrent requests with nothing to draft (their last two tokens never occurred) run as a
    # plain batch (a few that can draft: test_a_few_requests_together_run_their_own_drafts).
    both = [ids[:-1] + [t] for t in (11, 12)]
    before = lm.n_forward_tokens
    await asyncio.gather(*(lm.next_token_logprobs(c) for c in both))
    assert lm.n_forward_tokens == before + 2
    # A known text (prefill) asks for what it needs: no guesses.
    from genlm_bytes.lm.base import known_text
    from genlm_bytes.lm.hf.speculation import lookup_draft

    other = ids + mat + ids[1:4]  # its last two tokens occurred before
    assert lookup_draft(tuple(other), 2)
    with known_text():
        await lm.next_token_logprobs(other[:-1])
        before = lm.n_forward_tokens
        await lm.next_token_logprobs(other)
    assert lm.n_forward_tokens == before + 1
    assert not lm.has_logprobs(other + list(lookup_draft(tuple(other), 1)))
    off = transformer(embedded_lm, hf_model, draft_tokens=0)
    await off.next_token_logprobs(ids[:-1])
    await off.next_token_logprobs(ids)
    assert off.n_forward_tokens == len(ids) and not off.has_logprobs(ids + mat[:1])
    for bad in (-1, True, 1.5, "2"):
        with pytest.raises(ValueError, match="draft_tokens"):
            transformer(embedded_lm, draft_tokens=bad)


@pytest.mark.slow
async def test_a_few_requests_together_run_their_own_drafts(embedded_lm, embedded_hf, hf64):
    """A few generation requests asked in one go (a beam whose covers copy text in two
    segmentations) each run the tokens a prompt lookup drafts after their own context, in the
    same pass: exact, then served from the cache. Their group look-ahead drafts after its
    guesses too. ``group_drafts=False`` turns both off; a batch above ``ahead_group`` drafts
    nothing."""
    import genlm_bytes.lm.hf.speculation as tr

    hf_model, tok = hf64, embedded_hf[1]
    text = [0] + tok.encode("one two three four five six. one two three four five six. one two")
    ctxs = [text, text[:-1] + tok.encode(" tw")]  # (the second: another segmentation's context)
    lm = transformer(embedded_lm, hf_model, draft_tokens=2)
    drafts = [tr.lookup_draft(tuple(c), 2, most=lm.config.draft_most) for c in ctxs]
    assert len(drafts[0]) > 2 and not drafts[1], "the test expects one row with a copy's draft, one without"
    await lm.next_token_logprobs(text[:-1])  # (the shared past, cached)
    batches, tokens = lm.batcher.n_batches, lm.n_forward_tokens
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in ctxs))
    assert lm.batcher.n_batches == batches + 1
    assert lm.n_forward_tokens == tokens + len(ctxs) + len(drafts[0]) + len(ctxs[1]) - len(text)
    for c, r in zip(ctxs, rows):
        assert_close_to_uncached(hf_model, c, r)
    for k in range(1, len(drafts[0]) + 1):
        ctx = ctxs[0] + list(drafts[0][:k])
        assert lm.has_logprobs(ctx), f"draft context {k} not computed with the batch"
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx))
    assert lm.batcher.n_batches == batches + 1, "the drafted contexts come from the cache"
    assert_cache_consistent(lm.cache)

    off = transformer(embedded_lm, hf_model, draft_tokens=2, config=EngineConfig(group_drafts=False))
    await off.next_token_logprobs(text[:-1])
    await asyncio.gather(*(off.next_token_logprobs(c) for c in ctxs))
    assert not off.has_logprobs(ctxs[0] + list(drafts[0][:1]))
    many = [text[:-1] + [t] for t in range(11, 12 + lm.config.ahead_group)] + [text]
    fresh = transformer(embedded_lm, hf_model, draft_tokens=2)
    await asyncio.gather(*(fresh.next_token_logprobs(c) for c in many))
    assert not fresh.has_logprobs(text + list(drafts[0][:1])), "a batch above ahead_group drafts nothing"

    # The group look-ahead: after the batch, each context's guess and the draft after it (plain
    # drafts here: a copy's longer draft in the batch's pass would leave row 0 nothing to guess).
    lm = transformer(embedded_lm, hf_model, lookahead=True, draft_tokens=2, config=EngineConfig(draft_most=0))
    await lm.next_token_logprobs(text[:-1])
    await asyncio.gather(*(lm.next_token_logprobs(c) for c in ctxs))
    pending = lm.ahead.ahead
    assert pending is not None and len(pending.paths) == len(ctxs), "one guess per context"
    await asyncio.get_running_loop().run_in_executor(lm.batcher._executor, lambda: None)
    drafted = {p: tr.lookup_draft(p, 2, most=lm.config.draft_most) for p in pending.paths}
    assert any(drafted.values()), "the repeating text should give a look-ahead draft"
    for p, d in drafted.items():
        for k in range(len(d) + 1):
            assert lm.has_logprobs(list(p + d[:k])), f"look-ahead context {k} not computed"
            assert_close_to_uncached(hf_model, list(p + d[:k]), lm.cache.get_logp(p + d[:k]))
    assert pending.targets >= {p + d[:k] for p, d in drafted.items() for k in range(len(d) + 1)}
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_a_short_token_brings_its_likeliest_longer_sibling(embedded_lm, embedded_hf, hf64):
    """A lone request ending with a short token (" ") that begins a likelier token after the same
    prefix (" the") runs that sibling's context in the same pass: exact, and then cached."""
    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, draft_tokens=1)
    ctx = [0] + tok.encode("The cat sat on")
    row = await lm.next_token_logprobs(ctx)
    space = lm.byte_vocab.index(b" ")
    longer = [t for t in torch.topk(row, 8).indices.tolist()
              if lm.byte_vocab[t].startswith(b" ") and len(lm.byte_vocab[t]) > 1]
    assert longer, "the test expects a likely word after 'on'"
    batches, tokens = lm.batcher.n_batches, lm.n_forward_tokens
    assert_close_to_uncached(hf_model, ctx + [space], await lm.next_token_logprobs(ctx + [space]))
    assert lm.batcher.n_batches == batches + 1 and lm.n_forward_tokens == tokens + 2
    sibling = ctx + [longer[0]]
    assert lm.has_logprobs(sibling)
    assert_close_to_uncached(hf_model, sibling, await lm.next_token_logprobs(sibling))
    assert lm.batcher.n_batches == batches + 1
    ext = sibling + [11]  # the sibling's keys/values are cached too: one new token
    assert_close_to_uncached(hf_model, ext, await lm.next_token_logprobs(ext))
    assert lm.n_forward_tokens == tokens + 3
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_generation_writes_one_arena_in_place_and_stays_exact(embedded_lm, embedded_hf, hf64, monkeypatch):
    """Lone requests extending one context token by token write their keys/values in place after
    the tip of one arena (one segment: no gathering of the past per pass); a full arena moves to
    a larger one and is freed; a branch off an earlier prefix, or a sibling in a tree pass, gets
    its own memory and leaves the tip alone. Every distribution equals a plain forward."""
    hf_model, tok = hf64, embedded_hf[1]
    arenas = EngineConfig(arena_spare_min=4, arena_spare_share=0.0)
    lm = transformer(embedded_lm, hf_model, draft_tokens=0, config=arenas)
    ids = [0] + tok.encode(TEXT)
    assert_close_to_uncached(hf_model, ids[:3], await lm.next_token_logprobs(ids[:3]))
    first = lm.cache.walk(ids[:3])[-1].kv.block
    assert first.filled == 3 and first.keys[0].shape[2] == 3 + 4
    for n in range(4, 8):
        assert_close_to_uncached(hf_model, ids[:n], await lm.next_token_logprobs(ids[:n]))
    assert all(node.kv.nseg == 1 and node.kv.block is first for node in lm.cache.walk(ids[:7])), \
        "the passes should write into the arena in place"
    assert first.filled == 7 and lm.n_forward_tokens == 7
    # Full: the next pass copies the context into a larger arena, which its prefixes move to.
    assert_close_to_uncached(hf_model, ids[:8], await lm.next_token_logprobs(ids[:8]))
    second = lm.cache.walk(ids[:8])[-1].kv.block
    assert second is not first and second.filled == 8 and second.keys[0].shape[2] == 8 + 4
    assert all(node.kv.block is second for node in lm.cache.walk(ids[:8]))
    assert first.refs == 0, "the full arena should be freed once no context holds it"
    # A branch off an earlier prefix: its own arena; the tip of the other is untouched.
    branch = ids[:5] + [77]
    assert_close_to_uncached(hf_model, branch, await lm.next_token_logprobs(branch))
    assert lm.cache.walk(branch)[-1].kv.block is not second and second.filled == 8
    before = lm.n_forward_tokens
    for n in (9, 10):
        assert_close_to_uncached(hf_model, ids[:n], await lm.next_token_logprobs(ids[:n]))
    assert lm.n_forward_tokens == before + 2 and lm.cache.walk(ids[:10])[-1].kv.block is second
    assert_cache_consistent(lm.cache)
    # A tree pass (a lone request and its longer sibling): the path goes into the arena, the
    # sibling's slot is copied out, and the path's extension is written in place again.
    lm = transformer(embedded_lm, hf_model, draft_tokens=1, config=arenas)
    ctx = [0] + tok.encode("The cat sat on")
    await lm.next_token_logprobs(ctx)
    arena = lm.cache.walk(ctx)[-1].kv.block
    space = lm.byte_vocab.index(b" ")
    assert_close_to_uncached(hf_model, ctx + [space], await lm.next_token_logprobs(ctx + [space]))
    sib = [node for node in lm.cache.walk(ctx)[-1].children.values() if node.token != space]
    assert sib and all(node.kv.block is not arena and node.kv.prev.block is arena for node in sib)
    assert arena.filled == len(ctx) + 1 and lm.cache.walk(ctx + [space])[-1].kv.block is arena
    assert_close_to_uncached(hf_model, ctx + [space, 11], await lm.next_token_logprobs(ctx + [space, 11]))
    assert arena.filled == len(ctx) + 2
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
@pytest.mark.parametrize("lean", [True, False])
async def test_lookahead_guesses_the_next_context_and_stops_for_another(embedded_lm, embedded_hf, hf64, lean):
    """After serving a lone request, the model's thread runs that context extended by the token a
    greedy byte walk of its distribution ends at, by its likeliest token, and by the likely
    shorter tokens spelling the former's start (which a byte-level beam asks for first), before
    anyone asks: those requests are then served from the cache, exact. A request for another
    context stops such a pass at its next layer."""
    import threading

    import genlm_bytes.lm.hf.speculation as tr

    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, lookahead=True, lean=lean)
    assert (lm.lean is not None) == lean
    loop = asyncio.get_running_loop()

    async def idle():  # the model's thread has finished what it queued
        await loop.run_in_executor(lm.batcher._executor, lambda: None)

    def guess(row):  # the token a greedy byte walk ends at
        lp = row.numpy()
        return tr.byte_mode(lp, tr.top_tokens(lp, lm.config.ahead_top), lm.byte_vocab, lm.eos_token_ids)

    # A look-ahead pass checks before every layer whether it was stopped: armed, the check
    # holds the pass at its first layer until the gate opens.
    gate, entered, armed = threading.Event(), threading.Event(), threading.Event()
    check = lm.ahead.check_abort

    def hold(*args):
        if armed.is_set() and lm.ahead.abort is not None and lm.ahead.abort[1] == threading.get_ident():
            entered.set()
            gate.wait(30)
        check(*args)

    lm.ahead.check_abort = hold
    ctx = [0] + tok.encode("Once upon a time, there was")
    row = await lm.next_token_logprobs(ctx)
    await idle()
    a, best = guess(row), int(row.argmax())
    spelled = lm.byte_vocab[a]
    shorter = sorted((t for t, b in enumerate(lm.byte_vocab) if b and len(b) < len(spelled) and spelled.startswith(b)
                      and t != best and row[t] >= math.log(lm.config.ahead_shorter_p)),
                     key=lambda t: -len(lm.byte_vocab[t]))[:lm.config.ahead_shorter - (best != a)]  # longest first
    batches = lm.batcher.n_batches
    for t in [*shorter, a, best]:
        assert lm.has_logprobs(ctx + [t])
    for t in {*shorter, best} - {a}:
        assert_close_to_uncached(hf_model, ctx + [t], await lm.next_token_logprobs(ctx + [t]))
    # Asking for the guess starts the next guess; a request for another context stops it.
    armed.set()
    try:
        guessed = await lm.next_token_logprobs(ctx + [a])
        assert lm.batcher.n_batches == batches, "the guessed contexts should come from the cache"
        nxt = ctx + [a, guess(guessed)]
        assert await loop.run_in_executor(None, entered.wait, 30), "no look-ahead pass started"
        other = ctx + [a, 11]
        task = asyncio.ensure_future(lm.next_token_logprobs(other))
        await asyncio.sleep(0.05)
        assert lm.ahead.ahead.abort.is_set()
        # The model runs elsewhere meanwhile (here, in this thread): the stop concerns the
        # look-ahead pass's thread only.
        assert_close_to_uncached(hf_model, ctx + [a], guessed)
        gate.set()
        assert_close_to_uncached(hf_model, other, await asyncio.wait_for(task, 60))
    finally:
        armed.clear()
        gate.set()
    await idle()
    assert not lm.has_logprobs(nxt), "the stopped pass should have cached nothing"
    assert lm.ahead.abort is None and lm.cache.reserved == lm.runner.store.base_reserve
    assert_cache_consistent(lm.cache)
    assert_close_to_uncached(hf_model, nxt, await lm.next_token_logprobs(nxt))
    off = transformer(embedded_lm, hf_model)
    await off.next_token_logprobs(ctx)
    await loop.run_in_executor(off.batcher._executor, lambda: None)
    assert not off.has_logprobs(ctx + [a]), "lookahead=False: no guesses"
    for bad in (1, None, "yes"):
        with pytest.raises(TypeError, match="lookahead"):
            transformer(embedded_lm, lookahead=bad)


@pytest.mark.slow
async def test_lookahead_runs_a_prompt_lookup_draft_and_follows_right_drafts(embedded_lm, embedded_hf, hf64):
    """On text that repeats itself, a look-ahead pass also runs the tokens that followed the last
    earlier occurrence of its guess's context (a prompt-lookup draft): their distributions are
    cached, exact. Asking for the guess then walks along the drafts computed already (greedy
    guesses that match them) and runs the next pass from the first guess not computed, so the
    caller's requests along a right draft are all served from the cache."""
    import genlm_bytes.lm.hf.speculation as tr

    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, lookahead=True, draft_tokens=2)
    loop = asyncio.get_running_loop()

    async def idle():
        await loop.run_in_executor(lm.batcher._executor, lambda: None)

    def guess(ids):
        lp = lm.cache.get_logp(tuple(ids)).numpy()
        return tr.byte_mode(lp, tr.top_tokens(lp, lm.config.ahead_top), lm.byte_vocab, lm.eos_token_ids)

    ctx = [0] + tok.encode("one two three four five six. one two three four five six. one two three")
    await lm.next_token_logprobs(ctx)
    await idle()
    a = guess(ctx)
    draft = tr.lookup_draft(tuple(ctx + [a]), 2)
    assert len(draft) == 2, "the text repeats: a draft should follow the guess"
    for k in range(len(draft) + 1):
        ids = ctx + [a] + list(draft[:k])
        assert lm.has_logprobs(ids), f"draft context {k} not computed ahead"
        assert_close_to_uncached(hf_model, ids, lm.cache.get_logp(tuple(ids)))
    # The greedy guesses follow the draft (the text repeats): asking for the guess walks
    # along it and runs the next pass from its end; the caller's requests are all hits.
    walk = ctx + [a]
    while len(walk) < len(ctx) + 1 + len(draft) and guess(walk) == draft[len(walk) - len(ctx) - 1]:
        walk = walk + [guess(walk)]
    assert len(walk) == len(ctx) + 1 + len(draft), "the model should follow the repetition"
    batches = lm.batcher.n_batches
    for k in range(len(draft) + 1):
        await lm.next_token_logprobs(ctx + [a] + list(draft[:k]))
    await idle()
    assert lm.batcher.n_batches == batches, "every context along the draft should come from the cache"
    nxt = walk + [guess(walk)]
    assert lm.has_logprobs(nxt), "the pass after the draft should have run ahead"
    assert_close_to_uncached(hf_model, nxt, await lm.next_token_logprobs(nxt))
    assert_cache_consistent(lm.cache)


async def test_a_few_contexts_asked_together_get_one_lookahead_pass(embedded_lm, embedded_hf, hf64):
    """Contexts asked for in one go (a beam whose covers follow the same text in two
    segmentations, a few states stepping together) are guessed together: each extended by the
    token its greedy byte walk ends at, in one pass; asking for those guesses in one go serves
    them from the cache (exact) and guesses the next ones. Larger batches get no guesses."""
    import genlm_bytes.lm.hf.speculation as tr

    hf_model, tok = hf64, embedded_hf[1]
    lm = transformer(embedded_lm, hf_model, lookahead=True)
    loop = asyncio.get_running_loop()

    async def idle():
        await loop.run_in_executor(lm.batcher._executor, lambda: None)

    def guess(row):
        lp = row.numpy()
        return tr.byte_mode(lp, tr.top_tokens(lp, lm.config.ahead_top), lm.byte_vocab, lm.eos_token_ids)

    ctxs = [[0] + tok.encode("Once upon a time, there was"), [0] + tok.encode("The three primary colors are")]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in ctxs))
    assert lm.batcher.n_batches == 1, "asked in one go: one batch"
    await idle()
    nxt = [c + [guess(r)] for c, r in zip(ctxs, rows)]
    batches = lm.batcher.n_batches
    assert all(lm.has_logprobs(c) for c in nxt)
    got = await asyncio.gather(*(lm.next_token_logprobs(c) for c in nxt))
    assert lm.batcher.n_batches == batches, "the guessed contexts should come from the cache"
    for c, r in zip(nxt, got):
        assert_close_to_uncached(hf_model, c, r)
    await idle()
    after = [c + [guess(r)] for c, r in zip(nxt, got)]
    assert all(lm.has_logprobs(c) for c in after), "asking for the guesses guesses the next ones"
    assert lm.ahead.abort is None and lm.cache.reserved == lm.runner.store.base_reserve
    assert_cache_consistent(lm.cache)
    # More than AHEAD_GROUP contexts at once: no guesses.
    many = [[0] + tok.encode(f"Item {i} of the list is") for i in range(lm.config.ahead_group + 1)]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in many))
    await idle()
    assert not any(lm.has_logprobs(c + [guess(r)]) for c, r in zip(many, rows))


@pytest.mark.slow
async def test_siblings_are_the_likeliest_longer_tokens_and_the_tokens_on_their_way(embedded_lm, embedded_hf):
    """A lone request ending with a short token (" ") runs, in the same pass, the likeliest
    contexts the beam may ask for next inside a longer token: the likeliest longer tokens (" the")
    and the tokens spelling their starts on the way (" th"), likeliest first, not cached ones."""
    tok = embedded_hf[1]
    lm = transformer(embedded_lm, draft_tokens=2)
    vocab = lm.byte_vocab
    ctx = [0] + tok.encode("The cat sat on")
    row = await lm.next_token_logprobs(ctx)
    space = vocab.index(b" ")
    longer = [t for t in torch.topk(row, 8).indices.tolist() if vocab[t].startswith(b" ") and len(vocab[t]) > 1]
    on_way = {u for t in longer for n in range(2, len(vocab[t])) if (u := lm.by_bytes.get(vocab[t][:n])) is not None}
    allowed = set(longer) | on_way
    sibs = lm.scheduler.drafter.siblings(tuple(ctx + [space]), 3)
    assert len(sibs) == 3 and set(sibs) <= allowed
    assert sibs[0] == max(allowed, key=lambda t: float(row[t]))
    ps = [float(row[t]) for t in sibs]
    assert ps == sorted(ps, reverse=True), "likeliest first"
    await lm.next_token_logprobs(ctx + [space])  # the pass runs the two likeliest with it
    assert all(lm.has_logprobs(ctx + [t]) for t in sibs[:2])
    assert lm.scheduler.drafter.siblings(tuple(ctx + [space]), 3)[0] == sibs[2], "cached siblings are not offered again"
    assert lm.scheduler.drafter.siblings(tuple(ctx[:1]), 2) == [] and lm.scheduler.drafter.siblings(tuple(ctx + [space]), 0) == []


def test_byte_mode_follows_the_heaviest_bytes_not_the_likeliest_token():
    from genlm_bytes.lm.hf.speculation import byte_mode as _byte_mode

    vocab = [b" a", b" the", b" there", b" they", b" an", b"x", b"<eos>"]

    def mode(ps, eos=()):
        lp = np.log(np.array(ps, dtype=np.float32))
        return vocab[t] if (t := _byte_mode(lp, list(range(len(ps))), vocab, list(eos))) is not None else None

    # " t" holds 0.37 against " a"'s 0.35, and " the" (0.15) outweighs " ther" (0.12) and " they" (0.1).
    assert mode([0.3, 0.15, 0.12, 0.1, 0.05, 0.27, 0.01]) == b" the"
    assert mode([0.5, 0.15, 0.12, 0.1, 0.05, 0.07, 0.01]) == b" a"
    assert mode([0.05, 0.05, 0.05, 0.05, 0.05, 0.1, 0.65], eos=[6]) == b" the"  # EOS is never guessed
    assert mode([0.01] * 6 + [0.94], eos=[0, 1, 2, 3, 4, 5, 6]) is None


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"gather_chunk_bytes": -1}, ValueError, "EngineConfig.gather_chunk_bytes must be an int >= 0, got -1"),
    ({"gather_chunk_bytes": 1.5}, ValueError, "EngineConfig.gather_chunk_bytes must be an int >= 0"),
    ({"gather_chunk_bytes": True}, ValueError, "EngineConfig.gather_chunk_bytes must be an int >= 0"),
    ({"prefetch_chunk": 0}, ValueError, "EngineConfig.prefetch_chunk must be an int >= 1, got 0"),
    ({"pass_share": 1.5}, ValueError, "EngineConfig.pass_share is a share and must be at most 1"),
    ({"pass_share": float("nan")}, ValueError, "EngineConfig.pass_share must be a finite number >= 0"),
    ({"ahead_sibling": 1}, TypeError, "EngineConfig.ahead_sibling must be True or False"),
    ({"quantized_products": "yes"}, TypeError, "EngineConfig.quantized_products must be True or False"),
    ({"prepared_share": 1.5}, ValueError, "EngineConfig.prepared_share is a share and must be at most 1"),
    ({"prepared_share": -0.1}, ValueError, "EngineConfig.prepared_share must be a finite number >= 0"),
    ({"prepared_share": "0.1"}, ValueError, "EngineConfig.prepared_share must be a finite number >= 0"),
])
def test_engine_config_rejects_bad_knobs_by_name(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        EngineConfig(**kwargs)
    assert EngineConfig(gather_chunk_bytes=0).gather_chunk_bytes == 0  # one layer per group


async def test_output_layer_products_of_a_few_rows_run_padded_and_exact(embedded_lm, embedded_hf, hf64, monkeypatch):
    """``EngineConfig.head_pad``: the output layer of a pass keeping 5 to 15 positions runs on 16
    rows (a faster product on a CPU), and every kept row is still exact; 0 turns it off."""
    hf_model, tok = hf64, embedded_hf[1]
    ids = [0] + tok.encode(TEXT)[:9]  # 10 positions
    head = hf_model.get_output_embeddings().weight
    linear = torch.nn.functional.linear
    for pad, rows in ((16, 16), (0, 9)):
        seen = []

        def spy(x, w, b=None, seen=seen):
            if w is head:
                seen.append(x.shape[0])
            return linear(x, w, b)

        monkeypatch.setattr(torch.nn.functional, "linear", spy)
        lm = transformer(embedded_lm, hf_model, config=EngineConfig(head_pad=pad))
        await lm.next_token_logprobs(ids[:1])
        await lm.prefetch(ids, start=1)  # the logits after 9 new positions
        monkeypatch.setattr(torch.nn.functional, "linear", linear)
        assert seen[-1] == rows
        for i in (2, 5, 10):
            assert_close_to_uncached(hf_model, ids[:i], lm.cache.get_logp(tuple(ids[:i])))
