"""Models with sliding-window layers (Gemma 3, Mistral) reuse their KV and stay exact.

The engine keeps every layer's whole past and masks the window: transformers windows the masks
it builds from a padding mask; a tree pass's own 4-D mask is windowed in the attention function
(``genlm_bytes.lm.hf.attention``). The models are tiny and random, with a window of 4 tokens, so
every context here reaches past it.

Oracle: ``log_softmax(model(ids).logits[0, -1])``, one plain forward per context (transformers
windows it itself).
"""

from __future__ import annotations

import asyncio

import pytest
import torch

from genlm_bytes import BeamParams, ByteBeamState
from genlm_bytes.lm.hf import AsyncTransformer
from genlm_bytes.lm.hf.config import EngineConfig

TOL = 1e-4
WINDOW = 4
TEXT = "The quick brown fox jumps over the lazy dog, and then it runs far away."
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(autouse=True)
def _one_thread(one_torch_thread):
    """(see conftest)"""


def tiny(kind: str, vocab_size: int, attn: str = "sdpa"):
    import transformers

    torch.manual_seed(0)
    common = {"vocab_size": vocab_size, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
              "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 512,
              "sliding_window": WINDOW, "attn_implementation": attn}
    if kind == "gemma3":
        cfg = transformers.Gemma3TextConfig(**common, head_dim=16,
                                            layer_types=["sliding_attention", "full_attention", "sliding_attention"])
        return transformers.Gemma3ForCausalLM(cfg).eval()
    cfg = transformers.MistralConfig(**common)
    return transformers.MistralForCausalLM(cfg).eval()


@pytest.fixture(params=["gemma3", "mistral"])
def model(request, embedded_lm):
    return tiny(request.param, embedded_lm.model.config.vocab_size)


def backend(embedded_lm, model, **kwargs):
    kwargs.setdefault("lookahead", False)
    return AsyncTransformer(model, embedded_lm.tokenizer, byte_vocab=embedded_lm.byte_vocab,
                            initial_context=embedded_lm.initial_context, eos_token_ids=embedded_lm.eos_token_ids,
                            **kwargs)


@torch.inference_mode()
def assert_exact(model, ids, row) -> None:
    want = torch.log_softmax(model(torch.tensor([list(ids)])).logits[0, -1].float(), dim=-1)
    diff = (row - want).abs().max().item()
    assert diff <= TOL, f"a context of {len(ids)} tokens is {diff:.2e} off the model's own forward"


async def test_requests_one_by_one_and_in_batches_reuse_kv_past_the_window(embedded_lm, model):
    lm = backend(embedded_lm, model)
    assert lm.kv_reuse, "sliding-window layers under SDPA keep KV reuse"
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)
    for n in range(2, 14):
        assert_exact(model, ids[:n], await lm.next_token_logprobs(ids[:n]))
    before = lm.n_forward_tokens
    assert_exact(model, ids[:14], await lm.next_token_logprobs(ids[:14]))
    assert lm.n_forward_tokens == before + 1, "an extension runs its one new token on the stored past"
    batch = [ids[:k] + [t] for k, t in ((3, 100), (9, 200), (13, 300), (16, 400), (6, 500))]
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in batch))
    for ctx, row in zip(batch, rows):
        assert_exact(model, ctx, row)
    # Gemma 3 runs the lean decoder (its own sliding-window masks); Mistral transformers' modules.
    lean = model.config.model_type == "gemma3_text"
    assert set(lm.runner.passes) == ({"lean"} if lean else {"decoder"})


async def test_a_batch_padded_per_bucket_masks_each_buckets_window(embedded_lm, model):
    """Rows of pasts 2 to 15 split into buckets (``bucket_slots=1``): each bucket's sliding
    layers hide the keys a window behind their queries, counted within the bucket's padding."""
    lm = backend(embedded_lm, model, config=EngineConfig(bucket_slots=1))
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)
    for n in (2, 6, 9, 15):
        await lm.next_token_logprobs(ids[:n])
    batch = [ids[:2] + [100], ids[:15] + [200], ids[:9] + [300, 301], ids[:6] + [400], ids[:15] + [500]]
    used = []
    inner = lm.runner.buckets
    lm.runner.buckets = lambda rows: used.append(r := inner(rows)) or r
    rows = await asyncio.gather(*(lm.next_token_logprobs(c) for c in batch))
    for ctx, row in zip(batch, rows):
        assert_exact(model, ctx, row)
    lean = model.config.model_type == "gemma3_text"
    assert len(used) == 1 and (len(used[0][1] or ()) >= 2) == lean, "buckets where the lean decoder runs"


async def test_tree_passes_mask_the_window(embedded_lm, model):
    """A prefetch with alternatives and a ragged tree pass: 4-D masks that transformers takes as
    given; a branch far down the path must not see the keys behind its window."""
    lm = backend(embedded_lm, model, config=EngineConfig(prefetch_chunk=7, alt_chunk=3))
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)[:18]
    n = len(ids)
    alts = [(2, 504), (9, 42), (n, 7), (n - 3, 300)]
    await lm.prefetch(ids, alternatives=alts)
    for i in (3, 8, 12, n):
        assert_exact(model, ids[:i], lm.cache.get_logp(tuple(ids[:i])))
    for i, t in alts:
        assert_exact(model, ids[:i] + [t], lm.cache.get_logp(tuple(ids[:i] + [t])))
    P, ref = lm.cache.deepest_kv(tuple(ids[:13]), 12)
    assert P == 12
    rows = [(tuple(ids[:13]), ref, 12, [(13, (503, 504), ((1, 505),)), (10, (506,), ())]),
            (tuple(ids[:2] + [900, 901, 902, 903, 904, 905]), None, 0, [(6, (507,), ())])]
    out = lm.runner.tree_rows(rows)
    for (ctx, *_), row in zip(rows, out):
        assert_exact(model, ctx, row)
    for ctx in (ids[:13] + [503, 504], ids[:13] + [503, 505], ids[:10] + [506], ids[:2] + [900, 901, 902, 903, 507]):
        assert_exact(model, ctx, lm.cache.get_logp(tuple(ctx)))


async def test_prefetches_together_mask_each_jobs_window(embedded_lm, model):
    """``prefetch_many``'s shared pass lays several pasts end to end: each job's keys keep their
    own positions, so a window far down one path hides what it must (and nothing of another
    job's past is seen)."""
    lm = backend(embedded_lm, model)
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)[:18]
    await lm.prefetch(ids[:14])
    await lm.prefetch(ids[:3] + [800, 801, 802])
    seen = []
    inner = lm.runner.tree_many
    lm.runner.tree_many = lambda jobs: (seen.append(len(jobs)), inner(jobs))[1]
    await lm.prefetch_many([(ids[:14] + [810, 811], [(14, 812), (9, (813, 814))], 13),
                            (ids[:3] + [800, 801, 802, 820], [(6, 821)], 5),
                            (ids[:8] + [830], [], 7)])
    assert seen == [3]
    for ctx in (ids[:14] + [810], ids[:14] + [810, 811], ids[:14] + [812], ids[:9] + [813, 814],
                ids[:3] + [800, 801, 802, 820], ids[:3] + [800, 801, 802, 821], ids[:8] + [830]):
        assert_exact(model, ctx, lm.cache.get_logp(tuple(ctx)))


async def test_a_beam_gives_what_it_gives_without_kv_reuse(embedded_lm, model):
    """Prefill and greedy generation (look-ahead on) on KV reuse give the beam and the bytes of
    the same beam on a backend that runs every context whole."""
    params = BeamParams(K=5, prune_threshold=0.05)
    got = []
    for kwargs in ({"lookahead": True}, {"kv_reuse": False}):
        lm = backend(embedded_lm, model, **kwargs)
        beam = await (await ByteBeamState.initial(lm, params)).prefill(TEXT.encode())
        lp = (await beam.logp_next()).ps
        text = await (await ByteBeamState.initial(lm, params)).greedy(b"Once upon a time there", 24)
        got.append((beam.logZ, lp, text, lm.n_forward_tokens))
    (z1, lp1, t1, n1), (z0, lp0, t0, n0) = got
    assert abs(z1 - z0) <= TOL and t1 == t0
    finite = torch.isfinite(torch.as_tensor(lp0))
    assert torch.equal(finite, torch.isfinite(torch.as_tensor(lp1)))
    assert (torch.as_tensor(lp1)[finite] - torch.as_tensor(lp0)[finite]).abs().max().item() <= TOL
    assert n1 < n0, "KV reuse runs fewer tokens than whole contexts"


async def test_sliding_windows_without_sdpa_run_whole_contexts(embedded_lm):
    """Under another attention function (eager) the window is not masked by the engine: no KV
    reuse, still exact."""
    model = tiny("gemma3", embedded_lm.model.config.vocab_size, attn="eager")
    lm = backend(embedded_lm, model)
    assert not lm.kv_reuse
    ids = [0] + embedded_lm.tokenizer.encode(TEXT)[:12]
    assert_exact(model, ids, await lm.next_token_logprobs(ids))
