"""A one-token decode step: transformers' decoder vs our lean pass vs the bare matrix products.

Why greedy keeps up with transformers' ``generate`` (question 3): on a CPU a decode step of a
small model spends much of its time in transformers' per-module Python, which our lean pass
(``genlm_bytes.lm.lean``) does not have. On the embedded SmolLM2-135M, from a 20-token prose
context with a transformers ``DynamicCache``, the script runs ``--steps`` greedy decode steps
three ways, alternating them ``--repeats`` times in one process:

- ``transformers``: the model's decoder (``model.model(...)``) and its output layer;
- ``lean``: :class:`~genlm_bytes.lm.lean.LeanDecoder` on the same weights and cache type;
- ``products``: only the step's matrix products (q, k, v, o, gate, up, down per layer, and
  the output layer) on a random hidden state: a floor for any implementation in torch.

Both decoders must pick the same tokens (checked). Reported: median ms per step and the
ratio transformers / lean. Run: ``python benchmarks/bench_lean.py [--steps 20] [--repeats 5]``.
"""

from __future__ import annotations

import argparse
import time

import common
import torch
import torch.nn.functional as F

PROMPT = "The three primary colors are red, yellow, and blue. These colors are"


@torch.inference_mode()
def decode(model, run, ids: list[int], steps: int) -> tuple[float, list[int]]:
    """Seconds per step of ``steps`` greedy steps after ``ids`` with ``run(x, pos, cache)``."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    head = model.get_output_embeddings()
    h = run(torch.tensor([ids]), torch.arange(len(ids))[None], cache)
    t = head(h[:, -1]).argmax()
    out = []
    t0 = time.perf_counter()
    for i in range(steps):
        h = run(t.view(1, 1), torch.tensor([[len(ids) + i]]), cache)
        t = head(h[:, -1]).argmax()
        out.append(int(t))
    return (time.perf_counter() - t0) / steps, out


@torch.inference_mode()
def products(model, steps: int) -> float:
    """Seconds per step of the matrix products alone."""
    layers = [(lay.self_attn, lay.mlp) for lay in model.get_decoder().layers]
    head = model.get_output_embeddings()
    hidden = model.config.hidden_size
    t0 = time.perf_counter()
    for _ in range(steps):
        x = torch.randn(1, 1, hidden)
        for a, f in layers:
            F.linear(x, a.k_proj.weight)
            F.linear(x, a.v_proj.weight)
            x = x + F.linear(F.linear(x, a.q_proj.weight), a.o_proj.weight)
            x = x + F.linear(F.linear(x, f.gate_proj.weight) * F.linear(x, f.up_proj.weight), f.down_proj.weight)
        head(x)
    return (time.perf_counter() - t0) / steps


def main(args) -> dict:
    lm = common.setup(args.threads)
    model, lean = lm.model, lm.lean
    if lean is None:
        raise SystemExit("the embedded model should run lean passes; lean_decoder returned None")
    body = model.get_decoder()
    ids = common.canonical_ids(lm, PROMPT.encode())

    def hf(x, pos, cache):
        return body(input_ids=x, position_ids=pos, past_key_values=cache, use_cache=True).last_hidden_state

    def ours(x, pos, cache):
        return lean(x, None, pos, cache)

    for run in (hf, ours):  # warm-up
        decode(model, run, ids, 3)
    times = {"transformers": [], "lean": [], "products": []}
    same = True
    for _ in range(args.repeats):
        s_hf, tok_hf = decode(model, hf, ids, args.steps)
        s_lean, tok_lean = decode(model, ours, ids, args.steps)
        times["transformers"].append(s_hf)
        times["lean"].append(s_lean)
        times["products"].append(products(model, args.steps))
        same &= tok_hf == tok_lean
    med = {k: common.median(v) for k, v in times.items()}
    return {
        "question": "decode step: transformers' decoder vs the lean pass vs the bare matrix products",
        "settings": common.environment(args.threads, steps=args.steps, repeats=args.repeats,
                                       context_tokens=len(ids)),
        "ms_per_step": {k: [1000 * x for x in v] for k, v in times.items()},
        "median_ms_per_step": {k: 1000 * v for k, v in med.items()},
        "ratio_transformers_over_lean": med["transformers"] / med["lean"],
        "same_tokens": same,
    }


def report(res: dict) -> None:
    rows = [{"what": k, "ms": v} for k, v in res["median_ms_per_step"].items()]
    common.print_table(rows, [("what", "decode step", ""), ("ms", "ms (median)", ".1f")])
    print(f"\ntransformers / lean = {res['ratio_transformers_over_lean']:.2f}x; same tokens: {res['same_tokens']} "
          f"(load average {res['settings']['load_average_1min']})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    result = main(args)
    report(result)
    common.write_json("lean", result)
