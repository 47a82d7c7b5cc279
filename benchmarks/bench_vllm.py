"""vLLM vs transformers: byte throughput of 1 and of N concurrent beams on each backend, same run.

Set-up: one ``AsyncVLLM`` engine and one ``AsyncTransformer`` of the same model in one process.
Each run clears both caches (the vLLM engine's prefix cache too), prefills the prompt (untimed),
then ``--beams`` beams sample ``--steps`` bytes each at temperature 1, concurrently, with their own
seeds; the one-beam runs sample the same seeds one after the other (pooled). Backends and beam
counts alternate repetition by repetition, so load from other processes hits both alike; what
counts is the ratio of the medians (bytes per second, all beams together).

Run: ``python benchmarks/bench_vllm.py [--beams 32] [--steps 16] [--repeats 2]
[--model FOLDER] [--engine-arg KEY=VALUE ...]``. Default: the embedded SmolLM2-135M, float32, an
eager engine with 2 GiB of KV cache on the CPU build. Prints a table and writes
``benchmarks/results/vllm.json``. Say which machine (and card) the figures come from.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import time

import common

PROMPT = b"Once upon a time, in a small village by the sea,"
CPU_ENGINE = {"enforce_eager": True, "block_size": 32, "max_model_len": 2048}  # the CPU build's test set-up


def engine_arg(text: str) -> tuple[str, object]:
    from genlm_bytes.lm.vllm import parse_engine_arg

    try:
        return parse_engine_arg(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


async def run(lm, seeds: list[int], steps: int) -> dict:
    """Beams of ``seeds`` sampling ``steps`` bytes each, concurrently, timed after the prompt."""
    from genlm_bytes import ByteBeamState

    lm.clear_cache()
    start = await ByteBeamState.initial(lm, common.beam_params())
    start = await start.prefill(PROMPT)
    t0 = time.perf_counter()
    outs = await asyncio.gather(*(start.sample(b"", steps, rng=s) for s in seeds))
    return {"seconds": time.perf_counter() - t0, "bytes": sum(len(o) for o in outs)}


async def throughput(lm, seeds: list[int], steps: int, together: bool) -> float:
    if together:
        r = await run(lm, seeds, steps)
        return r["bytes"] / r["seconds"]
    runs = [await run(lm, [s], steps) for s in seeds]
    return sum(r["bytes"] for r in runs) / sum(r["seconds"] for r in runs)


async def main(args) -> dict:
    from genlm_bytes import load_model

    engine = dict(CPU_ENGINE if args.model is None else {}, **dict(args.engine_arg))
    t0 = time.perf_counter()
    backends = {"vllm": load_model(args.model, backend="vllm", **engine)}
    start_seconds = time.perf_counter() - t0
    backends["transformers"] = common.setup(args.threads, name=args.model, batch_size=max(32, args.beams))
    try:
        for lm in backends.values():
            await run(lm, [1000, 1001], 4)  # warm-up (vLLM's first requests compile kernels)
        figures = {(b, n): [] for b in backends for n in (1, args.beams)}
        for r in range(args.repeats):
            seeds = [100 * r + i for i in range(args.beams)]
            order = [(b, n) for b in backends for n in (1, args.beams)]
            for b, n in order if r % 2 == 0 else order[::-1]:
                figures[b, n].append(await throughput(backends[b], seeds[:n] if n > 1 else seeds[:args.solo_runs],
                                                      args.steps, together=n > 1))
            print(f"rep {r + 1}/{args.repeats}: " + ", ".join(f"{b} {n} beam(s) {v[-1]:.1f} B/s"
                                                             for (b, n), v in figures.items()), flush=True)
    finally:
        await backends["vllm"].close()
    rows = [{"backend": b, "beams": n, "bytes_per_second": common.median(v), "runs": v}
            for (b, n), v in figures.items()]
    med = {(r["backend"], r["beams"]): r["bytes_per_second"] for r in rows}
    return {
        "question": f"byte throughput of 1 and {args.beams} concurrent beams: vLLM vs transformers",
        "settings": common.environment(args.threads, repeats=args.repeats, steps=args.steps, beams=args.beams,
                                       solo_runs=args.solo_runs, model=args.model or common.MODEL_NAME,
                                       engine_args=engine, vllm_start_seconds=round(start_seconds, 1),
                                       kv_cache_gib=os.environ.get("VLLM_CPU_KVCACHE_SPACE")),
        "rows": rows,
        "vllm_over_transformers": {n: med["vllm", n] / med["transformers", n] for n in (1, args.beams)},
    }


def report(res: dict) -> None:
    print()
    common.print_table(res["rows"], [("backend", "backend", ""), ("beams", "beams", "d"),
                                     ("bytes_per_second", "bytes/s (all beams)", ".1f")])
    for n, ratio in res["vllm_over_transformers"].items():
        print(f"{n} beam(s): vLLM / transformers = {ratio:.2f}x")
    s = res["settings"]
    print(f"vLLM engine start {s['vllm_start_seconds']} s; load average {s['load_average_1min']}")


if __name__ == "__main__":  # (vLLM may spawn its engine process: the guard is required)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beams", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="bytes each beam samples")
    parser.add_argument("--solo-runs", type=int, default=4, help="one-beam runs pooled per repetition")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=common.THREADS, help="torch threads (transformers)")
    parser.add_argument("--model", default=None, help="a model folder (default: the embedded model)")
    parser.add_argument("--engine-arg", type=engine_arg, action="append", default=[], metavar="KEY=VALUE",
                        help="a vLLM engine argument (repeatable), e.g. tensor_parallel_size=2")
    args = parser.parse_args()
    for name in ("beams", "steps", "repeats", "solo_runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    result = asyncio.run(main(args))
    report(result)
    common.write_json("vllm", result)
