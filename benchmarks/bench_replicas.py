"""Issue 23: throughput of RayLM with 1 vs 2 replicas at 64 states, and how well routing keeps
the replicas' caches warm.

Set-up: a local Ray told ``--ray-cpus`` (3) logical CPUs, so that a 1-replica and a 2-replica
RayLM of the embedded model stay up side by side and alternate repetition by repetition (only
one runs at a time); each replica reserves 1 CPU and runs 1 torch thread. Baselines in the same
process: one local ``AsyncTransformer`` with 1 and with 2 threads (what 2 cores give one model;
it also prefetches prompts, which RayLM does not), and the 2 replicas with random routing (each
request to a random live replica: what prefix-affine routing saves).

A run: ``--states`` greedy beams from distinct prompts (``"Entry i: " + PROMPT``) prefill their
prompt and generate ``--steps`` bytes each, concurrently, from cold caches; timed whole.
Reported per setting: byte steps per second (all states together), the tokens the model(s) ran
(a replica lacking a prefix runs it again), the router's hit rates (requests sent to the
replica that served a prefix of them, and the share of their tokens that prefix covered), and
each replica's torch thread count. Every setting must produce the same bytes.

On this 2-core machine two 1-thread replicas can at best double one replica's throughput, and
the driver (routing, the byte-level beams) shares the same cores: the gain is bounded by the
cores, not by the code. Load average is printed; compare settings of the same run only.

Run: ``python benchmarks/bench_replicas.py [--states 64] [--steps 16] [--repeats 2]``.
Prints a table and writes ``benchmarks/results/replicas.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import time

import common

PROMPT = b"Once upon a time,"


class RandomRouter:
    """Each request to a random live replica (the baseline routing; same counters as PrefixRouter)."""

    def __init__(self, n_replicas: int, seed: int = 0):
        self.n_replicas, self.rng = n_replicas, random.Random(seed)
        self.n_routed = self.tokens_routed = 0

    def choose(self, ids, loads, alive) -> int:
        self.n_routed += 1
        self.tokens_routed += len(ids)
        return self.rng.choice([r for r in range(self.n_replicas) if alive[r]])

    def hit_rates(self) -> dict:
        return {"requests": None, "tokens": None}


async def greedy_states(lm, n: int, steps: int) -> list[bytes]:
    """Each state's prompt and greedy bytes."""
    from genlm_bytes import ByteBeamState

    b0 = await ByteBeamState.initial(lm, common.beam_params())
    return await asyncio.gather(*(b0.greedy(f"Entry {i}: ".encode() + PROMPT, steps) for i in range(n)))


def counters(lm) -> tuple[list[int], int, int]:
    """(tokens each model ran, actor calls, requests they carried); calls 0 for a local model."""
    if hasattr(lm, "n_forward_tokens"):
        return [lm.n_forward_tokens], 0, 0
    s = lm.stats()
    return [r.get("forward_tokens") or 0 for r in s["replicas"]], s["actor_calls"], s["requests_sent"]


def run(lm, args, random_routing: bool = False) -> dict:
    lm.clear_cache()
    if random_routing:
        lm.router = RandomRouter(len(lm.replicas))
    before = counters(lm)
    t0 = time.perf_counter()
    outs = asyncio.run(greedy_states(lm, args.states, args.steps))
    seconds = time.perf_counter() - t0
    steps = sum(len(o) for o in outs)
    after = counters(lm)
    tokens = [b - a for a, b in zip(before[0], after[0])]
    calls, sent = after[1] - before[1], after[2] - before[2]
    res = {"seconds": seconds, "byte_steps": steps, "byte_steps_per_second": steps / seconds,
           "forward_tokens": sum(tokens), "tokens_per_replica": tokens,
           "requests_per_call": sent / calls if calls else None, "outputs": outs}
    if hasattr(lm, "router"):
        res["hit_rates"] = lm.router.hit_rates()
        res["requests_routed"] = lm.router.n_routed
    return res


def main(args) -> dict:
    import ray
    import torch

    from genlm_bytes import RayLM

    torch.set_num_threads(1)
    # Logical CPUs: both RayLMs stay up and alternate; only one computes at a time.
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False)
    lms = {}
    try:
        lms["local"] = common.setup(threads=1)
        lms["ray1"] = RayLM.from_name(replicas=1, num_cpus=1)
        lms["ray2"] = RayLM.from_name(replicas=2, num_cpus=1)
        # (lm, label, random routing, torch threads of the local model)
        settings = [("local", "local AsyncTransformer, 1 thread", False, 1),
                    ("local", "local AsyncTransformer, 2 threads", False, 2),
                    ("ray1", "RayLM, 1 replica", False, None), ("ray2", "RayLM, 2 replicas", False, None)]
        if not args.no_random:
            settings.append(("ray2", "RayLM, 2 replicas, random routing", True, None))
        for key in ("local", "ray1", "ray2"):  # warm-up (first passes, imports)
            run(lms[key], argparse.Namespace(states=2, steps=2))
        runs = {label: [] for _, label, _, _ in settings}
        for rep in range(args.repeats):
            for key, label, rnd, local_threads in (settings if rep % 2 == 0 else settings[::-1]):
                torch.set_num_threads(local_threads or 1)
                runs[label].append(run(lms[key], args, rnd))
                print(f"  rep {rep + 1}/{args.repeats} {label}: {runs[label][-1]['byte_steps_per_second']:.1f} "
                      f"byte steps/s", flush=True)
        torch.set_num_threads(1)
        threads = {key: [i["threads"] for i in lms[key].replica_info] for key in ("ray1", "ray2")}
    finally:
        for key in ("ray1", "ray2"):
            if key in lms:
                asyncio.run(lms[key].close())
        ray.shutdown()
    base = common.median([r["byte_steps_per_second"] for r in runs["RayLM, 1 replica"]])
    rows = []
    for key, label, _, local_threads in settings:
        rs = runs[label]
        last = rs[-1]
        rows.append({"setting": label, "replicas": len(threads[key]) if key in threads else None,
                     "threads_each": local_threads or threads[key][0],
                     "byte_steps_per_second": common.median([r["byte_steps_per_second"] for r in rs]),
                     "vs_1_replica": common.median([r["byte_steps_per_second"] for r in rs]) / base,
                     "forward_tokens": last["forward_tokens"], "requests_per_call": last["requests_per_call"],
                     "tokens_per_replica": "/".join(map(str, last["tokens_per_replica"])),
                     "hit_requests": (last.get("hit_rates") or {}).get("requests"),
                     "hit_tokens": (last.get("hit_rates") or {}).get("tokens"),
                     "seconds": [round(r["seconds"], 2) for r in rs]})
    outputs = [r["outputs"] for rs in runs.values() for r in rs]
    return {
        "question": f"issue 23: RayLM throughput, 1 vs 2 replicas, {args.states} states; routing hit rate",
        "settings": common.environment(1, repeats=args.repeats, states=args.states, steps=args.steps,
                                       ray_logical_cpus=args.ray_cpus, replica_threads=threads,
                                       physical_cpus=os.cpu_count()),
        "rows": rows,
        "same_bytes_everywhere": all(o == outputs[0] for o in outputs),
        "ratio_2_vs_1": next(r["vs_1_replica"] for r in rows if r["setting"] == "RayLM, 2 replicas"),
    }


def report(res: dict) -> None:
    print()
    common.print_table(res["rows"], [
        ("setting", "setting", ""), ("replicas", "replicas", "d"), ("threads_each", "threads each", "d"),
        ("byte_steps_per_second", "byte steps/s", ".1f"), ("vs_1_replica", "vs 1 replica", ".2f"),
        ("forward_tokens", "model tokens", "d"), ("tokens_per_replica", "per replica", ""), ("requests_per_call", "requests/call", ".1f"),
        ("hit_requests", "hit (requests)", ".3f"),
        ("hit_tokens", "hit (tokens)", ".3f")])
    s = res["settings"]
    print()
    print(f"2 replicas / 1 replica = {res['ratio_2_vs_1']:.2f}x with {s['replica_threads']['ray2']} torch "
          f"threads per replica on {s['physical_cpus']} physical cores (the driver shares them)")
    print(f"same bytes in every setting and repetition: {res['same_bytes_everywhere']}")
    print(f"load average {s['load_average_1min']}")


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--states", type=int, default=64)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ray-cpus", type=int, default=3, help="logical CPUs Ray is told (3: 1 + 2 replicas)")
    p.add_argument("--no-random", action="store_true", help="skip the random-routing baseline")
    a = p.parse_args()
    out = main(a)
    report(out)
    common.write_json("replicas", out)
