"""A CPU model's weights on huge pages: each pass reads every weight, page by page.

A decode step of a small model is bound by reading its weights from memory (SmolLM2-135M in
float32: 513 MB per pass). With 4 KB pages that is 131k pages, each a TLB miss the first time
a pass touches it; with the 2 MB pages Linux gives anonymous memory that asks for them
(``madvise(MADV_HUGEPAGE)``, transparent huge pages in ``madvise`` or ``always`` mode), 257.
transformers loads a safetensors checkpoint as a file mapping, which the kernel backs with
4 KB pages. Measured on the benchmark machine (``benchmarks/README.md``, session 17): the
products of a SmolLM2 step by its own loaded weights 17.0-18.1 ms at 1 row, 15.7-17.0 ms with
the same weights copied onto huge pages; 4 rows 25.5-26.0 -> 22.7-22.9 ms.

:func:`move_to_huge_pages` copies a model's parameters, storage by storage (tied weights stay
tied), into one anonymous mapping that asks for huge pages, and points the parameters at it.
The loaders of this package (:func:`genlm_bytes.load_model`, ``AsyncTransformer.from_name``)
do it for the models they load; a model you load yourself is yours to move (it changes where
its parameters live, not their values).

Memory that a library allocates for us (oneDNN's packed copies of the weights,
:func:`genlm_bytes.lm.gemm.pack_weights`) cannot be placed: :class:`new_memory_on_huge_pages`
finds the anonymous memory a block of code mapped (``/proc/self/maps`` before and after) and
asks the kernel to back it with huge pages now (``MADV_COLLAPSE``, Linux 6.1+; older kernels
get ``MADV_HUGEPAGE`` alone, which khugepaged acts on later). Memory that block reused (heap
already mapped before it) stays as it was; ``lm.hf.memory.mapped_fresh`` makes glibc map
large allocations fresh within a block.

Not handled: other platforms than Linux (nothing is done), models not on the CPU (nor a
model moved to another device later: its new parameters are that device's), buffers (small).
"""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import sys
import weakref

import torch

logger = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # Linux
MADV_COLLAPSE = 25  # Linux 6.1+: back the range with huge pages now
_MOVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # model -> bytes moved


def moved_bytes(model) -> int:
    """What :func:`move_to_huge_pages` moved of ``model`` (0: nothing)."""
    return _MOVED.get(model, 0)


def _madvise(addr: int, length: int, advice: int) -> bool:
    """``madvise(addr, length, advice)`` (libc); False where it fails or cannot be called."""
    try:
        return ctypes.CDLL(None).madvise(ctypes.c_void_p(addr), ctypes.c_size_t(length), advice) == 0
    except (OSError, AttributeError, TypeError, ValueError):
        return False


def _madvise_huge(buf: mmap.mmap, offset: int, length: int) -> bool:
    return _madvise(ctypes.addressof(ctypes.c_char.from_buffer(buf)) + offset, length, MADV_HUGEPAGE)


@torch.no_grad()
def move_to_huge_pages(model: torch.nn.Module, min_bytes: int = 64 << 20) -> int:
    """Copy ``model``'s CPU parameters into one anonymous mapping that asks for huge pages and
    point the parameters at it (values, dtypes, shapes, strides and tying unchanged). Returns
    the bytes moved (0: nothing done: not Linux, not a torch module, parameters under
    ``min_bytes`` in all, or not on the CPU). The mapping lives as long as the parameters (their storage holds it)."""
    if isinstance(min_bytes, bool) or not isinstance(min_bytes, int) or min_bytes < 0:
        raise ValueError(f"min_bytes must be an int >= 0, got {min_bytes!r}")
    if not sys.platform.startswith("linux") or not isinstance(model, torch.nn.Module):
        return 0
    params = [p for p in model.parameters()]
    if not params or any(p.device.type != "cpu" for p in params):
        return 0
    storages: dict[int, torch.UntypedStorage] = {}
    for p in params:
        s = p.untyped_storage()
        storages.setdefault(s.data_ptr(), s)
    sizes = {ptr: -(-s.nbytes() // 64) * 64 for ptr, s in storages.items()}  # (64-byte aligned)
    total = sum(sizes.values())
    if total < min_bytes:
        return 0
    buf = mmap.mmap(-1, total + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    base = ctypes.addressof(ctypes.c_char.from_buffer(buf))
    start = (-base) % HUGE_PAGE
    advised = _madvise_huge(buf, start, total)
    flat = torch.frombuffer(buf, dtype=torch.uint8, count=total, offset=start)
    new, at = {}, 0
    for ptr, s in storages.items():
        n = s.nbytes()
        view = flat[at:at + n]
        view.copy_(torch.empty(0, dtype=torch.uint8).set_(s))
        new[ptr] = view.untyped_storage(), at
        at += sizes[ptr]
    for p in params:
        s_new, off = new[p.untyped_storage().data_ptr()]
        moved = torch.empty(0, dtype=p.dtype)
        moved.set_(s_new, off // p.element_size() + p.storage_offset(), p.size(), p.stride())
        p.data = moved
    _MOVED[model] = total
    logger.debug("moved %d MB of parameters onto %s pages", total >> 20, "huge" if advised else "anonymous")
    return total


def _anonymous_ranges() -> list[tuple[int, int]]:
    """The process's writable private anonymous mappings (the heap included), ``(start, end)`` sorted."""
    out = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if len(parts) < 5 or not parts[1].startswith("rw") or parts[1][3] != "p":
                    continue
                if len(parts) > 5 and parts[5] != "[heap]":  # a file, the stack, vdso ...
                    continue
                a, b = parts[0].split("-")
                out.append((int(a, 16), int(b, 16)))
    except OSError:
        return []
    return sorted(out)


def _new_ranges(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """The parts of ``after``'s ranges that no range of ``before`` covers (both sorted)."""
    out = []
    for a, b in after:
        at = a
        for c, d in before:
            if d <= at or c >= b:
                continue
            if c > at:
                out.append((at, c))
            at = max(at, d)
            if at >= b:
                break
        if at < b:
            out.append((at, b))
    return out


class new_memory_on_huge_pages:
    """``with new_memory_on_huge_pages() as h: ...``: the anonymous memory the block mapped (its
    whole 2 MB pages) asks for huge pages, made now where the kernel can (``MADV_COLLAPSE``).
    ``h.bytes``: the bytes advised; 0 off Linux, or where ``/proc/self/maps`` is unreadable."""

    def __init__(self):
        self.bytes = 0
        self._gc = False
        self._before: list[tuple[int, int]] | None = None

    def __enter__(self):
        # (the garbage collector held off: memory it unmapped within the block could be mapped
        # again at the same addresses, which the block would then not see as new)
        self._gc = gc.isenabled()
        gc.disable()
        if sys.platform.startswith("linux"):
            self._before = _anonymous_ranges()
        return self

    def __exit__(self, *exc):
        if self._gc:
            gc.enable()
        if self._before is None or exc[0] is not None:
            return False
        collapsed = 0
        for a, b in _new_ranges(self._before, _anonymous_ranges()):
            lo, hi = -(-a // HUGE_PAGE) * HUGE_PAGE, b // HUGE_PAGE * HUGE_PAGE
            if hi <= lo or not _madvise(lo, hi - lo, MADV_HUGEPAGE):
                continue
            self.bytes += hi - lo
            collapsed += (hi - lo) if _madvise(lo, hi - lo, MADV_COLLAPSE) else 0
        logger.debug("%d MB of new memory advised onto huge pages, %d MB collapsed now",
                     self.bytes >> 20, collapsed >> 20)
        return False

