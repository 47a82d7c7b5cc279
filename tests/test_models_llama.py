"""LlamaTransformer against transformers' LLaMA (tiny random models and the embedded SmolLM2),
its KV cache (incremental == full, forks leave the parent untouched), options, bad input,
and the AsyncLlama backend (cached == uncached)."""

import asyncio

import pytest
import torch
import transformers

from genlm_bytes.lm.mock import default_mock_vocab
from genlm_bytes.models import AsyncLlama, KVCache, LlamaConfig, LlamaTransformer


def tiny_hf(tie=False, bias=False, dtype=torch.float32, seed=0):
    """A random transformers LLaMA with grouped-query attention and a non-default RoPE base."""
    torch.manual_seed(seed)
    hc = transformers.LlamaConfig(
        vocab_size=101, hidden_size=64, intermediate_size=144, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, rope_parameters={"rope_type": "default", "rope_theta": 500.0},
        tie_word_embeddings=tie, attention_bias=bias, mlp_bias=bias, rms_norm_eps=1e-5)
    hf = transformers.LlamaForCausalLM(hc).to(dtype).eval()
    with torch.no_grad():  # larger weights than the default init, so logits are far from uniform
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.normal_(0, 0.3)
    return hf


def small_config(**kw):
    base = {"vocab_size": 97, "embedding_dim": 64, "num_blocks": 2, "head_dim": 16, "num_kv_heads": 2}
    return LlamaConfig(**{**base, **kw})


def randomized(model, std=0.3, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.normal_(0, std)
    return model.eval()


@pytest.mark.parametrize("tie,bias", [(False, False), (True, False), (False, True)])
def test_from_hf_matches_transformers_full_and_incremental(tie, bias):
    hf = tiny_hf(tie=tie, bias=bias)
    model = LlamaTransformer.from_hf(hf)
    assert model.config.tie_embeddings == tie and model.config.use_bias == bias
    assert model.config.theta == 500.0 and model.config.n_kv_heads == 2
    ids = torch.randint(0, 101, (3, 21))
    with torch.no_grad():
        ref = hf(ids).logits  # (B, S, V)
        assert ref.std() > 0.5
        torch.testing.assert_close(model(ids), ref, atol=1e-4, rtol=0)
        # prefill 9 tokens, then 5, then one at a time
        logits, cache = model.forward_cached(ids[:, :9])
        pieces = [logits]
        logits, cache = model.forward_cached(ids[:, 9:14], cache)
        pieces.append(logits)
        for j in range(14, 21):
            logits, cache = model.forward_cached(ids[:, j : j + 1], cache)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces, dim=1), ref, atol=1e-4, rtol=0)
        assert cache.length == 21


def test_float64_incremental_equals_full_tightly():
    hf = tiny_hf(dtype=torch.float64)
    model = LlamaTransformer.from_hf(hf)
    assert model.config.dtype == "float64"
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        full = model(ids)
        logits, cache = model.forward_cached(ids[:, :5])
        rest, _ = model.forward_cached(ids[:, 5:], cache)
        # transformers computes RMSNorm and RoPE in float32 even for float64 weights
        torch.testing.assert_close(full, hf(ids).logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(torch.cat([logits, rest], 1), full, atol=1e-10, rtol=0)


def test_cache_is_immutable_and_forks_share_the_parent():
    model = randomized(LlamaTransformer(small_config()))
    ids = torch.randint(0, 97, (1, 10))
    with torch.no_grad():
        _, parent = model.forward_cached(ids[:, :6])
        keys_before = [k.clone() for k in parent.keys]
        a, fork_a = model.forward_cached(torch.tensor([[5]]), parent)
        b, fork_b = model.forward_cached(torch.tensor([[7]]), parent)
        full_a = model(torch.cat([ids[:, :6], torch.tensor([[5]])], 1))[:, -1:]
        full_b = model(torch.cat([ids[:, :6], torch.tensor([[7]])], 1))[:, -1:]
    assert parent.length == 6 and fork_a.length == fork_b.length == 7
    for k, k0 in zip(parent.keys, keys_before):
        assert torch.equal(k, k0)
    torch.testing.assert_close(a, full_a, atol=1e-5, rtol=0)
    torch.testing.assert_close(b, full_b, atol=1e-5, rtol=0)
    assert parent.prefix(3).length == 3 and parent.nbytes == 2 * 2 * 2 * 6 * 16 * 4  # blocks·(K,V)·nkv·T·hs·4
    assert fork_a.nbytes > parent.nbytes


def test_forward_ragged_matches_rows_run_alone():
    model = randomized(LlamaTransformer(small_config()))
    ids = torch.randint(0, 97, (3, 15))
    with torch.no_grad():
        ref = model(ids)
        _, c0 = model.forward_cached(ids[0:1, :4])
        _, c2 = model.forward_cached(ids[2:3, :11])
        # pasts of 4, 0 and 11 tokens; extensions of 3, 15 and 1 tokens
        logits, caches = model.forward_ragged([ids[0, 4:7].tolist(), ids[1].tolist(), ids[2, 11:12].tolist()],
                                              [c0, None, c2])
        torch.testing.assert_close(logits[0], ref[0, 4:7], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[1], ref[1], atol=1e-5, rtol=0)
        torch.testing.assert_close(logits[2], ref[2, 11:12], atol=1e-5, rtol=0)
        assert [c.length for c in caches] == [7, 15, 12]
        nxt, _ = model.forward_cached(ids[0:1, 7:9], caches[0])
        torch.testing.assert_close(nxt[0], ref[0, 7:9], atol=1e-5, rtol=0)
        (one,), (one_cache,) = model.forward_ragged([ids[2, 12:15].tolist()], [caches[2]])  # a batch of one
        torch.testing.assert_close(one, ref[2, 12:15], atol=1e-5, rtol=0)
        assert one_cache.length == 15 and caches[2].length == 12


def test_options_soft_cap_qk_norm_dropout():
    ids = torch.randint(0, 97, (2, 8))
    plain = randomized(LlamaTransformer(small_config()), std=1.0)
    capped = LlamaTransformer(small_config(logits_soft_cap=2.0)).eval()
    capped.load_state_dict(plain.state_dict())
    with torch.no_grad():
        assert plain(ids).abs().max() > 4.0 and capped(ids).abs().max() <= 2.0
        torch.testing.assert_close(capped(ids), 2.0 * torch.tanh(plain(ids) / 2.0))
    qk = randomized(LlamaTransformer(small_config(qk_norm=True)))
    with torch.no_grad():
        first, cache = qk.forward_cached(ids[:, :5])
        rest, _ = qk.forward_cached(ids[:, 5:], cache)
        torch.testing.assert_close(torch.cat([first, rest], 1), qk(ids), atol=1e-5, rtol=0)
    drop = randomized(LlamaTransformer(small_config(dropout_rate=0.5)))
    with torch.no_grad():
        assert torch.equal(drop(ids), drop(ids))  # eval: no dropout
        drop.train()
        assert not torch.equal(drop(ids), drop(ids))


def test_bidirectional_sees_the_future_and_cannot_decode():
    model = randomized(LlamaTransformer(small_config(causal=False)))
    a, b = torch.tensor([[1, 2, 3, 4]]), torch.tensor([[1, 2, 3, 9]])
    with torch.no_grad():
        assert not torch.allclose(model(a)[:, 0], model(b)[:, 0])
    with pytest.raises(ValueError, match="causal"):
        model.forward_cached(a)


def test_document_masking_equals_running_documents_alone():
    # RoPE is relative, so a document attending only to itself gives the logits it has alone.
    model = randomized(LlamaTransformer(small_config(mask_across_document_boundaries=True)))
    doc1, doc2 = torch.randint(0, 97, (1, 5)), torch.randint(0, 97, (1, 7))
    ids = torch.cat([doc1, doc2], 1)
    seg = torch.tensor([[0] * 5 + [1] * 7])
    with torch.no_grad():
        both = model(ids, segment_ids=seg)
        # (float32 rounding: a product of 12 rows and one of 7 may take different BLAS kernels,
        # and did on an AMD EPYC: 1.7e-5 apart on logits of magnitude ~1)
        torch.testing.assert_close(both[:, 5:], model(doc2), atol=1e-4, rtol=0)
        torch.testing.assert_close(both[:, :5], model(doc1), atol=1e-4, rtol=0)
        assert not torch.allclose(model(ids)[:, 5:], both[:, 5:])  # without segments doc2 sees doc1
        first, cache = model.forward_cached(ids[:, :8], segment_ids=seg[:, :8])
        rest, _ = model.forward_cached(ids[:, 8:], cache, segment_ids=seg[:, 8:])
        torch.testing.assert_close(torch.cat([first, rest], 1), both, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kw,field", [
    ({"embedding_dim": 100, "head_dim": 16}, "head_dim"),
    ({"embedding_dim": -64}, "embedding_dim"),
    ({"vocab_size": 0}, "vocab_size"),
    ({"num_blocks": -1}, "num_blocks"),
    ({"head_dim": 15, "num_heads": 4}, "head_dim"),
    ({"num_kv_heads": 3}, "num_kv_heads"),
    ({"theta": -1.0}, "theta"),
    ({"dropout_rate": 1.0}, "dropout_rate"),
    ({"dtype": "float8"}, "dtype"),
    ({"logits_soft_cap": 0.0}, "logits_soft_cap"),
    ({"ffn_multiple_of": 0}, "ffn_multiple_of"),
    ({"num_blocks": 2.5}, "num_blocks"),
])
def test_inconsistent_config_names_the_field(kw, field):
    with pytest.raises(ValueError, match=field):
        small_config(**kw)


def test_config_derived_sizes():
    cfg = LlamaConfig(vocab_size=10, embedding_dim=576, num_blocks=1, head_dim=64, num_kv_heads=3)
    assert (cfg.n_heads, cfg.n_kv_heads, cfg.ffn_dim) == (9, 3, 1536)
    assert LlamaConfig(vocab_size=10, embedding_dim=256, num_blocks=1, ffn_dim_multiplier=1.3).ffn_dim == 896


def test_bad_inputs_name_the_field():
    model = LlamaTransformer(small_config())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.ones(1, 3))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(ValueError, match="segment_ids"):
        model(torch.tensor([[1, 2]]), segment_ids=torch.tensor([[0, 0, 0]]))
    _, cache = model.forward_cached(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="cache"):
        model.forward_cached(torch.tensor([[1], [2]]), cache)
    with pytest.raises(ValueError, match="caches"):
        model.forward_ragged([[1]], [cache, None])
    with pytest.raises(ValueError, match="n must be"):
        cache.prefix(5)
    with pytest.raises(TypeError, match="LlamaConfig"):
        LlamaTransformer({"vocab_size": 3})


def test_from_hf_rejects_what_it_cannot_reproduce():
    class NotLlama:
        config = transformers.GPT2Config()

    with pytest.raises(ValueError, match="model_type"):
        LlamaTransformer.from_hf(NotLlama())
    hf = tiny_hf()
    hf.config.rope_parameters = {"rope_type": "llama3", "rope_theta": 500.0, "factor": 8.0}
    with pytest.raises(ValueError, match="rope_type"):
        LlamaTransformer.from_hf(hf)


# -- the AsyncLM backend ---------------------------------------------------------------------------

def backend_model():
    vocab = default_mock_vocab()
    return randomized(LlamaTransformer(small_config(vocab_size=len(vocab) + 3))), vocab


async def test_async_llama_cached_equals_uncached_and_runs_only_the_extension():
    model, vocab = backend_model()
    cached = AsyncLlama(model, vocab, eos_token_ids=[0], initial_context=[0])
    uncached = AsyncLlama(model, vocab, eos_token_ids=[0], initial_context=[0], max_cache_entries=0)
    ctx = [0] + torch.randint(1, len(vocab), (30,)).tolist()
    lp = await cached.next_token_logprobs(ctx)
    assert cached.vocab_size == len(vocab) + 3 and cached.byte_vocab[-1] == b""  # padded like AsyncTransformer
    assert lp.shape == (cached.vocab_size,) and abs(lp.exp().sum().item() - 1) < 1e-5
    assert cached.n_tokens_run == 31
    # concurrent extensions by 1 or 3 tokens of cached prefixes run only those tokens, in one batch
    contexts = [ctx + [5], ctx + [6, 7, 8], ctx[:10] + [9], ctx[:20] + [4, 4]]
    n_before, b_before = cached.n_tokens_run, cached._batcher.n_batches
    got = await cached.batch_next_token_logprobs(contexts)
    assert cached.n_tokens_run - n_before == 1 + 3 + 1 + 2
    assert cached._batcher.n_batches - b_before == 1
    ref = await uncached.batch_next_token_logprobs(contexts)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    # every prefix of a run context is answered from the cache
    n_before = cached.n_tokens_run
    again = await asyncio.gather(*(cached.next_token_logprobs(ctx[:k]) for k in (1, 15, 31)))
    assert cached.n_tokens_run == n_before
    torch.testing.assert_close(again[2], lp)
    torch.testing.assert_close(torch.stack(again), await uncached.batch_next_token_logprobs(
        [ctx[:1], ctx[:15], ctx[:31]]), atol=1e-4, rtol=0)


async def test_async_llama_cache_is_bounded_and_inputs_checked():
    model, vocab = backend_model()
    lm = AsyncLlama(model, vocab, initial_context=[0], max_cache_entries=4)
    for k in range(6):
        await lm.next_token_logprobs([0, k + 1, k + 2])
    assert len(lm.cache) == 4
    lm.clear_cache()
    assert len(lm.cache) == 0
    with pytest.raises(ValueError, match="byte_vocab"):
        AsyncLlama(model, vocab + [bytes([1, 2, 3, i]) for i in range(10)])
    with pytest.raises(ValueError, match="max_cache_entries"):
        AsyncLlama(model, vocab, max_cache_entries=-1)
    with pytest.raises(TypeError, match="LlamaTransformer"):
        AsyncLlama(object(), vocab)
    with pytest.raises(ValueError, match="out of range"):
        await lm.next_token_logprobs([0, lm.vocab_size])


# -- the embedded SmolLM2 ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def smol(embedded_hf):
    """The embedded SmolLM2 copied into a LlamaTransformer: (ours, hf_model, tokenizer)."""
    hf, tok = embedded_hf
    return LlamaTransformer.from_hf(hf), hf, tok


@pytest.mark.slow
def test_embedded_smollm2_reproduces_transformers(smol):
    model, hf, tok = smol
    cfg = model.config
    assert (cfg.num_blocks, cfg.embedding_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim) == (30, 576, 9, 3, 64)
    assert cfg.tie_embeddings and cfg.theta == hf.config.rope_parameters["rope_theta"]
    texts = ["The capital of France is Paris, and the capital of Italy is", "def add(a, b):\n    return a + b  # sum"]
    rows = [tok.encode(t)[:12] for t in texts]
    ids = torch.tensor(rows)  # (2, 12)
    with torch.no_grad():
        ref = hf(ids).logits
        assert (model(ids) - ref).abs().max() < 1e-4
        logits, cache = model.forward_cached(ids[:, :8])
        pieces = [logits]
        for j in range(8, 12):
            logits, cache = model.forward_cached(ids[:, j : j + 1], cache)
            pieces.append(logits)
        assert (torch.cat(pieces, 1) - ref).abs().max() < 1e-4
    assert isinstance(cache, KVCache) and cache.nbytes == 46_080 * 2 * 12  # 46,080 bytes per token per row


@pytest.mark.slow
async def test_async_llama_on_smollm2_matches_async_transformer(smol, embedded_lm):
    _, hf, tok = smol
    ours = AsyncLlama.from_hf(hf, tok, initial_context=embedded_lm.initial_context)
    assert ours.byte_vocab == embedded_lm.byte_vocab and ours.eos_token_ids == embedded_lm.eos_token_ids
    ctx = ours.initial_context + ours.encode_bytes(b"Byte-level models let you condition on")
    assert ctx == embedded_lm.initial_context + embedded_lm.encode_bytes(b"Byte-level models let you condition on")
    contexts = [ctx, ctx + [tok.encode(" any")[0]], ctx[:4]]
    got = await ours.batch_next_token_logprobs(contexts)
    ref = await embedded_lm.batch_next_token_logprobs(contexts)
    assert (got - ref).abs().max() < 1e-4
