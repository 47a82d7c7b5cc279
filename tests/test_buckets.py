"""A batched pass pads its rows' pasts per bucket of similar lengths (``EngineConfig.bucket_slots``),
and decoding rows attend by two batched products (``models.layers.attend``)."""

from __future__ import annotations

import asyncio
import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
from test_backend import (  # noqa: F401 - _one_thread is an autouse fixture
    TEXT,
    _one_thread,
    assert_cache_consistent,
    assert_close_to_uncached,
    transformer,
)

from genlm_bytes.lm.hf import EngineConfig
from genlm_bytes.lm.hf.passes import attention_buckets
from genlm_bytes.models.layers import attend, group_mask


@pytest.fixture(scope="module")
def hf64(embedded_hf):
    """A float64 copy of the embedded model (this module only)."""
    return copy.deepcopy(embedded_hf[0]).to(torch.float64).eval()


def _slots(pasts, n, buckets, cost):
    return sum(cost + (r1 - r0) * (Pb + n) for r0, r1, Pb in buckets)


def test_buckets_cover_the_rows_in_order_and_cost_least():
    pasts = [60, 58, 57, 31, 30, 29, 28, 5, 4, 3]
    for cost in (0, 10, 40, 1000):
        got = attention_buckets(pasts, 1, cost)
        assert got[0][0] == 0 and got[-1][1] == len(pasts)
        assert all(a[1] == b[0] for a, b in itertools.pairwise(got)), "contiguous, in order"
        assert all(Pb == pasts[r0] for r0, _, Pb in got), "padded to each bucket's longest past"
        # No split costs less (exhaustive).
        best = min(_slots(pasts, 1, bk, cost) for bk in _splits(pasts))
        assert _slots(pasts, 1, got, cost) == best
    assert attention_buckets(pasts, 1, 10) == [(0, 3, 60), (3, 7, 31), (7, 10, 5)]
    assert attention_buckets(pasts, 1, 1000) == [(0, 10, 60)], "a bucket's own cost outweighs its savings"
    assert len(attention_buckets(list(range(200, 0, -1)), 1, 0, most_cuts=8)) <= 8, "cuts searched in few places"


def _splits(pasts):
    """Every split of the rows into contiguous buckets."""
    B = len(pasts)
    for mask in range(1 << (B - 1)):
        cuts = [0] + [i for i in range(1, B) if mask >> (i - 1) & 1] + [B]
        yield [(a, b, pasts[a]) for a, b in itertools.pairwise(cuts)]


@pytest.mark.parametrize("additive", [False, True])
@pytest.mark.parametrize("T", [1, 3])
def test_attend_by_products_matches_sdpa(additive, T):
    g = torch.Generator().manual_seed(0)
    B, h, hk, d, L = 5, 9, 3, 16, 12
    q, k, v = (torch.randn(s, generator=g) for s in ((B, h, T, d), (B, hk, L, d), (B, hk, L, d)))
    allowed = torch.rand(B, 1, T, L, generator=g) > 0.3
    allowed[..., -1] = True  # (every query sees a key)
    mask = allowed if not additive else torch.zeros(B, 1, T, L).masked_fill_(~allowed, float("-inf"))
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(h // hk, 1), v.repeat_interleave(h // hk, 1),
                                          attn_mask=mask, scale=0.3)
    got = attend(q, k, v, group_mask(mask, B, h // hk, T, L), 0.3)
    assert got.shape == (B, h, T, d)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one = attend(q[:1], k[:1], v[:1], group_mask(mask[:1], 1, h // hk, T, L), 0.3)  # (one row: SDPA)
    torch.testing.assert_close(one, want[:1], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
async def test_a_bucketed_batch_is_exact_and_answers_in_the_callers_order(embedded_lm, embedded_hf, hf64,
                                                                         monkeypatch):
    """Rows of very different pasts, in an order that is not by length, split into buckets: each
    caller gets its own row, close to a plain forward; a second batch extends them (their new
    tokens stored at the rows the bucketed pass gave them), and rows stored whole (a chain of
    MIN_SEGMENTS) take their slots from their bucket's padding."""
    from genlm_bytes.lm.hf import pass_cache

    hf_model, tok = hf64, embedded_hf[1]
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    lm = transformer(embedded_lm, hf_model, config=EngineConfig(bucket_slots=1, min_segments=2))
    for n in (2, 6, len(ids) - 8):
        await lm.next_token_logprobs(ids[:n])
    seen = []
    inner = pass_cache._Gather.update_buckets

    def recorded(self, k, v):
        out = inner(self, k, v)
        if self.index == 0:
            seen.append([tuple(K.shape) for K, _ in out])
        return out

    monkeypatch.setattr(pass_cache._Gather, "update_buckets", recorded)
    contexts = [ids[:2] + [11], ids[:len(ids) - 8] + [12], ids[:6] + [13, 14], ids[:2] + [15],
                ids[:len(ids) - 8] + [16, 17]]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
    assert len(seen) == 1 and len(seen[0]) >= 2, "one pass, its attention in buckets"
    assert sum(s[0] for s in seen[0]) == len(contexts)
    assert max(s[2] for s in seen[0]) == len(ids) - 8 + 2 and min(s[2] for s in seen[0]) < 8
    for ctx, row in zip(contexts, rows):
        assert_close_to_uncached(hf_model, ctx, row)
    for _ in range(3):  # steps that chain segments, then store rows whole
        contexts = [c + [21] for c in contexts]
        rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts))
        for ctx, row in zip(contexts, rows):
            assert_close_to_uncached(hf_model, ctx, row)
    assert len(seen) == 4 and all(len(s) >= 2 for s in seen)
    assert max(node.kv.nseg for c in contexts for node in lm.cache.walk(c) if node.kv is not None) <= 3
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
async def test_buckets_off_and_on_give_the_same_rows(embedded_lm, embedded_hf):
    """float32: the same batch with and without buckets (0: never) agrees to float rounding."""
    tok = embedded_hf[1]
    ids = [0] + tok.encode(TEXT + " " + TEXT)
    out = []
    for slots in (0, 1):
        lm = transformer(embedded_lm, config=EngineConfig(bucket_slots=slots))
        for n in (3, len(ids) - 4):
            await lm.next_token_logprobs(ids[:n])
        contexts = [ids[:3] + [40], ids[:len(ids) - 4] + [41], ids[:3] + [42, 43]]
        assert (lm.runner.buckets([(tuple(c), None, p) for c, p in zip(contexts, (3, len(ids) - 4, 3))])[1]
                is None) == (slots == 0)
        out.append(await asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts)))
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=0)


def test_attend_keeps_a_query_that_sees_no_key_finite_and_out_of_the_other_rows():
    """A padding query outside every window sees no key: its output stays finite (NaN would
    reach the other rows through its keys and values in the next layer: 0 * NaN), and the rows
    that see keys are SDPA's, whether the mask is bool or additive."""
    g = torch.Generator().manual_seed(1)
    B, h, hk, d, L = 3, 4, 2, 8, 6
    q, k, v = (torch.randn(s, generator=g) for s in ((B, h, 1, d), (B, hk, L, d), (B, hk, L, d)))
    allowed = torch.ones(B, 1, 1, L, dtype=torch.bool)
    allowed[1] = False
    allowed[2, ..., :3] = False
    want = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=allowed)
    for mask in (allowed, torch.zeros(B, 1, 1, L).masked_fill_(~allowed, float("-inf"))):
        got = attend(q, k, v, group_mask(mask, B, h // hk, 1, L))
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got[[0, 2]], want[[0, 2]], atol=1e-5, rtol=1e-5)


def test_bad_input_to_the_bucket_entry_points():
    for args in (([], 1, 0), ([3, 5], 1, 0), ([5, -1], 1, 0), ([5, 3], 0, 0), ([5, 3], 1, -1), ([5, 3.0], 1, 0),
                 ([5, 3], 1, True)):
        with pytest.raises(ValueError):
            attention_buckets(*args)
    with pytest.raises(ValueError, match="most_cuts"):
        attention_buckets([5, 3], 1, 0, most_cuts=0)
    for bad in (-1, 1.5, True, "128"):
        with pytest.raises(ValueError, match="bucket_slots"):
            EngineConfig(bucket_slots=bad)


def test_bad_input_to_the_group_entry_points():
    from genlm_bytes.lm import gemm

    w = torch.randn(8, 4)
    for fn in (gemm.packed_group, gemm.pack_groups):
        with pytest.raises(TypeError, match="not one tensor"):
            fn(w)
        with pytest.raises(TypeError, match="iterable"):
            fn(3)
    with pytest.raises(TypeError, match="not one tensor"):
        gemm.pack_groups([w, w])  # (a group is a tuple of weights, not one weight)
    assert gemm.packed_group((w, torch.randn(8, 4))) is None and not gemm.is_packed(w)
