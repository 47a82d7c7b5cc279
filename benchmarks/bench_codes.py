"""One part of the engine on and off, in one process (``--compare``):

- ``codes`` (default): products on the weights' own 4- and 8-bit codes (``lm/qgemm.py``) against
  oneDNN's packed float32 products. The engine packs the weights once as their codes
  (``EngineConfig.quantized_products``, the default) and once as oneDNN's float32 packs; the two
  sets of packs are swapped in between runs (the same weights, the same values: only the
  products differ).
- ``fused``: one-row passes of a few tokens in two C calls a layer (``lm/fused.py``) against the
  lean decoder's torch calls (``GENLM_BYTES_FUSED`` set between runs; both on codes).

Each item alternates the two, the order flipping item by item (the machine is noisy; what
counts are the ratios):

- ``greedy``: ``--bytes`` greedy bytes after each prompt of the suite and the held-out prompts
  (cold cache, the prompt's prefill included); per prompt the time on over the time off
  (``on_s``, ``off_s``), and whether both wrote the same bytes;
- ``prefill``: each text of the suite and the held-out texts (cold cache); the time ratio and
  the two log Z;
- ``beams``: ``--particles`` beams sampling ``--steps`` bytes from distinct suite prompts
  (``bench_concurrency.run``), ``--rounds`` times; bytes per second of each.

Reported: worst, median and best of the per-item ratios (time on / time off, e.g. with codes /
with float32: below 1 is faster) and their geometric mean.

Run: ``python benchmarks/bench_codes.py [--compare codes|fused] [--parts greedy prefill beams]
[--limit N]``. Writes ``benchmarks/results/codes.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import statistics
import time

import bench_concurrency
import common
import probes
import suite


def pack_sets(lm) -> dict:
    """{True: the packs as codes, False: oneDNN's float32 packs} of the engine's weights (made in
    the model's thread; the engine starts with the codes)."""
    from genlm_bytes.lm import gemm
    from genlm_bytes.lm.lean import pack_model

    def make():
        with gemm._PACK_LOCK:
            codes = dict(gemm._PACKS)
            for key in list(gemm._PACKS):
                gemm._drop(key)
        pack_model(lm.model, quantize=False)
        with gemm._PACK_LOCK:
            plain = dict(gemm._PACKS)
        if set(codes) != set(plain):
            raise SystemExit("the two sets of packs cover other weights")
        return {True: codes, False: plain}

    return lm.batcher._executor.submit(make).result()


def use(lm, sets: dict | None, codes: bool) -> None:
    """The engine with the part compared on (``codes``) or off: a set of packs (``sets``), or
    with ``sets`` None the fused layers (``GENLM_BYTES_FUSED``, read at each pass)."""
    from genlm_bytes.lm import gemm

    if sets is None:
        os.environ["GENLM_BYTES_FUSED"] = "1" if codes else "0"
        return

    def swap():
        with gemm._PACK_LOCK:
            gemm._PACKS.clear()
            gemm._PACKS.update(sets[codes])

    lm.batcher._executor.submit(swap).result()


def spread(ratios: list[float]) -> dict:
    s = sorted(ratios)
    return {"worst": s[-1], "median": statistics.median(s), "best": s[0],
            "geomean": math.exp(sum(map(math.log, s)) / len(s)), "n": len(s)}


async def timed(lm, fn) -> tuple[float, int, object]:
    lm.clear_cache()
    await probes.wait_idle(lm)
    with probes.PassCounter(lm) as counter:
        t0 = time.perf_counter()
        out = await fn()
        await probes.wait_idle(lm)
        return time.perf_counter() - t0, len(counter.log), out


async def greedy_part(lm, sets, args) -> dict:
    from genlm_bytes import ByteBeamState

    prompts = suite.load_prompts() + suite.load_prompts(suite.HELDOUT_PROMPTS)
    prompts = prompts[:args.limit] if args.limit else prompts
    rows = []
    for i, p in enumerate(prompts):
        text, got = p["text"].encode(), {}
        for codes in ((True, False) if i % 2 == 0 else (False, True)):
            use(lm, sets, codes)

            async def run(text=text):
                beam = await ByteBeamState.initial(lm, common.beam_params())
                return await beam.greedy(text, args.bytes)

            got[codes] = await timed(lm, run)
        rows.append({"name": p["name"], "on_s": got[True][0], "off_s": got[False][0],
                     "passes": [got[True][1], got[False][1]], "same_bytes": got[True][2] == got[False][2],
                     "ratio": got[True][0] / got[False][0]})
        print(f"  {p['name']:28s} {rows[-1]['ratio']:.3f}  same bytes: {rows[-1]['same_bytes']}", flush=True)
    return {"prompts": rows, "spread": spread([r["ratio"] for r in rows]),
            "same_bytes": sum(r["same_bytes"] for r in rows),
            "total_s": {"on": sum(r["on_s"] for r in rows), "off": sum(r["off_s"] for r in rows)}}


async def prefill_part(lm, sets, args) -> dict:
    from genlm_bytes import ByteBeamState

    texts = suite.load_texts() + suite.load_texts(suite.HELDOUT_TEXTS)
    texts = texts[:args.limit] if args.limit else texts
    rows = []
    for i, t in enumerate(texts):
        got = {}
        for codes in ((True, False) if i % 2 == 0 else (False, True)):
            use(lm, sets, codes)

            async def run(data=t["data"]):
                beam = await ByteBeamState.initial(lm, common.beam_params())
                return (await beam.prefill(data)).logZ

            got[codes] = await timed(lm, run)
        rows.append({"name": t["name"], "on_s": got[True][0], "off_s": got[False][0],
                     "logZ": [got[True][2], got[False][2]], "ratio": got[True][0] / got[False][0]})
        print(f"  {t['name']:28s} {rows[-1]['ratio']:.3f}  log Z {got[True][2]:.4f} / {got[False][2]:.4f}",
              flush=True)
    return {"texts": rows, "spread": spread([r["ratio"] for r in rows]),
            "largest_logZ_gap": max(abs(r["logZ"][0] - r["logZ"][1]) for r in rows)}


async def beams_part(lm, sets, args) -> dict:
    prompts = [p["text"].encode() for p in suite.load_prompts()][:args.particles]
    rates = {True: [], False: []}
    for r in range(args.rounds):
        for codes in ((True, False) if r % 2 == 0 else (False, True)):
            use(lm, sets, codes)
            out = await bench_concurrency.run(lm, [100 * r + i for i in range(args.particles)], prompts, args.steps)
            rates[codes].append(out["bytes"] / out["seconds"])
        print(f"  round {r + 1}: {rates[True][-1]:.0f} B/s on, {rates[False][-1]:.0f} off",
              flush=True)
    return {"bytes_per_second": {"on": rates[True], "off": rates[False]},
            "throughput_ratio": statistics.median(rates[True]) / statistics.median(rates[False])}


async def main(args) -> dict:
    lm = common.setup(args.threads, name=args.model, batch_size=max(32, args.particles))
    if not getattr(lm, "quantized", False):
        raise SystemExit("this engine's weights have no codes (or the kernel is not available here)")
    sets = pack_sets(lm) if args.compare == "codes" else None
    await bench_concurrency.run(lm, [1000, 1001], [b"Hello", b"The"], 4)  # warm-up
    out = {"question": {"codes": "products on the weights' codes against oneDNN's packed float32 ones",
                        "fused": "one-row passes in two C calls a layer against the lean decoder's torch calls"}[
                            args.compare] + ", in one process",
           "compare": args.compare,
           "settings": common.environment(args.threads, bytes=args.bytes, particles=args.particles,
                                          steps=args.steps, rounds=args.rounds, limit=args.limit)}
    for part in args.parts:
        print(part, flush=True)
        out[part] = await {"greedy": greedy_part, "prefill": prefill_part, "beams": beams_part}[part](lm, sets, args)
        if "spread" in out[part]:
            s = out[part]["spread"]
            print(f"{part}: time on / off: worst {s['worst']:.3f}, median {s['median']:.3f}, "
                  f"best {s['best']:.3f}, geometric mean {s['geomean']:.3f} ({s['n']} items)", flush=True)
        else:
            print(f"{part}: throughput on / off {out[part]['throughput_ratio']:.3f}", flush=True)
    use(lm, sets, True)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--compare", default="codes", choices=["codes", "fused"],
                    help="codes: products on codes vs float32 packs; fused: fused layers vs torch calls")
    ap.add_argument("--parts", nargs="+", default=["greedy", "prefill", "beams"],
                    choices=["greedy", "prefill", "beams"])
    ap.add_argument("--bytes", type=int, default=64)
    ap.add_argument("--particles", type=int, default=32)
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--limit", type=int, default=None, help="the first N prompts and texts only")
    ap.add_argument("--threads", type=int, default=common.THREADS)
    ap.add_argument("--name", default="codes")
    common.add_model_arg(ap)
    a = ap.parse_args()
    common.write_json(a.name, asyncio.run(main(a)))
