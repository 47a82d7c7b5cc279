"""One OpenMP thread pool at a time: the model's thread's, not the caller's too.

torch's CPU wheels for Linux run their parallel loops on GNU OpenMP (``libgomp``). Each OS
thread that starts a parallel region gets a pool of worker threads of its own, kept until that
thread exits. Between two regions (a pass is hundreds: one per product and element-wise op)
the workers spin for a while before they sleep, which is what makes a one-row product fast:
it is done before a sleeping worker would have woken. But libgomp spins only while it manages
no more threads than there are CPUs; past that it throttles the spin to a hundred rounds,
and every region then pays a futex wake-up.

The engine runs its passes in its own thread (:class:`~genlm_bytes.batching.Batcher`), and the
thread that loaded the model (the caller's; usually the one running the event loop) already has
a pool. On 2 CPUs those two pools make 3 managed threads: throttled. Measured on the benchmark
machine (SmolLM2, 2 cores; ``benchmarks/README.md``, session 17): a one-token lean pass took
21 ms in the thread that loaded the model and 31 ms in the engine's thread; oneDNN's products
of 300 weight matrices 31 ms with one pool, 43 ms as soon as a second thread had one.

:func:`release_thread_pool` frees the calling thread's pool (OpenMP 5's
``omp_pause_resource_all``; the thread gets a new one at its next parallel region, a few
hundred microseconds later). The engine calls it in the caller's thread before it hands work
to the model's thread (``EngineConfig.one_openmp_pool``), so while the model computes, its
pool is the only one, as long as the caller's thread runs no parallel torch op meanwhile (the
byte level's own work on the caller's thread uses numpy, or tensors too small for a region).

Several engines on the CPU (an ensemble's models, or two settings of one model) would each
have a thread with a pool of its own: they all compute in one thread instead
(:func:`shared_executor`), taking turns, as two passes on the same cores would anyway.

Not handled: other OpenMP runtimes (Intel's or LLVM's, macOS, Windows: nothing is done), and
pools of other threads of the program (only the calling thread's can be freed).
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import functools
import logging
import os
import sys
import threading

logger = logging.getLogger(__name__)

OMP_PAUSE_SOFT = 1  # omp_pause_resource_t: free the threads, keep what is cheap to keep


@functools.lru_cache(maxsize=1)
def _pause_fn():
    """libgomp's ``omp_pause_resource_all`` as loaded by torch, or None (another runtime or OS)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import torch

        if "OpenMP" not in torch.__config__.parallel_info():
            return None
        with open("/proc/self/maps") as f:
            paths = {line.split()[-1] for line in f if "libgomp" in line and "/" in line}
    except (OSError, ImportError, RuntimeError):
        return None
    for path in sorted(paths):
        try:
            fn = ctypes.CDLL(path).omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        fn.argtypes, fn.restype = [ctypes.c_int], ctypes.c_int
        logger.debug("OpenMP pools freed through %s", path)
        return fn
    return None


def available() -> bool:
    """Whether :func:`release_thread_pool` can free a pool here (torch on libgomp, Linux)."""
    return _pause_fn() is not None


def release_thread_pool() -> bool:
    """Free the OpenMP worker threads of the calling thread's pool, if it has one (see the
    module docstring). Returns whether the runtime did (False: not libgomp, or called inside a
    parallel region). Cheap when there is no pool: one C call."""
    fn = _pause_fn()
    return fn is not None and fn(OMP_PAUSE_SOFT) == 0


_SHARED: tuple[int, concurrent.futures.ThreadPoolExecutor] | None = None
_SHARED_LOCK = threading.Lock()


def shared_executor() -> concurrent.futures.ThreadPoolExecutor:
    """The one thread every CPU engine of this process computes in (see the module docstring);
    made on first use, and again in a forked child (which inherits the executor without its
    thread)."""
    global _SHARED
    with _SHARED_LOCK:
        if _SHARED is None or _SHARED[0] != os.getpid():
            _SHARED = (os.getpid(), concurrent.futures.ThreadPoolExecutor(max_workers=1,
                                                                          thread_name_prefix="genlm-cpu"))
        return _SHARED[1]
