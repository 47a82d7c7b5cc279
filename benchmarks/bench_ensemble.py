"""Ensembles across tokenizers: SmolLM2-135M + Gemma 3 270M as a byte-level mixture.

Two questions:
1. Cost. Greedy generation of ``--bytes`` bytes from each prompt by the
   mixture (equal weights) against the two members' own greedy generation of
   as many bytes, run back to back. Target: the ensemble takes at most 1.1x the
   back-to-back time (its members step concurrently; it adds no work of its own).
   Every run starts from cold caches and ends when both models' threads are free;
   the two sides alternate repetition by repetition. The texts differ (the
   mixture's likeliest bytes are not either member's); their lengths match.
2. Quality. Bits per byte (``-log2 P(text) / len(text)``, from ``prefill``) of the
   mixture and of each member on each text (default ``../shared/bench/prose.txt``
   and ``mixed.txt``). A mixture is never worse than its worst member and at most
   ``log2(1/w)/len`` bits/byte worse than its best.

Beams: K=5, prune_threshold=0.05 (``common.beam_params``) for every model.
Needs the Gemma 3 package: ``pip install 'genlm_bytes[gemma]'``.

Run: ``python benchmarks/bench_ensemble.py [TEXT ...] [--bytes 24] [--repeats 3]``.
Prints two tables and writes ``benchmarks/results/ensemble.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import time
from pathlib import Path

import common

TARGET = 1.1
PROMPTS = ["The capital of France is", "def fibonacci(n):\n", "Once upon a time"]
TEXTS = [common.SHARED_BENCH / "prose.txt", common.SHARED_BENCH / "mixed.txt"]
MODELS = ["smollm2-135m", "gemma3-270m"]


async def settle(lms) -> None:
    """Stop look-ahead passes and wait until every model's thread is free."""
    loop = asyncio.get_running_loop()
    for lm in lms:
        lm.stop_lookahead()
    await asyncio.gather(*(loop.run_in_executor(lm.batcher._executor, lambda: None) for lm in lms))


async def fresh_beams(lms):
    from genlm_bytes import ByteBeamState

    for lm in lms:
        lm.clear_cache()
    return [await ByteBeamState.initial(lm, common.beam_params()) for lm in lms]


def forward_tokens(lms) -> int:
    """Tokens run through the models so far (all of them): the LM work, beside the time."""
    return sum(lm.n_forward_tokens for lm in lms)


async def ensemble_greedy(lms, prompt: bytes, n_bytes: int) -> tuple[float, bytes, int]:
    from genlm_bytes import EnsembleState

    t0 = time.perf_counter()
    ens = EnsembleState(await fresh_beams(lms), kind="mixture")
    tok0 = forward_tokens(lms)
    out = await ens.greedy(prompt, n_bytes)
    await settle(lms)
    return time.perf_counter() - t0, out[len(prompt):], forward_tokens(lms) - tok0


async def back_to_back_greedy(lms, prompt: bytes, n_bytes: int) -> tuple[float, list[bytes], int]:
    t0 = time.perf_counter()
    texts = []
    beams = await fresh_beams(lms)
    tok0 = forward_tokens(lms)
    for beam, lm in zip(beams, lms):
        texts.append((await beam.greedy(prompt, n_bytes))[len(prompt):])
        await settle([lm])
    return time.perf_counter() - t0, texts, forward_tokens(lms) - tok0


async def cost(lms, args) -> list[dict]:
    await ensemble_greedy(lms, PROMPTS[0].encode(), 4)  # warm-up, both sides
    await back_to_back_greedy(lms, PROMPTS[0].encode(), 4)
    rows = []
    for prompt in args.prompts:
        pb = prompt.encode()
        ens_t, pair_t = [], []
        for r in range(args.repeats):
            for which in ((0, 1) if r % 2 == 0 else (1, 0)):
                if which == 0:
                    t, ens_text, ens_tokens = await ensemble_greedy(lms, pb, args.bytes)
                    ens_t.append(t)
                else:
                    t, member_texts, pair_tokens = await back_to_back_greedy(lms, pb, args.bytes)
                    pair_t.append(t)
            print(f"  {prompt!r} rep {r + 1}/{args.repeats}: ensemble {ens_t[-1]:.2f} s, "
                  f"back to back {pair_t[-1]:.2f} s", flush=True)
        rows.append({
            "prompt": prompt,
            "bytes": args.bytes,
            "ensemble_median_seconds": common.median(ens_t),
            "back_to_back_median_seconds": common.median(pair_t),
            "ratio": common.median(ens_t) / common.median(pair_t),
            "ensemble_forward_tokens": ens_tokens,
            "back_to_back_forward_tokens": pair_tokens,
            "ensemble_text": ens_text.decode("utf-8", "replace"),
            "member_texts": [t.decode("utf-8", "replace") for t in member_texts],
            "ensemble_seconds": ens_t,
            "back_to_back_seconds": pair_t,
        })
    return rows


async def quality(lms, paths: list[Path], max_bytes: int | None) -> list[dict]:
    from genlm_bytes import EnsembleState

    rows = []
    for path in paths:
        data = path.read_bytes()
        if max_bytes is not None:
            data = common.prefix(data, max_bytes)

        def bits(logz: float, n: int = len(data)) -> float:
            return -logz / math.log(2) / n

        alone = [(await b.prefill(data)).logZ for b in await fresh_beams(lms)]
        t0 = time.perf_counter()
        mix = await EnsembleState(await fresh_beams(lms), kind="mixture").prefill(data)
        seconds = time.perf_counter() - t0
        await settle(lms)
        rows.append({"text": path.name, "bytes": len(data), "mixture_bits_per_byte": bits(mix.logZ),
                     **{f"{m}_bits_per_byte": bits(z) for m, z in zip(MODELS, alone)},
                     "mixture_prefill_seconds": seconds})
        print(f"  {path.name}: mixture {bits(mix.logZ):.3f} bits/byte", flush=True)
    return rows


async def main(args) -> dict:
    import torch

    from genlm_bytes import load_model

    torch.set_num_threads(args.threads)
    lms = [load_model(name) for name in MODELS]
    res = {"question": "ensemble greedy vs its members' greedy back to back (target <= 1.1x); "
                       "bits/byte of the mixture beside its members'"}
    res["cost"] = cost_rows = await cost(lms, args)
    res["quality"] = await quality(lms, [Path(p) for p in args.texts], args.max_text_bytes)
    worst = max(r["ratio"] for r in cost_rows)
    res.update(worst_ratio=worst, target=TARGET, meets_target=worst <= TARGET,
               settings=common.environment(args.threads, models=MODELS, repeats=args.repeats,
                                           bytes=args.bytes, ensemble="mixture, equal weights"))
    return res


def report(res: dict) -> None:
    print()
    common.print_table(res["cost"], [
        ("prompt", "prompt", ""), ("bytes", "bytes", "d"),
        ("ensemble_median_seconds", "ensemble s", ".2f"),
        ("back_to_back_median_seconds", "members back to back s", ".2f"), ("ratio", "ratio", ".2f"),
        ("ensemble_forward_tokens", "LM tokens", "d"), ("back_to_back_forward_tokens", "members' LM tokens", "d")])
    for r in res["cost"]:
        print(f"  {r['prompt']!r}: mixture {r['ensemble_text']!r}; members {r['member_texts']!r}")
    print()
    common.print_table(res["quality"], [
        ("text", "text", ""), ("bytes", "bytes", "d"), ("mixture_bits_per_byte", "mixture bits/B", ".3f"),
        *((f"{m}_bits_per_byte", f"{m} bits/B", ".3f") for m in MODELS)])
    print(f"\nworst ensemble / back to back = {res['worst_ratio']:.2f}x: {common.verdict(res['meets_target'])} "
          f"(target <= {TARGET}x; load average {res['settings']['load_average_1min']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("texts", nargs="*", default=[str(p) for p in TEXTS],
                        help="texts for bits/byte (default: ../shared/bench/prose.txt and mixed.txt)")
    parser.add_argument("--prompts", nargs="+", default=PROMPTS)
    parser.add_argument("--bytes", type=int, default=24, help="bytes generated from each prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-text-bytes", type=int, default=None, help="score only this prefix (smoke runs)")
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--name", default="ensemble", help="results/<name>.json")
    args = parser.parse_args()
    if args.bytes < 1 or args.repeats < 1:
        parser.error("--bytes and --repeats must be at least 1")
    for p in args.texts:
        if not Path(p).is_file():
            parser.error(f"text {p} does not exist")
    result = asyncio.run(main(args))
    report(result)
    common.write_json(args.name, result)
