"""A lean pass of one row of a few tokens in two C calls a layer (lm/fused.py): the hidden states
of the torch calls it replaces, on models whose products are on codes; the torch calls elsewhere."""

import pytest
import torch
from test_lean import hf_hidden, passes, tiny
from test_qgemm import q4_1

from genlm_bytes.lm import fused, qgemm
from genlm_bytes.lm.gemm import onednn_works
from genlm_bytes.lm.lean import lean_decoder

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),
              pytest.mark.skipif(not (qgemm.available() and onednn_works()), reason="no codes kernel or no oneDNN here")]


def on_codes(kind="llama", **overrides):
    """A small random model whose decoder's weights are GGUF Q4_1 values (so they have codes)."""
    model = tiny(kind, hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                 **overrides)
    with torch.no_grad():
        for i, m in enumerate(model.get_decoder().modules()):
            if isinstance(m, torch.nn.Linear):
                m.weight.copy_(q4_1(*m.weight.shape, seed=i))
    return model


@pytest.fixture
def counted(monkeypatch):
    """How many passes the fused layers ran (``run`` gave hidden states)."""
    n = [0]
    run = fused.FusedLayers.run

    def counting(self, *a):
        out = run(self, *a)
        n[0] += out is not None
        return out

    monkeypatch.setattr(fused.FusedLayers, "run", counting)
    return n


def test_fused_layers_give_the_torch_calls_hidden_states(monkeypatch, counted):
    model = on_codes()
    lean = lean_decoder(model, packed=True, quantized=True)
    assert lean._fused.usable and lean._fused.table() is not None
    counted[0] = 0
    got = passes(model, lean)
    assert counted[0] == 5  # (a prompt, new tokens on it, a ragged batch of 2, a tree-masked pass, its prompt)
    monkeypatch.setenv("GENLM_BYTES_FUSED", "0")
    want = passes(model, lean)
    assert counted[0] == 5
    own = passes(model, lambda *a: hf_hidden(model, *a))
    for g, w, o in zip(got, want, own):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=1e-5)
        torch.testing.assert_close(g, o, atol=1e-4, rtol=1e-4)


def test_long_contexts_take_torch_s_attention_inside_the_fused_layers(monkeypatch, counted):
    """(Passes of 3 tokens or more, above MAX_SCORES; set to 1 here: the tree pass and the prompts.)"""
    model = on_codes()
    lean = lean_decoder(model, packed=True, quantized=True)
    want = passes(model, lambda *a: hf_hidden(model, *a))
    monkeypatch.setattr(fused, "MAX_SCORES", 1)
    counted[0] = 0
    got = passes(model, lean)
    assert counted[0] == 5
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)


def test_a_check_before_a_layer_stops_a_fused_pass_and_the_next_one_runs(counted):
    from transformers import DynamicCache

    model = on_codes()
    lean = lean_decoder(model, packed=True, quantized=True)
    ids = torch.arange(3, 9)[None]

    def stop():
        raise KeyboardInterrupt

    with torch.inference_mode(), pytest.raises(KeyboardInterrupt):
        lean(ids, None, torch.arange(6)[None], DynamicCache(config=model.config), before_layer=stop)
    with torch.inference_mode():
        got = lean(ids, None, torch.arange(6)[None], DynamicCache(config=model.config))
        want = hf_hidden(model, ids, None, torch.arange(6)[None], DynamicCache(config=model.config))
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert counted[0] >= 1


def test_weights_without_codes_or_biases_run_the_torch_calls(counted):
    plain = tiny("llama", hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    lean = lean_decoder(plain, packed=True, quantized=True)
    assert lean._fused.table() is None  # (oneDNN's float32 packs: not this path)
    with_bias = lean_decoder(on_codes("qwen2"), packed=True, quantized=True)
    assert not with_bias._fused.usable
    counted[0] = 0
    got = passes(plain, lean)
    want = passes(plain, lambda *a: hf_hidden(plain, *a))
    assert counted[0] == 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-5, rtol=1e-5)


def test_an_unknown_setting_is_a_value_error(monkeypatch):
    monkeypatch.setenv("GENLM_BYTES_FUSED", "yes")
    with pytest.raises(ValueError, match="GENLM_BYTES_FUSED"):
        fused.enabled()


@pytest.mark.slow
async def test_the_embedded_engine_gives_the_same_distributions_fused_or_not(embedded_lm, monkeypatch, counted):
    """The engine's one-row passes of SmolLM2 run fused; its next-token log-probs are those of the
    torch calls up to the order of sums."""
    ctx = list(embedded_lm.initial_context) + embedded_lm.encode_bytes("Ce soir, à Paris, nous irons".encode())
    embedded_lm.clear_cache()
    counted[0] = 0
    got = [torch.as_tensor(await embedded_lm.next_token_logprobs(ctx[:n])) for n in (4, 9, len(ctx))]
    assert counted[0] >= 1
    monkeypatch.setenv("GENLM_BYTES_FUSED", "0")
    embedded_lm.clear_cache()
    want = [torch.as_tensor(await embedded_lm.next_token_logprobs(ctx[:n])) for n in (4, 9, len(ctx))]
    embedded_lm.clear_cache()
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) < 1e-4  # (log-probs near -20: float32 sums in another order)
        assert int(g.argmax()) == int(w.argmax())


@pytest.mark.slow
async def test_the_embedded_engine_s_batched_passes_run_fused_with_the_same_distributions(embedded_lm, monkeypatch,
                                                                                          counted):
    """Rows of very different past lengths in one batched pass (their pasts in buckets): each row's
    next-token log-probs are those of the torch calls, up to the order of sums."""
    import asyncio

    text = ("In the old harbour town the fishermen mended their nets at dawn, and the gulls "
            "circled above the boats while the bakers opened their shutters one by one. ") * 3
    ids = list(embedded_lm.initial_context) + embedded_lm.encode_bytes(text.encode())
    embedded_lm.clear_cache()
    await embedded_lm.next_token_logprobs(ids[:120])  # (a long past cached, so the batch's pasts differ)
    await embedded_lm.next_token_logprobs(ids[:3])
    ctxs = [ids[:121], ids[:4], ids[:60] + [ids[7]], ids[:122]]

    async def rows():
        return [torch.as_tensor(r) for r in await asyncio.gather(*(embedded_lm.next_token_logprobs(c) for c in ctxs))]

    counted[0] = 0
    got = await rows()
    assert counted[0] >= 1
    monkeypatch.setenv("GENLM_BYTES_FUSED", "0")
    embedded_lm.clear_cache()
    await embedded_lm.next_token_logprobs(ids[:120])
    await embedded_lm.next_token_logprobs(ids[:3])
    want = await rows()
    embedded_lm.clear_cache()
    for g, w in zip(got, want):
        assert float((g - w).abs().max()) < 1e-4
        assert int(g.argmax()) == int(w.argmax())
