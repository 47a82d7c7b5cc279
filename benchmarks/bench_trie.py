"""Question 5: the token-byte trie: build time, node masses per distribution, share of prefill.

Measured on the embedded model's vocabulary (49,152 tokens):

1. build: ``TokenByteTrie(lm.byte_vocab)`` (sorting, nodes, edges), and the
   sparse reachability matrix that ``weight_sum`` builds on first use;
2. ``weight_sum`` per distribution: ``trie.weight_sum(p)`` (batch 1) and
   ``trie.batch_weight_sum(P) / 32`` (batch 32), with ``p`` real next-token
   distributions of the model; also what the beam actually does per
   distribution, ``TrieSpace.dists_for`` (gather into byte order, exp,
   float64 block sums), at batch 1 and 32;
3. the trie work inside a prefill of ``../shared/bench/prose.txt`` (K=5,
   threshold 0.05): wall time spent in ``genlm_bytes/byte_lm/trie_state.py``
   (``TrieSpace.dist_for/dists_for``, every ``ContextDist`` mass computation,
   ``LazyTrieState`` moves along bytes, token ends and next-byte masses),
   recorded by timers wrapped around those functions (outermost call only),
   as a fraction of the prefill's wall time. Target: under 10%. The time
   inside the model's forward calls is recorded the same way, and the rest
   (beam bookkeeping, batching, waiting) is what is left.

Run: ``python benchmarks/bench_trie.py [--repeats 5]``. Prints tables and
writes ``benchmarks/results/trie.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import common
import torch

TARGET_SHARE = 0.10


def instrument(lm) -> tuple[common.Timers, common.Timers]:
    """Timers around the trie work (trie_state.py) and around the backend's forward calls."""
    from genlm_bytes.byte_lm import trie_state as ts

    trie = common.Timers()
    for name in ("dist_for", "dists_for"):
        trie.wrap(ts.TrieSpace, name)
    for name in ("prepare", "mass", "masses", "p_eos"):
        trie.wrap(ts.ContextDist, name)
    for name in ("consume", "end_tokens", "add_next_masses", "_node_mass", "with_mode"):
        trie.wrap(ts.LazyTrieState, name)
    return trie, common.time_model(lm)


def instrument_planning() -> dict:
    """Wall time of ``PathSpeculator.branches`` (speculate.py: which one-token branches to prefetch).

    Not counted as trie work: it walks the trie along the text in Python; its mass
    computations are ``ContextDist`` calls, which the trie timers already count.
    """
    from genlm_bytes.byte_lm import speculate

    acc = {"seconds": 0.0}
    inner = speculate.PathSpeculator.branches

    async def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return await inner(self, *args, **kwargs)
        finally:
            acc["seconds"] += time.perf_counter() - t0

    speculate.PathSpeculator.branches = timed
    return acc


def time_calls(fn, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls (after one untimed call)."""
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return common.median(out)


async def distributions(lm, data: bytes, n: int) -> list[torch.Tensor]:
    """``n`` real next-token log-prob vectors (V,): after growing prefixes of the canonical encoding."""
    ids = common.canonical_ids(lm, data)
    step = max(1, (len(ids) - 1) // n)
    ctxs = [ids[: 1 + step * i] for i in range(n)]
    return [await lm.next_token_logprobs(c) for c in ctxs]


async def main(args) -> dict:
    from genlm_bytes.byte_lm.trie_state import TrieSpace
    from genlm_bytes.trie import TokenByteTrie

    lm = common.setup(args.threads)
    vocab = lm.byte_vocab
    data = common.shared_text("prose.txt")

    # 1. Build.
    t_build = time_calls(lambda: TokenByteTrie(vocab), args.repeats)
    trie = TokenByteTrie(vocab)

    def build_reach():
        trie._M = None
        trie.reachability()

    t_reach = time_calls(build_reach, args.repeats)

    # 2. Masses per distribution.
    logps = await distributions(lm, data, 32)
    P = torch.stack(logps).double().exp()  # (32, V) probabilities
    per = {}
    per["weight_sum_b1"] = time_calls(lambda: trie.weight_sum(P[0]), 5 * args.repeats)
    per["weight_sum_b32"] = time_calls(lambda: trie.batch_weight_sum(P), args.repeats) / 32

    def prep(k: int):
        space = TrieSpace(trie)
        return lambda: space.dists_for([lp.clone() for lp in logps[:k]]) if k > 1 else \
            space.dist_for(logps[0].clone()).prepare()

    per["dists_for_b1"] = time_calls(prep(1), 5 * args.repeats)
    per["dists_for_b32"] = time_calls(prep(32), args.repeats) / 32
    clone = time_calls(lambda: [lp.clone() for lp in logps], args.repeats) / 32  # subtract the copies
    per["dists_for_b1"] -= clone
    per["dists_for_b32"] -= clone

    # 3. Share of a prefill.
    await common.prefill_run(lm, data)  # warm-up
    trie_t, model_t = instrument(lm)
    planning = instrument_planning()
    shares = []
    for _ in range(args.prefill_repeats):
        trie_t.reset()
        model_t.reset()
        planning["seconds"] = 0.0
        run = await common.prefill_run(lm, data)
        shares.append({"prefill_seconds": run["seconds"], "trie_seconds": trie_t.seconds,
                       "trie_calls": trie_t.calls, "model_seconds": model_t.seconds,
                       "share": trie_t.seconds / run["seconds"],
                       "model_share": model_t.seconds / run["seconds"],
                       "branch_planning_seconds": planning["seconds"]})
    med = sorted(shares, key=lambda s: s["share"])[len(shares) // 2]
    share = med["share"]
    return {
        "question": "5. trie: build time, weight_sum per distribution, share of prefill (target < 10%)",
        "settings": common.environment(args.threads, repeats=args.repeats, prefill_repeats=args.prefill_repeats),
        "vocab_size": len(vocab),
        "trie_nodes": trie.n_nodes,
        "build_seconds": t_build,
        "reachability_build_seconds": t_reach,
        "per_distribution_ms": {k: 1000 * v for k, v in per.items()},
        "prefill_text": "prose.txt",
        "prefill_runs": shares,
        "median_prefill": med,
        "trie_share_of_prefill": share,
        "target": TARGET_SHARE,
        "meets_target": share < TARGET_SHARE,
    }


def report(res: dict) -> None:
    print(f"\nvocabulary {res['vocab_size']} tokens, {res['trie_nodes']} trie nodes")
    rows = [
        {"what": "build TokenByteTrie", "ms": 1000 * res["build_seconds"]},
        {"what": "build sparse reachability (first weight_sum)", "ms": 1000 * res["reachability_build_seconds"]},
    ]
    d = res["per_distribution_ms"]
    rows += [
        {"what": "weight_sum, batch 1 (per distribution)", "ms": d["weight_sum_b1"]},
        {"what": "batch_weight_sum, batch 32 (per distribution)", "ms": d["weight_sum_b32"]},
        {"what": "TrieSpace.dists_for, batch 1 (per distribution)", "ms": d["dists_for_b1"]},
        {"what": "TrieSpace.dists_for, batch 32 (per distribution)", "ms": d["dists_for_b32"]},
    ]
    common.print_table(rows, [("what", "what", ""), ("ms", "ms (median)", ".2f")])
    print()
    common.print_table(res["prefill_runs"], [
        ("prefill_seconds", "prefill s", ".3f"), ("trie_seconds", "trie s", ".3f"), ("trie_calls", "trie calls", "d"),
        ("share", "trie share", ".3f"), ("model_seconds", "model fwd s", ".3f"), ("model_share", "model share", ".3f"),
        ("branch_planning_seconds", "planning s", ".3f")])
    print(f"\ntrie work = {100 * res['trie_share_of_prefill']:.1f}% of the prefill of {res['prefill_text']}: "
          f"{common.verdict(res['meets_target'])} (target < {100 * TARGET_SHARE:.0f}%; "
          f"load average {res['settings']['load_average_1min']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--prefill-repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    args = parser.parse_args()
    result = asyncio.run(main(args))
    report(result)
    common.write_json("trie", result)
