"""One OpenMP pool at a time (genlm_bytes/lm/openmp.py): the caller's thread's pool is freed
before work goes to the model's thread, and the batcher's hook that does it."""

import asyncio
import os
import threading
import time

import pytest
import torch

from genlm_bytes.batching import Batcher
from genlm_bytes.lm import openmp

needs_pools = pytest.mark.skipif(
    not openmp.available() or torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task"),
    reason="needs torch on libgomp (Linux) with 2+ threads")


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _settles_at(want: int, timeout: float = 2.0) -> int:
    """The thread count once it reaches ``want`` (exiting threads leave /proc a moment later)."""
    end = time.monotonic() + timeout
    n = _threads()
    while n != want and time.monotonic() < end:
        time.sleep(0.005)
        n = _threads()
    return n


def _parallel_op() -> None:
    torch.randn(1 << 22).exp_()  # above torch's grain size: an OpenMP region on this thread


@needs_pools
def test_release_frees_the_calling_threads_pool_and_a_later_region_makes_a_new_one():
    helpers = torch.get_num_threads() - 1
    out = {}

    def work():
        _parallel_op()
        out["with"] = _threads()
        out["released"] = openmp.release_thread_pool()
        out["without"] = _settles_at(out["with"] - helpers)
        out["again_released"] = openmp.release_thread_pool()  # no pool: nothing to do, no error
        _parallel_op()
        out["again"] = _settles_at(out["with"])

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert out["released"] and out["again_released"]
    assert out["without"] == out["with"] - helpers
    assert out["again"] == out["with"]


@needs_pools
async def test_the_engine_frees_the_callers_pool_before_a_pass(embedded_lm):
    lm = embedded_lm
    helpers = torch.get_num_threads() - 1
    await lm.next_token_logprobs([lm.initial_context[0], 504, 2677])  # the model's thread has its pool
    await asyncio.sleep(0.05)
    _parallel_op()  # ... and now this thread has one
    n = _threads()
    await lm.next_token_logprobs([lm.initial_context[0], 504, 2677, 314, 9])  # not cached: a pass
    assert _settles_at(n - helpers) == n - helpers


async def test_before_dispatch_runs_in_the_loops_thread_once_per_batch(caplog):
    calls = []

    def before():
        calls.append(threading.get_ident())
        if len(calls) == 2:
            raise RuntimeError("boom")

    b = Batcher(lambda reqs: [r * 2 for r in reqs], name="t", before_dispatch=before)
    assert await asyncio.gather(*(b.submit(i, i) for i in range(5))) == [0, 2, 4, 6, 8]
    assert calls == [threading.get_ident()] and b.n_batches == 1
    assert await b.submit(10, 10) == 20  # the hook fails: logged, the batch still runs
    assert len(calls) == 2 and "before_dispatch failed" in caplog.text


def test_before_dispatch_must_be_callable():
    with pytest.raises(TypeError, match="before_dispatch"):
        Batcher(lambda reqs: reqs, before_dispatch=3)


@pytest.mark.skipif(not openmp.available(), reason="needs torch on libgomp (Linux)")
async def test_cpu_engines_compute_in_one_shared_thread(embedded_lm):
    from genlm_bytes.lm.hf import AsyncTransformer, EngineConfig

    lm = embedded_lm
    other = AsyncTransformer(lm.model, lm.tokenizer, byte_vocab=lm.byte_vocab, initial_context=lm.initial_context,
                             eos_token_ids=lm.eos_token_ids, lookahead=False)
    own = AsyncTransformer(lm.model, lm.tokenizer, byte_vocab=lm.byte_vocab, initial_context=lm.initial_context,
                           eos_token_ids=lm.eos_token_ids, config=EngineConfig(one_openmp_pool=False))
    assert other.batcher._executor is lm.batcher._executor is openmp.shared_executor()
    assert own.batcher._executor is not lm.batcher._executor and own.batcher.before_dispatch is None
    ctx = [lm.initial_context[0], 504, 2677, 314]
    a, b, c = await asyncio.gather(lm.next_token_logprobs(ctx), other.next_token_logprobs(ctx),
                                   own.next_token_logprobs(ctx))
    assert torch.allclose(a, b, atol=1e-5) and torch.allclose(a, c, atol=1e-5)


def test_a_shared_executor_must_run_one_thread():
    import concurrent.futures

    with pytest.raises(ValueError, match="one thread"):
        Batcher(lambda reqs: reqs, executor=concurrent.futures.ThreadPoolExecutor(max_workers=2))
    with pytest.raises(TypeError, match="executor"):
        Batcher(lambda reqs: reqs, executor="a thread")
