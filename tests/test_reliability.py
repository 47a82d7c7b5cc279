"""Reliability: failing models, cancellation, event loops and threads, bounded memory, a
concurrency soak, and hostile input (fuzzed with hypothesis).

Results of the embedded (float32) model are checked against a plain forward within 2e-4, the
float32 noise bound (see tests/test_backend.py for the exactness tests).

Every scenario that could hang runs under a timeout (``asyncio.wait_for`` inside, the suite's
``pytest-timeout`` outside). The asyncio leak messages ("Future exception was never retrieved",
"Task was destroyed but it is pending") fail the tests that look for them.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import math
import os
import random
import re
import threading
import time
import warnings

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from test_backend import (  # noqa: F401 - _one_thread is an autouse fixture
    TOL32,
    _one_thread,
    assert_cache_consistent,
    assert_close_to_uncached,
    transformer,
    uncached,
)

from genlm_bytes import AsyncLM, BeamParams, ByteBeamState, MockLM
from genlm_bytes.batching import Batcher

LEAK_MESSAGES = ("never retrieved", "destroyed but it is pending", "was never awaited")


# --------------------------------------------------------------------------- helpers


class ModelError(RuntimeError):
    pass


class BatchedMock(AsyncLM):
    """A user model: MockLM's distributions served through a Batcher, as a real backend would.

    ``fail_when(requests)`` makes a batch raise; ``gate`` (a threading.Event) holds the worker
    inside ``process`` until it is set; ``entered`` is set whenever a batch starts.
    """

    def __init__(self, max_batch_size: int = 64, seed: int = 0):
        self.mock = MockLM(seed=seed)
        super().__init__(byte_vocab=self.mock.byte_vocab, initial_context=[0], eos_token_ids=[0])
        self.batcher = Batcher(self._process, max_batch_size=max_batch_size, name="BatchedMock")
        self.fail_when = None
        self.gate: threading.Event | None = None
        self.entered = threading.Event()
        self.batches: list[list[tuple]] = []

    def _process(self, requests):
        self.batches.append(list(requests))
        self.entered.set()
        if self.gate is not None and not self.gate.wait(20):
            raise TimeoutError("test gate never opened")
        if self.fail_when is not None and self.fail_when(requests):
            raise ModelError(f"forward failed on a batch of {len(requests)}")
        return [self.mock.logprobs(list(r)) for r in requests]

    async def next_token_logprobs(self, token_ids):
        key = tuple(token_ids)
        return await self.batcher.submit(key, key)


async def settle() -> None:
    """Let finished workers return (a few loop iterations: a worker waits up to
    ``Batcher.SETTLE_PATIENCE`` iterations for more requests before it ends)."""
    for _ in range(2 * Batcher.SETTLE_PATIENCE + 5):
        await asyncio.sleep(0)


async def assert_no_other_tasks() -> None:
    await settle()
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert not others, f"background tasks left running: {others}"


@contextlib.contextmanager
def no_asyncio_leaks(caplog):
    """Fail on asyncio's leak reports (logged or warned; see run_checked for the loop's handler)."""
    caplog.set_level(logging.DEBUG, logger="asyncio")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
        gc.collect()
        gc.collect()
    messages = [r.getMessage() for r in caplog.records] + [str(w.message) for w in caught]
    leaks = [m for m in messages if any(k in m for k in LEAK_MESSAGES)]
    assert not leaks, leaks


def run_checked(coro_fn, *args):
    """``asyncio.run`` with an exception handler that records anything the loop reports."""
    reported = []

    async def main():
        asyncio.get_running_loop().set_exception_handler(lambda loop, ctx: reported.append(ctx))
        return await coro_fn(*args)

    out = asyncio.run(main())
    gc.collect()
    assert not reported, [c.get("message") for c in reported]
    return out


# --------------------------------------------------------------------------- failing model


def test_failing_batch_fails_exactly_its_callers_and_leaves_nothing_behind(caplog):
    lm = BatchedMock(max_batch_size=4)
    contexts = [[0, i] for i in range(12)]
    poison = (0, 5)
    lm.fail_when = lambda requests: poison in requests

    async def scenario():
        results = await asyncio.wait_for(
            asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts), return_exceptions=True), 20)
        await assert_no_other_tasks()
        # Once the model is well again, the next calls (including the failed contexts) work.
        lm.fail_when = None
        again = await asyncio.wait_for(lm.batch_next_token_logprobs(contexts[:6]), 20)
        await assert_no_other_tasks()
        return results, again

    with no_asyncio_leaks(caplog):
        results, again = run_checked(scenario)
    failed_batch = next(b for b in lm.batches if poison in b)
    assert len(lm.batches) >= 3 and len(failed_batch) <= 4
    for ctx, res in zip(contexts, results):
        if tuple(ctx) in failed_batch:
            assert isinstance(res, ModelError), (ctx, res)
        else:
            assert torch.equal(res, lm.mock.logprobs(ctx)), ctx
    for ctx, row in zip(contexts[:6], again):
        assert torch.equal(row, lm.mock.logprobs(ctx))


def test_process_returning_the_wrong_number_of_results_fails_the_batch(caplog):
    lm = BatchedMock()
    lm.batcher.process = lambda requests: []

    async def scenario():
        res = await asyncio.wait_for(
            asyncio.gather(lm.next_token_logprobs([0, 1]), lm.next_token_logprobs([0, 2]),
                           return_exceptions=True), 10)
        await assert_no_other_tasks()
        return res

    with no_asyncio_leaks(caplog):
        res = run_checked(scenario)
    assert all(isinstance(r, RuntimeError) and "returned 0 results for 2 requests" in str(r) for r in res)


@pytest.mark.slow
def test_transformer_failing_batch_among_others(embedded_lm, embedded_hf, caplog):
    hf_model, _ = embedded_hf
    lm = transformer(embedded_lm, batch_size=2)
    real_forward, calls = lm.runner.forward, []

    def forward(rows, all_positions, **kw):
        calls.append([r[0] for r in rows])
        if len(calls) == 2:
            raise ModelError("simulated failure of the second pass")
        return real_forward(rows, all_positions, **kw)

    lm.runner.forward = forward
    contexts = [[0, 504, t] for t in (11, 12, 13, 14, 15, 16)]

    async def scenario():
        res = await asyncio.wait_for(
            asyncio.gather(*(lm.next_token_logprobs(c) for c in contexts), return_exceptions=True), 120)
        await assert_no_other_tasks()
        return res

    with no_asyncio_leaks(caplog):
        results = run_checked(scenario)
    assert len(calls) == 3
    for ctx, res in zip(contexts, results):
        if tuple(ctx) in calls[1]:
            assert isinstance(res, ModelError)
            assert not lm.has_logprobs(ctx)
        else:
            assert_close_to_uncached(hf_model, ctx, res, TOL32)
    assert_cache_consistent(lm.cache)
    # The failed contexts work on the next call.
    row = lm.next_token_logprobs_sync(list(calls[1][0]))
    assert_close_to_uncached(hf_model, calls[1][0], row, TOL32)


# --------------------------------------------------------------------------- batching


async def test_callers_that_resume_after_several_hops_share_one_batch():
    """Callers answered by one batch go on to their next request after a few loop iterations
    each (other awaits in between); the worker waits for them (the loop has nothing else to
    run), so every later step of the 12 callers is one batch, not a trickle of small ones."""
    lm = BatchedMock()

    async def caller(i: int) -> None:
        for step in range(4):
            for _ in range(i % 5):  # a different number of hops for each caller
                await asyncio.sleep(0)
            await lm.next_token_logprobs([0, i, step])

    await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(12))), 10)
    assert [len(b) for b in lm.batches] == [12, 12, 12, 12]


async def test_a_busy_loop_delays_a_batch_by_a_bounded_number_of_iterations():
    """A task that keeps the loop busy (always ready) delays a batch by at most
    ``SETTLE_PATIENCE`` iterations without a new request, never forever."""
    lm = BatchedMock()
    spins = 0
    stop = False

    async def spinner() -> None:
        nonlocal spins
        while not stop:
            state = lm.batcher._states.get(asyncio.get_running_loop())
            if state is not None and state.queue:  # requests queued, the batch not taken yet
                spins += 1
            await asyncio.sleep(0)

    task = asyncio.ensure_future(spinner())
    try:
        rows = await asyncio.wait_for(asyncio.gather(*(lm.next_token_logprobs([0, i]) for i in range(3))), 10)
    finally:
        stop = True
        await task
    assert len(rows) == 3 and lm.batches == [[(0, 0), (0, 1), (0, 2)]]
    assert 0 < spins <= Batcher.SETTLE_PATIENCE + 2, f"the batch waited {spins} loop iterations"


# --------------------------------------------------------------------------- cancellation


async def test_cancelled_waiters_do_not_break_the_batch_for_the_others(caplog):
    lm = BatchedMock()
    lm.gate = threading.Event()
    contexts = [[0, i] for i in range(8)] + [[0, 3]]  # the last duplicates the fourth
    with no_asyncio_leaks(caplog):
        tasks = [asyncio.create_task(lm.next_token_logprobs(c)) for c in contexts]
        await asyncio.to_thread(lm.entered.wait, 10)  # the batch is inside the model now
        for i in (1, 3, 6):  # including one of the duplicated pair
            tasks[i].cancel()
        await settle()
        lm.gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 10)
        for i, (ctx, res) in enumerate(zip(contexts, results)):
            if i in (1, 3, 6):
                assert isinstance(res, asyncio.CancelledError)
            else:
                assert torch.equal(res, lm.mock.logprobs(ctx))
        assert len(lm.batches) == 1 and len(lm.batches[0]) == 8
        # The cancelled contexts can be asked again.
        again = await asyncio.wait_for(lm.batch_next_token_logprobs([contexts[1], contexts[6]]), 10)
        assert torch.equal(again[1], lm.mock.logprobs(contexts[6]))
        await assert_no_other_tasks()


async def test_timeouts_of_queued_and_running_requests(caplog):
    lm = BatchedMock(max_batch_size=2)
    lm.gate = threading.Event()
    with no_asyncio_leaks(caplog):
        running = [asyncio.create_task(lm.next_token_logprobs([0, i])) for i in (1, 2)]
        await asyncio.to_thread(lm.entered.wait, 10)
        queued = [asyncio.create_task(lm.next_token_logprobs([0, i])) for i in (3, 4, 5)]
        # wait_for timeouts: one on the running batch, one on a queued request; a third caller
        # shares the running request [0, 1] and must still get it.
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lm.next_token_logprobs([0, 1]), 0.05)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(lm.next_token_logprobs([0, 4]), 0.05)
        sharer = asyncio.create_task(lm.next_token_logprobs([0, 1]))
        queued[0].cancel()
        lm.gate.set()
        out = await asyncio.wait_for(asyncio.gather(*running, sharer, *queued[1:]), 10)
        for row, i in zip(out, (1, 2, 1, 4, 5)):
            assert torch.equal(row, lm.mock.logprobs([0, i]))
        assert queued[0].cancelled()
        await assert_no_other_tasks()


@pytest.mark.slow
async def test_transformer_cancellation_leaves_complete_cache_entries(embedded_lm, embedded_hf, caplog):
    hf_model, tok = embedded_hf
    lm = transformer(embedded_lm)
    ids = [0] + tok.encode("The cat sat on the mat")
    gate, entered = threading.Event(), threading.Event()
    real_forward = lm.runner.forward

    def gated_forward(rows, all_positions, **kw):
        entered.set()
        gate.wait(30)
        return real_forward(rows, all_positions, **kw)

    lm.runner.forward = gated_forward
    contexts = [ids[:4], ids[:6] + [13], ids, [0, 99]]
    with no_asyncio_leaks(caplog):
        tasks = [asyncio.create_task(lm.next_token_logprobs(c)) for c in contexts]
        await asyncio.to_thread(entered.wait, 30)
        with pytest.raises(asyncio.TimeoutError):  # a caller of the running pass gives up
            await asyncio.wait_for(lm.next_token_logprobs(ids), 0.05)
        tasks[0].cancel()
        tasks[3].cancel()
        pf = asyncio.create_task(lm.prefetch(ids + [5, 6, 7]))  # queued behind the pass, then cancelled
        await settle()
        pf.cancel()
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 120)
        assert isinstance(results[0], asyncio.CancelledError) and isinstance(results[3], asyncio.CancelledError)
        with pytest.raises(asyncio.CancelledError):
            await pf
        # Let the worker thread finish what it started, then look at the cache.
        await asyncio.wait_for(lm.next_token_logprobs(ids), 120)
        await asyncio.get_running_loop().run_in_executor(lm.batcher._executor, lambda: None)
        await assert_no_other_tasks()
    assert_cache_consistent(lm.cache)
    forwards = lm.n_forward_tokens
    for ctx in contexts:  # the pass finished in the background: every entry complete and exact
        assert lm.has_logprobs(ctx)
        assert_close_to_uncached(hf_model, ctx, await lm.next_token_logprobs(ctx), TOL32)
    assert lm.n_forward_tokens == forwards


# --------------------------------------------------------------------------- event loops and threads


def test_same_model_across_successive_asyncio_runs_and_sync_wrappers(caplog):
    lm = BatchedMock(max_batch_size=3)

    async def batch(k):
        return await asyncio.wait_for(lm.batch_next_token_logprobs([[0, k, j] for j in range(7)]), 10)

    with no_asyncio_leaks(caplog):
        for k in range(3):
            rows = run_checked(batch, k)
            assert torch.equal(rows[4], lm.mock.logprobs([0, k, 4]))
            assert torch.equal(lm.next_token_logprobs_sync([0, k]), lm.mock.logprobs([0, k]))
            assert torch.equal(lm.batch_next_token_logprobs_sync([[0, k], [1, k]])[1],
                               lm.mock.logprobs([1, k]))

        # A run that ends while its request is still inside the model: the next run still works.
        lm.gate = threading.Event()

        async def abandon():
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(lm.next_token_logprobs([0, 50]), 0.05)

        run_checked(abandon)
        threading.Timer(0.2, lm.gate.set).start()
        assert torch.equal(lm.next_token_logprobs_sync([0, 51]), lm.mock.logprobs([0, 51]))


async def test_sync_wrappers_refuse_to_run_inside_a_loop():
    lm = BatchedMock()
    with pytest.raises(RuntimeError, match="await lm.next_token_logprobs"):
        lm.next_token_logprobs_sync([0, 1])
    with pytest.raises(RuntimeError, match="await lm.batch_next_token_logprobs"):
        lm.batch_next_token_logprobs_sync([[0, 1]])


def _hammer_from_threads(lm, contexts_of, expected, n_threads: int, timeout: float):
    errors, done = [], []

    def worker(k):
        try:
            for ctxs in contexts_of(k):
                rows = lm.batch_next_token_logprobs_sync(ctxs)
                for ctx, row in zip(ctxs, rows):
                    if not torch.allclose(row, expected(ctx), atol=2e-4):
                        errors.append(f"thread {k}: wrong row for {ctx}")
            done.append(k)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(n_threads)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    assert not any(t.is_alive() for t in threads), f"threads hung; finished: {sorted(done)}"
    assert not errors, errors[:5]


@pytest.mark.timeout(60)
def test_sync_wrappers_from_several_threads_at_once():
    """Each thread runs its own event loop (``asyncio.run`` inside the sync wrapper); they share
    one batcher. (Before the fix, a new loop reset the shared queue and the others hung.)"""
    lm = BatchedMock(max_batch_size=4)
    lm.batcher.process = lambda reqs, f=lm._process: (time.sleep(0.002), f(reqs))[1]
    _hammer_from_threads(lm, lambda k: [[[0, k, i, j] for j in range(6)] for i in range(15)],
                         lambda ctx: lm.mock.logprobs(ctx), n_threads=4, timeout=40)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_transformer_across_runs_and_threads(embedded_lm, embedded_hf):
    hf_model, tok = embedded_hf
    lm = transformer(embedded_lm)
    ids = [0] + tok.encode("Paris is the capital of")

    def contexts_of(k):
        return [[ids + [100 + k, j] for j in range(2)], [ids[:3] + [200 + k]]]

    # The oracle runs here, before the threads start (one model, one forward at a time).
    expected = {tuple(c): uncached(hf_model, c) for k in range(3) for batch in contexts_of(k) for c in batch}
    for k in range(2):  # successive asyncio.run calls, then the sync wrappers
        row = asyncio.run(lm.next_token_logprobs(ids[: 4 + k]))
        assert_close_to_uncached(hf_model, ids[: 4 + k], row, TOL32)
    assert_close_to_uncached(hf_model, ids, lm.next_token_logprobs_sync(ids), TOL32)
    _hammer_from_threads(lm, contexts_of, lambda ctx: expected[tuple(ctx)], n_threads=3, timeout=150)
    assert_cache_consistent(lm.cache)


# --------------------------------------------------------------------------- memory bounds


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads resident memory from /proc")
async def test_long_greedy_generation_keeps_memory_flat(embedded_lm, embedded_hf):
    """A 100-step greedy loop with a 16 MB cache budget (the 2,000-step run is
    ``benchmarks/soak_memory.py``). Without the budget the cache would hold every step's pass,
    about 250 MB by the end; with it, resident memory stays flat and the results are those of a
    plain forward. (Up to half the budget is kept for memory outside the cache; the other half
    holds the context's 105 tokens of keys/values, 4.8 MB.)"""
    hf_model, tok = embedded_hf
    budget = 16 << 20
    lm = transformer(embedded_lm, cache_budget_bytes=budget, draft_tokens=0)  # one token per step
    ids = [0] + tok.encode("Once upon a time")
    prompt_len = len(ids)
    steps, warmup = 100, 20
    rss = []
    for step in range(steps):
        if step == warmup:
            gc.collect()
            rss0 = rss_bytes()
        logp = await lm.next_token_logprobs(ids)
        assert lm.cache.nbytes <= budget
        if step % 33 == 32 or step == steps - 1:
            assert_close_to_uncached(hf_model, ids, logp, TOL32)
        ids.append(int(logp.argmax()))
        if step >= warmup:
            rss.append(rss_bytes())
    assert lm.n_forward_tokens == prompt_len + steps - 1, "each step runs one new token on the cached past"
    assert lm.cache.n_evicted > 0
    growth = max(rss) - rss0
    assert growth < budget + (48 << 20), f"resident memory grew by {growth / 2**20:.0f} MB"
    assert_cache_consistent(lm.cache)


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_a_long_past_is_not_copied_whole_when_the_copy_would_evict_it(embedded_lm, embedded_hf):
    """Generating after a 1,500-token context at a 128 MB budget: the past (69 MB of keys/values)
    fits, but the past and a whole copy of it do not fit beside the byte level's reserve. Its
    chain of segments then grows instead of being copied whole (the copy's reservation evicted
    the very past it copied, and every later step ran the whole context again: 59,319 LM tokens
    for 40 steps). Each step runs one token."""
    hf_model, tok = embedded_hf
    budget = 128 << 20
    lm = transformer(embedded_lm, cache_budget_bytes=budget, draft_tokens=0)
    store = lm.runner.store
    ids = [0] + tok.encode(" ".join(["The harbor was quiet that spring, and the boats came back one by one."] * 120))
    ids = ids[:1500]
    assert 2 * len(ids) * store.kv_per_token + store.base_reserve > budget > len(ids) * store.kv_per_token
    logp = await lm.next_token_logprobs(ids)
    n0 = lm.n_forward_tokens
    steps = 12  # more than the segments after which a generated context is otherwise copied whole
    for _ in range(steps):
        ids.append(int(logp.argmax()))
        logp = await lm.next_token_logprobs(ids)
    assert lm.n_forward_tokens - n0 == steps, "each step runs one new token on the cached past"
    assert lm.cache.deepest_kv(ids, len(ids))[1].nseg > store.config.min_segments
    assert_close_to_uncached(hf_model, ids, logp, TOL32)
    assert_cache_consistent(lm.cache)


# --------------------------------------------------------------------------- soak


@pytest.mark.timeout(240)
async def test_soak_200_concurrent_beams_equal_one_at_a_time():
    rng = random.Random(7)
    pieces = [b"the", b" apple", b" day", b"and", b" of", b"ing", b"\n\n", b"\xc3\xa9", b"\xff", b"\x00", b"th"]
    texts = [b"".join(rng.choice(pieces) for _ in range(30))[:50] for _ in range(200)]
    params = BeamParams(K=3, prune_threshold=0.02)

    async def run(lm, text):
        beam = await ByteBeamState.initial(lm, params)
        for b in text:
            beam = await (beam.prune() << b)
        return beam.logZ, len(beam)

    plain = MockLM(seed=0)
    one_at_a_time = [await run(plain, t) for t in texts]
    batched = BatchedMock(max_batch_size=64, seed=0)
    together = await asyncio.wait_for(asyncio.gather(*(run(batched, t) for t in texts)), 200)
    assert together == one_at_a_time
    assert all(z > -math.inf for z, _ in together)
    assert len(batched.batches) < batched.batcher.n_requests / 4, "concurrent beams share batches"
    await assert_no_other_tasks()


# --------------------------------------------------------------------------- hostile input


def brute_force_logp(lm: MockLM, ctx: tuple, text: bytes) -> float:
    """log P(the next bytes start with ``text``) by enumerating token sequences (empty tokens spell
    nothing, so they are left out, as the byte trie leaves them out)."""
    vocab = lm.byte_vocab

    def prefix(ctx, rest):
        p = lm.logprobs(list(ctx)).double().exp().numpy()
        total = 0.0
        for t, b in enumerate(vocab):
            if not b:
                continue
            if b.startswith(rest):
                total += p[t]
            elif rest.startswith(b):
                total += p[t] * prefix(ctx + (t,), rest[len(b):])
        return total

    total = prefix(ctx, text)
    return math.log(total) if total > 0 else -math.inf


FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(min_size=1, max_size=4))
async def test_arbitrary_short_prompts_are_exact(data):
    """Any bytes (NUL, 0xFF, invalid UTF-8, a lone continuation byte) are text: the beam equals
    brute force over the default mock vocabulary (every byte is a token)."""
    lm = MockLM(seed=1)
    beam = await ByteBeamState.initial(lm, BeamParams(K=100_000))
    beam = await beam.prefill(data)
    assert beam.logZ == pytest.approx(brute_force_logp(lm, (0,), data), abs=1e-6)


@FUZZ
@given(st.binary(min_size=1, max_size=60))
async def test_arbitrary_long_prompts_keep_a_valid_beam(data):
    lm = MockLM(seed=2)
    beam = await ByteBeamState.initial(lm, BeamParams(K=3, prune_threshold=0.05))
    beam = await beam.prefill(data)
    assert len(beam) > 0 and -math.inf < beam.logZ <= 0
    ps = np.exp((await beam.logp_next()).ps)
    assert not np.isnan(ps).any() and ps.sum() == pytest.approx(1.0, abs=1e-9)


def _spellable_prefix(vocab, data: bytes) -> bool:
    """Whether some sequence of tokens of ``vocab`` starts with ``data``."""
    reach, i_max = {0}, len(data)
    for i in range(i_max + 1):
        if i not in reach:
            continue
        for t in vocab:
            if t and data[i:i + len(t)] == t[: i_max - i]:
                if i + len(t) >= i_max:
                    return True
                reach.add(i + len(t))
    return i_max in reach


@FUZZ
@given(st.binary(min_size=1, max_size=12))
@example(b"<")
@example(b"ab\x00a")
async def test_bytes_no_token_can_start_end_the_beam_cleanly(data):
    vocab = [b"<s>", b"a", b"b", b"ab", b"ba", b"abb"]
    lm = MockLM(vocab, seed=3, initial_context=[0])
    beam = await ByteBeamState.initial(lm, BeamParams(K=1000))
    beam = await beam.prefill(data)
    if _spellable_prefix(vocab, data):  # e.g. b"ab", or b"<s" (prefill reads "<s>" as text)
        assert beam.logZ == pytest.approx(brute_force_logp(lm, (0,), data), abs=1e-6)
    else:  # no token sequence starts with these bytes: probability 0, an empty beam and a clear error
        assert len(beam) == 0 and beam.logZ == -math.inf
        beam = await (beam << ord("a"))
        assert len(beam) == 0
        with pytest.raises(ValueError, match="empty beam"):
            await beam.logp_next()


@st.composite
def odd_vocab_and_text(draw):
    """A vocabulary with duplicate byte strings and empty tokens, and a text it can spell."""
    tokens = draw(st.lists(st.binary(min_size=1, max_size=3), min_size=1, max_size=8))
    singles = [bytes([b]) for b in sorted({b for t in tokens for b in t})]
    extra = [tokens[0], b""] + draw(st.lists(st.sampled_from(tokens + [b""]), max_size=4))
    vocab = [b"<s>"] + list(draw(st.permutations(singles + tokens + extra)))
    text = b"".join(draw(st.lists(st.sampled_from(tokens), min_size=1, max_size=3)))[:5]
    return vocab, text, draw(st.integers(0, 1000))


@FUZZ
@given(odd_vocab_and_text())
async def test_vocabularies_with_duplicates_and_empty_tokens(case):
    vocab, text, seed = case
    lm = MockLM(vocab, seed=seed, initial_context=[0])
    beam = await ByteBeamState.initial(lm, BeamParams(K=100_000))
    filled = await beam.prefill(text)
    assert filled.logZ == pytest.approx(brute_force_logp(lm, (0,), text), abs=1e-6)
    ps = np.exp((await filled.logp_next()).ps)
    assert not np.isnan(ps).any() and ps.sum() == pytest.approx(1.0, abs=1e-9)


class PoisonedLM(AsyncLM):
    """A user model returning a broken row (NaN, all -inf, or +inf) for every context of one length."""

    def __init__(self, bad_len: int, kind: str):
        self.mock = MockLM(seed=4)
        super().__init__(byte_vocab=self.mock.byte_vocab, initial_context=[0], eos_token_ids=[0])
        self.bad_len, self.kind = bad_len, kind

    async def next_token_logprobs(self, token_ids):
        row = self.mock.logprobs(token_ids)
        if len(token_ids) == self.bad_len:
            if self.kind == "nan":
                row[len(token_ids) % len(row)] = math.nan
            elif self.kind == "-inf":
                row[:] = -math.inf
            else:
                row[7] = math.inf
        return row


@FUZZ
@given(st.integers(1, 6), st.sampled_from(["nan", "-inf", "+inf"]), st.binary(min_size=6, max_size=10))
async def test_broken_rows_from_a_user_model_raise_naming_the_context(bad_len, kind, data):
    lm = PoisonedLM(bad_len, kind)
    match = {"nan": "NaN", "-inf": "no finite", "+inf": r"\+inf"}[kind]
    ctx_pattern = r"for context \[0" + r", \d+" * (bad_len - 1) + r"\]"
    with pytest.raises(ValueError, match=match) as info:
        beam = await ByteBeamState.initial(lm, BeamParams(K=1000))
        await beam.prefill(data)
    assert "PoisonedLM" in str(info.value)
    assert re.search(ctx_pattern, str(info.value)), str(info.value)


class WindowedLM(AsyncLM):
    """A user model with a context window, refusing longer contexts as AsyncTransformer does."""

    def __init__(self, window: int):
        self.mock = MockLM(seed=5)
        super().__init__(byte_vocab=self.mock.byte_vocab, initial_context=[0], eos_token_ids=[0])
        self.window = window

    async def next_token_logprobs(self, token_ids):
        if len(token_ids) > self.window:
            raise ValueError(f"a context of {len(token_ids)} tokens is longer than the model's window of "
                             f"{self.window} tokens; use max_context_length to truncate")
        return self.mock.logprobs(token_ids)


async def test_prompts_longer_than_the_window_error_or_truncate_as_documented():
    lm = WindowedLM(window=8)
    data = bytes(range(30))  # 30 single-byte tokens at least
    beam = await ByteBeamState.initial(lm, BeamParams(K=4))
    with pytest.raises(ValueError, match="longer than the model's window"):
        await beam.prefill(data)
    # Documented truncation: BeamParams(max_context_length=...) keeps the last tokens.
    beam = await ByteBeamState.initial(lm, BeamParams(K=4, max_context_length=8))
    beam = await beam.prefill(data)
    assert -math.inf < beam.logZ <= 0
    assert all(len(s.lm_state.context) <= 8 for s in beam.states)


LONG_TEXT = b"The quick brown fox jumps over the lazy dog and the cat sat on the mat while the bird sang."


@pytest.mark.slow
async def test_transformer_rejects_contexts_beyond_its_window(embedded_lm, embedded_hf):
    lm = transformer(embedded_lm)
    assert lm.max_positions == embedded_hf[0].config.max_position_embeddings
    with pytest.raises(ValueError, match="longer than the model's window of"):
        await lm.next_token_logprobs([0] * (lm.max_positions + 1))
    with pytest.raises(ValueError, match="longer than the model's window of"):
        await lm.prefetch([0] * (lm.max_positions + 1))
    assert lm.n_forward_tokens == 0
    # With a small window (set on this instance), a beam over a longer prompt errors clearly.
    lm.max_positions = 16
    assert len(lm.encode_bytes(LONG_TEXT)) > 16
    beam = await ByteBeamState.initial(lm, BeamParams(K=3, prune_threshold=0.05))
    with pytest.raises(ValueError, match="window of 16 tokens; use max_context_length"):
        await beam.prefill(LONG_TEXT)


@pytest.mark.slow
async def test_context_filling_the_window_is_accepted_and_truncation_works(embedded_lm):
    lm = transformer(embedded_lm)
    lm.max_positions = 16
    beam = await ByteBeamState.initial(lm, BeamParams(K=3, prune_threshold=0.05, max_context_length=16))
    try:
        beam = await beam.prefill(LONG_TEXT)  # documented truncation: keep the last 16 tokens
        assert -math.inf < beam.logZ < 0
        assert all(len(s.lm_state.context) <= 16 for s in beam.states)
    finally:
        ctx = [0] + lm.encode_bytes(LONG_TEXT)[:15]
        await lm.next_token_logprobs(ctx)  # 16 tokens: accepted
        await lm.prefetch(ctx)


@pytest.mark.slow
async def test_hostile_bytes_on_the_embedded_model(embedded_lm, embedded_hf):
    hf_model, _ = embedded_hf
    lm = transformer(embedded_lm)
    params = BeamParams(K=4, prune_threshold=0.01)
    # Invalid UTF-8 (the tokenizer has no encoding of it: the beam goes byte by byte).
    data = b"\x00 caf\xc3\xa9 \x80\x80 \xe2\x82 \xc3 ok"
    assert lm.encode_bytes(data) is None
    beam = await (await ByteBeamState.initial(lm, params)).prefill(data)
    assert len(beam) > 0 and -math.inf < beam.logZ < 0
    ps = np.exp((await beam.logp_next()).ps)
    assert not np.isnan(ps).any() and ps.sum() == pytest.approx(1.0, abs=1e-6)
    # SmolLM2's vocabulary has no token containing 0xFF (nor 0xC0, 0xF5..0xFE, a few control
    # bytes): such a byte has probability 0, and stepping on it leaves an empty beam and a clear error.
    assert not any(0xFF in b for b in lm.byte_vocab)
    assert ps[0xFF] == 0.0
    dead = await (beam << 0xFF)
    assert len(dead) == 0 and dead.logZ == -math.inf
    with pytest.raises(ValueError, match="empty beam"):
        await dead.logp_next()
    # Valid but odd UTF-8 (NUL, a combining accent, an emoji): the tokenizer's path is pinned, so
    # logZ is at least that path's log-probability from a plain forward.
    data = "\x00e\u0301 \U0001f642\x7f!".encode()
    enc = lm.encode_bytes(data)
    assert b"".join(lm.byte_vocab[t] for t in enc) == data
    with torch.inference_mode():
        logits = hf_model(torch.tensor([[0] + enc])).logits[0, :-1].float()
    logp_path = torch.log_softmax(logits, -1).gather(1, torch.tensor(enc)[:, None]).sum().item()
    beam = await (await ByteBeamState.initial(lm, params)).prefill(data)
    assert logp_path - 1e-3 <= beam.logZ < 0
    ps = np.exp((await beam.logp_next()).ps)
    assert not np.isnan(ps).any() and ps.sum() == pytest.approx(1.0, abs=1e-6)
