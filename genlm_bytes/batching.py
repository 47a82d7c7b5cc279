"""The request batcher: many coroutines ask, one worker answers in batches.

``await batcher.submit(key, request)`` queues a request and waits for its
result. A worker task drains the queue in batches of at most
``max_batch_size`` and runs ``process(requests) -> results`` in a dedicated
thread (so the event loop keeps collecting requests, and keeps running other
coroutines, while the model computes). Identical keys in flight are computed
once.

Guarantees:
- every waiting caller gets its result or the exception ``process`` raised
  for its batch; the next batch starts fresh;
- a lone request is not delayed by a sleep: the worker yields to the event
  loop until the coroutines that can run have run (a few iterations, bounded;
  see ``Batcher._settle``), so requests made meanwhile, and the next requests
  of the callers a batch just answered, join one batch;
- a cancelled caller does not disturb the others (the shared future is
  shielded);
- the batcher follows the running event loop: it can be used from successive
  ``asyncio.run`` calls, and from several threads each running its own loop
  (e.g. the synchronous wrappers called concurrently): every loop has its own
  queue and worker; their ``process`` calls take turns in the one worker thread.

Not handled here: caching of finished results (the backend does that).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any

logger = logging.getLogger(__name__)


def _retrieve(fut: asyncio.Future) -> None:
    # Mark an exception as retrieved, so a future whose waiters all left does not
    # log "Future exception was never retrieved".
    if not fut.cancelled():
        fut.exception()


class _LoopState:
    """What one event loop's callers share: the queue, in-flight futures by key, the worker task."""

    __slots__ = ("pending", "queue", "worker")

    def __init__(self):
        self.queue: list[tuple[Hashable, Any, asyncio.Future]] = []
        self.pending: dict[Hashable, asyncio.Future] = {}
        self.worker: asyncio.Task | None = None


class Batcher:
    """Batch concurrent requests into calls of ``process``.

    Args:
        process: ``process(list_of_requests) -> list_of_results``, same length; runs in a
            worker thread. An exception fails every request of that batch.
        max_batch_size: the largest batch handed to ``process``.
        name: used in log messages and the worker thread's name.
        before_dispatch: optional callable run in the event loop's thread right before each
            batch is handed to the worker thread (the HF backend frees the caller's OpenMP
            pool there: :mod:`genlm_bytes.lm.openmp`); an exception it raises is logged, not
            raised.
        executor: the single-thread executor ``process`` runs in (default: one of its own);
            batchers may share one (their ``process`` calls then take turns in its thread).
    """

    SETTLE_ROUNDS = 32  # event-loop iterations a batch waits at most for more requests (see _settle)
    SETTLE_PATIENCE = 8  # ... and iterations in a row without a new request (a caller takes ~5)

    def __init__(self, process: Callable[[Sequence[Any]], Sequence[Any]], max_batch_size: int = 32,
                 name: str = "batcher", before_dispatch: Callable[[], Any] | None = None,
                 executor: concurrent.futures.ThreadPoolExecutor | None = None):
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size must be a positive int, got {max_batch_size!r}")
        if before_dispatch is not None and not callable(before_dispatch):
            raise TypeError(f"before_dispatch must be callable or None, got {before_dispatch!r}")
        self.process = process
        self.before_dispatch = before_dispatch
        self.max_batch_size = max_batch_size
        self.name = name
        self.n_batches = 0  # number of process() calls: for tests and benchmarks
        self.n_requests = 0
        self.last_batch = 0  # requests in the latest process() call
        if executor is not None and not isinstance(executor, concurrent.futures.Executor):
            raise TypeError(f"executor must be a concurrent.futures executor or None, got {executor!r}")
        if executor is not None and getattr(executor, "_max_workers", 1) != 1:
            raise ValueError("executor must run one thread (max_workers=1): process calls must not overlap")
        self._executor = executor or concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._lock = threading.Lock()  # serializes process() calls
        self._states_lock = threading.Lock()
        # Per event loop: its queue, in-flight futures and worker (futures belong to one loop).
        self._states: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    def _state(self) -> tuple[asyncio.AbstractEventLoop, _LoopState]:
        loop = asyncio.get_running_loop()
        with self._states_lock:
            st = self._states.get(loop)
            if st is None:
                # A new loop (e.g. a later asyncio.run): forget the loops that have closed.
                for old in [lp for lp in self._states if lp.is_closed()]:
                    del self._states[old]
                st = self._states[loop] = _LoopState()
        return loop, st

    def in_flight(self) -> int:
        """Requests of the running event loop queued or being computed (0 outside a loop)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return 0
        st = self._states.get(loop)
        return len(st.pending) if st is not None else 0

    async def submit(self, key: Hashable, request: Any) -> Any:
        """Queue ``request`` (deduplicated by ``key``) and wait for its result."""
        loop, st = self._state()
        fut = st.pending.get(key)
        if fut is None:
            fut = loop.create_future()
            fut.add_done_callback(_retrieve)
            st.pending[key] = fut
            st.queue.append((key, request, fut))
            if st.worker is None or st.worker.done():
                st.worker = loop.create_task(self._run(st), name=f"{self.name}-worker")
        return await asyncio.shield(fut)

    async def _settle(self, loop: asyncio.AbstractEventLoop, st: _LoopState) -> None:
        """Yield to the event loop until the coroutines that can run have queued their requests,
        so that one batch carries them all: callers just answered go on to their next request
        within a few loop iterations, and one pass of many rows costs far less than several
        passes of a few (the model's weights are read once per pass). Stops when nothing else
        can run, when ``SETTLE_PATIENCE`` iterations in a row add no request (other work keeps
        the loop busy), or after ``SETTLE_ROUNDS`` iterations."""
        ready = getattr(loop, "_ready", None)  # (CPython's loops; others: patience alone)
        idle = 0
        for _ in range(self.SETTLE_ROUNDS):
            n = len(st.queue)
            await asyncio.sleep(0)
            if len(st.queue) >= self.max_batch_size or (ready is not None and not ready):
                return
            idle = 0 if len(st.queue) > n else idle + 1
            if idle >= self.SETTLE_PATIENCE:
                return

    async def _run(self, st: _LoopState) -> None:
        loop = asyncio.get_running_loop()
        # Let every coroutine that is ready add its request first.
        await self._settle(loop, st)
        while st.queue:
            batch = st.queue[: self.max_batch_size]
            del st.queue[: len(batch)]
            requests = [r for _, r, _ in batch]
            try:
                self.dispatching()
                results = await loop.run_in_executor(self._executor, self._call, requests)
                if len(results) != len(batch):
                    raise RuntimeError(f"{self.name}: process returned {len(results)} results "
                                       f"for {len(batch)} requests")
            except BaseException as e:
                if isinstance(e, asyncio.CancelledError):
                    err: BaseException = RuntimeError(f"{self.name}: the worker was cancelled")
                else:
                    err = e
                    logger.debug("%s: batch of %d failed: %r", self.name, len(batch), e)
                for key, _, fut in batch:
                    st.pending.pop(key, None)
                    if not fut.done():
                        fut.set_exception(err)
                if isinstance(e, asyncio.CancelledError):
                    for key, _, fut in st.queue:
                        st.pending.pop(key, None)
                        if not fut.done():
                            fut.set_exception(err)
                    st.queue.clear()
                    raise
                continue
            for (key, _, fut), res in zip(batch, results):
                st.pending.pop(key, None)
                if not fut.done():
                    fut.set_result(res)
            await self._settle(loop, st)

    def dispatching(self) -> None:
        """Run ``before_dispatch`` (in the calling thread: the event loop's, before work goes to
        the worker thread); what it raises is logged."""
        if self.before_dispatch is not None:
            try:
                self.before_dispatch()
            except Exception:
                logger.exception("%s: before_dispatch failed", self.name)

    def _call(self, requests):
        with self._lock:
            self.n_batches += 1
            self.n_requests += len(requests)
            self.last_batch = len(requests)
            return self.process(requests)

    def run_sync(self, requests):
        """Run ``process`` directly (no event loop), under the same lock."""
        return self._call(requests)
