"""One incremental token step of AsyncTransformer: long past vs short past.

Question: with automatic KV reuse, does a one-token step after a 500-token
context cost about the same as after a 10-token one? (Target: at most 2x.)

For each context length n, on the embedded SmolLM2-135M: the n-token context
(prose, tokenized) is computed once, so its keys/values are in the backend's
prefix cache; then each timed call asks for ``context + [t]`` with a token t not
asked before, which runs exactly one new token on the cached past. Reported:

- ``ms_step``: median wall time of that call (``await lm.next_token_logprobs``);
- ``ms_build_past``: median time of the backend building the padded past for the
  forward pass (``PassRunner.make_cache`` of ``genlm_bytes.lm.hf.passes``, part of ``ms_step``);
- ``ms_full``: median time of the same context with KV reuse off (the whole
  context runs again), for scale;
- ``ratio``: ``ms_step`` at the longest context / ``ms_step`` at the shortest.

Run: ``python benchmarks/bench_kv_step.py [--lengths 10 500] [--repeats 21] [--threads 2]``.
Prints a table and writes ``benchmarks/results/kv_step.json``. Every timing is a
median after warm-up steps; the lengths are measured in alternation, step by
step, so that load from other processes hits them alike. The machine's load
average is recorded too: a busy machine inflates all numbers (the ratio less so).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
PROSE = Path("/work/shared/bench/prose.txt")
TARGET_RATIO = 2.0


def context_ids(tok, n: int) -> list[int]:
    """``n`` token ids: ``<|endoftext|>`` then prose."""
    text = PROSE.read_text() if PROSE.exists() else "The quick brown fox jumps over the lazy dog. "
    ids = tok.encode(text)
    while len(ids) < n:
        ids = ids + ids
    return [0] + ids[: n - 1]


def step_tokens(k: int) -> list[int]:
    """``k`` distinct token ids to append (each call is then a cache miss)."""
    return [1000 + 37 * i for i in range(k)]


class Timed:
    """One context length: a backend with the context's KV cached, and its timings."""

    def __init__(self, model, tok, n: int):
        from genlm_bytes.lm.hf import AsyncTransformer

        self.n = n
        self.ctx = context_ids(tok, n)
        self.lm = AsyncTransformer(model, tok)
        self.full_lm = AsyncTransformer(model, tok, kv_reuse=False)
        self.steps: list[float] = []
        self.builds: list[float] = []
        self.full: list[float] = []
        make_cache = self.lm.runner.make_cache

        def timed_make_cache(*args, **kwargs):
            t0 = time.perf_counter()
            out = make_cache(*args, **kwargs)
            self.builds.append(time.perf_counter() - t0)
            return out

        self.lm.runner.make_cache = timed_make_cache

    async def prepare(self) -> None:
        await self.lm.next_token_logprobs(self.ctx)  # the context's KV is now cached
        self.builds.clear()

    async def step(self, t: int) -> None:
        """One new token on the cached past."""
        before = self.lm.n_forward_tokens
        t0 = time.perf_counter()
        await self.lm.next_token_logprobs(self.ctx + [t])
        self.steps.append(time.perf_counter() - t0)
        if self.lm.n_forward_tokens - before != 1:
            raise RuntimeError(f"n={self.n}: a step ran {self.lm.n_forward_tokens - before} tokens, "
                               "expected 1: the cached past was not reused")

    async def full_forward(self, t: int) -> None:
        """The same request with KV reuse off: the whole context runs."""
        t0 = time.perf_counter()
        await self.full_lm.next_token_logprobs(self.ctx + [t])
        self.full.append(time.perf_counter() - t0)

    def row(self, warmup: int) -> dict:
        return {
            "context_tokens": self.n,
            "ms_step": 1000 * statistics.median(self.steps[warmup:]),
            "ms_build_past": 1000 * statistics.median(self.builds[warmup:]),
            "ms_full": 1000 * statistics.median(self.full[1:]),
            "kv_bytes_of_context": sum(b.nbytes for b in self.lm.cache.deepest_kv(self.ctx, self.n)[1].blocks()),
        }


async def main(args) -> dict:
    from genlm_bytes import load_model

    torch.set_num_threads(args.threads)
    base = load_model()
    model, tok = base.model, base.tokenizer
    runs = [Timed(model, tok, n) for n in args.lengths]
    for r in runs:
        await r.prepare()
    # Interleave the lengths step by step (alternating the order), so that a change in the
    # machine's load hits every length alike and the ratio stays meaningful.
    tokens = step_tokens(args.warmup + args.repeats)
    for i, t in enumerate(tokens):
        for r in (runs if i % 2 == 0 else runs[::-1]):
            await r.step(t)
    for t in tokens[: 1 + max(3, args.repeats // 3)]:
        for r in runs:
            await r.full_forward(t)
    rows = [r.row(args.warmup) for r in runs]
    for row in rows:
        print(f"n={row['context_tokens']:>5}  step {row['ms_step']:7.2f} ms  "
              f"(past build {row['ms_build_past']:6.2f} ms)  full {row['ms_full']:8.2f} ms", flush=True)
    short = min(rows, key=lambda r: r["context_tokens"])
    long = max(rows, key=lambda r: r["context_tokens"])
    ratio = long["ms_step"] / short["ms_step"]
    return {
        "question": "one-token step with KV reuse: long past vs short past (target <= 2x)",
        "model": "SmolLM2-135M-Instruct (embedded), float32, CPU",
        "settings": {"repeats": args.repeats, "warmup": args.warmup, "threads": args.threads,
                     "torch": torch.__version__, "machine": platform.machine(),
                     "load_average_1min_at_end": os.getloadavg()[0]},
        "rows": rows,
        "ratio": {"long_tokens": long["context_tokens"], "short_tokens": short["context_tokens"],
                  "step_ratio": ratio, "target": TARGET_RATIO, "meets_target": ratio <= TARGET_RATIO},
    }


def print_table(result: dict) -> None:
    print()
    print(f"{'context':>8} | {'step':>9} | {'past build':>10} | {'full fwd':>9} | {'KV of ctx':>9}")
    print(f"{'tokens':>8} | {'ms':>9} | {'ms':>10} | {'ms':>9} | {'MB':>9}")
    for r in result["rows"]:
        print(f"{r['context_tokens']:>8} | {r['ms_step']:>9.2f} | {r['ms_build_past']:>10.2f} | "
              f"{r['ms_full']:>9.2f} | {r['kv_bytes_of_context'] / 1e6:>9.2f}")
    q = result["ratio"]
    verdict = "meets" if q["meets_target"] else "MISSES"
    print(f"\nstep({q['long_tokens']}) / step({q['short_tokens']}) = {q['step_ratio']:.2f}x "
          f"({verdict} the target of <= {q['target']:.0f}x; load average "
          f"{result['settings']['load_average_1min_at_end']:.1f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[10, 500])
    parser.add_argument("--repeats", type=int, default=21, help="timed steps per context length")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "kv_step.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(main(args))
    print_table(result)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
