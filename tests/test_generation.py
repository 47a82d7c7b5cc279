"""Tests of genlm_bytes.generation: generate_tokens and generate.

Layers: input validation; generation on the mock LM and on a scripted LM against
brute-force sequential decoding; the embedded model against ``model.generate`` (slow).
"""

import asyncio
import functools
import math
import subprocess
import sys

import numpy as np
import pytest
import torch

from genlm_bytes.generation import (
    generate,
    generate_sync,
    generate_tokens,
    generate_tokens_sync,
)
from genlm_bytes.lm.base import AsyncLM
from genlm_bytes.sampling import SamplingParams, greedy_sampling, temperature_sampling


class StepLM(AsyncLM):
    """Scripted LM over V tokens: after token t the next is (t + 1) % V with probability 0.9,
    the rest spread evenly. Token V - 1 is EOS. Records every batched call."""

    def __init__(self, V: int = 10):
        super().__init__(byte_vocab=[bytes([65 + i]) for i in range(V)], eos_token_ids=[V - 1])
        self.batch_calls: list[list[list[int]]] = []

    def logprobs(self, token_ids):
        V = self.vocab_size
        p = torch.full((V,), 0.1 / (V - 1), dtype=torch.float64)
        p[(token_ids[-1] + 1) % V] = 0.9
        return p.log().to(torch.float32)

    async def next_token_logprobs(self, token_ids):
        return self.logprobs(token_ids)

    async def batch_next_token_logprobs(self, contexts):
        self.batch_calls.append([list(c) for c in contexts])
        return await super().batch_next_token_logprobs(contexts)


def brute_greedy(lm, prompt, n_new, stop=()):
    """Sequential, uncached greedy decoding: the oracle for generate(do_sample=False)."""
    seq, out = list(prompt), []
    for _ in range(n_new):
        t = int(torch.argmax(lm.logprobs(seq)))
        seq.append(t)
        out.append(t)
        if t in stop:
            break
    return out


def test_public_import_paths_kept():
    """The split kept every path users import from: the package, genlm_bytes.sampling (re-export)
    and genlm_bytes.generation; either module can be imported first (no import circle)."""
    import genlm_bytes
    from genlm_bytes import generation, sampling

    for name in ("generate", "generate_tokens", "generate_sync", "generate_tokens_sync", "GenerateOutput",
                 "TokenSampleFn"):
        assert getattr(sampling, name) is getattr(generation, name)
    assert genlm_bytes.generate is generate and genlm_bytes.generate_tokens is generate_tokens
    assert genlm_bytes.SamplingParams is SamplingParams
    with pytest.raises(AttributeError, match="no_such_name"):
        sampling.no_such_name  # noqa: B018
    for first in ("genlm_bytes.generation", "genlm_bytes.sampling"):
        code = (f"import {first}; from genlm_bytes.sampling import generate_tokens; "
                "from genlm_bytes.generation import generate_tokens as g; assert g is generate_tokens")
        subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------- validation


async def test_bad_prefix_mask_and_shapes(mock_lm):
    toks = torch.tensor([[0, 5, 6], [0, 7, 8]])
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.ones(2, 2, dtype=torch.bool), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.ones(3, 3, dtype=torch.bool), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, [[0, 1], [0]], [[1, 1], [1]], max_length=5)  # ragged
    with pytest.raises(ValueError, match=r"prefix_mask\[1\] has gaps"):
        await generate_tokens(mock_lm, toks, torch.tensor([[1, 1, 1], [1, 0, 1]]), max_length=5)
    with pytest.raises(ValueError, match=r"prefix_mask\[0\] marks no token"):
        await generate_tokens(mock_lm, toks, torch.tensor([[0, 0, 0], [1, 1, 1]]), max_length=5)
    with pytest.raises(ValueError, match="prefix_mask"):
        await generate_tokens(mock_lm, toks, torch.tensor([[2, 1, 1], [1, 1, 1]]), max_length=5)
    with pytest.raises(ValueError, match="attention_mask"):
        await generate(mock_lm, toks, 2, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_length"):
        await generate_tokens(mock_lm, toks, max_length=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        await generate(mock_lm, toks, -1)
    with pytest.raises(ValueError, match=r"prefix_tokens\[1\]"):
        await generate_tokens(mock_lm, [[0, 1], [0, 10_000]], max_length=5)
    with pytest.raises(ValueError, match="eod_token_id"):
        await generate_tokens(mock_lm, toks, max_length=5, eod_token_id=10_000)
    with pytest.raises(ValueError, match="eos_token_id"):
        await generate(mock_lm, toks, 2, eos_token_id=10_000)
    with pytest.raises(ValueError, match="token_sample_fn"):
        await generate_tokens(mock_lm, toks, max_length=5, token_sample_fn=lambda lp, rng: [1])
    with pytest.raises(TypeError, match="lm"):
        await generate(object(), toks, 2)



# --------------------------------------------------------------------------- generate_tokens


async def test_generate_tokens_greedy_matches_sequential_oracle(mock_lm):
    prefixes = [[0, 72, 105], [0], [0, 84, 104, 101, 32]]
    tokens, valid = await generate_tokens(mock_lm, prefixes, max_length=9, token_sample_fn=greedy_sampling)
    assert tokens.shape == valid.shape == (3, 9) and valid.all()
    for b, p in enumerate(prefixes):
        assert tokens[b].tolist() == p + brute_greedy(mock_lm, p, 9 - len(p))


async def test_generate_tokens_padding_forms_agree(mock_lm):
    ragged = [[0, 72, 105], [0, 5]]
    left = torch.tensor([[0, 72, 105], [-1, 0, 5]])  # padding values are never read
    right = torch.tensor([[0, 72, 105], [0, 5, 999_999]])
    kw = {"max_length": 7, "token_sample_fn": functools.partial(temperature_sampling, temperature=0.9)}
    a = await generate_tokens(mock_lm, ragged, rng=3, **kw)
    b = await generate_tokens(mock_lm, left, left >= 0, rng=3, **kw)
    c = await generate_tokens(mock_lm, right, torch.tensor([[1, 1, 1], [1, 1, 0]]), rng=3, **kw)
    for other in (b, c):
        assert torch.equal(a[0], other[0]) and torch.equal(a[1], other[1])
    # one prompt as a 1-D array; a Generator seeded like the int seed
    d = await generate_tokens(mock_lm, np.array(ragged[1]), rng=np.random.default_rng(3), **kw)
    e = await generate_tokens(mock_lm, [ragged[1]], rng=3, **kw)
    assert torch.equal(d[0], e[0]) and d[0].shape == (1, 7)


async def test_generate_tokens_stops_at_eod_and_marks_invalid():
    lm = StepLM(V=10)
    eod = 7
    prefixes = [[5], [1, 2], [8]]  # greedy: 5->6->7 | 2->3->...->7 | 8->9->0->...->7
    tokens, valid = await generate_tokens(lm, prefixes, max_length=12, eod_token_id=eod,
                                          token_sample_fn=greedy_sampling)
    assert tokens[0].tolist() == [5, 6, 7] + [eod] * 9
    assert valid[0].tolist() == [True] * 3 + [False] * 9
    assert tokens[1].tolist() == [1, 2, 3, 4, 5, 6, 7] + [eod] * 5
    assert valid[1].sum() == 7
    assert tokens[2].tolist() == [8, 9, 0, 1, 2, 3, 4, 5, 6, 7] + [eod] * 2
    assert valid[2].sum() == 10
    # one batched call per step, with every live sequence's full context, and no call after all stopped
    assert len(lm.batch_calls) == 9
    assert lm.batch_calls[0] == [[5], [1, 2], [8]]
    assert lm.batch_calls[2] == [[1, 2, 3, 4], [8, 9, 0]]
    assert all(len(c) == 1 for c in lm.batch_calls[5:])


async def test_generate_tokens_without_eod_runs_to_max_length():
    lm = StepLM(V=10)
    tokens, valid = await generate_tokens(lm, [[5], [6, 7, 8]], max_length=6, token_sample_fn=greedy_sampling)
    assert valid.all()
    assert tokens.tolist() == [[5, 6, 7, 8, 9, 0], [6, 7, 8, 9, 0, 1]]
    assert len(lm.batch_calls) == 5  # a full-length prefix takes no step


async def test_generate_tokens_seeded_and_params_as_sample_fn(mock_lm):
    prefixes = [[0, 1, 2], [0]]
    fn = SamplingParams(temperature=0.8, top_k=20).sample
    a = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=42)
    b = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=42)
    c = await generate_tokens(mock_lm, prefixes, max_length=8, token_sample_fn=fn, rng=43)
    assert torch.equal(a[0], b[0]) and not torch.equal(a[0], c[0])
    # each generated token is among the 20 most likely after its context
    for b_, p in enumerate(prefixes):
        row = a[0][b_].tolist()
        for i in range(len(p), 8):
            top = torch.topk(mock_lm.logprobs(row[:i]), 20).indices.tolist()
            assert row[i] in top


def test_generate_tokens_sync(mock_lm):
    tokens, _valid = generate_tokens_sync(mock_lm, [[0, 3]], max_length=4, token_sample_fn=greedy_sampling)
    assert tokens[0].tolist() == [0, 3] + brute_greedy(mock_lm, [0, 3], 2)


# --------------------------------------------------------------------------- generate


async def test_generate_greedy_matches_sequential_oracle_left_padded(mock_lm):
    prompts = [[0, 72, 105, 33], [0, 5], [0, 84, 104]]
    seqs = await generate(mock_lm, prompts, 6, do_sample=False)
    assert seqs.shape == (3, 4 + 6)
    pad = mock_lm.eos_token_ids[0]
    for b, p in enumerate(prompts):
        expect = [pad] * (4 - len(p)) + p + brute_greedy(mock_lm, p, 6, stop=mock_lm.eos_token_ids)
        assert seqs[b].tolist() == expect


async def test_generate_input_forms_agree(mock_lm):
    ragged = [[0, 72, 105, 33], [0, 5]]
    left = torch.tensor([[0, 72, 105, 33], [2, 2, 0, 5]])
    mask = torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1]])
    kw = {"max_new_tokens": 5, "temperature": 0.7, "top_p": 0.95, "return_dict": True}
    a = await generate(mock_lm, ragged, rng=1, **kw)
    b = await generate(mock_lm, left, attention_mask=mask, rng=1, **kw)
    c = await generate(mock_lm, left.numpy(), attention_mask=mask.numpy(), rng=np.random.default_rng(1), **kw)
    for other in (b, c):
        assert all(torch.equal(a[k], other[k]) for k in a)
    assert a["attention_mask"].tolist() == [[1] * 9, [0, 0] + [1] * 7]
    # one prompt as a flat list (B = 1); greedy so the batch does not change the random stream
    single = await generate(mock_lm, ragged[0], 5, do_sample=False)
    batch = await generate(mock_lm, ragged, 5, do_sample=False)
    assert torch.equal(single[0], batch[0])


@pytest.mark.parametrize("kw", [
    {},
    {"temperature": 0.5, "top_k": 10},
    {"temperature": 1.3, "top_p": 0.8, "min_p": 0.05},
    {"do_sample": False},
], ids=repr)
async def test_generate_scores_and_logprobs_equal_recomputed(mock_lm, kw):
    prompts = [[0, 72, 105], [0]]
    out = await generate(mock_lm, prompts, 6, rng=7, return_dict=True, **kw)
    params = SamplingParams(**{k: v for k, v in kw.items()})
    P = 3
    assert out["scores"].shape == out["logprobs"].shape == (2, out["sequences"].shape[1] - P)
    for b, p in enumerate(prompts):
        n_new = int(out["attention_mask"][b, P:].sum())
        gen = out["sequences"][b, P:P + n_new].tolist()
        for t, tok in enumerate(gen):
            raw = mock_lm.logprobs(p + gen[:t])  # (V,) recomputed, uncached
            assert out["logprobs"][b, t].item() == raw[tok].item()
            assert out["scores"][b, t].item() == params.logprobs(raw)[tok].item()
            assert math.isfinite(out["scores"][b, t].item())
        assert (out["scores"][b, n_new:] == 0).all() and (out["logprobs"][b, n_new:] == 0).all()
    if params.is_greedy:
        assert (out["scores"] == 0).all()
    if kw.get("temperature", 1) != 1:
        assert not torch.equal(out["scores"], out["logprobs"])


async def test_generate_stops_at_eos_and_pads():
    lm = StepLM(V=10)  # EOS = 9
    out = await generate(lm, [[6], [2, 3], [7, 8]], 5, do_sample=False, return_dict=True, pad_token_id=0)
    # greedy: 6->7->8->9 stop | 3->4->5->6->7->8 (5 new) | 8->9 stop
    assert out["sequences"].tolist() == [[0, 6, 7, 8, 9, 0, 0], [2, 3, 4, 5, 6, 7, 8], [7, 8, 9, 0, 0, 0, 0]]
    assert out["attention_mask"].tolist() == [[0, 1, 1, 1, 1, 0, 0], [1] * 7, [1, 1, 1, 0, 0, 0, 0]]
    assert len(lm.batch_calls) == 5
    # custom eos ids, and [] never stops
    seqs = await generate(lm, [[6]], 5, do_sample=False, eos_token_id=8, pad_token_id=0)
    assert seqs.tolist() == [[6, 7, 8]]
    seqs = await generate(lm, [[6]], 5, do_sample=False, eos_token_id=[])
    assert seqs.tolist() == [[6, 7, 8, 9, 0, 1]]


async def test_generate_max_new_tokens_zero_and_empty_batch(mock_lm):
    assert (await generate(mock_lm, [[0, 1], [0]], 0)).tolist() == [[0, 1], [0, 0]]
    out = await generate(mock_lm, [], 3, return_dict=True)
    assert out["sequences"].shape == (0, 0) and out["scores"].shape == (0, 0)


async def test_generate_seeded_reproducible(mock_lm):
    kw = {"max_new_tokens": 8, "temperature": 1.2, "top_k": 50, "return_dict": True}
    a = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=99, **kw)
    b = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=99, **kw)
    c = await generate(mock_lm, [[0, 1], [0, 2, 3]], rng=100, **kw)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["sequences"], c["sequences"])


def test_generate_reproducible_across_processes(mock_lm):
    code = ("from genlm_bytes import MockLM; from genlm_bytes.sampling import generate_sync; "
            "print(generate_sync(MockLM(seed=0), [[0, 1], [0]], 8, temperature=0.9, top_p=0.9, rng=2024).tolist())")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    here = generate_sync(mock_lm, [[0, 1], [0]], 8, temperature=0.9, top_p=0.9, rng=2024).tolist()
    assert res.stdout.strip() == str(here)


async def test_sync_wrappers_refuse_running_loop(mock_lm):
    with pytest.raises(RuntimeError, match="await"):
        generate_sync(mock_lm, [[0]], 1)
    with pytest.raises(RuntimeError, match="await"):
        generate_tokens_sync(mock_lm, [[0]], max_length=2)


async def test_concurrent_generate_calls_share_lm(mock_lm):
    a, b = await asyncio.gather(generate(mock_lm, [[0, 1]], 4, rng=1), generate(mock_lm, [[0, 2]], 4, rng=2))
    assert torch.equal(a, await generate(mock_lm, [[0, 1]], 4, rng=1))
    assert torch.equal(b, await generate(mock_lm, [[0, 2]], 4, rng=2))


# --------------------------------------------------------------------------- embedded model


PROMPTS = ["The capital of France is", "Once upon a time, in a small village by the sea,", "def fib(n):",
           "1, 2, 3,"]


@pytest.mark.slow
def test_greedy_matches_hf_generate(embedded_lm):
    """generate(do_sample=False) == model.generate(do_sample=False) on a left-padded ragged batch."""
    model, tok = embedded_lm.model, embedded_lm.tokenizer
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        enc = tok(PROMPTS, padding=True, return_tensors="pt")
    finally:
        tok.padding_side = old_side
    assert len(set(enc["attention_mask"].sum(1).tolist())) > 1  # really different lengths
    eos = list(embedded_lm.eos_token_ids)
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos[0]
    with torch.no_grad():
        expect = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                                max_new_tokens=10, do_sample=False, eos_token_id=eos, pad_token_id=pad)
    ours = generate_sync(embedded_lm, enc["input_ids"], 10, do_sample=False,
                         attention_mask=enc["attention_mask"], eos_token_id=eos, pad_token_id=pad)
    assert ours.tolist() == expect.tolist()
    # the same prompts given as ragged lists, without a mask
    ragged = [tok(p)["input_ids"] for p in PROMPTS]
    assert torch.equal(generate_sync(embedded_lm, ragged, 10, do_sample=False, eos_token_id=eos,
                                     pad_token_id=pad), ours)
