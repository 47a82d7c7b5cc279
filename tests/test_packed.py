"""oneDNN's packed copies of the weights (lm/gemm.py: pack_weights, linear_fn(packed=True)) and new
memory onto huge pages (lm/hugepages.py: new_memory_on_huge_pages)."""

from __future__ import annotations

import gc
import mmap
import sys
import weakref
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from genlm_bytes.lm import gemm
from genlm_bytes.lm.hf.memory import mapped_fresh
from genlm_bytes.lm.hugepages import _new_ranges, new_memory_on_huge_pages

needs_onednn = pytest.mark.skipif(not gemm.onednn_works(), reason="torch has no working oneDNN linear op")


def _thp_enabled() -> bool:
    try:
        return "[never]" not in Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False


@needs_onednn
@torch.inference_mode()
def test_packed_rows_are_the_same_at_every_row_count():
    """A row multiplied by the packed weight comes out bit for bit the same whatever the number
    of rows of its product, the same as the plain layout's products of 2 rows or more, and equal
    to F.linear's up to rounding."""
    g = torch.Generator().manual_seed(0)
    with torch.inference_mode(False):
        w = torch.randn(256, 192, generator=g)
        b = torch.randn(256, generator=g)
    x = torch.randn(40, 192, generator=g)
    assert gemm.pack_weights([w]) == w.numel() * 4
    assert gemm.packed_weight(w) is not None
    packed, plain = gemm.linear_fn(True, packed=True), gemm.linear_fn(True)
    for bias in (None, b):
        first = packed(x[:1], w, bias)[0]
        for m in (2, 3, 5, 8, 9, 20, 40):
            assert torch.equal(packed(x[:m], w, bias)[0], first), m
            assert torch.equal(plain(x[:m], w, bias)[0], first), m
        torch.testing.assert_close(packed(x, w, bias), F.linear(x, w, bias), rtol=1e-5, atol=1e-4)
    y3 = packed(x.view(4, 10, 192), w)  # a 3-D input
    assert y3.shape == (4, 10, 256) and torch.equal(y3.view(40, 256), packed(x, w))


@needs_onednn
def test_a_stale_pack_is_not_used_and_is_made_again():
    """A weight changed in place (its version) or pointed elsewhere (its address) is multiplied
    as it is now; pack_weights packs it again."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(64, 32, generator=g)
    x = torch.randn(3, 32, generator=g)
    gemm.pack_weights([w])
    assert gemm.pack_bytes([w]) == 0 and gemm.pack_weights([w]) == 0  # packed as it is now
    linear = gemm.linear_fn(True, packed=True)
    with torch.no_grad():
        w.mul_(2.0)
    assert gemm.packed_weight(w) is None and gemm.pack_bytes([w]) == w.numel() * 4
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    assert gemm.pack_weights([w, w]) == w.numel() * 4  # (once, however often it is named)
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)
    w.data = torch.randn(64, 32, generator=g)  # the same tensor object, new memory
    assert gemm.packed_weight(w) is None
    with torch.inference_mode():
        torch.testing.assert_close(linear(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_packs_are_freed_with_their_weight_and_others_are_skipped():
    w = torch.randn(128, 64)
    assert gemm.pack_weights([torch.randn(8, 8, dtype=torch.float64), torch.randn(16)]) == 0  # not float32 matrices
    assert gemm.pack_weights([w]) == 128 * 64 * 4
    assert gemm.packed_bytes() >= 128 * 64 * 4
    key, pack = id(w), weakref.ref(gemm.packed_weight(w))
    del w
    gc.collect()
    assert pack() is None and (key,) not in gemm._PACKS


def test_new_ranges_are_what_before_did_not_cover():
    before = [(0, 10), (20, 30), (50, 60)]
    after = [(0, 12), (18, 35), (40, 45), (50, 60)]
    assert _new_ranges(before, after) == [(10, 12), (18, 20), (30, 35), (40, 45)]
    assert _new_ranges([], [(5, 9)]) == [(5, 9)]
    assert _new_ranges([(0, 100)], [(10, 20)]) == []


@pytest.mark.skipif(not sys.platform.startswith("linux") or not _thp_enabled(),
                    reason="needs Linux with transparent huge pages")
def test_memory_a_block_maps_is_advised_onto_huge_pages():
    with new_memory_on_huge_pages() as h:
        buf = mmap.mmap(-1, 64 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        buf[::4096] = bytes(range(256)) * (len(buf[::4096]) // 256)
    assert h.bytes >= 32 << 20
    assert buf[::4096] == bytes(range(256)) * ((64 << 20) // 4096 // 256)  # the contents are untouched
    with new_memory_on_huge_pages() as h2:
        pass
    assert h2.bytes < 32 << 20


def test_mapped_fresh_lowers_glibcs_threshold_within_the_block(monkeypatch):
    from genlm_bytes.lm.hf import memory

    calls = []
    monkeypatch.setattr(memory, "fix_mmap_threshold", lambda: True)
    monkeypatch.setattr(memory, "_MALLOPT", lambda param, value: calls.append((param, value)) or 1)
    with mapped_fresh(1 << 20):
        assert calls == [(memory.M_MMAP_THRESHOLD, 1 << 20)]
    assert calls[-1] == (memory.M_MMAP_THRESHOLD, memory.MMAP_THRESHOLD_BYTES)
    for bad in (0, -1, 2.5, True, "1M", 4 << 30):
        with pytest.raises(ValueError, match="nbytes"):
            mapped_fresh(bad)
    calls.clear()
    monkeypatch.setattr(memory, "fix_mmap_threshold", lambda: False)  # the user set MALLOC_MMAP_THRESHOLD_
    with mapped_fresh(1 << 20):
        pass
    assert calls == []


@pytest.mark.slow
@needs_onednn
async def test_engine_multiplies_by_packed_weights_with_the_same_rows(embedded_lm):
    """The default engine packs the decoder's and the output layer's weights and gives the rows an
    engine without packs gives (to rounding); it does not pack where the copies would not fit a
    quarter of the memory available."""
    from genlm_bytes import AsyncTransformer, EngineConfig
    from genlm_bytes.lm.lean import model_groups, model_matrices

    model, tok = embedded_lm.model, embedded_lm.tokenizer
    assert embedded_lm.packed
    mats = model_matrices(model)
    assert len(mats) > 100 and all(gemm.is_packed(w) for w in mats)
    groups = model_groups(model)  # (q, k, v) and (gate, up) of every layer: one pack each
    assert len(groups) == 2 * model.config.num_hidden_layers
    assert all(gemm.packed_group(g) is not None and all(gemm.packed_weight(w) is None for w in g) for g in groups)
    plain = AsyncTransformer(model, tok, initial_context=[0], config=EngineConfig(packed_weights=False))
    assert plain.onednn and not plain.packed
    contexts = [[0] + tok.encode(t) for t in ("The river was high that spring", "def main():\n    x = 1",
                                              '{"id": 4, "tags": [')]
    packed = AsyncTransformer(model, tok, initial_context=[0])
    assert packed.packed
    for ids in contexts:
        a, b = await packed.next_token_logprobs(ids), await plain.next_token_logprobs(ids)
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-4)
    assert packed.runner.passes["lean"] > 0


@pytest.mark.slow
def test_no_packing_where_memory_is_short(embedded_lm, monkeypatch):
    from genlm_bytes import AsyncTransformer
    from genlm_bytes.lm.hf import backend

    monkeypatch.setattr(backend, "pack_bytes", lambda weights: 600 << 20)  # as if nothing were packed yet
    monkeypatch.setattr(backend, "available_bytes", lambda: 2000 << 20)
    lm = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0])
    assert lm.onednn and not lm.packed
    monkeypatch.setattr(backend, "available_bytes", lambda: 2400 << 20)  # a quarter of it: packed
    assert AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0]).packed
    monkeypatch.setattr(backend, "available_bytes", lambda: None)  # unknown: packed
    assert AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, initial_context=[0]).packed


@needs_onednn
def test_a_change_through_data_is_found_and_packed_again():
    """``w.data.mul_`` keeps the version and the address: changed_weights finds it by a product."""
    g = torch.Generator().manual_seed(2)
    w, v = torch.randn(96, 48, generator=g), torch.randn(96, 48, generator=g)
    gemm.pack_weights([w, v])
    assert gemm.changed_weights([w, v]) == []
    w.data[5, 7] += 0.5  # one entry
    changed = gemm.changed_weights([w, v])
    assert len(changed) == 1 and changed[0] is w
    assert gemm.packed_weight(w) is None and gemm.packed_weight(v) is not None
    assert gemm.pack_weights([w, v]) == w.numel() * 4
    x = torch.randn(4, 48, generator=g)
    with torch.inference_mode():
        torch.testing.assert_close(gemm.linear_fn(True, packed=True)(x, w), F.linear(x, w), rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_pack_that_multiplies_differently_or_fails_is_not_used(monkeypatch):
    w = torch.randn(64, 32)
    real = torch.ops.mkldnn._reorder_linear_weight

    class Ops:  # oneDNN's packing, giving another matrix's pack
        _linear_pointwise = torch.ops.mkldnn._linear_pointwise
        _reorder_linear_weight = staticmethod(lambda t: real(t * 2.0))

    monkeypatch.setattr(gemm.torch.ops, "mkldnn", Ops)
    assert gemm.pack_weights([w]) == 0 and gemm.packed_weight(w) is None

    def broken(t):
        raise RuntimeError("no packing here")

    Ops._reorder_linear_weight = staticmethod(broken)
    assert gemm.pack_weights([w]) == 0 and gemm.packed_weight(w) is None


def test_bad_input_to_the_packing_entry_points():
    from genlm_bytes import EngineConfig

    w = torch.randn(8, 4)
    for fn in (gemm.pack_weights, gemm.pack_bytes, gemm.changed_weights):
        with pytest.raises(TypeError, match="not one tensor"):
            fn(w)
        with pytest.raises(TypeError, match="iterable of tensors"):
            fn(3)
    with pytest.raises(TypeError, match="packed_weights must be True or False"):
        EngineConfig(packed_weights=1)


@needs_onednn
def test_a_group_of_weights_packed_as_one_multiplies_as_each_of_them():
    """Weights that multiply the same input (q, k, v) packed as one matrix: one product gives
    each one's product side by side, bit for bit as their own packs do, at every row count; their
    own packs are dropped (the same bytes); a group of other widths or dtypes is not packed."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(n, 64, generator=g) for n in (64, 16, 16))
    x = torch.randn(20, 64, generator=g)
    gemm.pack_weights([q, k, v])
    with torch.inference_mode():
        linear = gemm.linear_fn(True, packed=True)
        alone = torch.cat([linear(x, w) for w in (q, k, v)], dim=-1)
        assert linear.group(x, (q, k, v)) is None, "no group pack yet: multiply by each"
        assert gemm.pack_groups([(q, k, v)]) == (64 + 16 + 16) * 64 * 4
        assert gemm.packed_group((q, k, v)) is not None and all(gemm.packed_weight(w) is None for w in (q, k, v))
        assert all(gemm.is_packed(w) for w in (q, k, v)) and gemm.pack_bytes([q, k, v]) == 0
        assert gemm.pack_weights([q, k, v]) == 0, "a grouped weight is not packed alone again"
        for m in (1, 2, 7, 20):
            assert torch.equal(linear.group(x[:m], (q, k, v)), alone[:m]), m
        y3 = linear.group(x.view(4, 5, 64), (q, k, v))
        assert y3.shape == (4, 5, 96) and torch.equal(y3.view(20, 96), alone)
        torch.testing.assert_close(alone, F.linear(x, torch.cat([q, k, v])), rtol=1e-5, atol=1e-4)
        assert gemm.linear_fn(True).group(x, (q, k, v)) is None, "not packed: multiply by each"
    assert gemm.pack_groups([(q, k, v)]) == 0, "packed as they are"
    assert gemm.pack_groups([(q, torch.randn(8, 32)), (q, q), (q, k.double())]) == 0
    with pytest.raises(TypeError, match="not one tensor"):
        gemm.pack_groups(q)


@needs_onednn
def test_a_changed_weight_of_a_group_is_not_multiplied_by_the_stale_pack():
    """A member changed in place (its version) leaves the group unused until packed again; one
    changed through ``.data`` is found by changed_weights, which drops the group; a group goes
    with its weights."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(32, 48, generator=g), torch.randn(32, 48, generator=g)
    x = torch.randn(3, 48, generator=g)
    gemm.pack_groups([(a, b)])
    linear = gemm.linear_fn(True, packed=True)
    with torch.no_grad():
        b.mul_(2.0)
    with torch.inference_mode():
        assert linear.group(x, (a, b)) is None
    assert gemm.pack_groups([(a, b)]) == 2 * 32 * 48 * 4
    with torch.inference_mode():
        torch.testing.assert_close(linear.group(x, (a, b))[:, 32:], F.linear(x, b), rtol=1e-5, atol=1e-4)
    assert gemm.changed_weights([a, b]) == []
    a.data[0, 0] += 1.0
    changed = gemm.changed_weights([a, b])
    assert [w is a for w in changed] == [True]
    assert gemm.packed_group((a, b)) is None and not gemm.is_packed(b)
    assert gemm.pack_groups([(a, b)]) > 0
    key = (id(a), id(b))
    before = gemm.packed_bytes()
    del a, changed
    gc.collect()
    assert key not in gemm._PACKS and gemm.packed_bytes() == before - 2 * 32 * 48 * 4
