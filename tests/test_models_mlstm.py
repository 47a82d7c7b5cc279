"""The mLSTM cell (step == sequence == parallel, with and without initial states, stable on long
inputs with large gates), the mLSTM LM (every mode gives the same logits, the state has a fixed
size), bad input, and the AsyncMLSTM backend (cached == uncached, also under the byte beam)."""

import asyncio
import math

import numpy as np
import pytest
import torch

from genlm_bytes.byte_lm import BeamParams, ByteBeamState
from genlm_bytes.lm.mock import default_mock_vocab
from genlm_bytes.models import (
    MLSTMLM,
    AsyncMLSTM,
    MLSTMConfig,
    MLSTMState,
    parallel_stabilized_fw,
    recurrent_sequence_fw,
    recurrent_step_fw,
)
from genlm_bytes.models.mlstm import zero_state


def cell_inputs(B=2, NH=3, S=16, DHQK=8, DHV=6, gate_scale=2.0, dtype=torch.float32, seed=0, initial=False):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)

    q, k, v = randn(B, NH, S, DHQK), randn(B, NH, S, DHQK), randn(B, NH, S, DHV)
    i_pre = randn(B, NH, S) * gate_scale
    f_pre = randn(B, NH, S) * gate_scale + 3.0
    states = {}
    if initial:
        states = {"c_initial": randn(B, NH, DHQK, DHV), "n_initial": randn(B, NH, DHQK),
                      "m_initial": randn(B, NH) * gate_scale}
    return (q, k, v, i_pre, f_pre), states


def step_loop(q, k, v, i_pre, f_pre, c_initial=None, n_initial=None, m_initial=None):
    """The oracle: recurrent_step_fw called once per position."""
    B, NH, S, DHQK = q.shape
    C, n, m = zero_state(B, NH, DHQK, v.shape[-1], q.dtype)
    if c_initial is not None:
        C, n, m = c_initial, n_initial, m_initial[..., None]
    hs = []
    for t in range(S):
        h, (C, n, m) = recurrent_step_fw(C, n, m, q[:, :, t], k[:, :, t], v[:, :, t],
                                         i_pre[:, :, t, None], f_pre[:, :, t, None])
        hs.append(h)
    return torch.stack(hs, dim=2), (C, n, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("initial", [False, True])
@pytest.mark.parametrize("S,seed", [(1, 0), (7, 1), (33, 2)])
def test_step_equals_sequence_equals_parallel(dtype, initial, S, seed):
    inputs, states = cell_inputs(S=S, dtype=dtype, seed=seed, initial=initial)
    h0, s0 = step_loop(*inputs, **states)
    h1, s1 = recurrent_sequence_fw(*inputs, **states, return_last_states=True)
    h2, s2 = parallel_stabilized_fw(*inputs, **states, return_last_states=True)
    assert h1.shape == h2.shape == (2, 3, S, 6) and h1.dtype == h2.dtype == dtype
    for h in (h1, h2):
        torch.testing.assert_close(h, h0, atol=1e-5, rtol=1e-5)
    for got in (s1, s2):
        assert [t.shape for t in got] == [(2, 3, 8, 6), (2, 3, 8), (2, 3, 1)]
        for a, b in zip(got, s0):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # without return_last_states only h comes back; gates of shape (B, NH, S, 1) are accepted too
    q, k, v, i_pre, f_pre = inputs
    torch.testing.assert_close(parallel_stabilized_fw(q, k, v, i_pre[..., None], f_pre[..., None], **states), h2)


def test_initial_state_continues_a_sequence():
    (q, k, v, i_pre, f_pre), _ = cell_inputs(S=40, dtype=torch.float64, seed=3)
    full = recurrent_sequence_fw(q, k, v, i_pre, f_pre)
    a = slice(0, 25)
    b = slice(25, 40)
    h_a, (C, n, m) = parallel_stabilized_fw(q[:, :, a], k[:, :, a], v[:, :, a], i_pre[..., a], f_pre[..., a],
                                            return_last_states=True)
    h_b = parallel_stabilized_fw(q[:, :, b], k[:, :, b], v[:, :, b], i_pre[..., b], f_pre[..., b], C, n, m)
    torch.testing.assert_close(torch.cat([h_a, h_b], 2), full, atol=1e-10, rtol=0)


@pytest.mark.parametrize("gate_scale", [30.0, 100.0])
def test_long_sequences_with_large_gates_stay_finite_and_agree(gate_scale):
    (q, k, v, i_pre, f_pre), _ = cell_inputs(B=1, NH=2, S=1024, dtype=torch.float64, seed=4,
                                             gate_scale=gate_scale)
    # without the stabilizer these gates would overflow: exp(ĩ) is inf in float32
    assert torch.isinf(torch.exp(i_pre.float())).any()
    h1, s1 = recurrent_sequence_fw(q, k, v, i_pre, f_pre, return_last_states=True)
    h2, s2 = parallel_stabilized_fw(q, k, v, i_pre, f_pre, return_last_states=True)
    torch.testing.assert_close(h2, h1, atol=1e-5, rtol=1e-5)
    for a, b in zip(s2, s1):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # float32 on the same inputs: everything finite, and the states track the float64 ones
    f32 = [t.float() for t in (q, k, v, i_pre, f_pre)]
    for fw in (recurrent_sequence_fw, parallel_stabilized_fw):
        h, (C, n, m) = fw(*f32, return_last_states=True)
        assert all(torch.isfinite(t).all() for t in (h, C, n, m))
        torch.testing.assert_close(C.double(), s1[0], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(m.double(), s1[2], atol=1e-4, rtol=1e-5)


def test_step_returns_new_tensors_and_leaves_inputs_alone():
    (q, k, v, i_pre, f_pre), states = cell_inputs(S=1, initial=True)
    C, n, m = states["c_initial"], states["n_initial"], states["m_initial"][..., None]
    before = [t.clone() for t in (C, n, m)]
    h, (C2, _n2, m2) = recurrent_step_fw(C, n, m, q[:, :, 0], k[:, :, 0], v[:, :, 0], i_pre[..., :1], f_pre[..., :1])
    assert h.shape == (2, 3, 6)
    for t, t0 in zip((C, n, m), before):
        assert torch.equal(t, t0)
    assert not torch.equal(C2, C)
    # m' = max(log σ(f̃) + m, ĩ)
    expected_m = torch.maximum(torch.nn.functional.logsigmoid(f_pre[..., :1]) + m, i_pre[..., :1])
    torch.testing.assert_close(m2, expected_m)


def test_bad_shapes_name_the_tensor():
    (q, k, v, i_pre, f_pre), states = cell_inputs(S=5, initial=True)
    C, n, m = states["c_initial"], states["n_initial"], states["m_initial"][..., None]
    q0, k0, v0, i0, f0 = q[:, :, 0], k[:, :, 0], v[:, :, 0], i_pre[..., :1], f_pre[..., :1]
    cases = [
        ("vecK", lambda: recurrent_step_fw(C, n, m, q0, k0[..., :5], v0, i0, f0)),
        ("scaF", lambda: recurrent_step_fw(C, n, m, q0, k0, v0, i0, f0[:, :2])),
        ("vecN_state", lambda: recurrent_step_fw(C, n[:1], m, q0, k0, v0, i0, f0)),
        ("matC_state", lambda: recurrent_step_fw(C[0], n, m, q0, k0, v0, i0, f0)),
        ("keys", lambda: recurrent_sequence_fw(q, k[:, :, :3], v, i_pre, f_pre)),
        ("values", lambda: parallel_stabilized_fw(q, k, v[:1], i_pre, f_pre)),
        ("igate_preact", lambda: parallel_stabilized_fw(q, k, v, i_pre[..., :4], f_pre)),
        ("fgate_preact", lambda: recurrent_sequence_fw(q, k, v, i_pre, f_pre[None])),
        ("c_initial", lambda: parallel_stabilized_fw(q, k, v, i_pre, f_pre, c_initial=C[..., :2])),
        ("m_initial", lambda: recurrent_sequence_fw(q, k, v, i_pre, f_pre, m_initial=torch.zeros(2))),
        ("queries", lambda: parallel_stabilized_fw(q[0], k, v, i_pre, f_pre)),
    ]
    for name, call in cases:
        with pytest.raises(ValueError, match=name):
            call()


# -- the language model ----------------------------------------------------------------------------

def small_lm(dtype="float32", vocab_size=None, seed=0, **kw):
    cfg = MLSTMConfig(vocab_size=vocab_size or 120, embedding_dim=64, num_blocks=2, num_heads=2, dtype=dtype,
                      chunk_size=16, **kw)
    torch.manual_seed(seed)
    model = MLSTMLM(cfg).eval()
    with torch.no_grad():  # larger weights than the default init, so outputs are far from uniform
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    return model


@pytest.mark.parametrize("dtype,atol", [("float32", 2e-4), ("float64", 1e-10)])
def test_lm_modes_and_splits_agree(dtype, atol):
    model = small_lm(dtype)
    ids = torch.randint(0, 120, (2, 45))
    with torch.no_grad():
        ref = model(ids, mode="recurrent")
        assert ref.std() > 1.0 and ref.dtype == model.config.torch_dtype
        torch.testing.assert_close(model(ids, mode="parallel"), ref, atol=atol, rtol=0)
        state, pieces = None, []
        for t in range(45):  # one step per token
            logits, state = model.forward_cached(ids[:, t : t + 1], state)
            pieces.append(logits)
        torch.testing.assert_close(torch.cat(pieces, 1), ref, atol=atol, rtol=0)
        first, mid = model.forward_cached(ids[:, :20])  # parallel prefill, then continue
        rest, last = model.forward_cached(ids[:, 20:], mid)
        torch.testing.assert_close(torch.cat([first, rest], 1), ref, atol=atol, rtol=0)
        for a, b in zip(last.layers[1], state.layers[1]):
            torch.testing.assert_close(a, b, atol=atol, rtol=1e-5)


def test_lm_state_has_a_fixed_size_and_is_not_modified():
    model = small_lm()
    with torch.no_grad():
        _, short = model.forward_cached(torch.randint(0, 120, (1, 3)))
        _, long = model.forward_cached(torch.randint(0, 120, (1, 500)))
        saved = [t.clone() for layer in long.layers for t in layer]
        model.forward_cached(torch.tensor([[1, 2, 3]]), long)
    cfg = model.config
    per_block = cfg.num_heads * (cfg.qk_head_dim * cfg.v_head_dim + cfg.qk_head_dim + 1) * 4
    assert short.nbytes == long.nbytes == cfg.num_blocks * per_block
    assert all(torch.equal(a, b) for a, b in zip(saved, (t for layer in long.layers for t in layer)))
    both = MLSTMState.stack([short, long])
    assert both.batch_size == 2 and torch.equal(both.select(1).layers[0][0], long.layers[0][0])


def test_lm_soft_caps():
    model = small_lm(logits_soft_cap=3.0, gate_soft_cap=5.0)
    with torch.no_grad():
        logits = model(torch.randint(0, 120, (1, 30)))
    assert logits.abs().max() <= 3.0


@pytest.mark.parametrize("kw,field", [
    ({"embedding_dim": -8}, "embedding_dim"),
    ({"num_blocks": 0}, "num_blocks"),
    ({"num_heads": 3}, "qk_dim_factor"),
    ({"v_dim_factor": 0.3}, "v_dim_factor"),
    ({"gate_soft_cap": -1.0}, "gate_soft_cap"),
    ({"dtype": "int8"}, "dtype"),
    ({"chunk_size": 0}, "chunk_size"),
])
def test_inconsistent_config_names_the_field(kw, field):
    base = {"vocab_size": 50, "embedding_dim": 64, "num_blocks": 2, "num_heads": 4}
    with pytest.raises(ValueError, match=field):
        MLSTMConfig(**{**base, **kw})


def test_lm_bad_inputs_name_the_field():
    model = small_lm()
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.tensor([[1, 120]]))
    with pytest.raises(ValueError, match="mode"):
        model(torch.tensor([[1]]), mode="chunkwise")
    _, state = model.forward_cached(torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="state C"):
        model.forward_cached(torch.tensor([[1], [2]]), state)
    with pytest.raises(ValueError, match="state"):
        model.forward_cached(torch.tensor([[1]]), "not a state")
    with pytest.raises(TypeError, match="MLSTMConfig"):
        MLSTMLM({"vocab_size": 3})


# -- the AsyncLM backend ---------------------------------------------------------------------------

@pytest.fixture
def recurrent_pair():
    """The same small mLSTM LM behind a cached backend and an uncached one."""
    vocab = default_mock_vocab()
    model = small_lm(vocab_size=len(vocab), seed=1)
    kw = {"eos_token_ids": [0], "initial_context": [0]}
    return AsyncMLSTM(model, vocab, checkpoint_every=8, **kw), AsyncMLSTM(model, vocab, max_cache_entries=0, **kw)


async def test_async_mlstm_cached_equals_uncached(recurrent_pair):
    cached, uncached = recurrent_pair
    ctx = [0] + torch.randint(1, cached.vocab_size, (30,)).tolist()
    await cached.prefetch(ctx)
    assert cached.n_tokens_run == 31
    # one-token extensions of cached contexts: one stacked step, one token each
    contexts = [ctx + [t] for t in (5, 6, 7)] + [ctx[:9] + [3], ctx[:17] + [4, 4]]
    n0, b0 = cached.n_tokens_run, cached._batcher.n_batches
    got = await cached.batch_next_token_logprobs(contexts)
    assert cached._batcher.n_batches - b0 == 1
    assert cached.n_tokens_run - n0 == 3 + 2 + 3  # ctx[:9] resumes at checkpoint 8, ctx[:17] at 16
    ref = await uncached.batch_next_token_logprobs(contexts)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=0)
    prefixes = [ctx[:k] for k in (1, 12, 31)]
    n0 = cached.n_tokens_run
    got = await cached.batch_next_token_logprobs(prefixes)
    assert cached.n_tokens_run == n0  # every prefix of a run context is cached
    torch.testing.assert_close(got, await uncached.batch_next_token_logprobs(prefixes), atol=1e-4, rtol=0)
    assert uncached.cache is None and not uncached.has_logprobs(ctx) and cached.has_logprobs(ctx)


async def test_async_mlstm_bad_arguments(recurrent_pair):
    cached, _ = recurrent_pair
    with pytest.raises(ValueError, match="checkpoint_every"):
        AsyncMLSTM(cached.model, cached.byte_vocab, checkpoint_every=0)
    with pytest.raises(TypeError, match="MLSTMLM"):
        AsyncMLSTM(object(), cached.byte_vocab)
    with pytest.raises(ValueError, match="empty"):
        await cached.next_token_logprobs([])


async def test_byte_beam_on_recurrent_backend_matches_uncached_model(recurrent_pair):
    cached, uncached = recurrent_pair
    params = BeamParams(K=8, prune_threshold=0.0)
    text = b"the apple day"
    beams = await asyncio.gather(*(ByteBeamState.initial(lm, params) for lm in (cached, uncached)))
    for cut in (0, 4, len(text)):
        b_cached, b_plain = await asyncio.gather(*(beam.prefill(text[:cut]) for beam in beams))
        p_cached, p_plain = await asyncio.gather(b_cached.logp_next(), b_plain.logp_next())
        assert p_cached.ps.shape == (258,)
        np.testing.assert_allclose(p_cached.ps, p_plain.ps, atol=1e-4)
        assert math.isclose(b_cached.logZ, b_plain.logZ, abs_tol=1e-4)
        assert abs(np.logaddexp.reduce(p_cached.ps)) < 1e-4
    # stepping byte by byte from the prefilled beam agrees as well
    for sym in b" of":
        b_cached, b_plain = await asyncio.gather(b_cached.prune() << sym, b_plain.prune() << sym)
    p_cached, p_plain = await asyncio.gather(b_cached.logp_next(), b_plain.logp_next())
    np.testing.assert_allclose(p_cached.ps, p_plain.ps, atol=1e-4)
    assert cached.n_tokens_run < uncached.n_tokens_run
