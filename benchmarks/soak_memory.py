"""Soak: a 2,000-step greedy generation on the embedded model under a small cache budget.

Question: with a cache budget much smaller than what the run touches, does resident memory stay
flat (bounded by the budget), and are the results still those of a plain forward pass?

Each step asks ``AsyncTransformer.next_token_logprobs`` for the whole context so far and appends
the argmax (a plain greedy loop; every step runs one new token on the cached past). Without a
budget the cache would keep every step's pass: step n's keys/values hold the whole n-token past,
so 2,000 steps would touch ~90 GB. Recorded every ``--every`` steps: resident memory (RSS, from
/proc), ``cache.nbytes``, evictions, the median step time; at a few checkpoints the step's
log-probs are compared with a plain forward of the same context.

Expected bound: resident memory above the first step stays under the budget plus the transient
copies of one pass (the padded past and the forward's concatenated keys/values: about twice the
longest context's KV), however long the run. The test suite runs a 100-step version
(tests/test_reliability.py); this is the long run.
Run: ``python benchmarks/soak_memory.py [--steps 2000] [--budget-mb 160] [--threads 1]``.
Writes ``benchmarks/results/soak_memory.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
KV_BYTES_PER_TOKEN = 46_080  # SmolLM2-135M, float32: 30 layers x (K, V) x 3 heads x 64 x 4 bytes


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@torch.inference_mode()
def plain_forward(model, ids: list[int]) -> torch.Tensor:
    return torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].float(), dim=-1)


async def main(args) -> dict:
    from genlm_bytes import load_model
    from genlm_bytes.lm.hf import AsyncTransformer

    torch.set_num_threads(args.threads)
    base = load_model()
    budget = args.budget_mb << 20
    lm = AsyncTransformer(base.model, base.tokenizer, cache_budget_bytes=budget,
                          initial_context=base.initial_context)
    ids = [0] + base.tokenizer.encode(args.prompt)
    prompt_len = len(ids)
    checkpoints = {args.steps // 4, args.steps // 2, args.steps - 1}
    rows, checks, times = [], [], []
    gc.collect()
    rss_start = None
    t_start = time.perf_counter()
    for step in range(args.steps):
        t0 = time.perf_counter()
        logp = await lm.next_token_logprobs(ids)
        times.append(time.perf_counter() - t0)
        if rss_start is None:
            rss_start = rss_mb()  # after the first forward: the weights are paged in
        if lm.cache.nbytes > budget:
            raise RuntimeError(f"step {step}: cache holds {lm.cache.nbytes} bytes > budget {budget}")
        # Resident memory before a checkpoint's plain forward (the check's own temporaries, a
        # 2,000-token uncached forward's, stay in the heap a while: they are not the engine's).
        rss = rss_mb()
        if step in checkpoints:
            diff = (logp - plain_forward(base.model, ids)).abs().max().item()
            checks.append({"step": step, "context_tokens": len(ids), "max_abs_diff": diff})
            print(f"  checkpoint at {len(ids)} tokens: max |diff| vs plain forward {diff:.2e}", flush=True)
        ids.append(int(logp.argmax()))
        if step % args.every == 0 or step == args.steps - 1:
            row = {"step": step, "context_tokens": len(ids) - 1, "rss_mb": rss,
                   "cache_mb": lm.cache.nbytes / 2**20, "evicted": lm.cache.n_evicted,
                   "ms_step_median_since_last": 1000 * statistics.median(times[-args.every:]),
                   "elapsed_s": time.perf_counter() - t_start}
            rows.append(row)
            print(f"step {step:>5}  ctx {row['context_tokens']:>5}  RSS {row['rss_mb']:8.1f} MB  "
                  f"cache {row['cache_mb']:6.1f} MB  evicted {row['evicted']:>6}  "
                  f"step {row['ms_step_median_since_last']:7.1f} ms", flush=True)
    untouched = sum(n * KV_BYTES_PER_TOKEN for n in range(prompt_len, prompt_len + args.steps)) / 2**30
    later = [r["rss_mb"] for r in rows if r["step"] >= args.steps // 4]
    return {
        "question": "resident memory and exactness of a long greedy generation under a small cache budget",
        "settings": {"steps": args.steps, "budget_mb": args.budget_mb, "threads": args.threads,
                     "prompt_tokens": prompt_len, "torch": torch.__version__, "machine": platform.machine(),
                     "load_average_1min_at_end": os.getloadavg()[0]},
        "forward_tokens": lm.n_forward_tokens,
        "one_new_token_per_step": lm.n_forward_tokens == prompt_len + args.steps - 1,
        "kv_touched_without_budget_gb": untouched,
        "rss_after_first_step_mb": rss_start,
        "rss_max_mb": max(r["rss_mb"] for r in rows),
        "rss_growth_after_first_quarter_mb": max(later) - min(later) if later else 0.0,
        "checks": checks,
        "rows": rows,
        "text_start": base.tokenizer.decode(ids[:120]),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--budget-mb", type=int, default=160,
                        help="cache budget; must hold the longest context's keys/values (~92 MB at 2,000 tokens) "
                             "beside the byte level's reserve (~47 MB at 160 MB), else the last steps run the "
                             "whole context again")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--every", type=int, default=100, help="record a row every this many steps")
    parser.add_argument("--prompt", default="Once upon a time")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak_memory.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    result = asyncio.run(main(args))
    print(f"\nRSS {result['rss_after_first_step_mb']:.0f} MB after the first step, "
          f"{result['rss_max_mb']:.0f} MB at most; "
          f"growth after the first quarter {result['rss_growth_after_first_quarter_mb']:.0f} MB "
          f"(budget {args.budget_mb} MB; without it the run would touch "
          f"{result['kv_touched_without_budget_gb']:.0f} GB of KV); "
          f"max |diff| vs plain forward {max(c['max_abs_diff'] for c in result['checks']):.1e}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
