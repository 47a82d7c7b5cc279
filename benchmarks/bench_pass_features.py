"""Session 19's pass features against their baselines, in one process: buckets of past lengths,
attention by products, grouped packs.

Two parts, each alternating its variants run by run (the machine is noisy; what counts is the
ratio of the medians, or of the sums of medians):

- ``replay``: one run of ``--particles`` beams sampling ``--steps`` bytes from distinct suite
  prompts is recorded (its ragged passes); each pass of at least 2 rows is then run again
  alone under four variants, ``--repeats`` times each, alternating: torch's SDPA or two
  batched products for the attention of a few queries per head
  (``genlm_bytes.models.layers.FEW_QUERIES`` 0 or its default), each with buckets off
  (``EngineConfig.bucket_slots=0``) or at the engine's default. Reported per pass and summed
  (medians), as a ratio to SDPA without buckets (what ran before session 19).
- ``groups``: greedy generation (``--bytes`` bytes from ``--prompts`` suite prompts, cold
  cache each) and a run of the beams, with the weights packed in groups (a layer's q/k/v and
  gate/up as one matrix each: ``lm.gemm.pack_groups``) or one by one, alternating
  ``--rounds`` times (each round on other prompts and seeds). Reported: the greedy time and
  the beams' throughput with groups as a ratio to without.

Run: ``python benchmarks/bench_pass_features.py [--parts replay groups] [--repeats 5]``.
Prints the figures and writes ``benchmarks/results/pass_features.json`` (``--name``).
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import statistics
import time

import bench_concurrency
import common
import probes
import suite

VARIANTS = (("sdpa", False), ("sdpa", True), ("products", False), ("products", True))  # (attention, buckets)


async def record_run(lm, prompts: list[bytes], seeds: list[int], steps: int) -> list[tuple]:
    """The ragged passes (rows, args, kwargs) one run of the beams makes."""
    from genlm_bytes.lm.hf import passes

    starts = await bench_concurrency.prompt_states(lm, prompts)
    runner, recorded = lm.runner, []
    inner = passes.PassRunner.forward

    def forward(rows, *args, **kwargs):
        recorded.append((list(rows), args, kwargs))
        return inner(runner, rows, *args, **kwargs)

    runner.forward = forward
    try:
        await asyncio.gather(*(st.sample(b"", steps, rng=s) for st, s in zip(starts, seeds)))
        await probes.wait_idle(lm)
    finally:
        del runner.forward
    return recorded


def replay(lm, recorded: list[tuple], repeats: int) -> dict:
    """Each recorded pass of 2 rows or more under every variant, alternating; seconds per variant."""
    from genlm_bytes.lm.hf import passes
    from genlm_bytes.models import layers

    runner, base, few = lm.runner, lm.runner.config, layers.FEW_QUERIES
    todo = [r for r in recorded if len(r[0]) >= 2]
    times = {v: [[] for _ in todo] for v in VARIANTS}

    def one(variant, rows, args, kwargs) -> float:
        attention, buckets = variant
        layers.FEW_QUERIES = few if attention == "products" else 0
        runner.config = dataclasses.replace(base, bucket_slots=base.bucket_slots if buckets else 0)
        try:
            t0 = time.perf_counter()
            passes.PassRunner.forward(runner, rows, *args, **kwargs)
            return time.perf_counter() - t0
        finally:
            runner.config, layers.FEW_QUERIES = base, few

    ex = lm.batcher._executor  # (the model's thread, as the engine runs its passes)
    for r in range(repeats):
        for j, (rows, args, kwargs) in enumerate(todo):
            for v in (VARIANTS if r % 2 == 0 else VARIANTS[::-1]):
                times[v][j].append(ex.submit(one, v, rows, args, kwargs).result())
    per_pass = [{"rows": len(rows), **{f"{a}/{'buckets' if b else 'padded'}": 1000 * statistics.median(times[(a, b)][j])
                                      for a, b in VARIANTS}} for j, (rows, _, _) in enumerate(todo)]
    sums = {f"{a}/{'buckets' if b else 'padded'}": sum(1000 * statistics.median(t) for t in times[(a, b)])
            for a, b in VARIANTS}
    baseline = sums["sdpa/padded"]
    return {"passes": per_pass, "sum_ms": sums, "ratio_to_sdpa_padded": {k: v / baseline for k, v in sums.items()}}


def use_groups(lm, groups: bool) -> None:
    """Pack the model's weights in groups, or one by one (in the model's thread, between runs)."""
    from genlm_bytes.lm import gemm
    from genlm_bytes.lm.lean import model_groups, model_matrices

    def repack():
        with gemm._PACK_LOCK:
            for key in [k for k in gemm._PACKS if len(k) > 1]:  # (the groups' packs)
                gemm._drop(key)
        if groups:
            gemm.pack_groups(model_groups(lm.model))
        gemm.pack_weights(model_matrices(lm.model))

    lm.batcher._executor.submit(repack).result()


async def groups_part(lm, prompts: list[bytes], args) -> dict:
    from genlm_bytes import ByteBeamState

    greedy = {True: [], False: []}
    beams = {True: [], False: []}
    n = args.prompts
    for r in range(args.rounds):
        batch = [prompts[(r * n + i) % len(prompts)] for i in range(n)]
        for groups in ((True, False) if r % 2 == 0 else (False, True)):
            use_groups(lm, groups)
            t0 = time.perf_counter()
            for p in batch:
                lm.clear_cache()
                await probes.wait_idle(lm)
                beam = await ByteBeamState.initial(lm, common.beam_params())
                await beam.greedy(p, args.bytes)
                await probes.wait_idle(lm)
            greedy[groups].append(time.perf_counter() - t0)
            out = await bench_concurrency.run(lm, [100 * r + i for i in range(args.particles)],
                                              prompts[:args.particles], args.steps)
            beams[groups].append(out["bytes"] / out["seconds"])
        print(f"  round {r + 1}/{args.rounds}: greedy {greedy[True][-1]:.2f} s with groups, "
              f"{greedy[False][-1]:.2f} s without; {args.particles} beams {beams[True][-1]:.0f} / "
              f"{beams[False][-1]:.0f} B/s", flush=True)
    use_groups(lm, True)  # (as the engine packs)
    return {
        "greedy_seconds": {"groups": greedy[True], "one_by_one": greedy[False]},
        "beams_bytes_per_second": {"groups": beams[True], "one_by_one": beams[False]},
        "greedy_time_ratio": statistics.median(greedy[True]) / statistics.median(greedy[False]),
        "beams_throughput_ratio": statistics.median(beams[True]) / statistics.median(beams[False]),
    }


async def main(args) -> dict:
    lm = common.setup(args.threads, name=args.model, batch_size=max(32, args.particles))
    prompts = [p["text"].encode() for p in suite.load_prompts(args.suite)]
    if args.particles > len(prompts):
        raise SystemExit(f"--particles {args.particles} is more than the {len(prompts)} prompts of the suite")
    await bench_concurrency.run(lm, [1000, 1001], prompts[:2], 4)  # warm-up
    out = {"question": "session 19's pass features against their baselines, in one process",
           "settings": common.environment(args.threads, particles=args.particles, steps=args.steps,
                                          repeats=args.repeats, rounds=args.rounds, prompts=args.prompts,
                                          bytes=args.bytes, parts=list(args.parts))}
    if "replay" in args.parts:
        if not getattr(lm, "packed", False) and not hasattr(lm, "runner"):
            raise SystemExit("the replay needs the transformers backend's engine")
        recorded = await record_run(lm, prompts[:args.particles], list(range(args.particles)), args.steps)
        out["replay"] = replay(lm, recorded, args.repeats)
    if "groups" in args.parts:
        if not getattr(lm, "packed", False):
            print("weights not packed on this machine (EngineConfig.packed_weights): no groups to compare")
        else:
            out["groups"] = await groups_part(lm, prompts, args)
    return out


def report(res: dict) -> None:
    if "replay" in res:
        rp = res["replay"]
        print()
        cols = [("rows", "rows", "")] + [(k, k + " ms", ".1f") for k in rp["sum_ms"]]
        common.print_table(rp["passes"], cols)
        print("summed: " + ", ".join(f"{k} {v:.1f} ms ({rp['ratio_to_sdpa_padded'][k]:.3f}x)"
                                     for k, v in rp["sum_ms"].items()))
    if "groups" in res:
        g = res["groups"]
        print(f"grouped packs: greedy time {g['greedy_time_ratio']:.3f}x of one-by-one packs, "
              f"beams' throughput {g['beams_throughput_ratio']:.3f}x")
    print(f"load average {res['settings']['load_average_1min']}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=("replay", "groups"), default=["replay", "groups"])
    parser.add_argument("--suite", default=str(suite.PROMPT_SUITE), help="a prompt suite (JSON)")
    parser.add_argument("--particles", type=int, default=32)
    parser.add_argument("--steps", type=int, default=16, help="bytes each beam samples")
    parser.add_argument("--repeats", type=int, default=5, help="runs of each replayed pass per variant")
    parser.add_argument("--rounds", type=int, default=4, help="alternating rounds of the groups part")
    parser.add_argument("--prompts", type=int, default=6, help="greedy prompts per round")
    parser.add_argument("--bytes", type=int, default=48, help="greedy bytes per prompt")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    common.add_model_arg(parser)
    parser.add_argument("--name", default="pass_features", help="results/<name>.json")
    args = parser.parse_args()
    for name in ("particles", "steps", "repeats", "rounds", "prompts", "bytes"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    result = asyncio.run(main(args))
    report(result)
    common.write_json(args.name, result)
