"""A sampling profiler inside the process: which thread is doing what, every few milliseconds.

A daemon thread reads every thread's Python stack (``sys._current_frames``) every
``interval`` seconds and files each thread under a *state* (idle: waiting in a selector, a
lock or a queue; else busy) and, when busy, a *category* taken from the innermost frame of
the library (``trie``, ``beam``, ``backend``, ...) and a *place* (that frame's file and
function). Each sample weighs the time since the previous one, so a sampler delayed by the
GIL still accounts for the whole wall time.

Why not cProfile alone: it sees only the thread that enables it (the event loop), while
the model's passes run in the backend's worker thread; and the question "is the model's
thread idle while the event loop works" needs both threads at the same instants.

Not handled: native frames (a thread inside a C call shows its innermost Python frame),
and telling a thread that waits for the GIL from one that runs.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections import Counter

LIB = f"{os.sep}genlm_bytes{os.sep}"
# Innermost Python frames where a thread waits rather than works: (file name, function).
IDLE = {("selectors.py", "select"), ("threading.py", "wait"), ("threading.py", "_wait_for_tstate_lock"),
        ("queue.py", "get"), ("thread.py", "_worker")}
# Library path prefix (under genlm_bytes/) -> category, first match wins.
CATEGORIES = (("trie", "trie & distributions"), ("dist", "trie & distributions"),
              ("byte_lm/trie_state", "trie & distributions"), ("byte_lm/", "beam & byte states"), ("sampling", "sampling"), ("lm/", "backend"),
              ("models/", "backend"), ("", "library, other"))
INTERVAL = 0.005  # 5 ms: ~200 samples a second, well under 1% of a core


def classify(frame) -> tuple[bool, str, str]:
    """``(busy, category, place)`` of one thread's stack, innermost frame first."""
    code = frame.f_code
    if (os.path.basename(code.co_filename), code.co_name) in IDLE:
        return False, "idle", f"{os.path.basename(code.co_filename)}:{code.co_name}"
    f = frame
    while f is not None:
        path = f.f_code.co_filename
        if LIB in path:
            rel = path.rsplit(LIB, 1)[1]
            cat = next(c for prefix, c in CATEGORIES if rel.startswith(prefix))
            return True, cat, f"{rel}:{f.f_code.co_name}"
        f = f.f_back
    name = os.path.basename(code.co_filename)
    cat = "asyncio" if f"{os.sep}asyncio{os.sep}" in code.co_filename else "python, other"
    return True, cat, f"{name}:{code.co_name}"


class ThreadSampler:
    """Samples every thread's state until :meth:`stop`; ``samples``: ``(t, dt, {ident: (busy, cat, place)})``."""

    def __init__(self, interval: float = INTERVAL):
        self.interval = interval
        self.samples: list[tuple[float, float, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="suite-sampler", daemon=True)

    def start(self) -> ThreadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        me = threading.get_ident()
        last = time.perf_counter()
        while not self._stop.wait(self.interval):
            frames = sys._current_frames()
            now = time.perf_counter()
            snap = {ident: classify(f) for ident, f in frames.items() if ident != me}
            self.samples.append((now, now - last, snap))
            last = now

    def window(self, t0: float, t1: float, main: int, model: set[int]) -> dict:
        """Seconds in ``[t0, t1)`` by what the main thread and the model's thread(s) were doing."""
        main_cat, main_place, model_place = Counter(), Counter(), Counter()
        joint = Counter()  # (main busy, model busy) -> seconds
        for t, dt, snap in self.samples:
            if not t0 <= t < t1:
                continue
            m_busy, m_cat, m_place = snap.get(main, (False, "idle", "-"))
            main_cat[m_cat] += dt
            if m_busy:
                main_place[m_place] += dt
            busy = [snap[i] for i in model if i in snap and snap[i][0]]
            for _, _, place in busy[:1]:
                model_place[place] += dt
            joint[(m_busy, bool(busy))] += dt
        return {"main_by_category": dict(main_cat), "main_by_place": dict(main_place.most_common(12)),
                "model_by_place": dict(model_place.most_common(12)),
                "both_busy": joint[(True, True)], "main_only": joint[(True, False)],
                "model_only": joint[(False, True)], "both_idle": joint[(False, False)]}

    def threads_in_library_backend(self) -> set[int]:
        """Threads other than the main one seen busy in the backend (the model's thread, if no pass
        counter could name it)."""
        main = threading.main_thread().ident
        return {i for _, _, snap in self.samples for i, (busy, cat, _) in snap.items()
                if busy and i != main and cat == "backend"}
