"""Process memory hygiene: glibc's heap trim and mmap threshold, and the resident set size.

Why: cached log-prob rows (196 KB each for a 49k vocabulary) are freed in LRU order between
a pass's large temporary tensors, which leaves free holes inside the heap that the resident
set keeps counting. :class:`HeapTrimmer` hands those pages back (``malloc_trim``) when it is
worth it, and :func:`fix_mmap_threshold` stops glibc from raising its mmap threshold (see
``benchmarks/README.md`` for the measurements).

The threshold is where a tensor stops coming from the heap: below it, a pass's temporaries
(a layer's activations, a chunk of logits) reuse the heap pages the last pass freed; above
it, each is mapped fresh and every page of it is faulted in again, on every pass. The free
heap a pass leaves is kept until the next pass starts, and given back then only past what
that pass reserved (its temporaries reuse it), so the resident set stays within the budget.

Not handled: allocators other than glibc's (then every function here does nothing), memory
held by other libraries (a trim cannot give it back; :class:`HeapTrimmer` bounds the time
spent trying).
"""

from __future__ import annotations

import functools
import logging
import os
import time

logger = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # mallopt's parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
# A pass's temporaries come from the heap up to this size (a layer's activations for ~2,700
# tokens of a 576-wide model, 64 rows of logits of a 49k vocabulary); larger tensors are mapped
# and unmapped when freed. At 256 KB, scoring the 9 suite texts twice faulted 4.1M pages in
# (benchmarks/README.md, session 15).
MMAP_THRESHOLD_BYTES = 16 << 20
TRIM_THRESHOLD_BYTES = 2 * MMAP_THRESHOLD_BYTES  # free heap top free() keeps (glibc's own ratio; trims give it back)


def _glibc():
    """glibc's ``malloc_trim`` and ``mallopt`` (None, None elsewhere)."""
    try:
        import ctypes
        import ctypes.util

        name = ctypes.util.find_library("c")
        if not name:
            return None, None
        lib = ctypes.CDLL(name)
        trim, opt = lib.malloc_trim, lib.mallopt
    except (OSError, AttributeError):
        return None, None
    trim.argtypes = [ctypes.c_size_t]
    opt.argtypes = [ctypes.c_int, ctypes.c_int]
    return trim, opt


_MALLOC_TRIM, _MALLOPT = _glibc()
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


@functools.cache
def fix_mmap_threshold() -> bool:
    """Fix glibc's mmap threshold at MMAP_THRESHOLD_BYTES for this process (once; not when the
    user set ``MALLOC_MMAP_THRESHOLD_``). glibc raises the threshold by itself, up to 32 MB,
    every time a block it had mapped is freed; after the first large pass, every tensor below
    that size comes from the heap, and the long-lived rows allocated between a pass's
    temporaries pin free holes that the resident set keeps counting. Tensors above the
    threshold are mapped and returned to the system when freed."""
    if _MALLOPT is None or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    ok = bool(_MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    if "MALLOC_TRIM_THRESHOLD_" not in os.environ:  # (a fixed mmap threshold leaves glibc's at 128 KB)
        _MALLOPT(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    logger.debug("glibc mmap threshold fixed at %d bytes: %s", MMAP_THRESHOLD_BYTES, ok)
    return ok


class mapped_fresh:
    """``with mapped_fresh(nbytes): ...``: glibc maps allocations of ``nbytes`` or more made within
    the block fresh (its mmap threshold) where no free heap chunk serves them (so that
    ``lm.hugepages.new_memory_on_huge_pages`` sees them as new); then back to
    MMAP_THRESHOLD_BYTES. Nothing is changed where this process does not own glibc's threshold
    (:func:`fix_mmap_threshold`). Best effort: a large free heap chunk is still reused."""

    def __init__(self, nbytes: int):
        if isinstance(nbytes, bool) or not isinstance(nbytes, int) or not 0 < nbytes <= 1 << 30:
            raise ValueError(f"nbytes must be an int in (0, 1 GiB], got {nbytes!r}")
        self.nbytes, self.own = nbytes, False

    def __enter__(self):
        self.own = _MALLOPT is not None and fix_mmap_threshold()
        if self.own:
            _MALLOPT(M_MMAP_THRESHOLD, self.nbytes)
        return self

    def __exit__(self, *exc):
        if self.own:
            _MALLOPT(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
        return False


def rss_bytes() -> int | None:
    """Resident set size of this process (Linux), else None."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * _PAGE
    except (OSError, ValueError, IndexError):
        return None


def available_bytes() -> int | None:
    """Memory the system could give this process now (Linux's ``MemAvailable``), else None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def trim_heap() -> None:
    """Hand the free pages inside the heap back to the system (glibc only)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


class HeapTrimmer:
    """Trims the heap around passes when it is worth it: after evictions freed
    ``config.trim_after_bytes``, or, as a pass starts, when the resident set has grown past
    what the cache accounts for (``cache.nbytes + cache.reserved``, the starting pass's
    reservation included, over the resident set with the model loaded) by more than
    ``config.trim_slack_bytes``, spending at most ``config.trim_time_share`` of the passes'
    time on such trims (trimmed pages cost page faults when reused, hence not after every
    pass). The free heap a pass leaves behind (its temporaries) is not trimmed as it ends:
    the next pass's temporaries reuse it, within that pass's reservation."""

    def __init__(self, cache, config):
        self.cache, self.config = cache, config
        # The resident set with the model loaded: what grows past it beyond the cache's
        # accounting is mostly free heap pages.
        self.rss0 = rss_bytes() if _MALLOC_TRIM is not None else None
        fix_mmap_threshold()
        self.pass_seconds = self.trim_seconds = 0.0
        self._t0 = 0.0

    def pass_started(self) -> None:
        self.maybe_trim()  # what the pass's reservation evicted leaves the resident set first
        self._t0 = time.perf_counter()

    def pass_ended(self) -> None:
        self.pass_seconds += time.perf_counter() - self._t0
        self.maybe_trim(over_accounting=False)

    def maybe_trim(self, over_accounting: bool = True) -> None:
        """Trim after enough evictions; ``over_accounting``: also when the resident set exceeds
        the accounted memory (see the class docstring)."""
        if _MALLOC_TRIM is None:
            return
        cache = self.cache
        if cache.freed_bytes >= self.config.trim_after_bytes:
            cache.freed_bytes = 0
            trim_heap()
            return
        if not over_accounting or self.rss0 is None or self.trim_seconds > self.config.trim_time_share * self.pass_seconds:
            return  # (memory held elsewhere that a trim cannot give back costs at most that share)
        rss = rss_bytes()
        if rss is not None and rss - self.rss0 - cache.nbytes - cache.reserved > self.config.trim_slack_bytes:
            t0 = time.perf_counter()
            trim_heap()
            self.trim_seconds += time.perf_counter() - t0
