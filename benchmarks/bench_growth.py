"""Question 2: does the per-byte cost of prefill stay flat as the text grows?

Target: per-byte prefill time on an 8 KB text is within 1.5x of that on a 1 KB
text. Measured two ways: (a) the verdict: the 8 KB text scored in one prefill
against the same bytes cut into 1 KB pieces, each scored alone (same content,
so only the length differs); (b) for information, prefixes of one text. The texts are prefixes (0.5, 1, 2, 4, 8 KB by default) of
``benchmarks/data/varied.txt``, our own mix of prose, a Python listing,
meeting minutes, a how-to, dialogue and YAML, so the model is not made
unnaturally confident by repetition. For every length the token-level forward
pass over the canonical tokenization is timed too (the floor's own per-byte
cost also changes a little with length and content), alternating with the
prefill, after a warm-up, with ``lm.clear_cache()`` before each prefill.

A prefill that runs longer than ``--time-limit`` seconds is abandoned (between
two bytes, or before its next model pass) and not repeated: its time is then a lower bound, so its per-byte
time is at least ``limit / length`` and its bytes/s at most ``length / limit``
(marked ``>=`` / ``<=``, open markers in the plot).

Outputs: a table, ``benchmarks/results/growth.json`` and the plot
``benchmarks/results/growth.png`` (bytes/s against document length, our
scoring vs the token-level forward pass; needs matplotlib: ``pip install -e
".[bench]"``).

Run: ``python benchmarks/bench_growth.py [--lengths 512 1024 2048 4096 8192] [--repeats 2]
[--time-limit 300] [--cache-budget-mib N] [--name growth]``.
"""

from __future__ import annotations

import argparse
import asyncio

import common

TARGET = 1.5


async def main(args) -> dict:
    kw = {"cache_budget_bytes": args.cache_budget_mib << 20} if args.cache_budget_mib else {}
    lm = common.setup(args.threads, **kw)
    budget = lm.cache.budget_bytes
    full = common.varied_text()
    texts = {n: common.prefix(full, n) for n in args.lengths}
    ids = {n: common.canonical_ids(lm, t) for n, t in texts.items()}

    # Warm-up on the shortest text.
    n0 = min(args.lengths)
    common.forward_seconds(lm, ids[n0])
    await common.prefill_run(lm, texts[n0])

    fwd = {n: [] for n in args.lengths}
    runs = {n: [] for n in args.lengths}
    for r in range(args.repeats):
        for n in (args.lengths if r % 2 == 0 else args.lengths[::-1]):
            fwd[n].append(common.forward_seconds(lm, ids[n]))
            if runs[n] and not runs[n][-1]["completed"]:
                continue  # over the time limit once: a lower bound is all we get
            runs[n].append(await common.prefill_run(lm, texts[n], time_limit=args.time_limit))
            x = runs[n][-1]
            status = "" if x["completed"] else f" ABANDONED at byte {x['bytes_done']} (over {args.time_limit:g} s)"
            print(f"  rep {r + 1}/{args.repeats}, {n:>5} bytes: forward {fwd[n][-1]:.2f} s, "
                  f"prefill {x['seconds']:.2f} s ({x['forward_tokens']} tokens, {x['batches']} batches, "
                  f"cache {lm.cache.nbytes >> 20} MiB){status}", flush=True)

    # Same bytes, short contexts: the large text cut into pieces of the small length, each scored
    # from a cold cache. Prefixes of one text also differ in content (prose first, code and YAML
    # later), which changes the per-byte cost whatever the length; this comparison does not.
    pieces = _pieces(texts[args.large], args.small)
    piece_runs, piece_fwd = [], []
    for piece in pieces:
        piece_fwd.append(common.forward_seconds(lm, common.canonical_ids(lm, piece)))
        piece_runs.append(await common.prefill_run(lm, piece, time_limit=args.time_limit))
    print(f"  {len(pieces)} pieces of the {len(texts[args.large])} B text, scored one by one: "
          f"{sum(x['seconds'] for x in piece_runs):.2f} s (forward {sum(piece_fwd):.2f} s)", flush=True)

    rows = []
    for n in args.lengths:
        b = len(texts[n])
        t_f = common.median(fwd[n])
        last = runs[n][-1]
        done = last["completed"]
        t_p = common.median([x["seconds"] for x in runs[n]]) if done else last["seconds"]
        rows.append({
            "bytes": b,
            "completed": done,
            "bytes_done": last["bytes_done"],
            "bound": "" if done else ">=",
            "canonical_tokens": len(ids[n]) - 1,
            "median_forward_seconds": t_f,
            "median_prefill_seconds": t_p,
            "forward_ms_per_byte": 1000 * t_f / b,
            "prefill_ms_per_byte": 1000 * t_p / b,
            "forward_bytes_per_second": b / t_f,
            "prefill_bytes_per_second": b / t_p,
            "prefill_over_forward": t_p / t_f,
            "forward_tokens": last["forward_tokens"],
            "forward_tokens_over_canonical": last["forward_tokens"] / len(ids[n]),
            "batches": last["batches"],
            "requests": last["requests"],
            "logZ": last["logZ"],
            "prefill_seconds": [x["seconds"] for x in runs[n]],
            "forward_seconds": fwd[n],
        })
    by = {r["bytes"]: r for r in rows}
    small = by[len(texts[args.small])]
    large = by[len(texts[args.large])]
    # Abandoned runs give a lower bound of their time: the ratio is then a lower bound if only the
    # long text was abandoned, and unknown if the short one was.
    growth = large["prefill_ms_per_byte"] / small["prefill_ms_per_byte"] if small["completed"] else None
    floor_growth = large["forward_ms_per_byte"] / small["forward_ms_per_byte"]
    pieces_done = all(x["completed"] for x in piece_runs)
    t_pieces = sum(x["seconds"] for x in piece_runs)
    same_bytes = large["median_prefill_seconds"] / t_pieces if pieces_done else None
    return {
        "question": "2. per-byte prefill time, 8 KB text vs 1 KB text (target <= 1.5x)",
        "pieces": {
            "n": len(pieces),
            "bytes": [len(x) for x in pieces],
            "prefill_seconds": [x["seconds"] for x in piece_runs],
            "forward_seconds": piece_fwd,
            "forward_tokens": [x["forward_tokens"] for x in piece_runs],
            "completed": pieces_done,
        },
        "same_bytes_growth": same_bytes,
        "same_bytes_floor_growth": large["median_forward_seconds"] / sum(piece_fwd),
        "text": "benchmarks/data/varied.txt (prefixes)",
        "settings": common.environment(args.threads, repeats=args.repeats, time_limit_seconds=args.time_limit,
                                       cache_budget_bytes=budget),
        "rows": rows,
        "small_bytes": small["bytes"],
        "large_bytes": large["bytes"],
        "per_byte_growth": growth,
        "per_byte_growth_is_lower_bound": not large["completed"],
        "floor_per_byte_growth": floor_growth,
        "target": TARGET,
        "meets_target_prefixes": growth is not None and growth <= TARGET and large["completed"],
        "meets_target": (same_bytes is not None and same_bytes <= TARGET and large["completed"]),
    }


def _pieces(data: bytes, size: int) -> list[bytes]:
    """``data`` cut into consecutive pieces of about ``size`` bytes, on UTF-8 character boundaries."""
    out, at = [], 0
    while at < len(data):
        piece = common.prefix(data[at:], size)
        if not piece:  # a character longer than size: take it whole
            piece = data[at: at + 4]
        out.append(piece)
        at += len(piece)
    return out


def plot(res: dict, path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed (pip install -e ".[bench]"): no plot')
        return False
    rows = res["rows"]
    x = [r["bytes"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(x, [r["forward_bytes_per_second"] for r in rows], "o-", label="token-level forward pass (floor)")
    ok = [r for r in rows if r["completed"]]
    ax.plot([r["bytes"] for r in ok], [r["prefill_bytes_per_second"] for r in ok], "s-", color="C1",
            label=f"byte-level scoring (K={common.K}, threshold {common.PRUNE_THRESHOLD})")
    cut = [r for r in rows if not r["completed"]]
    if cut:
        ax.plot([r["bytes"] for r in cut], [r["prefill_bytes_per_second"] for r in cut], "v", color="white",
                markeredgecolor="C1", markersize=10, linestyle="none",
                label=f"scoring abandoned after >= {s_limit(res)} s: at most this")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(x, [f"{b / 1024:g} KB" if b >= 1024 else f"{b} B" for b in x])
    ax.set_xlabel("document length")
    ax.set_ylabel("bytes / second (higher is better)")
    s = res["settings"]
    ax.set_title(f"Scoring throughput vs length (SmolLM2-135M, CPU, {s['threads']} threads)", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.text(0.01, 0.01, f"{s['date']}, load average {s['load_average_1min']}", fontsize=7, color="gray")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path.relative_to(common.HERE.parent)}")
    return True


def s_limit(res: dict) -> str:
    return f"{res['settings']['time_limit_seconds']:g}"


def report(res: dict) -> None:
    print()
    common.print_table(res["rows"], [
        ("bytes", "bytes", "d"), ("canonical_tokens", "tokens", "d"),
        ("median_forward_seconds", "forward s", ".3f"), ("bound", "", ""),
        ("median_prefill_seconds", "prefill s", ".3f"),
        ("forward_ms_per_byte", "fwd ms/B", ".3f"), ("prefill_ms_per_byte", "prefill ms/B", ".3f"),
        ("prefill_over_forward", "x floor", ".2f"), ("forward_tokens", "LM tokens", "d"),
        ("batches", "batches", "d")])
    if res["per_byte_growth"] is None:
        print(f"\nthe {res['small_bytes']} B prefill was abandoned: no growth ratio; FAIL")
        return
    bound = ">= " if res["per_byte_growth_is_lower_bound"] else ""
    if bound:
        print(f"\nthe {res['large_bytes']} B prefill did not finish within {s_limit(res)} s: "
              f"its per-byte time is at least {res['per_byte_growth']:.2f}x that of {res['small_bytes']} B")
    print(f"\nper-byte prefill time, {res['large_bytes']} B prefix / {res['small_bytes']} B prefix = "
          f"{bound}{res['per_byte_growth']:.2f}x (the floor's: {res['floor_per_byte_growth']:.2f}x; "
          f"the prefixes differ in content)")
    pc = res["pieces"]
    if res["same_bytes_growth"] is None:
        print(f"a piece of {res['small_bytes']} B was abandoned: no same-bytes ratio; FAIL")
        return
    print(f"same bytes: the {res['large_bytes']} B text in one prefill / its {pc['n']} pieces of "
          f"{res['small_bytes']} B scored one by one = {bound}{res['same_bytes_growth']:.2f}x "
          f"(the floor's: {res['same_bytes_floor_growth']:.2f}x): {common.verdict(res['meets_target'])} "
          f"(target <= {TARGET}x; load average {res['settings']['load_average_1min']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    parser.add_argument("--small", type=int, default=1024, help="the short length of the growth ratio")
    parser.add_argument("--large", type=int, default=8192, help="the long length of the growth ratio")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--time-limit", type=float, default=300.0,
                        help="abandon a prefill after this many seconds (then not repeated)")
    parser.add_argument("--cache-budget-mib", type=int, default=None,
                        help="the backend's cache budget (default: the library's default)")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--name", default="growth", help="JSON and PNG file name under benchmarks/results")
    args = parser.parse_args()
    for n in (args.small, args.large):
        if n not in args.lengths:
            args.lengths.append(n)
    args.lengths.sort()
    result = asyncio.run(main(args))
    report(result)
    common.write_json(args.name, result)
    plot(result, common.RESULTS / f"{args.name}.png")
