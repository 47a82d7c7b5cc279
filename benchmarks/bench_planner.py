"""Session 20's prefill planner against session 19's, in one process, on the text suite.

Two changes to how a prefill's passes are planned (neither changes a result):

- the stall walk (``PrefillPlanner.STALL_WALK``): when the beam stalls for a pass, a copy of it
  walks the next bytes and the same pass starts the look-ahead paths of the covers that would
  stall there next (0: off, session 19);
- prefetches together (``EngineConfig.prefetch_together``): the look-ahead paths of one stall
  run as one pass, their pasts end to end (``PassRunner.tree_many``), not a pass each.

Each text is scored from a cold cache (``ByteBeamState.initial`` + ``prefill``, K=5, prune
0.05) under both settings, alternating, ``--repeats`` times, and against one token-level
forward pass as in ``bench_prefill.py``. Reported per text: the prefill / forward ratio of
both (medians), the ratio of their times, and the passes and LM tokens of each; over the
suite, the worst and median of the time ratio and the sums of the medians.

Run: ``python benchmarks/bench_planner.py [--texts DIR] [--limit N] [--repeats 3]``.
Prints a table and writes ``benchmarks/results/planner.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics

import common
import probes
import suite

SETTINGS = ("session 19", "session 20")


def use(lm, setting: str, walk: int, config) -> None:
    """Switch the planner and the engine to ``setting``."""
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    before = setting == SETTINGS[0]
    PrefillPlanner.STALL_WALK = 0 if before else walk
    lm.scheduler.config = dataclasses.replace(config, prefetch_together=not before)


async def measure(lm, text: dict, repeats: int, walk: int, config) -> dict:
    data = text["data"]
    ids = common.canonical_ids(lm, data)
    fwd, runs = [], {s: [] for s in SETTINGS}
    for r in range(repeats):
        fwd.append(common.forward_seconds(lm, ids))
        for s in (SETTINGS if r % 2 == 0 else SETTINGS[::-1]):
            use(lm, s, walk, config)
            with probes.PassCounter(lm) as counter:
                res = await common.prefill_run(lm, data)
            runs[s].append({**res, "passes": len(counter.log)})
    use(lm, SETTINGS[1], walk, config)
    f = statistics.median(fwd)
    row = {"name": text["name"], "bytes": len(data), "canonical_tokens": len(ids), "forward_seconds": f}
    for s, key in zip(SETTINGS, ("s19", "s20")):
        secs = statistics.median(x["seconds"] for x in runs[s])
        row.update({f"{key}_seconds": secs, f"{key}_ratio": secs / f, f"{key}_passes": runs[s][-1]["passes"],
                    f"{key}_lm_tokens": runs[s][-1]["forward_tokens"]})
    row["time_ratio"] = row["s20_seconds"] / row["s19_seconds"]
    lz = [x["logZ"] for s in SETTINGS for x in runs[s]]
    row["logZ_spread"] = max(lz) - min(lz)
    return row


async def main(args) -> dict:
    from genlm_bytes.byte_lm.speculate import PrefillPlanner

    lm = common.setup()
    texts = suite.load_texts(args.texts, args.limit)
    walk, config = PrefillPlanner.STALL_WALK, lm.scheduler.config
    await common.prefill_run(lm, texts[0]["data"])  # warm-up
    rows = []
    for text in texts:
        rows.append(await measure(lm, text, args.repeats, walk, config))
        r = rows[-1]
        print(f"  {r['name']}: {r['s19_ratio']:.2f}x -> {r['s20_ratio']:.2f}x of a forward pass "
              f"({r['time_ratio']:.3f} of the time; passes {r['s19_passes']} -> {r['s20_passes']})", flush=True)
    total = {k: sum(r[f"{k}_seconds"] for r in rows) for k in ("s19", "s20")}
    return {"question": "prefill with session 20's planner (stall walk, prefetches together) vs session 19's",
            "settings": common.environment(repeats=args.repeats, stall_walk=walk),
            "rows": rows,
            "time_ratio": suite.spread(rows, "time_ratio", higher_is_better=False),
            "sum_seconds": total, "sum_ratio": total["s20"] / total["s19"],
            "s20_ratio": suite.spread(rows, "s20_ratio", higher_is_better=False),
            "s19_ratio": suite.spread(rows, "s19_ratio", higher_is_better=False)}


def report(res: dict) -> None:
    print()
    common.print_table(res["rows"], [
        ("name", "text", "s"), ("bytes", "bytes", "d"), ("s19_ratio", "x fwd s19", ".2f"),
        ("s20_ratio", "x fwd s20", ".2f"), ("time_ratio", "s20/s19", ".3f"), ("s19_passes", "passes s19", "d"),
        ("s20_passes", "passes s20", "d"), ("s19_lm_tokens", "LM tok s19", "d"), ("s20_lm_tokens", "LM tok s20", "d"),
        ("logZ_spread", "logZ spread", ".1e")])
    t = res["time_ratio"]
    print(f"\ntime s20 / s19: worst {t['worst']:.3f} ({t['worst_name']}), median {t['median']:.3f}, "
          f"best {t['best']:.3f} ({t['best_name']}); sums {res['sum_seconds']['s19']:.2f} -> "
          f"{res['sum_seconds']['s20']:.2f} s ({res['sum_ratio']:.3f})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    suite.add_text_args(parser, "planner")
    args = parser.parse_args()
    suite.check_text_args(parser, args)
    result = asyncio.run(main(args))
    report(result)
    common.write_json(args.name, result)
