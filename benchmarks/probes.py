"""Read what a backend exposes about its work, without depending on how it is built.

The benchmarks run against the library as it is and as it was (before/after comparisons),
so every access to the backend's internals here is defensive: a counter or a method the
backend does not have reads as ``None`` or is skipped, never an error.

- :func:`counters`: the work counters (tokens run through the model, batches, requests);
- :func:`wait_idle`: stop a look-ahead pass and wait until the model's thread is free;
- :class:`PassCounter`: counts model passes (and their rows and tokens) at the one call every
  pass of a torch decoder makes, the embedding lookup of its input ids;
- :class:`ContextRecorder` and :func:`positions_needed`: the contexts whose distributions a
  byte-level beam reads, and how many model positions any backend must compute to serve them.

Not handled: backends that are not torch modules (vLLM, Ray replicas) beyond their counters.
"""

from __future__ import annotations

import asyncio
import threading
import time

# Counter name -> attribute names to look for, in this order, on the backend and its parts.
COUNTERS = {
    "forward_tokens": ("n_forward_tokens",),
    "batches": ("n_batches",),
    "requests": ("n_requests",),
}
PARTS = ("batcher", "engine", "scheduler", "runner", "passes")  # where a restructured backend may keep them


def _holders(lm) -> list:
    return [lm] + [p for p in (getattr(lm, name, None) for name in PARTS) if p is not None]


def counters(lm) -> dict:
    """``{"forward_tokens", "batches", "requests"}`` as the backend counts them now (None: not exposed)."""
    out = {}
    for key, names in COUNTERS.items():
        out[key] = None
        for holder in _holders(lm):
            val = next((getattr(holder, n) for n in names if isinstance(getattr(holder, n, None), int)), None)
            if val is not None:
                out[key] = val
                break
    return out


def since(before: dict, after: dict) -> dict:
    """``after - before`` per counter (None where either is None)."""
    return {k: (after[k] - before[k]) if after.get(k) is not None and before.get(k) is not None else None
            for k in before}


def _executor(lm):
    for holder in _holders(lm):
        ex = getattr(holder, "_executor", None) or getattr(holder, "executor", None)
        if ex is not None and hasattr(ex, "submit"):
            return ex
    return None


async def wait_idle(lm) -> None:
    """Stop a look-ahead pass (if the backend has them) and wait until the model's thread is free."""
    stop = getattr(lm, "stop_lookahead", None)
    if callable(stop):
        stop()
    ex = _executor(lm)
    if ex is not None:
        await asyncio.get_running_loop().run_in_executor(ex, lambda: None)
    else:
        await asyncio.sleep(0)


def embedding_weight(lm):
    """The input embedding matrix of the backend's torch model, or None."""
    model = getattr(lm, "model", None)
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (AttributeError, NotImplementedError):
        emb = None
    return getattr(emb, "weight", None)


class PassCounter:
    """Counts model passes while active: every call of ``torch.nn.functional.embedding`` on the
    model's own embedding matrix is one pass (rows: the batch, tokens: all ids of the pass).

    Each pass is logged as ``(t_start, thread id, rows, tokens)``; passes stopped early (a
    look-ahead the backend abandons) count as passes started. Use as a context manager.
    """

    def __init__(self, lm):
        self.weight = embedding_weight(lm)
        self.log: list[tuple[float, int, int, int]] = []
        self._saved = None

    @property
    def available(self) -> bool:
        return self.weight is not None

    def __enter__(self):  # -> PassCounter
        import torch.nn.functional as F

        if self.weight is None:
            return self
        inner, weight, log = F.embedding, self.weight, self.log

        def counted(input, w, *args, **kwargs):
            if w is weight:
                rows = int(input.shape[0]) if input.dim() > 1 else 1
                log.append((time.perf_counter(), threading.get_ident(), rows, int(input.numel())))
            return inner(input, w, *args, **kwargs)

        self._saved = inner
        F.embedding = counted
        return self

    def __exit__(self, *exc) -> None:
        import torch.nn.functional as F

        if self._saved is not None:
            F.embedding = self._saved
            self._saved = None

    def summary(self, t0: float = 0.0, t1: float = float("inf")) -> dict:
        """Passes started in ``[t0, t1)``: count, rows and tokens (total, mean, max)."""
        sel = [p for p in self.log if t0 <= p[0] < t1]
        if not sel:
            return {"passes": 0 if self.available else None, "rows": 0, "tokens": 0, "max_rows": 0}
        return {"passes": len(sel), "rows": sum(p[2] for p in sel), "tokens": sum(p[3] for p in sel),
                "max_rows": max(p[2] for p in sel), "threads": len({p[1] for p in sel})}


class ContextRecorder:
    """Records the contexts a byte-level beam reads while active: every ``next_token_logprobs``
    call on ``lm`` (the one way ``StatefulTokenizedLM`` asks for a distribution), in order.

    The backend's own reads ahead (``peek_next_token_logprobs``, prefetches, look-ahead passes)
    are not recorded: they are how a backend serves the beam, not what the beam needs.
    Use as a context manager; it wraps the instance's method and puts it back.
    """

    def __init__(self, lm):
        self.lm = lm
        self.contexts: list[tuple[int, ...]] = []
        self._had, self._inner = False, None  # (an instance attribute there before, and the method wrapped)

    def __enter__(self):  # -> ContextRecorder
        lm, contexts = self.lm, self.contexts
        self._had = "next_token_logprobs" in vars(lm)
        inner = lm.next_token_logprobs

        async def recorded(token_ids, *args, **kwargs):
            contexts.append(tuple(int(t) for t in token_ids))
            return await inner(token_ids, *args, **kwargs)

        self._inner = inner
        lm.next_token_logprobs = recorded
        return self

    def __exit__(self, *exc) -> None:
        if self._had:
            self.lm.next_token_logprobs = self._inner
        else:
            del self.lm.next_token_logprobs


def positions_needed(contexts) -> int:
    """Model positions any backend must compute to give the distributions after ``contexts``:
    the distinct non-empty prefixes among them (a context's distribution needs the keys and
    values of every token before it, so each prefix is one position of some pass).

    >>> positions_needed([(1, 2, 3), (1, 2, 4), (1, 5)])
    5
    """
    seen: set[tuple[int, ...]] = set()
    for ctx in contexts:
        for i in range(len(ctx), 0, -1):
            prefix = tuple(ctx[:i])
            if prefix in seen:
                break  # (its own prefixes are in already)
            seen.add(prefix)
    return len(seen)
