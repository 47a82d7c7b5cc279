"""A one-token decode step: transformers' decoder vs our lean pass vs the bare matrix products.

Why greedy keeps up with transformers' ``generate`` (question 3): on a CPU a decode step of a
small model spends much of its time in transformers' per-module Python, which our lean pass
(``genlm_bytes.lm.lean``) does not have. On the embedded SmolLM2-135M, from a 20-token prose
context with a transformers ``DynamicCache``, the script runs ``--steps`` greedy decode steps
three ways, alternating them ``--repeats`` times in one process:

- ``transformers``: the model's decoder (``model.model(...)``) and its output layer;
- ``lean``: :class:`~genlm_bytes.lm.lean.LeanDecoder` on the same weights and cache type;
- ``products``: only the step's matrix products (q, k, v, o, gate, up, down per layer, and
  the output layer) on a random hidden state, by ``F.linear`` (transformers' BLAS);
- ``products (engine's)``: the same by the lean pass's own products, a layer's groups at once
  (the weights' codes where they have them, :mod:`genlm_bytes.lm.qgemm`, else oneDNN's packs
  where torch has them, :mod:`genlm_bytes.lm.gemm`): a floor for our passes.

Both decoders must pick the same tokens (checked). Reported: median ms per step and the
ratio transformers / lean.

``--tokens 1 2 3 4 8 16``: also what a pass of T new tokens costs against a pass of one
(the price of guessing: drafts, hints and branches run as extra tokens of a pass), each
alternating in the same process:

- ``lean``: the lean pass of T tokens on the cached context, and the output layer on its T
  rows (the cache cut back after each); with oneDNN's products (the engine's) and, beside
  it, with ``F.linear``'s;
- ``products``: the same pass's matrix products alone, T rows (oneDNN's and ``F.linear``'s);
- ``int8 products``: the same products with every weight matrix rounded to int8 per output
  row (``torch._weight_int8pack_mm``, bfloat16 inputs): the floor of a draft step of an 8-bit
  copy of the model, against the float32 pass it would save.

Run: ``python benchmarks/bench_lean.py [--steps 20] [--repeats 5] [--tokens 1 2 3 4 8 16]``.
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


def _int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (N, K) as int8 with one bfloat16 scale per output row (symmetric rounding)."""
    scale = w.abs().amax(dim=1).clamp(min=1e-30) / 127
    return torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8), scale.to(torch.bfloat16)


def _weights(model) -> list[torch.Tensor]:
    """The matrices of one decode step, in the order a pass reads them (then the output layer)."""
    out = []
    for lay in model.get_decoder().layers:
        a, f = lay.self_attn, lay.mlp
        out += [a.q_proj.weight, a.k_proj.weight, a.v_proj.weight, a.o_proj.weight,
                f.gate_proj.weight, f.up_proj.weight, f.down_proj.weight]
    return out + [model.get_output_embeddings().weight]


@torch.inference_mode()
def pass_of(model, lean, ids: list[int], T: int, passes: int) -> float:
    """Seconds per lean pass of ``T`` new tokens on the cached ``ids``, output layer included."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    head = model.get_output_embeddings()
    lean(torch.tensor([ids]), None, torch.arange(len(ids))[None], cache)
    x = torch.tensor([(ids * (T // len(ids) + 1))[:T]])  # (T tokens, the context's repeated if longer)
    pos = torch.arange(len(ids), len(ids) + T)[None]
    t0 = time.perf_counter()
    for _ in range(passes):
        lean.linear(lean(x, None, pos, cache)[0], head.weight, head.bias)  # (the output layer by its products)
        cache.crop(-T)  # (transformers 5: a negative count removes that many tokens)
    return (time.perf_counter() - t0) / passes


def _in_groups(weights: list[torch.Tensor]) -> list[tuple]:
    """:func:`_weights` as a pass multiplies them: a layer's (q, k, v), o, (gate, up), down; the output layer."""
    out = []
    for i in range(0, len(weights) - 1, 7):
        q, k, v, o, g, u, d = weights[i:i + 7]
        out += [(q, k, v), (o,), (g, u), (d,)]
    return out + [(weights[-1],)]


@torch.inference_mode()
def products_of(weights, T: int, passes: int, int8=None, linear=F.linear) -> float:
    """Seconds per pass of the products alone on ``T`` rows by ``linear`` (``int8``: the rounded
    weights)."""
    xs = {w.shape[1]: torch.randn(T, w.shape[1]) for w in weights}
    if int8 is not None:
        xs = {k: v.to(torch.bfloat16) for k, v in xs.items()}
    t0 = time.perf_counter()
    for _ in range(passes):
        if int8 is None:
            for ws in _in_groups(weights):  # (the engine's products take a layer's groups at once)
                group = getattr(linear, "group", None)
                if len(ws) == 1 or group is None or group(xs[ws[0].shape[1]], ws) is None:
                    for w in ws:
                        linear(xs[w.shape[1]], w)
        else:
            for w, (q, sc) in zip(weights, int8):
                torch._weight_int8pack_mm(xs[w.shape[1]], q, sc)
    return (time.perf_counter() - t0) / passes


def by_tokens(model, lean, ids: list[int], tokens: list[int], passes: int, repeats: int) -> list[dict]:
    """Rows of the ``--tokens`` table: median ms per pass of each kind, and over one token."""
    weights = _weights(model)
    int8 = [_int8(w) for w in weights] if hasattr(torch, "_weight_int8pack_mm") else None
    kinds = {"lean": lambda T: pass_of(model, lean, ids, T, passes),
             "products": lambda T: products_of(weights, T, passes)}
    if lean.linear is not F.linear:  # (the engine's products are oneDNN's: F.linear's beside them)
        plain = type(lean)(model.get_decoder(), F.linear)
        kinds = {"lean (oneDNN)": kinds["lean"], "lean (F.linear)": lambda T: pass_of(model, plain, ids, T, passes),
                 "products (oneDNN)": lambda T: products_of(weights, T, passes, linear=lean.linear),
                 "products (F.linear)": kinds["products"]}
    if int8 is not None:
        kinds["int8 products"] = lambda T: products_of(weights, T, passes, int8)
    times = {(k, T): [] for k in kinds for T in tokens}
    for f in kinds.values():  # warm-up
        f(tokens[0])
    for r in range(repeats):
        for T in (tokens if r % 2 == 0 else tokens[::-1]):
            for k, f in kinds.items():
                times[(k, T)].append(f(T))
    rows = []
    for k in kinds:
        one = common.median(times[(k, tokens[0])])
        for T in tokens:
            ms = common.median(times[(k, T)])
            rows.append({"kind": k, "tokens": T, "ms": 1000 * ms, "over_first": ms / one})
    return rows


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
    weights = _weights(model)
    times = {"transformers": [], "lean": [], "products": [], "products (engine's)": []}
    same = True
    for _ in range(args.repeats):
        s_hf, tok_hf = decode(model, hf, ids, args.steps)
        s_lean, tok_lean = decode(model, ours, ids, args.steps)
        times["transformers"].append(s_hf)
        times["lean"].append(s_lean)
        times["products"].append(products_of(weights, 1, args.steps))
        times["products (engine's)"].append(products_of(weights, 1, args.steps, linear=lean.linear))
        same &= tok_hf == tok_lean
    med = {k: common.median(v) for k, v in times.items()}
    tokens = by_tokens(model, lean, ids, args.tokens, args.steps, args.repeats) if args.tokens else None
    return {
        "question": "decode step: transformers' decoder vs the lean pass vs the bare matrix products",
        "settings": common.environment(args.threads, steps=args.steps, repeats=args.repeats,
                                       context_tokens=len(ids)),
        "ms_per_step": {k: [1000 * x for x in v] for k, v in times.items()},
        "median_ms_per_step": {k: 1000 * v for k, v in med.items()},
        "ratio_transformers_over_lean": med["transformers"] / med["lean"],
        "same_tokens": same,
        "by_tokens_per_pass": tokens,
    }


def report(res: dict) -> None:
    rows = [{"what": k, "ms": v} for k, v in res["median_ms_per_step"].items()]
    common.print_table(rows, [("what", "decode step", ""), ("ms", "ms (median)", ".1f")])
    print(f"\ntransformers / lean = {res['ratio_transformers_over_lean']:.2f}x; same tokens: {res['same_tokens']} "
          f"(load average {res['settings']['load_average_1min']})")
    if res.get("by_tokens_per_pass"):
        print("\nA pass of T new tokens against a pass of the first T listed:")
        common.print_table(res["by_tokens_per_pass"], [("kind", "pass", ""), ("tokens", "T", "d"),
                                                       ("ms", "ms (median)", ".1f"), ("over_first", "x first", ".2f")])


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=common.THREADS)
    parser.add_argument("--tokens", type=int, nargs="*", default=[],
                        help="also time passes of these many new tokens (e.g. 1 2 3 4 8 16)")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1:
        parser.error("--steps and --repeats must be at least 1")
    if any(t < 1 for t in args.tokens):
        parser.error("--tokens must be at least 1")
    result = main(args)
    report(result)
    common.write_json("lean", result)
