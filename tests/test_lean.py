"""The lean decoder pass (genlm_bytes.lm.lean): the model's own hidden states, for the models it
recognizes, and transformers' forward for the others."""

import pytest
import torch
import torch.nn.functional as F

from genlm_bytes.lm.gemm import linear_fn, onednn_works
from genlm_bytes.lm.lean import LeanDecoder, lean_decoder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def tiny(kind="llama", **overrides):
    """A small random model of a transformers family (float32, eval mode)."""
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": 97, "hidden_size": 48, "intermediate_size": 80, "num_hidden_layers": 2,
                  "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": 128}
    common.update(overrides)
    if kind == "qwen2":
        cfg = transformers.Qwen2Config(**common)
        model = transformers.Qwen2ForCausalLM(cfg)
    elif kind == "gemma3":  # (a window the passes below stay inside: transformers' sliding cache keeps
        # only the window, which a tree mask over the whole past cannot address; windows past the
        # window are tested through the backend in test_sliding_window.py)
        common = {"head_dim": 8, "sliding_window": 16, "layer_types": ["sliding_attention", "full_attention"],
                  **common}
        cfg = transformers.Gemma3TextConfig(**common)
        model = transformers.Gemma3ForCausalLM(cfg)
    else:
        cfg = transformers.LlamaConfig(**common)
        model = transformers.LlamaForCausalLM(cfg)
    return model.eval()


def hf_hidden(model, ids, mask, pos, cache):
    return model.get_decoder()(input_ids=ids, attention_mask=mask, position_ids=pos, past_key_values=cache,
                               use_cache=True).last_hidden_state


def passes(model, run):
    """Hidden states of four kinds of pass: a causal prompt, new tokens on its past, a ragged batch
    (left-padded pasts, right-padded new tokens) and a tree-masked pass on a past."""
    from transformers import DynamicCache

    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 9), generator=gen)
    out = []
    c = DynamicCache(config=model.config)
    out.append(run(ids[:1, :5], None, torch.arange(5)[None], c))
    out.append(run(ids[:1, 5:8], None, torch.arange(5, 8)[None], c))
    mask = torch.ones((2, 9), dtype=torch.long)
    mask[0, :3] = 0  # row 0: 6 tokens, left-padded
    mask[1, 8] = 0  # row 1: its last new token is padding
    pos = torch.stack([torch.arange(-3, 6).clamp(min=0), torch.arange(9)])
    full = run(ids, mask, pos, DynamicCache(config=model.config))
    out += [full[0, 3:], full[1, :8]]
    c = DynamicCache(config=model.config)
    run(ids[:1, :4], None, torch.arange(4)[None], c)
    # Four new tokens on a past of 4: a path of two, then a branch at position 4 and its child.
    allowed = torch.ones(4, 8, dtype=torch.bool)
    allowed[:, 4:] = torch.tensor([[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]], dtype=torch.bool)
    tree = torch.zeros(1, 1, 4, 8).masked_fill_(~allowed, float("-inf"))
    out.append(run(ids[:1, 4:8], tree, torch.tensor([[4, 5, 4, 5]]), c))
    return out


@pytest.mark.parametrize("onednn", [True, False])
@pytest.mark.parametrize("kind", ["llama", "qwen2", "gemma3"])
def test_lean_passes_equal_the_models_own(kind, onednn):
    model = tiny(kind)
    lean = lean_decoder(model, onednn=onednn)
    assert isinstance(lean, LeanDecoder)
    assert (lean.linear is not F.linear) == (onednn and onednn_works())
    want = passes(model, lambda *a: hf_hidden(model, *a))
    got = passes(model, lambda *a: lean(*a))
    assert len(got) == len(want) == 5
    for g, w in zip(got, want):
        assert g.shape == w.shape
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_onednn_products_where_they_apply_and_f_linear_elsewhere(monkeypatch):
    """``linear_fn()``: oneDNN's product for float32 CPU tensors outside autograd (the same values
    as ``F.linear`` up to rounding, any leading shape, with or without a bias, on a transposed
    weight); ``F.linear`` for other dtypes, for tensors autograd records, and when turned off."""
    assert linear_fn(False) is F.linear
    if not onednn_works():
        pytest.skip("torch has no working oneDNN linear op here")
    linear = linear_fn()
    assert linear is not F.linear
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(300, 64, generator=gen), torch.randn(300, generator=gen)
    for shape in ((1, 64), (4, 64), (2, 7, 64), (0, 64)):
        x = torch.randn(shape, generator=gen)
        for ww, bb in ((w, None), (w, b), (w.t().contiguous().t(), b)):
            got, want = linear(x, ww, bb), F.linear(x, ww, bb)
            assert got.shape == want.shape
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(a[0].dtype) or real(*a))
    linear(torch.randn(2, 64), w)
    assert calls == []  # oneDNN's
    linear(torch.randn(2, 64, dtype=torch.float64), w.double())
    linear(torch.randn(2, 64, requires_grad=True), w)
    assert calls == [torch.float64, torch.float32]
    with torch.inference_mode():
        linear(torch.randn(2, 64), w)
    assert len(calls) == 2


def test_onednn_products_run_on_a_few_row_counts_and_their_kernels_are_bounded():
    """oneDNN keeps a compiled kernel per shape: row counts are rounded up to ``ROW_BUCKETS``
    (zero rows, dropped) and larger products run in pieces, with the values of the exact
    product; ``kernel_bytes`` bounds what those kernels keep (distinct weight shapes x buckets)."""
    from genlm_bytes.lm import gemm

    if not onednn_works():
        pytest.skip("torch has no working oneDNN linear op here")
    seen = []
    real = gemm._onednn_op()

    class Spy:
        def __call__(self, x, *a):
            seen.append(x.shape[0])
            return real(x, *a)

    linear = None
    try:
        gemm._onednn_op = lambda: Spy()
        linear = linear_fn()
    finally:
        gemm._onednn_op = lambda: real
    gen = torch.Generator().manual_seed(0)
    w, b = torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
    top = gemm.ROW_BUCKETS[-1]
    for shape in ((9, 16), (3, 5, 16), (top + 70, 16), (2, top, 16)):
        seen.clear()
        x = torch.randn(shape, generator=gen)
        got = linear(x, w, b)
        assert got.shape == (*shape[:-1], 40)
        torch.testing.assert_close(got, F.linear(x, w, b), atol=1e-4, rtol=1e-5)
        assert seen and all(n in gemm.ROW_BUCKETS for n in seen)
    assert seen == [top, top], "two pieces of the largest bucket"
    model = tiny()
    shapes = {tuple(p.shape) for p in model.parameters() if p.dim() == 2}
    assert gemm.kernel_bytes(model.parameters()) == len(shapes) * len(gemm.ROW_BUCKETS) * gemm.KERNEL_BYTES


def test_products_of_a_few_rows_run_as_weight_times_rows_with_the_same_values():
    """Up to ``SMALL_ROWS`` rows (one): ``w @ x.T`` (rows padded to an even count), not oneDNN's
    op; the values of ``F.linear``, with and without a bias, for 2-D and 3-D inputs."""
    from genlm_bytes.lm import gemm

    if not onednn_works():
        pytest.skip("torch has no working oneDNN linear op here")
    seen = []
    real = gemm._onednn_op()
    try:
        gemm._onednn_op = lambda: (lambda x, *a: seen.append(x.shape[0]) or real(x, *a))
        linear = linear_fn()
    finally:
        gemm._onednn_op = lambda: real
    gen = torch.Generator().manual_seed(1)
    w, b = torch.randn(40, 16, generator=gen), torch.randn(40, generator=gen)
    with torch.inference_mode():
        for shape in [(m, 16) for m in range(1, gemm.SMALL_ROWS + 1)] + [(1, 1, 16)]:
            x = torch.randn(shape, generator=gen)
            for bias in (None, b):
                got = linear(x, w, bias)
                assert got.shape == (*shape[:-1], 40) and got.is_contiguous()
                torch.testing.assert_close(got, F.linear(x, w, bias), atol=1e-5, rtol=1e-5)
        assert seen == []  # none went to oneDNN
        linear(torch.randn(gemm.SMALL_ROWS + 1, 16, generator=gen), w)
    assert seen == [gemm.SMALL_ROWS + 1]


def test_a_check_before_each_layer_can_stop_the_pass():
    from transformers import DynamicCache

    model = tiny()
    lean = lean_decoder(model)
    seen = []

    class Stop(Exception):
        pass

    def before():
        seen.append(1)
        if len(seen) == 2:
            raise Stop

    with pytest.raises(Stop):
        lean(torch.tensor([[1, 2, 3]]), None, torch.arange(3)[None], DynamicCache(config=model.config), before)
    assert len(seen) == 2


def test_models_it_does_not_compute_exactly_run_through_transformers():
    assert lean_decoder(tiny(hidden_act="gelu")) is None  # another activation
    assert lean_decoder(tiny(rope_scaling={"rope_type": "dynamic", "factor": 2.0})) is None
    odd = tiny()
    odd.config.model_type = "gemma"  # a family with other norms and scaled embeddings
    assert lean_decoder(odd) is None
    assert lean_decoder(tiny("gemma3", hidden_activation="gelu")) is None  # Gemma 3, another activation
    # Recognized by its parts, but computing something else: the check on a few tokens says so.
    changed = tiny()
    changed.model.layers[1].mlp.act_fn = torch.nn.GELU()
    assert lean_decoder(changed) is None
    assert lean_decoder(torch.nn.Linear(2, 2)) is None  # not a transformers model at all
    with pytest.raises(TypeError, match="LeanDecoder"):
        LeanDecoder(torch.nn.Linear(2, 2))


async def test_the_backend_uses_it_and_can_be_told_not_to(embedded_lm):
    from genlm_bytes.lm.hf import AsyncTransformer

    assert embedded_lm.lean is not None  # the embedded model (LLaMA family) runs lean passes
    common = {"byte_vocab": embedded_lm.byte_vocab, "initial_context": embedded_lm.initial_context,
                  "eos_token_ids": embedded_lm.eos_token_ids, "lookahead": False}
    off = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, lean=False, **common)
    on = AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, **common)
    assert off.lean is None and on.lean is not None
    ids = [0] + embedded_lm.tokenizer.encode("The quick brown fox jumps")
    for ctx in (ids, ids + [11], ids[:-1]):
        torch.testing.assert_close(await on.next_token_logprobs(ctx), await off.next_token_logprobs(ctx),
                                   atol=1e-4, rtol=0)
    for bad in (1, None, "no"):
        with pytest.raises(TypeError, match="lean"):
            AsyncTransformer(embedded_lm.model, embedded_lm.tokenizer, lean=bad, **common)
