"""Where the time goes over the suites: greedy generation over prompts, prefill of texts.

Runs greedy generation (K=5, prune_threshold=0.05, ``--bytes`` bytes, cold cache) over
the first ``--limit`` prompts of ``data/prompts.json`` and the prefill of the first
``--texts`` texts of ``data/texts/``, one request after the other, and prints per phase:

- **model passes**: passes started (counted at the model's embedding lookup, so look-ahead
  passes stopped early count), per generated token (the tokenizer's own tokens of the
  generated text; ``generate`` needs one pass each) or per canonical token of a scored
  text, rows and tokens per pass, LM tokens the backend counts, and the model's thread
  busy time per pass;
- **trie and beam work per byte**: the event loop's time in the trie and the byte
  distributions, and in the beam and its covers, in ms per byte;
- **Python overhead per request**: the event loop's other busy time (asyncio, the
  backend's code on the loop, the rest) per request the backend counts (per pass where
  it counts none);
- **waiting between passes**: time the model's thread is idle while the phase runs
  (the event loop busy or both idle), per pass, against the time the loop waits on it.

Thread states come from ``sampler.ThreadSampler`` (every 5 ms, both threads at the same
instants); ``--cprofile`` adds cProfile's top functions of the event-loop thread (it slows
Python down, so the shares above shift), ``--py-spy`` runs the whole script again under
py-spy (``pip install py-spy``) and prints the top library frames of each thread.
Backend internals are read through ``probes`` (counters that may not exist read as
``None``), so the script runs against the library before and after restructuring.

Run: ``python benchmarks/profile_suite.py [--limit 12] [--texts 9] [--bytes 64]``.
Writes ``benchmarks/results/profile.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import shutil
import subprocess
import sys
import threading
import time
from collections import Counter

import common
import probes
import sampler
import suite

LOOP_OVERHEAD = ("asyncio", "python, other", "backend", "library, other")  # the loop's busy time besides trie/beam


async def greedy_request(lm, prompt: dict, n_bytes: int, counter: probes.PassCounter) -> dict:
    """One greedy generation from a cold cache, with its work."""
    from genlm_bytes import ByteBeamState

    pb = prompt["text"].encode()
    lm.clear_cache()
    before, n0 = probes.counters(lm), len(counter.log)
    t0 = time.perf_counter()
    beam = await ByteBeamState.initial(lm, common.beam_params())
    out = await beam.greedy(pb, n_bytes)
    await probes.wait_idle(lm)
    seconds = time.perf_counter() - t0
    text = out[len(pb):]
    tokens = len(lm.tokenizer.encode(text.decode("utf-8", "replace"), add_special_tokens=False))
    work = probes.since(before, probes.counters(lm))
    prompt_tokens = len(common.canonical_ids(lm, pb))  # what the prompt's prefill runs at least
    beyond = work["forward_tokens"] - prompt_tokens if work["forward_tokens"] is not None else None
    return {"name": prompt["name"], "seconds": seconds, "bytes": len(text), "tokens": tokens,
            **_passes(counter, n0), **work, "forward_tokens_beyond_prompt": beyond}


async def prefill_request(lm, text: dict, counter: probes.PassCounter) -> dict:
    """One prefill of a text from a cold cache, with its work."""
    n0 = len(counter.log)
    run = await common.prefill_run(lm, text["data"])
    await probes.wait_idle(lm)
    tokens = len(common.canonical_ids(lm, text["data"])) - 1
    return {"name": text["name"], "seconds": run["seconds"], "bytes": len(text["data"]), "tokens": tokens,
            **_passes(counter, n0), **{k: run.get(k) for k in ("forward_tokens", "batches", "requests")},
            "forward_tokens_beyond_prompt": run.get("forward_tokens")}


def _passes(counter: probes.PassCounter, n0: int) -> dict:
    new = counter.log[n0:]
    if not counter.available:
        return {"passes": None, "pass_rows": None, "pass_tokens": None, "max_rows": None}
    return {"passes": len(new), "pass_rows": sum(p[2] for p in new), "pass_tokens": sum(p[3] for p in new),
            "max_rows": max((p[2] for p in new), default=0)}


async def run_phase(lm, kind: str, items: list, args, counter, profile) -> tuple[list[dict], float, float]:
    t0 = time.perf_counter()
    if profile is not None:
        profile.enable()
    try:
        if kind == "greedy":
            rows = [await greedy_request(lm, p, args.bytes, counter) for p in items]
        else:
            rows = [await prefill_request(lm, t, counter) for t in items]
    finally:
        if profile is not None:
            profile.disable()
    return rows, t0, time.perf_counter()


def _sum(rows: list[dict], key: str):
    vals = [r.get(key) for r in rows]
    return None if any(v is None for v in vals) else sum(vals)


def _div(a, b):
    return a / b if a is not None and b else None


def summarize(kind: str, rows: list[dict], window: dict) -> dict:
    """The breakdown of one phase from its requests and the sampler's window over it."""
    wall = _sum(rows, "seconds")
    nbytes, ntok, passes = _sum(rows, "bytes"), _sum(rows, "tokens"), _sum(rows, "passes")
    requests = _sum(rows, "requests")
    by_cat = window["main_by_category"]
    model_busy = window["both_busy"] + window["model_only"]
    model_idle = window["main_only"] + window["both_idle"]
    loop_other = sum(by_cat.get(c, 0.0) for c in LOOP_OVERHEAD)
    return {
        "phase": kind, "requests_run": len(rows), "seconds": wall, "bytes": nbytes, "tokens": ntok,
        "passes": passes,
        "passes_per_token": _div(passes, ntok),
        "rows_per_pass": _div(_sum(rows, "pass_rows"), passes),
        "tokens_per_pass": _div(_sum(rows, "pass_tokens"), passes),
        "max_rows": max((r.get("max_rows") or 0 for r in rows), default=0),
        "lm_tokens_per_token": _div(_sum(rows, "forward_tokens_beyond_prompt"), ntok),
        "batches": _sum(rows, "batches"), "backend_requests": requests,
        "requests_per_batch": _div(requests, _sum(rows, "batches")),  # the batcher's batch sizes
        "model_busy_s": model_busy, "model_busy_share": _div(model_busy, model_busy + model_idle),
        "model_ms_per_pass": _div(1e3 * model_busy, passes),
        "trie_ms_per_byte": _div(1e3 * by_cat.get("trie & distributions", 0.0), nbytes),
        "beam_ms_per_byte": _div(1e3 * by_cat.get("beam & byte states", 0.0), nbytes),
        "sampling_ms_per_byte": _div(1e3 * by_cat.get("sampling", 0.0), nbytes),
        "loop_overhead_s": loop_other,
        "loop_overhead_ms_per_request": _div(1e3 * loop_other, requests or passes),
        "overhead_counted_per": "backend request" if requests else "pass",
        "model_idle_s": model_idle,
        "model_idle_while_loop_busy_s": window["main_only"],
        "model_idle_ms_per_pass": _div(1e3 * model_idle, passes),
        "loop_waiting_on_model_s": window["model_only"],
        "window": window,
        "requests": rows,
    }


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def report(s: dict) -> None:
    f = _fmt
    per = "generated token" if s["phase"] == "greedy" else "canonical token"
    print(f"\n== {s['phase']}: {s['requests_run']} requests, {f(s['seconds'])} s, {s['bytes']} bytes, "
          f"{s['tokens']} tokens")
    print(f"model passes: {s['passes']} ({f(s['passes_per_token'])} per {per}); rows per pass "
          f"{f(s['rows_per_pass'])} (max {s['max_rows']}); tokens per pass {f(s['tokens_per_pass'])}; "
          f"LM tokens per {per} {f(s['lm_tokens_per_token'])}"
          + (" (passes: the prompts' included; LM tokens: beyond the prompt)" if s["phase"] == "greedy" else ""))
    print(f"backend: {_fmt(s['batches'], 'd')} batches of {_fmt(s['backend_requests'], 'd')} requests "
          f"({f(s['requests_per_batch'])} per batch)")
    print(f"model thread: busy {f(s['model_busy_s'])} s ({f(s['model_busy_share'] and 100 * s['model_busy_share'], '.0f')}%"
          f" of the phase), {f(s['model_ms_per_pass'], '.1f')} ms per pass")
    print(f"trie & distributions {f(s['trie_ms_per_byte'], '.3f')} ms/byte, beam & byte states "
          f"{f(s['beam_ms_per_byte'], '.3f')} ms/byte, sampling {f(s['sampling_ms_per_byte'], '.3f')} ms/byte "
          f"(event loop)")
    print(f"Python overhead on the loop: {f(s['loop_overhead_s'])} s, "
          f"{f(s['loop_overhead_ms_per_request'], '.2f')} ms per {s['overhead_counted_per']}")
    print(f"waiting between passes: model idle {f(s['model_idle_s'])} s ({f(s['model_idle_ms_per_pass'], '.1f')} ms "
          f"per pass; {f(s['model_idle_while_loop_busy_s'])} s of it while the loop works); "
          f"loop waiting on the model {f(s['loop_waiting_on_model_s'])} s")
    w = s["window"]
    print("event loop by category (s): " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                    sorted(w["main_by_category"].items(), key=lambda kv: -kv[1])))
    for title, places in (("event loop, busiest places", w["main_by_place"]),
                          ("model thread, busiest places", w["model_by_place"])):
        print(f"{title}:")
        for place, sec in list(places.items())[:8]:
            print(f"  {sec:7.2f} s  {place}")


def print_cprofile(profile: cProfile.Profile, kind: str, top: int) -> None:
    out = io.StringIO()
    pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(top)
    print(f"\n-- cProfile of the event loop, {kind} (top {top} by own time; cProfile slows Python down) --")
    print("\n".join(line for line in out.getvalue().splitlines()[6:] if line.strip()))


async def main(args) -> dict:
    lm = common.setup(args.threads, name=args.model)
    every = suite.load_prompts(args.suite)
    prompts = every[:args.limit]
    texts = suite.load_texts(args.text_dir, args.texts) if args.texts else []
    await greedy_request(lm, every[0], 8, probes.PassCounter(lm))  # warm-up: both paths once
    if texts:
        await common.prefill_run(lm, texts[0]["data"][:200])
    smp = sampler.ThreadSampler(args.interval).start()
    phases, profiles = [], {}
    with probes.PassCounter(lm) as counter:
        for kind, items in (("greedy", prompts), ("prefill", texts)):
            if not items:
                continue
            profiles[kind] = cProfile.Profile() if args.cprofile else None
            rows, t0, t1 = await run_phase(lm, kind, items, args, counter, profiles[kind])
            phases.append((kind, rows, t0, t1))
    smp.stop()
    model = {p[1] for p in counter.log} or smp.threads_in_library_backend()
    main_id = threading.main_thread().ident
    out = [summarize(kind, rows, smp.window(t0, t1, main_id, model)) for kind, rows, t0, t1 in phases]
    for s in out:
        report(s)
        if profiles.get(s["phase"]) is not None:
            print_cprofile(profiles[s["phase"]], s["phase"], args.top)
    return {"question": "where the time goes over the suites (issue 24)",
            "settings": common.environment(args.threads, bytes=args.bytes, interval=args.interval,
                                           cprofile=args.cprofile, pass_counter=counter.available),
            "model_threads": len(model), "phases": out}


def py_spy(argv: list[str], name: str) -> int:
    """Run this script again under py-spy (raw stacks, every thread) and print its busiest library frames."""
    exe = shutil.which("py-spy")
    if exe is None:
        print("py-spy is not installed (pip install py-spy)", file=sys.stderr)
        return 2
    common.RESULTS.mkdir(parents=True, exist_ok=True)
    raw = common.RESULTS / f"{name}_pyspy.txt"
    cmd = [exe, "record", "--threads", "--full-filenames", "-r", "200", "-f", "raw", "-o", str(raw), "--",
           sys.executable, __file__, *argv]
    rc = subprocess.run(cmd, check=False).returncode
    if raw.is_file():
        summarize_raw(raw.read_text(encoding="utf-8", errors="replace"))
    return rc


def _waiting(frame: str) -> bool:
    """Whether a py-spy frame ``"Class.func (/path/file.py:12)"`` is one where a thread waits."""
    func, _, where = frame.partition(" (")
    return (where.rsplit(":", 1)[0].rsplit("/", 1)[-1], func.rsplit(".", 1)[-1]) in sampler.IDLE


def summarize_raw(text: str, top: int = 12) -> None:
    """Busy samples of py-spy's raw output per thread, by the innermost library frame (else the
    innermost frame). The main thread counts only under ``run_phase`` (not loading or warm-up),
    other threads only with a library frame (the model's); waiting frames are left out."""
    by_thread: dict[str, Counter] = {}
    names: dict[str, set] = {}
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        frames = stack.split(";")  # "thread (id): name", then "func (file:line)" outermost first
        main = any("profile_suite.py" in fr for fr in frames)
        if (main and not any(fr.startswith("run_phase ") for fr in frames)) or \
                (not main and not any(sampler.LIB in fr for fr in frames)) or _waiting(frames[-1]):
            continue
        lib = next((fr for fr in reversed(frames) if sampler.LIB in fr), frames[-1])
        if sampler.LIB in lib:  # "func (/path/genlm_bytes/x.py:12)" -> "func (x.py)": by function
            lib = f"{lib.split(' (', 1)[0]} ({lib.rsplit(sampler.LIB, 1)[1].rsplit(':', 1)[0]})"
        thread, _, name = frames[0].partition(": ")  # a thread may be renamed while it runs
        names.setdefault(thread, set()).add(name or "?")
        by_thread.setdefault(thread, Counter())[lib] += int(count)
    for thread, places in sorted(by_thread.items(), key=lambda kv: -sum(kv[1].values()))[:3]:
        print(f"\n-- py-spy, {thread} ({', '.join(sorted(names[thread]))}): {sum(places.values())} busy samples --")
        for place, n in places.most_common(top):
            print(f"  {n:6d}  {place}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default=str(suite.PROMPT_SUITE), help="a prompt suite (JSON)")
    parser.add_argument("--limit", type=int, default=12, help="greedy over the first N prompts (0: none)")
    parser.add_argument("--text-dir", default=str(suite.TEXT_SUITE), help="a folder of texts to prefill")
    parser.add_argument("--texts", type=int, default=9, help="prefill the first N texts (0: none)")
    parser.add_argument("--bytes", type=int, default=64, help="bytes each greedy generation produces")
    parser.add_argument("--interval", type=float, default=sampler.INTERVAL, help="sampling interval, seconds")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--cprofile", action="store_true", help="also cProfile the event loop's thread")
    parser.add_argument("--top", type=int, default=25, help="functions cProfile lists per phase")
    parser.add_argument("--py-spy", action="store_true", help="run again under py-spy and summarize its stacks")
    common.add_model_arg(parser)
    parser.add_argument("--name", default="profile", help="results/<name>.json")
    args = parser.parse_args()
    if args.limit < 0 or args.texts < 0 or args.bytes < 1 or args.interval <= 0:
        parser.error("--limit and --texts must be 0 or more, --bytes at least 1, --interval positive")
    if args.limit == 0 and args.texts == 0:
        parser.error("nothing to profile: --limit and --texts are both 0")
    if args.py_spy:
        sys.exit(py_spy([a for a in sys.argv[1:] if a != "--py-spy"], args.name))
    result = asyncio.run(main(args))
    common.write_json(args.name, result)
