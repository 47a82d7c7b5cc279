"""Memory: peak RSS while scoring the 8 KB text, against the cache budget plus the model.

Target: the peak resident set size during scoring stays within the configured
``cache_budget_bytes`` plus the model. Each budget runs in a fresh subprocess
(so earlier allocations do not hide in the peak): it loads the embedded model
with that budget, warms up on a short text, records its RSS (the model's
weights plus the Python/torch runtime: the "model" side of the limit), then
scores the first 8 KB of ``benchmarks/data/varied.txt`` from a cold cache
while a thread samples RSS from ``/proc/self/statm`` every 5 ms. The check is
``peak RSS <= RSS before scoring + budget``; the parameter bytes of the model
and the cache's own accounting (``lm.cache.nbytes``) are reported alongside.
A scoring that runs longer than ``--time-limit`` seconds is abandoned (between
two bytes); its peak is then a lower bound of the full scoring's peak.

Run: ``python benchmarks/bench_memory.py [--budgets-mib 1024 512] [--bytes 8192] [--time-limit 600]``.
Prints a table and writes ``benchmarks/results/memory.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import subprocess
import sys
import threading
import time

import common

MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakSampler:
    """Samples this process's RSS every ``interval`` seconds in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())
        return False


async def child(args) -> dict:
    """Runs in the subprocess: one budget, one scoring of the long text."""
    lm = common.setup(args.threads, cache_budget_bytes=args.budget)
    param_bytes = sum(p.numel() * p.element_size() for p in lm.model.parameters())
    try:  # oneDNN's packed copies of the weights (the model's side, made with the engine)
        from genlm_bytes.lm.gemm import packed_bytes
        packed = packed_bytes()
    except ImportError:
        packed = None
    data = common.prefix(common.varied_text(), args.bytes)
    await common.prefill_run(lm, common.prefix(data, 256))  # warm-up
    lm.clear_cache()
    before = rss_bytes()
    with PeakSampler() as sampler:
        run = await common.prefill_run(lm, data, time_limit=args.time_limit)
    cache_end = lm.cache.nbytes
    return {
        "budget_bytes": args.budget,
        "text_bytes": len(data),
        "param_bytes": param_bytes,
        "packed_weight_bytes": packed,
        "rss_before_scoring": before,
        "peak_rss_scoring": sampler.peak,
        "growth_bytes": sampler.peak - before,
        "limit_bytes": before + args.budget,
        "within_limit": sampler.peak <= before + args.budget,
        "cache_nbytes_at_end": cache_end,
        "process_max_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "seconds": run["seconds"],
        "completed": run["completed"],
        "bytes_done": run["bytes_done"],
        "forward_tokens": run["forward_tokens"],
        "batches": run["batches"],
        "logZ": run["logZ"],
    }


def run_child(budget: int, args) -> dict:
    cmd = [sys.executable, __file__, "--child", "--budget", str(budget), "--bytes", str(args.bytes),
           "--threads", str(args.threads), "--time-limit", str(args.time_limit)]
    t0 = time.perf_counter()
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child for budget {budget} failed:\n{out.stderr[-3000:]}")
    res = json.loads(out.stdout.strip().splitlines()[-1])
    res["subprocess_seconds"] = time.perf_counter() - t0
    return res


def report(res: dict) -> None:
    print()
    rows = [{**r, **{k: r[k] / MIB for k in ("budget_bytes", "param_bytes", "rss_before_scoring",
                                             "peak_rss_scoring", "growth_bytes", "limit_bytes",
                                             "cache_nbytes_at_end")},
             "ok": common.verdict(r["within_limit"]),
             "done": "yes" if r["completed"] else f"no ({r['bytes_done']} B)"} for r in res["rows"]]
    common.print_table(rows, [
        ("budget_bytes", "budget MiB", ".0f"), ("param_bytes", "params MiB", ".0f"),
        ("rss_before_scoring", "RSS before MiB", ".0f"), ("peak_rss_scoring", "peak RSS MiB", ".0f"),
        ("growth_bytes", "growth MiB", ".0f"), ("limit_bytes", "limit MiB", ".0f"),
        ("cache_nbytes_at_end", "cache MiB", ".0f"), ("seconds", "scoring s", ".1f"),
        ("forward_tokens", "LM tokens", "d"), ("done", "finished", ""), ("ok", "within", "")])
    if not all(r["completed"] for r in res["rows"]):
        print("\n(an abandoned scoring's peak is a lower bound; a FAIL stands, a PASS is provisional)")
    print(f"\npeak RSS scoring {res['rows'][0]['text_bytes']} bytes within RSS before + budget: "
          f"{common.verdict(res['meets_target'])} (load average {res['settings']['load_average_1min']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets-mib", type=int, nargs="+", default=[1024, 512])
    parser.add_argument("--bytes", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--time-limit", type=float, default=600.0, help="abandon a scoring after this many seconds")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--budget", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(child(args))))
        sys.exit(0)
    rows = []
    for mib in args.budgets_mib:
        r = run_child(mib * MIB, args)
        done = "" if r["completed"] else f", abandoned at byte {r['bytes_done']}"
        print(f"  budget {mib} MiB: peak {r['peak_rss_scoring'] / MIB:.0f} MiB "
              f"(before {r['rss_before_scoring'] / MIB:.0f} MiB), {r['seconds']:.1f} s{done}", flush=True)
        rows.append(r)
    result = {
        "question": "memory: peak RSS scoring the 8 KB text <= RSS with the model loaded + cache budget",
        "text": "benchmarks/data/varied.txt (first 8 KB)",
        "settings": common.environment(args.threads),
        "rows": rows,
        "meets_target": all(r["within_limit"] and r["completed"] for r in rows),
    }
    report(result)
    common.write_json("memory", result)
